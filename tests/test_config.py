"""Configuration: defaults are the seed values, overrides apply, bad values are named."""

from __future__ import annotations

import pytest

from cy_sidecar import config


def test_defaults_are_the_design_seed_values():
    cfg = config.load(None, env={})
    assert cfg.bind_addr == "0.0.0.0:50051"
    assert cfg.worker_uds == "unix:///tmp/cy_worker.sock"
    assert cfg.metrics_port == 9090
    assert cfg.batch_interval_secs == 10
    assert cfg.offline_queue_size == 10000
    assert cfg.check_interval_secs == 5
    assert cfg.reconnect_delay_secs == 2
    assert cfg.max_reconnect_attempts == 5


def test_the_shipped_sidecar_toml_is_valid_and_equals_the_defaults():
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "sidecar.toml"
    assert config.load(str(path), env={}).values == config.load(None, env={}).values


def test_environment_overrides_the_file_and_says_so(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[server]\nbind_addr = "127.0.0.1:7000"\n[observability]\nlog_level = "warning"\n')
    cfg = config.load(str(path), env={"SIDECAR_LOG_LEVEL": "debug"})
    assert cfg.bind_addr == "127.0.0.1:7000"
    assert cfg.sources["server.bind_addr"] == f"file {path}"
    assert cfg.log_level == "debug"
    assert cfg.sources["observability.log_level"] == "env SIDECAR_LOG_LEVEL"
    cfg = config.load(None, env={"SIDECAR_CONFIG": str(path)})
    assert cfg.bind_addr == "127.0.0.1:7000"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[server]\nworker_uds = "/tmp/x.sock"\n', "server.worker_uds = '/tmp/x.sock'"),
        ("[metering]\nbatch_interval_secs = 0\n", "metering.batch_interval_secs = 0.0"),
        ("[health]\nmax_reconnect_attempts = true\n", "health.max_reconnect_attempts = True"),
        ("[server]\nnot_a_key = 1\n", "server.not_a_key"),
        ("[nosuch]\nx = 1\n", "[nosuch]"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_a_bad_file_raises_one_line_naming_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path), env={})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(config.ConfigError) as err:
        config.load(None, env={"SIDECAR_BIND_ADDR": "localhost"})
    assert "env SIDECAR_BIND_ADDR" in str(err.value)
    assert "host:port" in str(err.value)


def test_the_readme_documents_every_setting():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    for s in config.SETTINGS:
        assert f"`{s.section}.{s.key}`" in readme, f"{s.section}.{s.key} is not in README"
