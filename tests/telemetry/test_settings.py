"""Configuration of telemetry: the metrics address (file, environment, flag) and the
standard OTEL_* variables."""

from __future__ import annotations

import pytest

from kvbroker.config import DEFAULT_METRICS_LISTEN, ConfigError, load_config
from kvbroker.daemon import _parser
from kvbroker.telemetry.otel import OtelSettings


def test_metrics_listen_defaults_and_precedence(tmp_path) -> None:
    assert load_config().metrics_listen == DEFAULT_METRICS_LISTEN == "127.0.0.1:9464"
    path = tmp_path / "k.toml"
    path.write_text('[telemetry]\nmetrics_listen = "127.0.0.1:9500"\n')
    assert load_config(path=str(path)).metrics_listen == "127.0.0.1:9500"
    env = {"KVBROKER_METRICS_LISTEN": "[::1]:9600"}
    assert load_config(path=str(path), environ=env).metrics_listen == "[::1]:9600"
    flags = _parser().parse_args(["--metrics-listen", ""])
    config = load_config(path=str(path), environ=env, overrides={"metrics_listen": flags.metrics_listen})
    assert config.metrics_listen == ""  # '' disables


@pytest.mark.parametrize(
    "source, key",
    [
        ({"path": '[telemetry]\nmetrics_listen = "9464"\n'}, "telemetry.metrics_listen"),
        ({"path": "[telemetry]\nmetrics_listen = 9464\n"}, "telemetry.metrics_listen"),
        ({"path": '[telemetry]\nmetrics_port = "x"\n'}, "telemetry.metrics_port"),
        ({"environ": {"KVBROKER_METRICS_LISTEN": "localhost"}}, "KVBROKER_METRICS_LISTEN"),
        ({"overrides": {"metrics_listen": "nohost:"}}, "--metrics-listen"),
    ],
)
def test_a_bad_metrics_address_names_its_key(tmp_path, source, key) -> None:
    kwargs = dict(source)
    if "path" in kwargs:
        path = tmp_path / "k.toml"
        path.write_text(kwargs.pop("path"))
        kwargs["path"] = str(path)
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    assert str(info.value).startswith(key)


def test_no_otel_variables_means_no_export() -> None:
    assert OtelSettings.from_env({}) == OtelSettings()
    assert not OtelSettings.from_env({"OTEL_SERVICE_NAME": "x"}).enabled


def test_an_endpoint_turns_both_signals_on_over_grpc() -> None:
    s = OtelSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert (s.traces, s.metrics, s.traces_protocol, s.metrics_protocol) == ("otlp", "otlp", "grpc", "grpc")
    assert s.metric_interval_s == 60


def test_per_signal_variables() -> None:
    s = OtelSettings.from_env({
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRICS_EXPORTER": "console",
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",
    })  # fmt: skip
    assert (s.traces, s.metrics, s.traces_protocol, s.metric_interval_s) == ("otlp", "console", "http/protobuf", 5)
    s = OtelSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_TRACES_EXPORTER": "none"})
    assert (s.traces, s.metrics) == (None, "otlp")
    assert not OtelSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}).enabled


@pytest.mark.parametrize(
    "env, key",
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
         "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "OTEL_METRIC_EXPORT_INTERVAL"),
    ],
)  # fmt: skip
def test_unsupported_values_name_the_variable(env, key) -> None:
    with pytest.raises(ValueError, match=key):
        OtelSettings.from_env(env)
