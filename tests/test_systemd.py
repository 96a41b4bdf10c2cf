"""The sidecar under systemd: the unit file, and the supervisor's sd_notify conversation.

systemd is played by a datagram socket in the test's directory, passed to the real sidecar
as NOTIFY_SOCKET (with WATCHDOG_USEC). SO_PASSCRED makes the kernel attach the sender's
credentials to every datagram, so each message is recorded with the pid that sent it, as
systemd sees it when it applies NotifyAccess=main.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cy_sidecar import config as config_mod
from cy_sidecar import exitcodes
from cy_sidecar.localrun import cli
from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc
from cy_sidecar.supervisor import arbiter

from helpers import collect, new_channel, request, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "systemd", "cy-sidecar.service")
WATCHDOG_USEC = 1_000_000


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: every datagram with its sender's pid."""

    def __init__(self, path: str, on_message=None):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, int, list[str]]] = []  # (monotonic, pid, lines)
        self.on_message = on_message
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        cred_size = struct.calcsize("iII")
        while not self._closed:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(cred_size))
            except socket.timeout:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:cred_size])[0]
            lines = data.decode().split("\n")
            if self.on_message is not None:
                self.on_message(pid, lines)
            with self._cond:
                self.messages.append((time.monotonic(), pid, lines))
                self._cond.notify_all()

    def sent(self, prefix: str) -> list[tuple[float, int, str]]:
        """(time, pid, line) of every line that starts with `prefix`."""
        with self._cond:
            return [(t, pid, line) for t, pid, lines in self.messages
                    for line in lines if line.startswith(prefix)]

    def wait_for(self, pattern: str, timeout: float = 20.0, after: float = 0.0) -> tuple:
        """The first (time, pid, line) matching `pattern` received after `after`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, pid, lines in self.messages:
                    for line in lines:
                        if t > after and regex.search(line):
                            return t, pid, line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = [lines for _, _, lines in self.messages[-10:]]
                    raise AssertionError(f"no notify line /{pattern}/ in {timeout} s; "
                                         f"last datagrams: {got}")
                self._cond.wait(min(remaining, 0.2))

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


def _notify_env(path: str) -> dict:
    return {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def _tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _child_pids(sidecar, role: str) -> dict[int, int]:
    """index -> pid of the latest `role` child the supervisor reported ready/started."""
    pids = {}
    pattern = re.compile(rf"{role} (?:ready|started) index=(\d+) pid=(\d+)")
    for line in sidecar.text().splitlines():
        match = pattern.search(line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


# -- the unit file ---------------------------------------------------------------------


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    with open(UNIT, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_the_unit_file_states_the_supervisors_contract():
    unit = _unit_settings()
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["KillMode"] == "mixed" and one["Restart"] == "on-failure"
    assert {int(c) for c in one["RestartPreventExitStatus"].split()} == set(exitcodes.FATAL)
    assert one["StateDirectory"] == "cy-sidecar" and one["RuntimeDirectory"] == "cy-sidecar"
    assert one["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "RuntimeDirectoryPreserve"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"

    exec_start = one["ExecStart"].split()
    assert exec_start[1:3] == ["start", "--config"]
    cfg = config_mod.load(os.path.join(ROOT, "systemd", "sidecar.toml"), env={})
    # The example config puts the ledger in the StateDirectory and the worker socket in
    # the RuntimeDirectory (the unit's /tmp is private).
    assert cfg.state_dir == "/var/lib/cy-sidecar"
    assert cfg.worker_path.startswith("/run/cy-sidecar/")
    # systemd must wait for the whole drain before it kills anything.
    assert _seconds(one["TimeoutStopSec"]) > cfg.drain_grace_secs + arbiter.SHUTDOWN_EXTRA_SECS
    # The supervisor replaces a stale proxy itself before systemd's watchdog would fire.
    assert _seconds(one["WatchdogSec"]) > 2 * arbiter.HEARTBEAT_STALE_SECS


def test_the_example_config_for_the_unit_is_valid():
    proc = subprocess.run(cli("config", "check", os.path.join(ROOT, "systemd", "sidecar.toml")),
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("SIDECAR_")})
    assert proc.returncode == 0, proc.stderr
    assert "is valid" in proc.stdout


def test_the_sysctl_snippet_names_settings_this_kernel_has():
    """Every key of systemd/cy-sidecar.sysctl.conf exists under /proc/sys, with a value."""
    keys = {}
    with open(os.path.join(ROOT, "systemd", "cy-sidecar.sysctl.conf")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                key, _, value = line.partition("=")
                keys[key.strip()] = value.strip()
    assert keys == {"net.ipv4.tcp_migrate_req": "1"}
    for key in keys:
        assert os.path.exists("/proc/sys/" + key.replace(".", "/")), key


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing; .ci/run installs it")
        pytest.skip(f"{tool} is not installed (.ci/run installs it: apt-get install systemd)")
    return path


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = _need("systemd-analyze")
    # verify insists that ExecStart= exists and is executable: the same unit, pointed at a
    # placeholder in the test's directory instead of /opt/cy-sidecar/venv/bin/cy-sidecar.
    placeholder = tmp_path / "bin" / "cy-sidecar"
    placeholder.parent.mkdir()
    placeholder.write_text("#!/bin/sh\nexit 0\n")
    placeholder.chmod(0o755)
    text = open(UNIT, encoding="utf-8").read()
    assert text.count("/opt/cy-sidecar/venv/bin/cy-sidecar ") == 1
    unit = tmp_path / "cy-sidecar.service"
    unit.write_text(text.replace("/opt/cy-sidecar/venv/bin/cy-sidecar ", f"{placeholder} "))
    proc = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60)
    # Unknown keys and bad values are only warnings: any output at all is a failure.
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout + proc.stderr)


def test_sysusers_and_tmpfiles_snippets_apply_in_a_scratch_root(tmp_path):
    sysusers = _need("systemd-sysusers")
    tmpfiles = _need("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).write_text("root:x:0:0:root:/root:/bin/sh\n" if name == "passwd"
                                         else "root:x:0:\n" if name == "group" else "")
    conf = os.path.join(ROOT, "systemd", "cy-sidecar.sysusers.conf")
    proc = subprocess.run([sysusers, f"--root={root}", conf], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    passwd = (root / "etc" / "passwd").read_text()
    assert re.search(r"^cy-sidecar:x:\d+:\d+:[^:]*:/var/lib/cy-sidecar:", passwd, re.M), passwd
    assert re.search(r"^cy-sidecar:x:\d+:", (root / "etc" / "group").read_text(), re.M)

    conf = os.path.join(ROOT, "systemd", "cy-sidecar.tmpfiles.conf")
    proc = subprocess.run([tmpfiles, f"--root={root}", "--create", conf], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    made = os.stat(root / "run" / "cy-sidecar")
    assert made.st_mode & 0o7777 == 0o2770


# -- sd_notify ------------------------------------------------------------------------


def test_ready_status_watchdog_reload_and_stop_all_come_from_the_supervisor(stack, tmp_path):
    answered_at_ready: list[bool] = []

    def on_message(pid, lines):
        if "READY=1" in lines and not answered_at_ready:
            answered_at_ready.append(_tcp_answers(stack.grpc_port))

    fake = FakeSystemd(str(tmp_path / "notify.sock"), on_message)
    try:
        sidecar = stack.start_sidecar(procs=2, env=_notify_env(fake.path), wait=False)
        ready_t, ready_pid, _ = fake.wait_for(r"^READY=1$")
        assert ready_pid == sidecar.pid
        assert answered_at_ready == [True]
        with new_channel(stack.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Both proxies had reported ready before READY=1 went out; the meter had too.
        sidecar.wait_for(r"sidecar ready procs=2")
        assert len(_child_pids(sidecar, "proxy")) == 2
        assert sidecar.wait_for(r"meter_ready pid=\d+", timeout=1)

        fake.wait_for(r"^STATUS=2/2 proxies, worker ready, 0 pending$")
        wait_until(lambda: len(fake.sent("WATCHDOG=1")) >= 3, timeout=10,
                   what="three WATCHDOG=1 pings")

        sidecar.signal(signal.SIGHUP)
        reload_t, pid, line = fake.wait_for(r"^RELOADING=1$", after=ready_t)
        assert pid == sidecar.pid
        again_t, pid, _ = fake.wait_for(r"^READY=1$", after=reload_t, timeout=30)
        assert pid == sidecar.pid
        monotonic = [ln for _, _, ln in fake.sent("MONOTONIC_USEC=")]
        assert len(monotonic) == 1 and int(monotonic[0].split("=")[1]) > 0
        # After the reload: two new proxies, both ready, a STATUS saying so, pings again.
        assert len(fake.sent("READY=1")) == 2
        watchdogs = len(fake.sent("WATCHDOG=1"))
        wait_until(lambda: len(fake.sent("WATCHDOG=1")) >= watchdogs + 2, timeout=10,
                   what="WATCHDOG=1 pings after the reload")

        sidecar.signal(signal.SIGTERM)
        stop_t, pid, _ = fake.wait_for(r"^STOPPING=1$", after=again_t)
        assert pid == sidecar.pid
        assert sidecar.popen.wait(30) == 0
        assert not [ln for t, _, ln in fake.sent("WATCHDOG=1") if t > stop_t + 0.2]
        assert {pid for _, pid, _ in fake.messages} == {sidecar.pid}
    finally:
        fake.close()


def test_a_stopped_proxy_withholds_the_watchdog_then_is_replaced_and_serves(stack, tmp_path):
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    stopped = 0
    try:
        sidecar = stack.start_sidecar(procs=2, env=_notify_env(fake.path), wait=False)
        fake.wait_for(r"^READY=1$")
        wait_until(lambda: len(fake.sent("WATCHDOG=1")) >= 2, timeout=10,
                   what="WATCHDOG=1 pings while healthy")
        stopped = _child_pids(sidecar, "proxy")[0]
        mark = len(sidecar.lines)
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()

        sidecar.wait_for(rf"proxy unresponsive index=0 pid={stopped} ", timeout=15, start=mark)
        sidecar.wait_for(r"proxy ready index=0 pid=\d+", timeout=15, start=mark)
        replacement = _child_pids(sidecar, "proxy")[0]
        assert replacement != stopped
        assert not psutil_alive(stopped)
        resumed_t, _, _ = fake.wait_for(r"^WATCHDOG=1$", after=time.monotonic(), timeout=10)

        # While the proxy was silent, no ping went out for longer than its staleness limit
        # (healthy pings are WATCHDOG_USEC / 2 apart), and pings resumed after the restart.
        pings = [t for t, _, _ in fake.sent("WATCHDOG=1")]
        gaps = [(b - a, a) for a, b in zip(pings, pings[1:])]
        longest, gap_start = max(gaps)
        assert longest > 2.0 and stopped_at - 1.0 < gap_start < stopped_at + 5.0, gaps
        assert resumed_t > gap_start + longest - 0.01

        # The replacement serves: reach it on a fresh connection (SO_REUSEPORT spreads
        # them) and run a stream through it.
        def served_by_replacement():
            with new_channel(stack.target) as channel:
                stub = pb_grpc.AiInferenceStub(channel)
                pid = stub.Health(pb.WorkerHealthRequest(), timeout=5).metrics["proxy_pid"]
                if int(pid) != replacement:
                    return None
                return collect(stub.StreamPredict(iter([request(tokens=6)]), timeout=10))

        out = wait_until(served_by_replacement, timeout=15, interval=0.01,
                         what="a connection to the replacement proxy")
        assert out["tokens"] == 6 and out["usage"].status == "finished"
        assert {pid for _, pid, _ in fake.messages} == {sidecar.pid}
    finally:
        if stopped and psutil_alive(stopped):
            os.kill(stopped, signal.SIGCONT)
        fake.close()


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ready_waits_until_the_ledger_is_open(stack, tmp_path):
    # A directory where the SQLite file should be: the state directory is writable (the
    # sidecar starts), the ledger cannot be opened until the directory is gone.
    blocker = os.path.join(stack.state_dir, "ledger.db")
    os.makedirs(blocker)
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    try:
        sidecar = stack.start_sidecar(procs=2, env=_notify_env(fake.path), wait=False)
        waiting_t, pid, line = fake.wait_for(r"^STATUS=waiting for the ledger: .*ledger\.db")
        assert pid == sidecar.pid
        assert len(_child_pids(sidecar, "proxy")) == 2  # the proxies were ready already
        assert not fake.sent("READY=1") and "sidecar ready" not in sidecar.text()

        os.rmdir(blocker)
        ready_t, pid, _ = fake.wait_for(r"^READY=1$", timeout=15)
        assert pid == sidecar.pid and ready_t > waiting_t
        sidecar.wait_for(r"sidecar ready procs=2")
        assert os.path.isfile(blocker)
        fake.wait_for(r"^STATUS=2/2 proxies, worker ready, 0 pending$")
    finally:
        fake.close()
