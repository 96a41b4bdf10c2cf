"""The proxy process's connection to the inference worker (the "link").

One link per proxy process: a single Unix-socket connection that multiplexes every open
stream of this process by stream id. The link owns the connection's lifecycle:

* a state machine, ``connecting -> ready | loading -> dead -> connecting ...`` (plus
  ``draining`` when the inference worker says so), driven by the worker's hello and state
  frames, by pings every ``check_interval_secs`` (any frame from the worker counts as an
  answer: a busy worker may answer pings late) and by the connection itself;
* reconnects with exponential backoff from ``reconnect_delay_secs`` for
  ``max_reconnect_attempts`` attempts, then a slow probe every 30 s; while waiting it
  watches the socket path, so a worker that comes back is reconnected within ~100 ms;
* per-stream flow control: a stream starts with ``stream_window`` credit and the consumer
  returns credit as it writes chunks to the Gateway, so at most a window of chunks is ever
  buffered per stream; a worker that sends beyond its credit breaks the protocol.

When the connection is lost every open stream receives a :class:`Lost` event at once, so the
callers see a specific error within milliseconds instead of waiting for a timeout. Whether the
death was an out-of-memory kill is part of that event: the worker said so for the whole
connection (an ``err`` frame code ``oom`` without a stream, sent by the SDK's
``announce_exit``), or the cgroup's ``oom_kill`` counter went up. A stream the worker failed
with ``oom`` says nothing about a later death (it may have lived on).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import time
from typing import Callable

from cy_sidecar import logs, wire

log = logs.get("proxy.link")

CONNECTING, READY, LOADING, DEAD, DRAINING = "connecting", "ready", "loading", "dead", "draining"
SLOW_PROBE_SECS = 30.0
HELLO_TIMEOUT_SECS = 5.0


@dataclasses.dataclass
class Lost:
    """The connection to the inference worker ended while the stream was open."""

    reason: str
    oom: bool


def _cgroup_oom_kills() -> int | None:
    """The oom_kill count of this process's cgroup (v2), or None where it is not readable."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as fh:
            rel = fh.read().strip().split("::", 1)[-1]
        with open(f"/sys/fs/cgroup{rel}/memory.events", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


class Stream:
    """One open stream on the link: a bounded queue of frames for its consumer."""

    __slots__ = (
        "sid", "queue", "waiter", "credit_owed", "window", "received", "link", "ended",
        "tokens", "prompt",
    )

    def __init__(self, link: "WorkerLink", sid: int, window: int):
        self.sid = sid
        self.link = link
        self.window = window
        self.queue: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.credit_owed = 0
        self.received = 0  # chunk frames received minus credit returned: at most window
        self.ended = False
        # What the worker sent on this stream: tokens in all chunk frames, prompt tokens
        # if it said. Kept here, per frame, so that the consumer meters once per message.
        self.tokens = 0
        self.prompt = 0

    def push(self, event) -> None:
        self.queue.append(event)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self):
        """The next frame (dict) or a Lost event; waits while the queue is empty."""
        while not self.queue:
            self.waiter = self.link.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.queue.popleft()

    def consumed(self, frames: int = 1) -> None:
        """The consumer wrote `frames` chunks to the Gateway: return credit in batches."""
        self.credit_owed += frames
        if self.credit_owed * 2 >= self.window and not self.ended:
            self.link.send({"t": "credit", "s": self.sid, "n": self.credit_owed})
            self.received -= self.credit_owed
            self.credit_owed = 0


