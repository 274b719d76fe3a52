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


# -- issue 10, defects 2 and 7: every number checked, every problem listed at once --------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2Gi", 2 * GiB), ("2GiB", 2 * GiB), ("2gib", 2 * GiB), ("512Mi", 512 * MiB), ("64Ki", 64 * 1024),
        ("1Ti", 1 << 40), ("1.5Gi", 3 * GiB // 2), ("2G", 2_000_000_000), ("2GB", 2_000_000_000), ("3k", 3000),
    ],
)
def test_binary_units_with_or_without_the_b_and_decimal_units(text, expected):
    """``Gi`` and ``GiB`` are powers of 1024; ``G`` and ``GB`` powers of 1000."""
    assert parse_size("k", text) == expected


@pytest.mark.parametrize("text", ["1.5", "0.1KiB", "lots", "-1", "99999999999TiB", "1e9", "2 GiBs"])
def test_a_size_is_a_whole_number_of_bytes_in_range(text):
    with pytest.raises(ConfigError) as info:
        parse_size("devices.host_capacity", text)
    assert str(info.value).startswith("devices.host_capacity: ")


@pytest.mark.parametrize(
    "source, key",
    [
        ('[server]\nlisten = "127.0.0.1:99999"\n', "server.listen"),
        ('[server]\nlisten = "[::1]:65536"\n', "server.listen"),
        ('[telemetry]\nmetrics_listen = "127.0.0.1:70000"\n', "telemetry.metrics_listen"),
        ({"KVBROKER_LISTEN": "127.0.0.1:99999"}, "KVBROKER_LISTEN"),
        ({"KVBROKER_METRICS_LISTEN": "0.0.0.0:123456"}, "KVBROKER_METRICS_LISTEN"),
    ],
)
def test_ports_above_65535_are_refused_with_the_key(tmp_path, source, key):
    """A socket API takes the port modulo 65536: 99999 used to serve on 34463."""
    with pytest.raises(ConfigError) as info:
        if isinstance(source, str):
            load_config(path=write(tmp_path, source))
        else:
            load_config(environ=source)
    assert str(info.value).startswith(f"{key}: port ") and "0 to 65535" in str(info.value)


def test_ports_0_and_65535_are_fine():
    config = load_config(overrides={"listen": "127.0.0.1:0", "metrics_listen": "[::1]:65535"})
    assert (config.listen, config.metrics_listen) == ("127.0.0.1:0", "[::1]:65535")
    with pytest.raises(ConfigError, match=r"^--listen: port 99999 is out of range"):
        load_config(overrides={"listen": "127.0.0.1:99999"})


