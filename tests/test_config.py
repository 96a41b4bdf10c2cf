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
    path.write_text('[server]\nbind_addr = "127.0.0.1:7000"\n'
                    '[observability]\nlog_level = "warning"\n')
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
        ("[server]\nprocs = " + "9" * 5000 + "\n", "not usable TOML"),
        ('[server]\nmax_concurrent_streams = "--5"\n', "server.max_concurrent_streams = '--5'"),
        ("[[server]]\nprocs = 2\n", "[[server]] in"),
        ("server = 1\n", "is a value at the top level"),
        ("x = 1\n", "x = 1 in"),
    ],
)
def test_a_bad_file_raises_one_line_naming_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path), env={})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["--5", "\u00b2", "1_000", "9" * 5000, "0x10", ""])
def test_an_integer_from_the_environment_is_plain_digits_or_a_config_error(value):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, env={"SIDECAR_PROCS": value})
    assert "env SIDECAR_PROCS" in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize("text", ['"yes"', '"false"', '"off"', "0", "1"])
def test_a_boolean_in_the_file_is_true_or_false_and_nothing_else(tmp_path, text):
    path = tmp_path / "b.toml"
    path.write_text(f"[metering]\nenabled = {text}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path), env={})
    assert "expected true or false" in str(err.value)


@pytest.mark.parametrize("word, value", [("yes", True), ("on", True), ("1", True),
                                         ("TRUE", True), ("no", False), ("off", False),
                                         ("0", False), ("false", False)])
def test_a_boolean_from_the_environment_takes_the_usual_words(word, value):
    assert config.load(None, env={"SIDECAR_METERING": word}).get("metering", "enabled") is value


def test_a_wrong_type_names_the_limits_as_an_operator_writes_them(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[server]\nmax_frame_bytes = "big"\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path), env={})
    assert "expected an integer from 4096 to 16777216 (written without quotes)" in str(
        err.value)


@pytest.mark.parametrize("value", ["a\nb", "a b", "x" * 129, "tab\there"])
def test_a_sidecar_id_is_one_printable_word(value):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, env={"SIDECAR_ID": value})
    assert "metering.sidecar_id" in str(err.value) and "\n" not in str(err.value)


def test_config_show_output_is_toml_that_loads_back_to_the_same_values(tmp_path):
    odd = tmp_path / 'st"ate\\dir\x7f\u00e9'
    cfg = config.load(None, env={"SIDECAR_STATE_DIR": str(odd), "SIDECAR_ID": "node-\u00e9"})
    path = tmp_path / "shown.toml"
    path.write_text(config.render_toml(cfg), encoding="utf-8")
    again = config.load(str(path), env={})
    assert again.as_dict() == cfg.as_dict()


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


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[metering]\n\nsidecar_id = "n\xf6de"\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path), env={})
    message = str(err.value)
    assert message.startswith(f"config file {path} is not valid UTF-8 TOML: ")
    assert "0xf6 on line 3" in message and "\n" not in message


@pytest.mark.parametrize(
    "value, ok",
    [("0.0.0.0:50051", True), ("[::]:50051", True), ("[::1]:1", True),
     ("localhost:50051", True), ("gpu-node-7.example.:65535", True),
     ("1.2.3.4:5000:6", False), ("::1:50051", False), ("[127.0.0.1]:50051", False),
     ("999.1.1.1:50051", False), ("1.2.3:50051", False), ("-node:50051", False),
     ("node_1:50051", False), ("a..b:50051", False), (":50051", False),
     ("127.0.0.1:0", False), ("127.0.0.1:65536", False), ("127.0.0.1", False)],
)
def test_bind_addr_and_upload_target_hosts(value, ok):
    for name in ("SIDECAR_BIND_ADDR", "SIDECAR_UPLOAD_TARGET"):
        if ok:
            config.load(None, env={name: value})
            continue
        with pytest.raises(config.ConfigError) as err:
            config.load(None, env={name: value})
        assert f"= {value!r} (env {name}) is not allowed: expected host:port" in str(err.value)


@pytest.mark.parametrize("value, ok", [("0.0.0.0", True), ("::", True), ("::1", True),
                                       ("localhost", True), ("[::]", False), ("", False),
                                       ("127.0.0.1:9090", False), ("two words", False)])
