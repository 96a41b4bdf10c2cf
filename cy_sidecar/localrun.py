"""Start the real pieces on loopback: usage sink, demo worker, sidecar.

Used by `cy-sidecar demo`, the benchmark and the tests, so all three exercise the programs
exactly as an operator starts them (separate processes, real sockets, a real state
directory). Each :class:`Proc` reads its child's output on a thread, keeps every line, and
lets callers wait for a line matching a pattern: readiness is a printed line, never a sleep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


class StackError(RuntimeError):
    """A piece did not start or did not print what was expected in time."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all probes stay open until each is chosen)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class Proc:
    """A child process whose stdout and stderr lines are collected as they come."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None,
                 log_path: str | None = None, cwd: str | None = None):
        self.name = name
        self.argv = argv
        self.lines: list[tuple[str, str]] = []  # (stream, line)
        self._cond = threading.Condition()
        self._log = open(log_path, "a", encoding="utf-8") if log_path else None
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=env, text=True, bufsize=1, start_new_session=True, cwd=cwd,
        )
        self.pid = self.popen.pid
        self._threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, "out"), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, "err"), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, pipe, stream: str) -> None:
        for line in pipe:
            line = line.rstrip("\n")
            with self._cond:
                self.lines.append((stream, line))
                if self._log:
                    self._log.write(f"[{self.name} {stream}] {line}\n")
                    self._log.flush()
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20.0, stream: str | None = None,
                 start: int = 0) -> re.Match:
        """Wait until a line (from index `start`) matches `pattern`; returns the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for i in range(seen, len(self.lines)):
                    src, line = self.lines[i]
                    if stream and src != stream:
                        continue
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and not self._alive()):
                    tail = "\n".join(f"  {src}: {line}" for src, line in self.lines[-15:])
                    raise StackError(
                        f"{self.name} (pid {self.pid}) did not print /{pattern}/ within "
                        f"{timeout:.0f} s; exit code {self.popen.poll()}; last lines:\n{tail}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def _alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def json_lines(self, event: str | None = None) -> list[dict]:
        out = []
        with self._cond:
            lines = list(self.lines)
        for src, line in lines:
            if src != "out" or not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if event is None or obj.get("event") == event:
                out.append(obj)
        return out

    def text(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, then SIGKILL the process group if it is still there."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        for thread in self._threads:
            thread.join(2)
        if self._log:
            self._log.close()
            self._log = None
        return self.popen.returncode

    def kill_group(self) -> None:
        """SIGKILL the whole process group at once (every process of the program)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)


def cli(*args: str) -> list[str]:
    # -P: run the installed package even from a checkout, whose cy_sidecar/ folder lacks the
    # process folders that installing maps into it.
    return [sys.executable, "-P", "-m", "cy_sidecar", *args]


@dataclasses.dataclass
class Stack:
    """A usage sink, a demo worker and a sidecar in one temporary directory."""

    root: str
    grpc_port: int
    metrics_port: int
    sink_port: int
    worker_path: str
    config_path: str
    sink: Proc | None = None
    worker: Proc | None = None
    sidecar: Proc | None = None
    log_path: str | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def state_dir(self) -> str:
        return os.path.join(self.root, "state")

    @classmethod
    def create(cls, root: str | None = None, log_path: str | None = None) -> "Stack":
        root = root or tempfile.mkdtemp(prefix="cy-sidecar-")
        grpc_port, metrics_port, sink_port = free_ports(3)
        return cls(
            root=root,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            sink_port=sink_port,
            worker_path=os.path.join(root, "worker.sock"),
            config_path=os.path.join(root, "sidecar.toml"),
            log_path=log_path,
        )

    def write_config(self, **overrides) -> None:
        """Write sidecar.toml for this stack; overrides are 'section.key' -> value."""
        values = {
            "server.bind_addr": f"127.0.0.1:{self.grpc_port}",
            "server.worker_uds": f"unix://{self.worker_path}",
            "server.drain_grace_secs": 10.0,
            "metering.state_dir": self.state_dir,
            "metering.upload_target": f"127.0.0.1:{self.sink_port}",
            "metering.batch_interval_secs": 0.2,
            "health.check_interval_secs": 1.0,
            "health.reconnect_delay_secs": 0.2,
            "observability.metrics_port": self.metrics_port,
            "observability.metrics_host": "127.0.0.1",
        }
        values.update(overrides)
        sections: dict[str, list[str]] = {}
        for name, value in values.items():
            section, key = name.split(".", 1)
            sections.setdefault(section, []).append(f"{key} = {json.dumps(value)}")
        with open(self.config_path, "w", encoding="utf-8") as fh:
            for section, lines in sections.items():
                fh.write(f"[{section}]\n" + "\n".join(lines) + "\n\n")

    def _env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        for name in [k for k in env if k.startswith("SIDECAR_")]:
            del env[name]
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra or {})
        return env

    def start_sink(self, *args: str, timeout: float = 20.0) -> Proc:
        self.sink = Proc(
            "sink", cli("usage-sink", "--listen", f"127.0.0.1:{self.sink_port}", *args),
            env=self._env(), log_path=self.log_path,
        )
        self.sink.wait_for(r'"event": ?"listening"', timeout)
        return self.sink

    def start_worker(self, *args: str, timeout: float = 20.0) -> Proc:
        self.worker = Proc(
            "worker", cli("demo-worker", "--uds", self.worker_path, *args),
            env=self._env(), log_path=self.log_path,
        )
        self.worker.wait_for(r"demo worker listening", timeout)
        return self.worker

    def start_sidecar(self, procs: int = 2, env: dict | None = None, wait: bool = True,
                      timeout: float = 30.0, argv0: list[str] | None = None,
                      cwd: str | None = None) -> Proc:
        """`argv0`: the command that runs cy-sidecar (default: this interpreter)."""
        if not os.path.exists(self.config_path):
            self.write_config()
        args = ["start", "--procs", str(procs), "--config", self.config_path]
        self.sidecar = Proc(
            "sidecar", [*argv0, *args] if argv0 else cli(*args),
            env=self._env(env), log_path=self.log_path, cwd=cwd,
        )
        if wait:
            self.sidecar.wait_for(r"sidecar ready", timeout)
        return self.sidecar

    def stop(self) -> None:
        for proc in (self.sidecar, self.worker, self.sink):
            if proc is not None:
                proc.stop()
