"""The offload tier's configuration: a pool's ``offload`` key and ``[persistence]``
``host_max_bytes``/``disk_max_bytes``, through the file, ``KVBROKER_*`` and flags, with
every problem named under its key."""

from __future__ import annotations

import pytest

from kvbroker.config import ConfigError, load_config

from .test_settings import write


def test_tiers_and_budgets_through_the_layers(tmp_path):
    path = write(tmp_path, """
[persistence]
dir = "/var/lib/kvbroker"
host_max_bytes = "2GiB"
disk_max_bytes = "8GiB"

[[pools]]
name = "both"
offload = ["host", "disk"]

[[pools]]
name = "host"
offload = "host"

[[pools]]
name = "none"
""")
    config = load_config(path=path, environ={"KVBROKER_OFFLOAD_HOST_MAX_BYTES": "3GiB"},
                         overrides={"offload_disk_max_bytes": "16GiB"})  # fmt: skip
    assert [p.offload for p in config.pools] == [("host", "disk"), ("host",), ()]
    assert (config.offload_host_max_bytes, config.offload_disk_max_bytes) == (3 << 30, 16 << 30)


@pytest.mark.parametrize("value, why", [
    ('"tape"', 'must be "host", "disk" or ["host", "disk"]'),
    ("[]", 'must be "host", "disk" or ["host", "disk"]'),
    ("3", 'must be "host", "disk" or ["host", "disk"]'),
    ('["disk", "disk"]', "names a tier twice"),
])  # fmt: skip
def test_a_bad_offload_value_is_named(tmp_path, value, why):
    path = write(tmp_path, f"""
[persistence]
host_max_bytes = "1GiB"

[[pools]]
name = "p"
offload = {value}
""")
    with pytest.raises(ConfigError) as caught:
        load_config(path=path, environ={})
    assert why in dict(caught.value.problems)["pools[0].offload"]


def test_a_tier_without_a_budget_or_a_directory_is_refused(tmp_path):
    path = write(tmp_path, """
[[pools]]
name = "h"
offload = "host"

[[pools]]
name = "d"
offload = "disk"
""")
    with pytest.raises(ConfigError) as caught:
        load_config(path=path, environ={})
    problems = dict(caught.value.problems)
    assert "pools h offload to the host tier" in problems["persistence.host_max_bytes"]
    assert "pools d offload to the disk tier" in problems["persistence.disk_max_bytes"]
    assert "pools d offload to disk: set persistence.dir" in problems["persistence.dir"]
    with pytest.raises(ConfigError) as caught:
        load_config(path=path, environ={"KVBROKER_OFFLOAD_HOST_MAX_BYTES": "a lot"})
    assert "expected a size" in dict(caught.value.problems)["KVBROKER_OFFLOAD_HOST_MAX_BYTES"]