def test_metrics_host_is_an_ip_address_or_a_host_name(value, ok):
    env = {"SIDECAR_METRICS_HOST": value}
    if ok:
        assert config.load(None, env=env).metrics_host == value
        return
    with pytest.raises(config.ConfigError) as err:
        config.load(None, env=env)
    assert str(err.value).startswith(f"observability.metrics_host = {value!r} ")
    assert "metrics_port" not in str(err.value)


def test_socket_paths_longer_than_107_bytes_are_refused_naming_the_key():
    fits = "/tmp/" + "c" * (107 - len("/tmp/"))
    assert config.load(None, env={"SIDECAR_CONTROL_SOCKET": fits}).control_path == fits
    with pytest.raises(config.ConfigError) as err:
        config.load(None, env={"SIDECAR_CONTROL_SOCKET": fits + "c"})
    assert str(err.value).startswith("server.control_socket = ")
    assert "at most 107 bytes" in str(err.value)

    state_fits = "/tmp/" + "s" * (107 - len("/tmp/") - len("/control.sock"))
    assert len(config.load(None, env={"SIDECAR_STATE_DIR": state_fits}).control_path) == 107
    with pytest.raises(config.ConfigError) as err:
        config.load(None, env={"SIDECAR_STATE_DIR": state_fits + "s"})
    message = str(err.value)
    assert message.startswith(f"metering.state_dir = {state_fits + 's'!r} (env SIDECAR_STATE_DIR)")
    assert "server.control_socket = '' (default)" in message and "108 bytes" in message
    # A short control_socket of its own makes a long state_dir fine.
    cfg = config.load(None, env={"SIDECAR_STATE_DIR": state_fits + "s" * 50,
                                 "SIDECAR_CONTROL_SOCKET": "/tmp/c.sock"})
    assert cfg.control_path == "/tmp/c.sock"


def test_a_prompt_must_fit_in_a_frame_with_room_for_the_rest(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[server]\nmax_frame_bytes = 131072\n")
    assert config.load(str(path), env={"SIDECAR_MAX_PROMPT_BYTES": "65536"}).max_prompt_bytes \
        == 65536
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path), env={"SIDECAR_MAX_PROMPT_BYTES": "65537"})
    assert str(err.value) == (
        f"server.max_prompt_bytes = 65537 (env SIDECAR_MAX_PROMPT_BYTES) and "
        f"server.max_frame_bytes = 131072 (file {path}) are not allowed together: expected "
        "max_prompt_bytes + 65536 <= max_frame_bytes, so that a request with the longest "
        "prompt fits in one frame"
    )


def test_the_grpc_port_and_the_metrics_port_must_differ():
    with pytest.raises(config.ConfigError) as err:
        config.load(None, env={"SIDECAR_BIND_ADDR": "127.0.0.1:9090"})
    assert "server.bind_addr = '127.0.0.1:9090' (env SIDECAR_BIND_ADDR) and " \
        "observability.metrics_port = 9090 (default)" in str(err.value)
    config.load(None, env={"SIDECAR_BIND_ADDR": "127.0.0.1:9090", "SIDECAR_METRICS_PORT": "0"})


def test_command_line_overrides_get_the_same_checks():
    cfg = config.load(None, env={})
    assert cfg.with_overrides(procs=3).procs == 3
    with pytest.raises(config.ConfigError) as err:
        cfg.with_overrides(max_prompt_bytes=1 << 20)
    assert "server.max_prompt_bytes = 1048576 (command line)" in str(err.value)


def test_the_laptop_example_of_the_readme_is_valid_and_stays_on_loopback():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    cfg = config.load(str(root / "examples" / "local.toml"), env={})
    assert cfg.bind_addr.startswith("127.0.0.1:") and cfg.metrics_host == "127.0.0.1"
    assert cfg.upload_target == "127.0.0.1:50052"
    assert not cfg.state_dir.startswith("/")  # under the directory the commands run in
    running_it = (root / "README.md").read_text().split("## Running it", 1)[1]
    assert "cy-sidecar start --procs 4 --config examples/local.toml" in running_it
    assert "cy-sidecar usage-sink --listen 127.0.0.1:50052" in running_it
