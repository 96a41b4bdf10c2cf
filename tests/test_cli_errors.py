"""Operator mistakes get one `Error: ...` line and a named exit code, never a traceback.

Every test runs the real `cy-sidecar` command on files and sockets made in its own
temporary directory; addresses are loopback literals only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from cy_sidecar import exitcodes
from cy_sidecar.localrun import Stack, cli, free_ports


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout,
                          env=env or _clean_env(), stdin=subprocess.DEVNULL)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single line on stderr, which must be an `Error: ...` line."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def write_config(path, **values) -> None:
    """A sidecar.toml from 'section.key' -> value (loopback ports chosen free)."""
    grpc_port, metrics_port = free_ports(2)
    settings = {
        "server.bind_addr": f"127.0.0.1:{grpc_port}",
        "observability.metrics_port": metrics_port,
        "observability.metrics_host": "127.0.0.1",
    }
    settings.update(values)
    sections: dict[str, list[str]] = {}
    for name, value in settings.items():
        section, key = name.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {json.dumps(value)}")
    path.write_text("".join(f"[{sec}]\n" + "\n".join(lines) + "\n\n"
                            for sec, lines in sections.items()))


# -- 1. the control socket path: never delete what is not a socket ----------------------


@pytest.mark.parametrize("configured", [True, False], ids=["control_socket", "state_dir"])
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_control_socket_path_that_is_not_a_socket_is_refused_and_left_alone(
    tmp_path, configured, kind
):
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "ledger.db" if configured else state / "control.sock"
    if kind == "file":
        victim.write_bytes(b"SQLite format 3\x00 precious")
    else:
        victim.mkdir()
        (victim / "inside").write_text("keep me")
    values = {"metering.state_dir": str(state)}
    if configured:
        values["server.control_socket"] = str(victim)
    conf = tmp_path / "sidecar.toml"
    write_config(conf, **values)

    proc = run_cli("start", "--config", str(conf))
    assert proc.returncode == exitcodes.CANT_CREATE
    line = error_line(proc)
    assert str(victim) in line and "is not a socket" in line
    assert ("a regular file" if kind == "file" else "a directory") in line
    if kind == "file":
        assert victim.read_bytes() == b"SQLite format 3\x00 precious"
    else:
        assert (victim / "inside").read_text() == "keep me"


def test_a_stale_control_socket_is_removed_and_the_sidecar_starts(tmp_path):
    st = Stack.create(root=str(tmp_path))
    st.write_config()
    os.makedirs(st.state_dir)
    path = os.path.join(st.state_dir, "control.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays; nobody listens on it
    try:
        st.start_worker()
        st.start_sidecar(procs=1)
        proc = run_cli("status", "--json", "--config", st.config_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["supervisor"]["pid"] == st.sidecar.pid
    finally:
        st.stop()
    assert st.sidecar.popen.returncode == 0


def test_a_second_sidecar_on_the_same_control_socket_is_refused(tmp_path):
    st = Stack.create(root=str(tmp_path))
    st.write_config()
    try:
        st.start_worker()
        st.start_sidecar(procs=1)
        other = tmp_path / "other.toml"
        write_config(other, **{"metering.state_dir": st.state_dir})
        proc = run_cli("start", "--config", str(other))
        assert proc.returncode == exitcodes.UNAVAILABLE
        assert "a sidecar is already running" in error_line(proc)
        assert st.sidecar.popen.poll() is None
        assert os.path.exists(os.path.join(st.state_dir, "control.sock"))
    finally:
        st.stop()


# -- 2. a config file that is not UTF-8 ---------------------------------------------------


def test_a_config_file_with_invalid_utf8_is_a_config_error(tmp_path):
    conf = tmp_path / "latin1.toml"
    conf.write_bytes(b'[metering]\nsidecar_id = "n\xf6de-1"\n')
    for args in (("config", "check", str(conf)), ("start", "--config", str(conf))):
        proc = run_cli(*args)
        assert proc.returncode == exitcodes.CONFIG
        line = error_line(proc)
        assert line.startswith(f"Error: config file {conf} is not valid UTF-8 TOML: ")
        assert "line 2" in line


# -- 3. usage export --out to a place that cannot take a file ---------------------------


@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_usage_export_to_an_unwritable_out_path_fails_with_one_line(tmp_path, where):
    conf = tmp_path / "sidecar.toml"
    write_config(conf, **{"metering.state_dir": str(tmp_path / "state")})
    out = tmp_path / "no-such-dir" / "usage.jsonl" if where == "missing directory" else tmp_path
    proc = run_cli("usage", "export", "--out", str(out), "--config", str(conf))
    assert proc.returncode == exitcodes.CANT_CREATE
    line = error_line(proc)
    assert line.startswith(f"Error: --out {out} cannot be written: ")
    if where == "missing directory":
        assert f"the directory {tmp_path / 'no-such-dir'} does not exist" in line
    else:
        assert "is a directory" in line
    assert proc.stdout == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("to", ["--out", "stdout"])
def test_usage_export_to_a_full_disk_fails_with_one_line(tmp_path, to):
    from cy_sidecar.meter_store.ledger import Ledger

    state = tmp_path / "state"
    state.mkdir()
    Ledger(str(state / "ledger.db")).close()  # an empty ledger: the CSV header is written
    conf = tmp_path / "sidecar.toml"
    write_config(conf, **{"metering.state_dir": str(state)})
    args = ["usage", "export", "--format", "csv", "--config", str(conf)]
    if to == "--out":
        proc = run_cli(*args, "--out", "/dev/full")
    else:
        with open("/dev/full", "w") as full:
            proc = subprocess.run(cli(*args), stdout=full, stderr=subprocess.PIPE, text=True,
                                  timeout=60, env=_clean_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == exitcodes.CANT_CREATE
    line = error_line(proc)
    where = "/dev/full" if to == "--out" else "standard output"
    assert f"writing the export to {where} failed: No space left on device" in line


# -- 4. what `config check` passes, `start` accepts: one check for both -----------------


@pytest.mark.parametrize(
    "values, names",
    [
        ({"server.bind_addr": "1.2.3.4:5000:6"}, ["server.bind_addr = '1.2.3.4:5000:6'"]),
        ({"server.bind_addr": "::1:5000"}, ["server.bind_addr"]),
        ({"observability.metrics_host": "127.0.0.1:9090"},
         ["observability.metrics_host = '127.0.0.1:9090'"]),
        ({"observability.metrics_host": "bad host"}, ["observability.metrics_host"]),
        ({"server.control_socket": "/tmp/" + "c" * 110 + ".sock"},
         ["server.control_socket", "107 bytes"]),
        ({"metering.state_dir": "/tmp/" + "s" * 100},
         ["metering.state_dir", "server.control_socket", "107"]),
        ({"server.max_prompt_bytes": 1_000_000},
         ["server.max_prompt_bytes = 1000000", "server.max_frame_bytes = 1048576",
          "max_prompt_bytes + 65536 <= max_frame_bytes"]),
    ],
    ids=["bind-extra-colon", "bind-bare-ipv6", "metrics-host-port", "metrics-host-space",
         "control-socket-long", "state-dir-long", "prompt-vs-frame"],
)
def test_config_check_refuses_what_start_would_refuse(tmp_path, values, names):
    conf = tmp_path / "sidecar.toml"
    values.setdefault("metering.state_dir", str(tmp_path / "state"))
    write_config(conf, **values)
    check = run_cli("config", "check", str(conf))
    start = run_cli("start", "--config", str(conf))
    assert check.returncode == start.returncode == exitcodes.CONFIG
    line = error_line(check)
    assert error_line(start) == line
    for name in names:
        assert name in line
    assert not os.path.exists(tmp_path / "state")  # refused before anything was created


def test_the_same_checks_apply_to_environment_overrides(tmp_path):
    proc = run_cli("config", "check",
                   env=_clean_env(SIDECAR_METRICS_HOST="0.0.0.0:9090"))
    assert proc.returncode == exitcodes.CONFIG
    line = error_line(proc)
    assert "observability.metrics_host = '0.0.0.0:9090' (env SIDECAR_METRICS_HOST)" in line
    assert "metrics_port" not in line


def test_valid_hosts_still_pass(tmp_path):
    for bind, metrics in [("[::1]:50051", "::1"), ("localhost:50051", "localhost"),
                          ("127.0.0.1:50051", "127.0.0.1"), ("[::]:50051", "::")]:
        conf = tmp_path / "ok.toml"
        write_config(conf, **{"server.bind_addr": bind, "observability.metrics_host": metrics})
        proc = run_cli("config", "check", str(conf))
        assert proc.returncode == 0, proc.stderr


# -- 5. a state_dir that is a file ------------------------------------------------------


def test_a_state_dir_that_is_a_file_is_named_as_not_a_directory(tmp_path):
    state = tmp_path / "state"
    state.write_text("not a directory")
    conf = tmp_path / "sidecar.toml"
    write_config(conf, **{"metering.state_dir": str(state)})
    proc = run_cli("start", "--config", str(conf))
    assert proc.returncode == exitcodes.CANT_CREATE
    line = error_line(proc)
    assert f"metering.state_dir {str(state)!r} is not a directory" in line
    assert "File exists" not in line
    assert state.read_text() == "not a directory"


# -- 6. a stop signal while the sidecar starts -------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_startup_stops_cleanly_before_any_child(tmp_path, sig):
    # The state directory's write probe is a FIFO here, so `start` blocks inside prepare()
    # (after its signal handlers are installed) until this test opens the other end.
    state = tmp_path / "state"
    state.mkdir()
    fifo = state / ".write-test"
    os.mkfifo(fifo)
    conf = tmp_path / "sidecar.toml"
    write_config(conf, **{"metering.state_dir": str(state),
                          "server.worker_uds": f"unix://{tmp_path / 'w.sock'}"})
    proc = subprocess.Popen(cli("start", "--config", str(conf)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=_clean_env(), start_new_session=True)
    try:
        _wait_for_handlers(proc.pid)  # it records signals; it cannot pass the FIFO
        os.kill(proc.pid, sig)
        time.sleep(0.3)
        assert proc.poll() is None  # the signal was recorded, not acted on
        assert _read_fifo(str(fifo)) == b"ok"  # unblocks the probe
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, err
    name = signal.Signals(sig).name
    assert f"supervisor stopping signal={name} before starting any child" in err
    assert "supervisor stopped exit_code=0" in err
    assert " started index=" not in err  # no proxy, no meter
    assert not os.path.exists(state / "control.sock")


def test_a_stop_signal_while_the_command_still_reads_its_config_stops_it_cleanly(tmp_path):
    # Earlier still: the config file is a FIFO, so `start` blocks reading it, before the
    # supervisor exists, until this test writes it. The command records the signal from
    # its first lines and the supervisor acts on it.
    fifo = tmp_path / "sidecar.toml"
    os.mkfifo(fifo)
    proc = subprocess.Popen(cli("start", "--config", str(fifo)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=_clean_env(), start_new_session=True)
    try:
        _wait_for_handlers(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        write_config(tmp_path / "real.toml", **{
            "metering.state_dir": str(tmp_path / "state"),
            "server.worker_uds": f"unix://{tmp_path / 'w.sock'}"})
        _write_fifo(str(fifo), (tmp_path / "real.toml").read_bytes(), proc)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "supervisor stopping signal=SIGTERM before starting any child" in err
    assert " started index=" not in err


def _wait_for_handlers(pid: int, timeout: float = 30.0) -> None:
    """Until process `pid` catches SIGQUIT (the last of the supervisor's handlers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        if int(fields["SigCgt"], 16) & (1 << (signal.SIGQUIT - 1)):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not install its signal handlers in {timeout} s")


def _read_fifo(path: str, timeout: float = 30.0) -> bytes:
    """Open the FIFO for reading (the writer blocked in open() goes on), read it to EOF."""
    import select

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                chunk = os.read(fd, 64)
                if not chunk:
                    return data
                data += chunk
        raise AssertionError(f"the writer of {path} did not close it within {timeout} s")
    finally:
        os.close(fd)


def _write_fifo(path: str, data: bytes, proc, timeout: float = 30.0) -> None:
    """Write `data` into the FIFO once `proc` has opened it for reading, then close it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # no reader yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nothing opened {path} to read it") from None
            time.sleep(0.005)
    try:
        os.set_blocking(fd, True)
        os.write(fd, data)
    finally:
        os.close(fd)


# -- 7. reload refused for a config error ------------------------------------------------


def test_reload_after_the_config_file_was_removed_exits_with_the_config_code(tmp_path):
    st = Stack.create(root=str(tmp_path))
    st.write_config()
    try:
        st.start_worker()
        st.start_sidecar(procs=1)
        os.unlink(st.config_path)
        env = _clean_env(SIDECAR_CONTROL_SOCKET=os.path.join(st.state_dir, "control.sock"))
        proc = run_cli("reload", env=env)
        assert proc.returncode == exitcodes.CONFIG
        line = error_line(proc)
        assert "reload refused" in line
        assert f"config file {st.config_path} does not exist" in line
        # The sidecar keeps running on the configuration it has.
        proc = run_cli("status", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert st.sidecar.popen.poll() is None
    finally:
        st.stop()
    assert st.sidecar.popen.returncode == 0


def test_sighup_with_a_bad_value_in_the_file_keeps_the_sidecar_serving(tmp_path):
    st = Stack.create(root=str(tmp_path))
    st.write_config()
    try:
        st.start_worker()
        st.start_sidecar(procs=1)
        st.write_config(**{"health.max_reconnect_attempts": "--5"})  # a string in TOML
        mark = len(st.sidecar.lines)
        st.sidecar.signal(signal.SIGHUP)
        st.sidecar.wait_for(r"reload refused", start=mark)
        assert "Traceback" not in st.sidecar.text()
        assert "health.max_reconnect_attempts = '--5'" in st.sidecar.text()
        env = _clean_env(SIDECAR_CONTROL_SOCKET=os.path.join(st.state_dir, "control.sock"))
        proc = run_cli("status", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert st.sidecar.popen.poll() is None
    finally:
        st.stop()
    assert st.sidecar.popen.returncode == 0
