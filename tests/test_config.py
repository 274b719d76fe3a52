"""Configuration: precedence (defaults < TOML < env < flags) and errors that name the key."""

from __future__ import annotations

import pytest

from kvbroker.config import ConfigError, load_config, parse_size
from kvbroker.core.types import GiB, MiB, Placement


def write(tmp_path, text: str) -> str:
    path = tmp_path / "kvbroker.toml"
    path.write_text(text)
    return str(path)


def test_defaults_serve_one_default_pool_on_localhost():
    config = load_config()
    assert config.listen == "127.0.0.1:50051"
    assert config.unix_socket
    assert [p.name for p in config.pools] == ["default"]
    assert config.device_kind == "auto"


@pytest.mark.parametrize(
    "text, expected",
    [("1073741824", GiB), ("512MiB", 512 * MiB), ("2GiB", 2 * GiB), ("1.5GB", 1_500_000_000), ("64 KiB", 64 * 1024)],
)
def test_sizes_accept_units(text, expected):
    assert parse_size("k", text) == expected


def test_example_config_loads():
    config = load_config(path="deploy/kvbroker.example.toml")
    vista, ocr = config.pools
    assert (vista.name, vista.min_bytes, vista.max_bytes, vista.eviction_policy) == ("vista", 512 * MiB, 1536 * MiB, "adaptive")
    assert (ocr.name, ocr.placement) == ("deepseek-ocr", Placement.ROUND_ROBIN)


def test_file_then_environment_then_flags(tmp_path):
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:6000"\n[devices]\nhost_capacity = "1GiB"\n')
    assert load_config(path=path).listen == "127.0.0.1:6000"
    env = {"KVBROKER_LISTEN": "127.0.0.1:7000", "KVBROKER_HOST_CAPACITY": "2GiB"}
    config = load_config(path=path, environ=env)
    assert (config.listen, config.host_capacity_bytes) == ("127.0.0.1:7000", 2 * GiB)
    config = load_config(path=path, environ=env, overrides={"listen": "127.0.0.1:8000", "shm_dir": None})
    assert config.listen == "127.0.0.1:8000"
    assert config.shm_dir == "/dev/shm"


@pytest.mark.parametrize(
    "text, key",
    [
        ('[server]\nlisten = "nope"\n', "server.listen"),
        ('[server]\nlisen = "127.0.0.1:1"\n', "server.lisen"),
        ('[devices]\nhost_capacity = "lots"\n', "devices.host_capacity"),
        ('[devices]\nkind = "tpu"\n', "devices.kind"),
        ("[[pools]]\ndevices = ['*']\n", "pools[0].name"),
        ("[[pools]]\nname = 'a'\neviction_policy = 'fifo'\n", "pools[0].eviction_policy"),
        ("[[pools]]\nname = 'a'\nplacement = 'random'\n", "pools[0].placement"),
        ("[[pools]]\nname = 'a'\nmin_bytes = -1\n", "pools[0].min_bytes"),
        ("[[pools]]\nname = 'a'\ncolour = 'red'\n", "pools[0].colour"),
        ("[[pools]]\nname = 'a'\n[[pools]]\nname = 'a'\n", "pools[1].name"),
        ("[metrics]\nport = 1\n", "metrics"),
        ("[server\n", "kvbroker.toml"),
    ],
)
def test_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_config(path=write(tmp_path, text))
    assert key in str(info.value)


def test_environment_errors_name_the_variable():
    with pytest.raises(ConfigError, match="KVBROKER_GRACE_SECONDS"):
        load_config(environ={"KVBROKER_GRACE_SECONDS": "soon"})
    with pytest.raises(ConfigError, match="KVBROKER_DEVICES"):
        load_config(environ={"KVBROKER_DEVICES": "gpu"})


def test_missing_file_is_reported():
    with pytest.raises(ConfigError, match="--config"):
        load_config(path="/nonexistent/kvbroker.toml")


def test_session_timing_keys(tmp_path):
    path = write(tmp_path, "[sessions]\nlease_seconds = 2.5\nsegment_idle_seconds = 0\n")
    config = load_config(path=path)
    assert (config.lease_seconds, config.segment_idle_seconds) == (2.5, 0.0)
    assert load_config(environ={"KVBROKER_LEASE_SECONDS": "4"}).lease_seconds == 4.0
    with pytest.raises(ConfigError, match="sessions.lease_seconds"):
        load_config(path=write(tmp_path, "[sessions]\nlease_seconds = 0\n"))
    with pytest.raises(ConfigError, match="KVBROKER_SEGMENT_IDLE_SECONDS"):
        load_config(environ={"KVBROKER_SEGMENT_IDLE_SECONDS": "-1"})


def test_pools_scrub_reused_bytes_unless_told_not_to(tmp_path):
    from kvbroker.core import DeviceSpec
    from kvbroker.daemon import DevicePlan, pool_specs

    config = load_config(path=write(tmp_path, "[[pools]]\nname = 'shared'\n[[pools]]\nname = 'mine'\nscrub = false\n"))
    assert [(p.name, p.scrub) for p in config.pools] == [("shared", True), ("mine", False)]
    specs = pool_specs(config, DevicePlan((DeviceSpec("host", GiB),), {}))
    assert [(p.name, p.scrub) for p in specs] == [("shared", True), ("mine", False)]
    with pytest.raises(ConfigError, match=r"pools\[0\].scrub"):
        load_config(path=write(tmp_path, "[[pools]]\nname = 'a'\nscrub = 'no'\n"))


def test_auth_section_builds_the_policy_and_names_bad_keys(tmp_path):
    good = tmp_path / "auth.toml"
    good.write_text(
        '[[auth.principals]]\nname = "vista"\ntoken_env = "VISTA_TOKEN"\n'
        'pools = { vista = ["allocate", "attach", "release"] }\n'
    )
    config = load_config(path=str(good), environ={"VISTA_TOKEN": "s3cret"})
    assert config.auth.enabled and config.auth.principals[0].name == "vista"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[auth.principals]]\nname = "vista"\nuids = [1]\npools = { vista = ["fly"] }\n')
    with pytest.raises(ConfigError) as err:
        load_config(path=str(bad), environ={})
    assert err.value.key == "auth.principals[0].pools.vista"


def test_tls_files_must_come_in_pairs_and_be_readable(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match=r"--tls-cert: TLS needs both a certificate and a key \(set tls_key too\)"):
        load_config(overrides={"tls_cert": str(cert)})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(overrides={"tls_cert": str(cert), "tls_key": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="mutual TLS needs"):
        load_config(overrides={"tls_client_ca": str(cert)})