class _Protocol(asyncio.Protocol):
    def __init__(self, link: "WorkerLink"):
        self.link = link
        self.decoder = wire.FrameDecoder(wire.FROM_WORKER, link.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.closed = link.loop.create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        error = None
        try:
            frames = self.decoder.feed(data)
        except wire.FrameError as exc:
            # Frames that arrived whole before the bad bytes are still the worker's output.
            frames, error = exc.frames, exc
        if frames:
            # Any whole frame proves the worker alive (a busy worker may answer pings late);
            # bytes that never complete a frame do not: a worker stuck mid-frame is reset.
            self.link._last_pong = time.monotonic()
        dispatch = self.link.dispatch
        try:
            for frame in frames:
                if not dispatch(frame):
                    return
        except Exception as exc:  # noqa: BLE001 - a frame must never kill the reader
            log.exception("frame handling failed uds=%s", self.link.path)
            self.link.protocol_error(f"the sidecar could not handle a frame: {exc!r}")
            return
        if error is not None:
            self.link.protocol_error(str(error))

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


class WorkerLink:
    """Connection manager for the inference worker socket. Create inside the running loop."""

    def __init__(
        self,
        path: str,
        *,
        window: int = 64,
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
        check_interval: float = 5.0,
        reconnect_delay: float = 2.0,
        max_attempts: int = 5,
        on_state: Callable[[str, dict], None] | None = None,
        on_frame_error: Callable[[], None] | None = None,
        on_connect_error: Callable[[], None] | None = None,
    ):
        self.path = path
        self.window = window
        self.max_frame_bytes = max_frame_bytes
        self.check_interval = check_interval
        self.reconnect_delay = reconnect_delay
        self.max_attempts = max_attempts
        self.loop = asyncio.get_running_loop()
        self.state = CONNECTING
        self.state_since = time.time()
        self.eta_ms = 0
        self.worker_pid = 0
        self.worker_name = ""
        self.models: list[str] = []
        self.streams: dict[int, Stream] = {}
        self._on_state = on_state
        self._on_frame_error = on_frame_error
        self._on_connect_error = on_connect_error
        self._proto: _Protocol | None = None
        self._next_sid = 1
        self._next_ping = 1
        self._last_pong = time.monotonic()
        self._next_ctl = 1
        self._ctl_waiters: dict[int, asyncio.Future] = {}
        self._state_changed = asyncio.Event()
        self._oom_seen = False  # the worker said it is dying of OOM (connection-level err)
        self._oom_kills_at_connect: int | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.send_max = max_frame_bytes  # lowered to what the worker announces it accepts
        self._out: list[bytes] = []  # encoded frames waiting for the end of this loop pass
        self._first_sid = 1  # first stream id opened on the current connection
        self._cancelled: dict[int, float] = {}  # stream ids we cancelled: late frames ok
        self._reset_reason = ""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._task = self.loop.create_task(self._run(), name="worker-link")

    async def close(self) -> None:
        self._closing = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._proto and self._proto.transport:
            self._proto.transport.close()

    def _set_state(self, state: str, eta_ms: int = 0) -> None:
        if state == self.state and eta_ms == self.eta_ms:
            return
        previous = self.state
        self.state = state
        self.eta_ms = eta_ms
        self.state_since = time.time()
        level = 20 if state in (READY, LOADING, CONNECTING) else 30
        log.log(
            level, "worker state=%s previous=%s worker_pid=%s eta_ms=%s uds=%s",
            state, previous, self.worker_pid, eta_ms, self.path,
        )
        self._state_changed.set()
        self._state_changed = asyncio.Event()
        if self._on_state:
            self._on_state(state, {"eta_ms": eta_ms, "previous": previous})

    async def wait_state_change(self, timeout: float) -> None:
        event = self._state_changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                try:
                    connected = await self._connect_once()
                    if connected:
                        attempt = 0
                        await self._serve_connection()
                        continue
                except Exception:  # noqa: BLE001 - a bug here must not silence the link
                    log.exception("worker link failed uds=%s next=reconnect", self.path)
                    self._fail_streams("the sidecar's worker link failed", oom=False)
                attempt += 1
                if attempt <= self.max_attempts:
                    delay = self.reconnect_delay * (2 ** (attempt - 1))
                else:
                    delay = SLOW_PROBE_SECS
                await self._wait_for_socket(delay)
        finally:
            # Cancelled (shutdown, or anything else): no open stream may wait for frames
            # that will never come.
            proto, self._proto = self._proto, None
            if proto is not None and proto.transport is not None:
                proto.transport.abort()
            self._fail_streams("the sidecar's worker link stopped", oom=False)

    def _fail_streams(self, reason: str, oom: bool) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.ended = True
            stream.push(Lost(reason, oom))

    def _socket_identity(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    async def _wait_for_socket(self, delay: float) -> None:
        """Sleep up to `delay`, but return early when a new socket file appears.

        A replaced socket can get the same inode number and timestamps as the one it
        replaced, so while any socket file exists a connect is also tried every second
        (cheap: a stale socket refuses at once).
        """
        before = self._socket_identity()
        started = time.monotonic()
        deadline = started + delay
        while time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            now = self._socket_identity()
            if now is not None and (now != before or time.monotonic() - started >= 1.0):
                return
            before = now

    async def _connect_once(self) -> bool:
        try:
            _, proto = await self.loop.create_unix_connection(
                lambda: _Protocol(self), self.path
            )
        except (FileNotFoundError, ConnectionRefusedError, OSError) as exc:
            if self.state != DEAD:
                self._set_state(DEAD)
            if self._on_connect_error:
                self._on_connect_error()
            log.debug("worker connect failed uds=%s error=%s", self.path, exc)
            return False
        self._proto = proto
        self._out = []
        self.worker_pid = 0  # unknown until this connection's hello names it
        self._oom_seen = False
        self._oom_kills_at_connect = _cgroup_oom_kills()
        self._first_sid = self._next_sid
        self._cancelled.clear()
        self._reset_reason = ""
        self.send_max = self.max_frame_bytes
        self.send({
            "t": "hello", "v": wire.PROTOCOL_VERSION, "role": "proxy", "pid": os.getpid(),
            "max_frame": self.max_frame_bytes,
        })
        hello = self.loop.create_future()
        self._hello = hello
        # A connect can land in the backlog of a worker that is just dying: its reset
        # must end the handshake at once, not after the hello timeout.
        await asyncio.wait((hello, proto.closed), timeout=HELLO_TIMEOUT_SECS,
                           return_when=asyncio.FIRST_COMPLETED)
        if hello.done():
            frame = hello.result()
        else:
            reason = (
                "the connection closed during the handshake" if proto.closed.done()
                else f"no hello within {HELLO_TIMEOUT_SECS:.0f} s"
            )
            if not self._reset_reason:  # else a bad hello was logged as a protocol error
                log.warning("worker handshake failed uds=%s error=%s next=reconnect",
                            self.path, reason)
            proto.transport.close()
            self._proto = None
            self._set_state(DEAD)
            if self._on_connect_error:
                self._on_connect_error()
            return False
        if frame["role"] != "worker":
            log.error("worker handshake failed uds=%s error=%r next=reconnect", self.path,
                      f"hello from role {frame['role']!r}, expected 'worker'")
            proto.transport.abort()
            self._proto = None
            self._set_state(DEAD)
            return False
        self.send_max = min(self.max_frame_bytes, frame.get("max_frame") or self.send_max)
        self.worker_pid = frame.get("pid", 0)
        self.worker_name = frame.get("name", "")
        self.models = [m for m in frame.get("models") or [] if isinstance(m, str)]
        log.info(
            "worker connected uds=%s worker_pid=%s name=%s models=%s",
            self.path, self.worker_pid, self.worker_name, ",".join(self.models),
        )
        self._set_state(frame.get("state") or READY, frame.get("eta_ms") or 0)
        return True

    async def _serve_connection(self) -> None:
        proto = self._proto
        self._last_pong = time.monotonic()
        pinger = self.loop.create_task(self._ping_loop(proto))
        try:
            await proto.closed
        finally:
            pinger.cancel()
        self._connection_ended()

    async def _ping_loop(self, proto: _Protocol) -> None:
        unanswered = 0
        answered_at = self._last_pong
        while True:
            await asyncio.sleep(self.check_interval)
            if self._last_pong != answered_at:
                answered_at = self._last_pong
                unanswered = 0
            silent = time.monotonic() - self._last_pong
            # Three pings sent and none answered, not just time passed: when this process
            # itself was too busy to run the loop, no ping went out and none is held against
            # the worker.
            if unanswered >= 3 and silent > max(3 * self.check_interval, 2.0):
                log.error(
                    "worker unresponsive uds=%s worker_pid=%s silent_secs=%.1f "
                    "next=reset connection", self.path, self.worker_pid, silent,
                )
                self._reset(
                    f"inference worker pid={self.worker_pid} stopped answering pings for "
                    f"{silent:.0f} s; the sidecar reset the connection"
                )
                return
            self.send({"t": "ping", "id": self._next_ping})
            self._next_ping += 1
            unanswered += 1

    def _connection_ended(self) -> None:
        oom = self._oom_seen
        kills = _cgroup_oom_kills()
        if kills is not None and self._oom_kills_at_connect is not None:
            oom = oom or kills > self._oom_kills_at_connect
        if self._reset_reason:
            reason = self._reset_reason
        else:
            reason = f"inference worker pid={self.worker_pid} " + (
                "ran out of memory" if oom else "closed the connection (crashed or stopped)"
            )
        if not self._closing:
            log.error(
                "worker connection lost uds=%s worker_pid=%s oom=%s open_streams=%s "
                "next=reconnect", self.path, self.worker_pid, oom, len(self.streams),
            )
            if self._on_connect_error:
                self._on_connect_error()
        self._proto = None
        self._set_state(DEAD)
        self._fail_streams(reason, oom)
        for waiter in self._ctl_waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError(reason))
        self._ctl_waiters.clear()

    def _reset(self, reason: str) -> None:
        """Abort the current connection; its streams and waiters end with `reason` when
        the transport reports the loss (see _connection_ended)."""
        self._reset_reason = reason
        proto = self._proto
        if proto and proto.transport:
            proto.transport.abort()

    def protocol_error(self, detail: str) -> None:
        """A malformed frame: reset the connection; its streams fail with INTERNAL."""
        log.error(
            "worker protocol error uds=%s worker_pid=%s error=%r next=reset connection",
            self.path, self.worker_pid, detail,
        )
        if self._on_frame_error:
            self._on_frame_error()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.ended = True
            stream.push({"t": "err", "code": "protocol", "msg": f"bad frame: {detail}"})
        self._reset(f"the sidecar reset the worker connection: {detail}")

    # -- frames ----------------------------------------------------------------------

    def send(self, frame: dict, now: bool = False) -> bool:
        """Queue a frame for the worker; frames of one loop pass go out in one write.

        `now`: write at once (with whatever is queued before it), for frames whose latency
        a caller waits on: a request (time to first token) or a cancel.
        """
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            return False
        data = wire.encode(frame, self.send_max)
        if now:
            out, self._out = self._out, []
            out.append(data)
            proto.transport.write(b"".join(out) if len(out) > 1 else data)
            return True
        if not self._out:
            self.loop.call_soon(self._flush, proto)
        self._out.append(data)
        return True

    def _flush(self, proto: _Protocol) -> None:
        if proto is not self._proto:
            return  # that connection is gone; its unsent frames were dropped with it
        out, self._out = self._out, []
        if out and not proto.transport.is_closing():
            proto.transport.write(b"".join(out))

    def dispatch(self, frame: dict) -> bool:
        """Route one frame from the worker. Returns False when the connection was reset."""
        kind = frame["t"]
        hello = getattr(self, "_hello", None)
        if kind != "hello" and hello is not None and not hello.done():
            self.protocol_error(f"frame kind {kind!r} before the worker's hello")
            return False
        if kind == "chunk":
            stream = self.streams.get(frame["s"])
            if stream is None:
                return self._unknown_stream(frame)
            stream.received += 1
            if stream.received > stream.window:
                self.protocol_error(
                    f"stream {frame['s']} received more chunks than its credit "
                    f"({stream.window})"
                )
                return False
            stream.tokens += frame["n"]
            prompt = frame.get("p")
            if prompt is not None:
                stream.prompt = prompt
            stream.push(frame)
            return True
        if kind in ("end", "err"):
            sid = frame.get("s")
            if sid is None:
                # The worker is done with this connection: the SDK says why just before
                # its process exits. Closing it here keeps a worker that lives on from
                # naming a later loss of a fresh connection after this error.
                code, msg = frame.get("code"), str(frame.get("msg", ""))[:200]
                log.error("worker error code=%s msg=%r worker_pid=%s next=reset connection",
                          code, msg, self.worker_pid)
                if code == "oom":
                    self._oom_seen = True
                self._reset(f"inference worker pid={self.worker_pid} " + (
                    f"ran out of memory: {msg}" if code == "oom"
                    else f"gave up its connection ({code}): {msg}"))
                return False
            stream = self.streams.pop(sid, None)
            if stream is None:
                # An end racing our cancel is normal; anything else is a protocol error.
                return self._unknown_stream(frame)
            stream.ended = True
            stream.push(frame)
            return True
        if kind == "pong":
            self._last_pong = time.monotonic()
            return True
        if kind == "ping":
            self._last_pong = time.monotonic()
            self.send({"t": "pong", "id": frame["id"]})
            return True
        if kind == "state":
            models = frame.get("models")
            if models is not None:
                self.models = [m for m in models if isinstance(m, str)]
            self._set_state(frame["state"], frame.get("eta_ms") or 0)
            return True
        if kind == "ctl_reply":
            waiter = self._ctl_waiters.pop(frame["id"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(frame)
            return True
        if kind == "hello":
            hello = getattr(self, "_hello", None)
            if hello is not None and not hello.done():
                hello.set_result(frame)
                return True
            self.protocol_error("second hello on one connection")
            return False
        self.protocol_error(f"unexpected frame kind {kind!r}")
        return False

    def _unknown_stream(self, frame: dict) -> bool:
        sid = frame.get("s")
        if sid in self._cancelled:
            # A late frame for a stream we cancelled, racing the cancel: drop it.
            return True
        what = "already ended" if self._first_sid <= sid < self._next_sid else "unknown"
        self.protocol_error(f"frame kind={frame['t']!r} for {what} stream id {sid}")
        return False

    # -- streams ---------------------------------------------------------------------

    def open_stream(self, request: dict) -> Stream:
        """Send a request frame; returns the stream whose events the caller consumes."""
        sid = self._next_sid
        self._next_sid += 1
        stream = Stream(self, sid, self.window)
        request["s"] = sid
        request["credit"] = self.window
        self.streams[sid] = stream
        if not self.send(request, now=True):
            del self.streams[sid]
            stream.ended = True
            stream.push(Lost("inference worker is not connected", False))
        return stream

    def cancel_stream(self, stream: Stream) -> None:
        """Tell the worker to stop a stream now. Its final end frame may still arrive."""
        if not stream.ended:
            self.send({"t": "cancel", "s": stream.sid}, now=True)
            cancelled = self._cancelled
            cancelled[stream.sid] = time.monotonic()
            if len(cancelled) > 4096:
                horizon = time.monotonic() - 30.0
                for sid in [k for k, at in cancelled.items() if at < horizon]:
                    del cancelled[sid]

    def forget_stream(self, stream: Stream) -> None:
        """Stop routing frames to a stream; late frames for it are dropped."""
        self.streams.pop(stream.sid, None)
        stream.ended = True

    async def control(self, cmd: str, payload: dict, timeout: float = 10.0) -> dict:
        """Send a control command to the worker and wait for its reply frame."""
        if self.state == DEAD or self._proto is None:
            raise ConnectionError("inference worker is not connected")
        cid = self._next_ctl
        self._next_ctl += 1
        waiter = self.loop.create_future()
        self._ctl_waiters[cid] = waiter
        try:
            # A frame over the limit raises wire.FrameError here, naming its size.
            if not self.send({"t": "ctl", "id": cid, "cmd": cmd, "payload": payload}):
                raise ConnectionError("inference worker is not connected")
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._ctl_waiters.pop(cid, None)