@pytest.mark.parametrize(
    "text, key",
    [
        ("[server]\ngrace_seconds = -1\n", "server.grace_seconds"),
        ("[server]\ngrace_seconds = inf\n", "server.grace_seconds"),
        ("[sessions]\nlease_seconds = nan\n", "sessions.lease_seconds"),
        ("[sessions]\nsegment_idle_seconds = -0.5\n", "sessions.segment_idle_seconds"),
        ("[devices]\ncuda_memory_fraction = 0\n", "devices.cuda_memory_fraction"),
        ("[devices]\ncuda_memory_fraction = 1.5\n", "devices.cuda_memory_fraction"),
        ("[devices]\ncuda_memory_fraction = nan\n", "devices.cuda_memory_fraction"),
        ("[devices]\nhost_capacity = 100\n", "devices.host_capacity"),
        ('[devices]\nhost_capacity = "0.5KiB"\n', "devices.host_capacity"),
        ("[[pools]]\nname = 'a'\npriority = 2147483648\n", "pools[0].priority"),
        ("[[pools]]\nname = 'a'\npriority = -2147483649\n", "pools[0].priority"),
        ("[[pools]]\nname = 'a'\npriority = 1.5\n", "pools[0].priority"),
        ("[[pools]]\nname = 'a'\ngc_threshold = 0\n", "pools[0].gc_threshold"),
        ("[[pools]]\nname = 'a'\ngc_threshold = 1.01\n", "pools[0].gc_threshold"),
        ("[[pools]]\nname = 'a'\ngc_threshold = nan\n", "pools[0].gc_threshold"),
        ("[[pools]]\nname = 'a'\nblock_bytes = 3000\n", "pools[0].block_bytes"),
        ("[[pools]]\nname = 'a'\nblock_bytes = 0\n", "pools[0].block_bytes"),
        ("[[pools]]\nname = 'a'\nblock_bytes = '1MiB'\nsegment_bytes = '64KiB'\n", "pools[0].segment_bytes"),
        ("[[pools]]\nname = 'a'\nmax_bytes = 0\n", "pools[0].max_bytes"),
        ("[[pools]]\nname = 'a'\nmax_bytes = '1MiB'\ndefault_cache_bytes = '2MiB'\n", "pools[0].default_cache_bytes"),
        ("[[pools]]\nname = 'has space'\n", "pools[0].name"),
        ("[[pools]]\nname = 'a'\ndevices = ['host', 'host']\n", "pools[0].devices"),
    ],
)
def test_every_number_is_checked_and_its_key_named(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_config(path=write(tmp_path, text))
    assert [k for k, _ in info.value.problems] == [key], info.value


def test_flags_and_variables_are_checked_too():
    cases = [
        ({"overrides": {"grace_seconds": -1.0}}, "--grace-seconds"),
        ({"overrides": {"lease_seconds": float("inf")}}, "--lease-seconds"),
        ({"overrides": {"segment_idle_seconds": float("nan")}}, "--segment-idle-seconds"),
        ({"overrides": {"host_capacity_bytes": "2 lots"}}, "--host-capacity"),
        ({"overrides": {"device_kind": "tpu"}}, "--devices"),
        ({"environ": {"KVBROKER_GRACE_SECONDS": "-3"}}, "KVBROKER_GRACE_SECONDS"),
        ({"environ": {"KVBROKER_CUDA_MEMORY_FRACTION": "inf"}}, "KVBROKER_CUDA_MEMORY_FRACTION"),
    ]
    for kwargs, key in cases:
        with pytest.raises(ConfigError) as info:
            load_config(**kwargs)
        assert info.value.key == key, (kwargs, str(info.value))
    assert load_config(overrides={"host_capacity_bytes": "2Gi"}).host_capacity_bytes == 2 * GiB


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        '[server]\nlisten = "127.0.0.1:99999"\ngrace_seconds = -1\ncolour = "red"\n'
        '[devices]\nhost_capacity = "2 lots"\n'
        "[[pools]]\nname = 'a'\ngc_threshold = 2.0\nblock_bytes = 3000\neviction_policy = 'fifo'\n"
        "[[pools]]\nname = 'b'\nmin_bytes = '2GiB'\nmax_bytes = '1GiB'\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path=path, environ={"KVBROKER_LEASE_SECONDS": "-1"}, overrides={"metrics_listen": "x:70000"})
    keys = [key for key, _ in info.value.problems]
    assert sorted(keys) == sorted([
        "server.listen", "server.grace_seconds", "server.colour", "devices.host_capacity",
        "pools[0].gc_threshold", "pools[0].block_bytes", "pools[0].eviction_policy", "pools[1].max_bytes",
        "KVBROKER_LEASE_SECONDS", "--metrics-listen",
    ])  # fmt: skip
    lines = str(info.value).splitlines()
    assert len(lines) == len(keys) and all(line.startswith(f"{key}: ") for line, key in zip(lines, keys))


def test_a_pools_key_is_named_once_in_the_operators_form(tmp_path):
    """It read ``pools[0]: pools.b.max_bytes: ...``: the key path twice, in two forms."""
    with pytest.raises(ConfigError) as info:
        load_config(path=write(tmp_path, "[[pools]]\nname = 'b'\nmin_bytes = '2GiB'\nmax_bytes = '1GiB'\n"))
    assert str(info.value) == "pools[0].max_bytes: must be >= min_bytes (2147483648), got 1073741824"


def test_pool_devices_are_resolved_with_every_problem_named_in_the_operators_form(tmp_path):
    from kvbroker.core import DeviceSpec
    from kvbroker.daemon import DevicePlan, pool_specs

    config = load_config(path=write(
        tmp_path,
        "[[pools]]\nname = 'a'\ndevices = ['cuda:3']\n[[pools]]\nname = 'b'\nmin_bytes = '2GiB'\n"
        "[[pools]]\nname = 'c'\ndevices = ['tpu0']\n",
    ))  # fmt: skip
    with pytest.raises(ConfigError) as info:
        pool_specs(config, DevicePlan((DeviceSpec("host", GiB),), {}))
    assert [key for key, _ in info.value.problems] == ["pools[0].devices", "pools[1].min_bytes", "pools[2].devices"]
    assert "pools." + "b" not in str(info.value)
    assert "pools[1].min_bytes: 2 GiB (2147483648 bytes) is more than the pool's devices hold (1 GiB" in str(info.value)


def test_serve_prints_every_problem_and_exits_2(tmp_path, capsys):
    from kvbroker.daemon import main

    path = write(tmp_path, "[server]\nlisten = '127.0.0.1:99999'\n[[pools]]\nname = 'a'\npriority = 9999999999\n")
    assert main(["--config", path, "--grace-seconds", "-1", "--host-capacity", "2Gi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvbroker: 3 configuration errors:\n")
    for key in ("server.listen: port 99999", "pools[0].priority: must be a 32-bit integer", "--grace-seconds: must be"):
        assert f"\n  {key}" in err, err


def test_copy_threads_from_file_environment_and_flag_and_its_bounds(tmp_path) -> None:
    path = tmp_path / "k.toml"
    path.write_text("[devices]\ncopy_threads = 3\n")
    assert load_config(path=str(path)).copy_threads == 3
    assert load_config(path=str(path), environ={"KVBROKER_COPY_THREADS": "5"}).copy_threads == 5
    assert load_config(environ={"KVBROKER_COPY_THREADS": "5"}, overrides={"copy_threads": "2"}).copy_threads == 2
    assert load_config().copy_threads == 0
    with pytest.raises(ConfigError) as caught:
        load_config(overrides={"copy_threads": "65"})
    assert caught.value.key == "--copy-threads" and "0 (automatic) to 64" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"KVBROKER_COPY_THREADS": "many"})
    assert caught.value.key == "KVBROKER_COPY_THREADS"
