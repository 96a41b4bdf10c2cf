"""The demo inference worker as a real process, driven by a raw-frame proxy client.

Each worker process is started the way the sidecar starts it and is waited for through its
startup line on stderr; every wait on it is a frame, an EOF or its exit, with a timeout.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from cy_sidecar import wire
from cy_sidecar.worker_sdk.demo import CORPUS, words_for

PY = sys.executable
TIMEOUT = 5.0
FAST = {"demo_tps": "1000000000", "demo_ttft_ms": "0"}  # pacing so quick it never waits
VOCABULARY = {w for sentence in CORPUS for w in sentence.split()}


class DemoProcess:
    """One demo inference worker process; its stderr is read by a thread."""

    def __init__(self, folder: str, **options):
        self.path = os.path.join(folder, f"w{len(os.listdir(folder))}.sock")
        options.setdefault("tokens_per_sec", 2000.0)
        options.setdefault("ttft_ms", 1.0)
        options["uds"] = self.path
        code = ("from cy_sidecar.worker_sdk.demo import DemoOptions, run_demo_worker; "
                f"raise SystemExit(run_demo_worker(DemoOptions(**{options!r})))")
        self.proc = subprocess.Popen([PY, "-c", code], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._startup: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "demo worker listening" in line:
                self._startup.put(line)
        self._startup.put("")  # EOF: the process is gone

    def wait_listening(self) -> str:
        line = self._startup.get(timeout=TIMEOUT)
        assert line, f"demo worker exited: {''.join(self.lines)}"
        return line

    def wait_exit(self) -> int:
        return self.proc.wait(timeout=TIMEOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client:
    """A proxy-side connection speaking raw frames, with a blocking socket."""

    def __init__(self, path: str, max_frame: int = wire.DEFAULT_MAX_FRAME_BYTES):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.decoder = wire.FrameDecoder(wire.FROM_WORKER, max_frame)
        self.pending: list[dict] = []
        self.send({"t": "hello", "v": 1, "role": "proxy", "pid": os.getpid(),
                   "max_frame": max_frame})
        self.hello = self.recv()
        assert self.hello["t"] == "hello" and self.hello["role"] == "worker"

    def send(self, frame: dict) -> None:
        self.sock.sendall(wire.encode(frame))

    def recv(self) -> dict:
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("inference worker closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def recv_until(self, kind: str, sid: int | None = None) -> list[dict]:
        got = []
        while True:
            got.append(self.recv())
            if got[-1]["t"] == kind and (sid is None or got[-1].get("s") == sid):
                return got

    def frames_until_eof(self) -> list[dict]:
        got = []
        try:
            while True:
                got.append(self.recv())
        except (EOFError, ConnectionResetError):
            return got

    def ping(self, ident: int) -> list[dict]:
        self.send({"t": "ping", "id": ident})
        frames = self.recv_until("pong")
        assert frames[-1]["id"] == ident
        return frames[:-1]

    def request(self, sid: int, prompt: str = "Where does the road lead?", credit: int = 1000,
                max_new_tokens: int = 0, model: str = "demo", **extra: str) -> None:
        self.send({"t": "req", "s": sid, "model": model, "prompt": prompt, "credit": credit,
                   "params": {"max_new_tokens": max_new_tokens, "temperature": 0.8,
                              "top_p": 0.95, "repetition_penalty": 1.0},
                   "meta": {"trace_id": f"trace-{sid}", "tenant": "t1", "player_id": "p1",
                            "locale": "en", "extra": extra}})

    def ctl(self, ident: int, cmd: str, **payload: str) -> dict:
        """Send a command, return its reply; other frames stay queued for recv()."""
        self.send({"t": "ctl", "id": ident, "cmd": cmd, "payload": payload})
        frames = self.recv_until("ctl_reply")
        self.pending[0:0] = frames[:-1]
        assert frames[-1]["id"] == ident
        return frames[-1]

    def close(self) -> None:
        self.sock.close()


def chunks(frames: list[dict], sid: int) -> list[dict]:
    return [f for f in frames if f["t"] == "chunk" and f["s"] == sid]


@pytest.fixture(scope="module")
def folder():
    path = tempfile.mkdtemp(prefix="cydemo", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn(folder):
    started: list[DemoProcess] = []

    def start(**options) -> DemoProcess:
        worker = DemoProcess(folder, **options)
        started.append(worker)
        worker.wait_listening()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def shared(folder):
    """One paced demo worker for the tests that do not change its state or kill it."""
    worker = DemoProcess(folder)
    worker.wait_listening()
    yield worker
    worker.stop()


@pytest.fixture
def client(shared):
    conn = Client(shared.path)
    yield conn
    conn.close()


def test_startup_line_and_hello(shared, client):
    line = [ln for ln in shared.lines if "demo worker listening" in ln][0]
    assert f"demo worker listening uds={shared.path} pid={shared.proc.pid}" in line
    hello = client.hello
    assert hello["pid"] == shared.proc.pid and hello["name"] == "demo"
    assert hello["models"] == ["demo"] and hello["state"] == "ready"
    assert hello["v"] == 1 and hello["max_frame"] == wire.DEFAULT_MAX_FRAME_BYTES
    assert oct(os.stat(shared.path).st_mode & 0o777) == oct(0o660)


def test_readable_deterministic_text_and_usage(client):
    prompt = "Tell me about the harbour town"
    client.request(1, prompt=prompt)
    frames = client.recv_until("end", 1)
    got = chunks(frames, 1)
    assert len(got) == 48 and all(c["n"] == 1 for c in got)  # default_tokens
    text = "".join(c["text"] for c in got)
    assert text == " ".join(words_for(prompt, 48))
    assert text[0].isupper() and "." in text
    assert set(text.split()) <= VOCABULARY
    assert got[0]["p"] == 6 and all("p" not in c for c in got[1:])
    assert frames[-1] == {"t": "end", "s": 1, "reason": "stop",
                          "usage": {"prompt_tokens": 6, "completion_tokens": 48}}
    client.request(2, prompt=prompt)
    again = "".join(c["text"] for c in chunks(client.recv_until("end", 2), 2))
    client.request(3, prompt="Something else entirely")
    other = "".join(c["text"] for c in chunks(client.recv_until("end", 3), 3))
    assert again == text and other != text


def test_length_limits(client):
    client.request(1, max_new_tokens=5)
    frames = client.recv_until("end", 1)
    assert len(chunks(frames, 1)) == 5 and frames[-1]["reason"] == "length"
    client.request(2, max_new_tokens=50, demo_tokens="3")
    frames = client.recv_until("end", 2)
    assert len(chunks(frames, 2)) == 3 and frames[-1]["reason"] == "stop"
    client.request(3, demo_tokens="0")
    assert client.recv() == {"t": "end", "s": 3, "reason": "stop",
                             "usage": {"prompt_tokens": 5, "completion_tokens": 0}}


def test_pacing_follows_ttft_and_tokens_per_second(client):
    t0 = time.monotonic()
    client.request(1, demo_tokens="10", demo_tps="100", demo_ttft_ms="50")
    frames = client.recv_until("end", 1)
    # First token after 50 ms, then nine more 10 ms apart: at least 140 ms in all.
    assert time.monotonic() - t0 >= 0.14
    assert len(chunks(frames, 1)) == 10


def test_credit_pauses_and_resumes(client):
    client.request(1, credit=3, demo_tokens="10", **FAST)
    assert [client.recv()["t"] for _ in range(3)] == ["chunk"] * 3
    # Unpaced, the remaining seven would be on the socket before the pong.
    assert client.ping(1) == []
    client.send({"t": "credit", "s": 1, "n": 2})
    assert [client.recv()["t"] for _ in range(2)] == ["chunk"] * 2
    assert client.ping(2) == []
    client.send({"t": "credit", "s": 1, "n": 10})
    frames = client.recv_until("end", 1)
    assert len(chunks(frames, 1)) == 5
    assert frames[-1]["usage"]["completion_tokens"] == 10


def test_cancel_ends_promptly_with_usage_so_far(client):
    client.request(1, demo_tokens="1000", demo_tps="50", demo_ttft_ms="0")
    received = [client.recv() for _ in range(2)]
    t0 = time.monotonic()
    client.send({"t": "cancel", "s": 1})
    frames = client.recv_until("end", 1)
    assert time.monotonic() - t0 < 1.0
    received += frames
    end = received[-1]
    assert end["reason"] == "cancelled"
    assert end["usage"] == {"prompt_tokens": 5,
                            "completion_tokens": len(chunks(received, 1))}
    client.send({"t": "cancel", "s": 1})  # finished already: ignored
    assert client.ping(3) == []


def test_ping_and_unknown_model(client):
    assert client.ping(11) == []
    client.request(1, model="gpt-unknown")
    err = client.recv()
    assert err["t"] == "err" and err["code"] == "not_found" and "gpt-unknown" in err["msg"]


def test_two_concurrent_connections(shared):
    first, second = Client(shared.path), Client(shared.path)
    try:
        first.request(1, demo_tokens="20", demo_tps="1000", demo_ttft_ms="0")
        second.request(1, demo_tokens="20", demo_tps="1000", demo_ttft_ms="0",
                       prompt="another prompt")
        a = first.recv_until("end", 1)
        b = second.recv_until("end", 1)
        assert len(chunks(a, 1)) == len(chunks(b, 1)) == 20
        assert "".join(c["text"] for c in chunks(b, 1)) == " ".join(
            words_for("another prompt", 20))
        reply = first.ctl(1, "state")
        assert reply["ok"] and int(reply["payload"]["connections"]) >= 2
    finally:
        first.close()
        second.close()


def test_fault_oom_and_error(client):
    client.request(1, demo_fault="oom", demo_fault_after="2", **FAST)
    frames = client.recv_until("err", 1)
    assert len(chunks(frames, 1)) == 2
    assert frames[-1]["code"] == "oom" and "CUDA out of memory" in frames[-1]["msg"]
    client.request(2, demo_fault="error", **FAST)
    err = client.recv()
    assert err["t"] == "err" and err["s"] == 2 and err["code"] == "internal"
    client.request(3, demo_fault="unheard-of")
    err = client.recv()
    assert err["code"] == "invalid" and "unheard-of" in err["msg"]
    client.request(4, demo_tokens="many")
    assert "demo_tokens" in client.recv()["msg"]


def test_fault_stall_until_cancelled(client):
    client.request(1, demo_fault="stall", demo_fault_after="3", demo_tokens="10", **FAST)
    assert [client.recv()["t"] for _ in range(3)] == ["chunk"] * 3
    assert client.ping(1) == []  # alive, answering, but the stream produces nothing
    client.send({"t": "cancel", "s": 1})
    end = client.recv()
    assert end["reason"] == "cancelled" and end["usage"]["completion_tokens"] == 3


def test_usage_at_end_only_per_request(client):
    client.request(1, prompt="one two three", demo_usage_at_end_only="1", demo_tokens="4",
                   **FAST)
    frames = client.recv_until("end", 1)
    assert all("p" not in c for c in chunks(frames, 1))
    assert frames[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}
    client.request(2, prompt="one two three", demo_usage_at_end_only="1",
                   demo_fault="stall", demo_fault_after="1", **FAST)
    assert "p" not in client.recv()
    client.send({"t": "cancel", "s": 2})
    assert client.recv()["usage"] == {"prompt_tokens": 3, "completion_tokens": 1}


MALFORMED = {
    "badlen": "frame length 4294967295 outside",
    "oversize": f"frame length {wire.DEFAULT_MAX_FRAME_BYTES + 1} outside",
    "badjson": "is not valid JSON",
    "unknown_kind": "unknown frame kind t='bogus'",
    "not_object": "JSON list, expected an object",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_fault_malformed(shared, kind):
    conn = Client(shared.path)
    try:
        conn.request(1, demo_fault="malformed", demo_malformed=kind, demo_fault_after="2",
                     **FAST)
        seen: list[dict] = []
        with pytest.raises(wire.FrameError) as info:
            while True:
                seen.append(conn.recv())
        assert MALFORMED[kind] in str(info.value)
        # The chunks sent before the fault all arrived: some returned by recv() before
        # the bad bytes were read, the rest decoded in the same read as the bad frame.
        assert len(chunks(seen + info.value.frames, 1)) == 2
    finally:
        conn.close()
    # The worker itself is unharmed.
    check = Client(shared.path)
    assert check.ping(1) == []
    check.close()


def test_fault_malformed_unknown_stream(client):
    client.request(1, demo_fault="malformed", demo_malformed="unknown_stream", **FAST)
    frame = client.recv()
    assert frame["t"] == "chunk" and frame["s"] == wire.MAX_STREAM_ID  # never opened
    client.request(2, demo_fault="malformed", demo_malformed="nonsense")
    err = client.recv()
    assert err["code"] == "invalid" and "nonsense" in err["msg"]


def test_unknown_control_command(client):
    reply = client.ctl(5, "teleport")
    assert reply["ok"] is False and "teleport" in reply["msg"]
    reply = client.ctl(6, "fault", kind="meteor")
    assert reply["ok"] is False and "meteor" in reply["msg"]


def test_fault_crash_kills_the_process(spawn):
    worker = spawn()
    conn = Client(worker.path)
    conn.request(1, demo_fault="crash", demo_fault_after="2", **FAST)
    frames = conn.frames_until_eof()
    assert [f["t"] for f in frames] == ["chunk", "chunk"]
    assert worker.wait_exit() == -signal.SIGKILL


def test_fault_oom_exit_writes_err_then_dies(spawn):
    worker = spawn()
    conn = Client(worker.path)
    other = Client(worker.path)  # another proxy's connection, with no stream of its own
    assert other.ping(1) == []
    conn.request(1, demo_fault="oom_exit", demo_fault_after="1", **FAST)
    frames = conn.frames_until_eof()
    assert [f["t"] for f in frames] == ["chunk", "err", "err"]
    assert frames[1]["code"] == "oom" and frames[1]["s"] == 1
    # Then every connection hears that the process dies of OOM (no stream id).
    assert frames[2]["code"] == "oom" and "s" not in frames[2]
    told = other.frames_until_eof()
    assert [(f["t"], f["code"], "s" in f) for f in told] == [("err", "oom", False)]
    assert worker.wait_exit() == -signal.SIGKILL


def test_ctl_fault_crash(spawn):
    worker = spawn()
    conn = Client(worker.path)
    conn.send({"t": "ctl", "id": 1, "cmd": "fault", "payload": {"kind": "crash"}})
    assert conn.frames_until_eof() == []
    assert worker.wait_exit() == -signal.SIGKILL


def test_slow_start_reports_loading_then_ready(spawn):
    worker = spawn(slow_start_secs=0.4)
    conn = Client(worker.path)
    assert conn.hello["state"] == "loading" and 0 < conn.hello["eta_ms"] <= 400
    conn.request(1)
    err = conn.recv()
    assert err["code"] == "overloaded" and "loading" in err["msg"]
    state = conn.recv_until("state")[-1]
    assert state["state"] == "ready" and state["models"] == ["demo"]
    conn.request(2, demo_tokens="2", **FAST)
    assert conn.recv_until("end", 2)[-1]["reason"] == "stop"
    conn.close()


def test_reload_and_state_commands(spawn):
    worker = spawn()
    conn, other = Client(worker.path), Client(worker.path)
    reply = conn.ctl(1, "state")
    assert reply["ok"] and reply["payload"]["state"] == "ready"
    assert reply["payload"]["pid"] == str(worker.proc.pid)
    assert reply["payload"]["models"] == "demo"
    reply = conn.ctl(2, "reload", secs="0.3")
    assert reply["ok"]
    # Answered at once: the reply came before the reload ended (no "ready" ahead of it).
    assert [f["state"] for f in conn.pending] == ["loading"]
    for c in (conn, other):
        loading = c.recv_until("state")[-1]
        assert loading["state"] == "loading" and loading["eta_ms"] == 300
    conn.request(1)
    assert conn.recv()["code"] == "overloaded"
    for c in (conn, other):
        assert c.recv_until("state")[-1]["state"] == "ready"
    conn.request(2, demo_tokens="1", **FAST)
    assert conn.recv_until("end", 2)[-1]["reason"] == "stop"
    reply = conn.ctl(3, "reload", secs="soon")
    assert reply["ok"] is False
    conn.close()
    other.close()


def test_drain_and_stall_all(spawn):
    worker = spawn()
    conn, other = Client(worker.path), Client(worker.path)
    conn.request(1, credit=1, demo_tokens="5", **FAST)
    assert conn.recv()["t"] == "chunk"
    reply = conn.ctl(1, "fault", kind="stall_all")
    assert reply["ok"]
    conn.send({"t": "credit", "s": 1, "n": 10})
    assert conn.ping(1) == []  # stalled: no chunk, but the loop answers
    other.request(1, demo_tokens="5", **FAST)
    assert other.ping(2) == []  # new streams stall too
    assert int(conn.ctl(2, "state")["payload"]["open_streams"]) == 2
    assert conn.ctl(3, "drain")["ok"]
    for c in (conn, other):
        assert c.recv_until("state")[-1]["state"] == "draining"
    other.request(2)
    assert other.recv()["code"] == "overloaded"
    conn.send({"t": "cancel", "s": 1})
    assert conn.recv() == {"t": "end", "s": 1, "reason": "cancelled",
                           "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    conn.close()
    other.close()


def test_stamp_any_model_and_usage_at_end_only(spawn):
    worker = spawn(stamp=True, models=["*"], usage_at_end_only=True, fast=True)
    conn = Client(worker.path)
    conn.request(1, model="whatever-7b", demo_tokens="6", prompt="a b")
    frames = conn.recv_until("end", 1)
    stamps = [c["ts"] for c in chunks(frames, 1)]
    assert len(stamps) == 6 and stamps == sorted(stamps)
    assert all("p" not in c for c in chunks(frames, 1))
    assert frames[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 6}
    conn.close()


def test_sigterm_closes_cleanly(spawn):
    worker = spawn()
    conn = Client(worker.path)
    conn.request(1, demo_fault="stall", demo_fault_after="1", **FAST)
    assert conn.recv()["t"] == "chunk"
    worker.proc.send_signal(signal.SIGTERM)
    frames = conn.frames_until_eof()
    assert frames[-1]["t"] == "err" and frames[-1]["code"] == "cancelled"
    assert worker.wait_exit() == 0
    assert not os.path.exists(worker.path)


def test_exit_codes_for_a_held_socket_and_a_bad_option(folder):
    held = os.path.join(folder, "held.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(held)
    live.listen(1)
    try:
        code = ("from cy_sidecar.worker_sdk.demo import DemoOptions, run_demo_worker; "
                f"raise SystemExit(run_demo_worker(DemoOptions(uds={held!r})))")
        done = subprocess.run([PY, "-c", code], capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert done.returncode == 69, done.stderr
        assert "another process is listening" in done.stderr
    finally:
        live.close()
    code = ("from cy_sidecar.worker_sdk.demo import DemoOptions, run_demo_worker; "
            "raise SystemExit(run_demo_worker(DemoOptions(uds='/tmp/x.sock', "
            "tokens_per_sec=0)))")
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 78 and "tokens_per_sec" in done.stderr
    assert "bad_option" in done.stderr
