"""``[persistence]`` and the pools' ``persistent`` key through the configuration's
layers (file, ``KVBROKER_*``, flags) and rules."""

from __future__ import annotations

import pytest

from kvbroker.config import ConfigError, load_config
from kvbroker.daemon import main


def write(tmp_path, text: str) -> str:
    path = tmp_path / "kvbroker.toml"
    path.write_text(text)
    return str(path)


def test_the_file_then_the_environment_then_flags(tmp_path):
    path = write(tmp_path, """
[persistence]
dir = "/var/lib/kvbroker"
max_bytes = "8GiB"
checkpoint_interval_seconds = 60

[[pools]]
name = "kept"
persistent = true
""")
    config = load_config(path=path, environ={"KVBROKER_CHECKPOINT_INTERVAL_SECONDS": "30"},
                         overrides={"persistence_dir": "/srv/ckpt"})  # fmt: skip
    assert config.persistence_dir == "/srv/ckpt"
    assert config.persistence_max_bytes == 8 << 30
    assert config.checkpoint_interval_seconds == 30
    assert config.restore_grace_seconds == 60  # the default
    assert config.pools[0].persistent


def test_defaults_keep_nothing():
    config = load_config(environ={})
    assert config.checkpoint_interval_seconds == 300  # the seed's
    assert not any(p.persistent for p in config.pools) and config.persistence_dir == ""


def test_every_problem_is_named(tmp_path):
    path = write(tmp_path, """
[persistence]
max_bytes = "lots"
checkpoint_interval_seconds = -1
restore_grace_seconds = inf
keep = 3

[[pools]]
name = "kept"
persistent = true
""")
    with pytest.raises(ConfigError) as caught:
        load_config(path=path, environ={})
    problems = dict(caught.value.problems)
    assert "expected a size" in problems["persistence.max_bytes"]
    assert "must be a finite number of seconds >= 0" in problems["persistence.checkpoint_interval_seconds"]
    assert "finite" in problems["persistence.restore_grace_seconds"]
    assert "unknown key" in problems["persistence.keep"]
    assert "set persistence.dir" in problems["persistence.dir"]


def test_a_persistent_pool_needs_a_directory_and_a_boolean(tmp_path):
    with pytest.raises(ConfigError, match="pools kept are persistent: set persistence.dir"):
        load_config(path=write(tmp_path, '[[pools]]\nname = "kept"\npersistent = true\n'), environ={})
    with pytest.raises(ConfigError, match=r"pools\[0\].persistent: expected bool"):
        load_config(path=write(tmp_path, '[[pools]]\nname = "kept"\npersistent = "yes"\n'), environ={})


def test_the_daemon_refuses_to_start_and_says_why(tmp_path, capsys):
    path = write(tmp_path, '[[pools]]\nname = "kept"\npersistent = true\n')
    assert main(["--config", path, "--checkpoint-interval-seconds", "-5"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint-interval-seconds: must be a finite number of seconds >= 0" in err
    assert "set persistence.dir" in err
