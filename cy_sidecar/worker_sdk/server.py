"""Worker SDK: serve an inference engine to the sidecar's proxy processes over a Unix socket.

An inference engine (the *inference worker*) imports this module, wraps its token generator
in a :class:`WorkerServer`, and serves it; each of the sidecar's *proxy processes* connects
once and multiplexes many streams over its connection. The protocol is written down in
docs/worker-protocol.md; frames are encoded and checked by :mod:`cy_sidecar.wire`. asyncio
only, no gRPC.

Public API::

    Request          what the engine is asked for: stream_id, model, prompt, params (dict with
                     max_new_tokens, temperature, top_p, repetition_penalty filled in), meta
                     (trace_id, tenant, player_id, locale, extra), adapter, priority. The engine
                     may set ``prompt_tokens`` (sent as ``p`` on the first chunk when set by
                     then; always in the final usage) and ``finish_reason`` ("stop"/"length").
    Chunk(text, tokens=1)
                     one piece of output; ``tokens`` is how many tokens it stands for.
    WorkerError(code, message)
                     raised by the engine (or a control handler) to fail one stream with an
                     ``err`` frame of that code: oom, not_found, invalid, overloaded, internal.
    WorkerServer(generate, path, models, name="engine", max_frame_bytes=1 MiB, control=None,
                 state="ready", stamp=False)
        generate(request) -> AsyncIterator[Chunk]   the engine, usually an async generator
        control(cmd, payload) -> dict               optional async handler of ``ctl`` frames
        await start()          bind the socket (a stale socket file is removed; mode 0o660)
        await serve_forever()  start if needed, return once close() has finished
        await close(grace_secs=0.0)
        set_state(state, eta_ms=0, msg="", models=None)  broadcast a ``state`` frame
        announce_exit(code, msg)  about to die (e.g. "oom"): tell every proxy, then exit
        info() -> dict         state, pid, models, open stream count (for a "state" command)

Ownership: the server owns the listening socket and its file, every proxy connection, and
one asyncio task per open stream, which is the only code that advances that stream's engine
iterator. Nothing is retried here: a proxy process that loses its connection reconnects and
re-sends its requests itself.

What is lost on failure: when a connection drops, or a proxy sends a malformed frame (one
log line, then the connection is closed), every stream of that connection is cancelled and
its engine iterator closed; no frame can reach that proxy any more, so output and usage not
yet sent are lost. A ``cancel`` from the proxy closes the iterator and answers with ``end``
reason "cancelled" carrying the usage so far. ``close()`` fails the streams still open after
the grace period with ``err`` code "cancelled"; their usage is what their chunks already
carried (``n`` and ``p``). An exception from the engine fails only its own stream (``err``
internal, or oom for an exception class named ``*OutOfMemory*``).

Flow control: a stream's iterator is advanced only while the stream has credit (one credit
per chunk frame); at zero credit the stream task waits on a future that the next ``credit``
frame resolves, so nothing spins. Frames are not written one syscall each: a connection
collects the frames produced during one event-loop pass and writes them together, and
drains only when the transport reports it is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

from cy_sidecar import wire

log = logging.getLogger("cy_sidecar.worker_sdk")

_STATES = wire.WORKER_STATES
_ENGINE_CODES = ("oom", "not_found", "invalid", "overloaded", "internal")
# Write out collected frames once this many bytes are waiting, without waiting for the end
# of the event-loop pass.
_FLUSH_BYTES = 64 * 1024
# A stream whose engine never suspends yields to the loop after this many chunks so that
# other streams and the reader of its connection are not starved.
_YIELD_EVERY = 64
# How long a cancelled engine iterator may take to close before we give up waiting on it.
_ACLOSE_TIMEOUT_SECS = 5.0
# How long a closing connection may take to flush before it is aborted.
_CLOSE_FLUSH_SECS = 5.0
_PEERCRED = struct.Struct("3i")

_PARAM_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 0,
    "temperature": 1.0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
}
_META_FIELDS = ("trace_id", "tenant", "player_id", "locale")


class WorkerError(Exception):
    """Raised by an engine to fail one stream (or by a control handler to refuse a command).

    ``code`` is one of oom, not_found, invalid, overloaded, internal; anything else is sent
    as internal. ``message`` is human text that reaches the proxy unchanged.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code if code in _ENGINE_CODES else "internal"
        self.message = message


class Chunk(NamedTuple):
    """One piece of generated text; ``tokens`` is how many tokens it stands for (>= 0)."""

    text: str
    tokens: int = 1


class Request:
    """One stream as the engine sees it. The SDK builds it from a ``req`` frame.

    ``params`` always has max_new_tokens (0: the engine's default), temperature, top_p and
    repetition_penalty, type-checked; other keys the proxy sent are kept. ``meta`` always has
    trace_id, tenant, player_id, locale (strings, "" when absent) and extra (str -> str).

    Set by the engine: ``prompt_tokens`` (None until known; sent as ``p`` on the first chunk
    if set before it, and used for the final usage, read after the iterator finished or was
    closed, so an engine may set it in a ``finally`` block) and ``finish_reason`` ("stop" or
    "length"; default "length" when max_new_tokens > 0 was reached, else "stop").
    """

    __slots__ = (
        "stream_id", "model", "prompt", "params", "meta", "adapter", "priority",
        "prompt_tokens", "finish_reason", "_conn",
    )

    def __init__(
        self,
        stream_id: int,
        model: str,
        prompt: str,
        params: dict[str, Any],
        meta: dict[str, Any],
        adapter: str = "",
        priority: int = 0,
        conn: _Connection | None = None,
    ):
        self.stream_id = stream_id
        self.model = model
        self.prompt = prompt
        self.params = params
        self.meta = meta
        self.adapter = adapter
        self.priority = priority
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self._conn = conn

    @property
    def max_new_tokens(self) -> int:
        return self.params["max_new_tokens"]

    @property
    def extra(self) -> dict[str, str]:
        return self.meta["extra"]

    @property
    def max_frame(self) -> int:
        """Largest frame the proxy on this stream's connection accepts (negotiated)."""
        return self._conn.send_max if self._conn else wire.DEFAULT_MAX_FRAME_BYTES

    def flush(self) -> None:
        """Hand every frame queued on this stream's connection to the kernel now.

        Meant for fault injection: an engine about to kill its own process calls it so that
        the chunks it already produced are really on the socket.
        """
        if self._conn is not None:
            self._conn.flush()

    def inject_raw(self, data: bytes) -> None:
        """Write bytes verbatim on this stream's connection, after everything queued.

        Fault injection only (the demo inference worker uses it to send malformed frames):
        the bytes bypass every check, and a proxy will usually reset the connection.
        """
        if self._conn is not None:
            self._conn.write_raw(data)


Generate = Callable[[Request], AsyncIterator[Chunk]]
Control = Callable[[str, dict], Awaitable[dict]]


class _Stream:
    __slots__ = ("sid", "request", "task", "credit", "waiter", "cancel_reason", "tokens",
                 "finished")

    def __init__(self, sid: int, request: Request, credit: int):
        self.sid = sid
        self.request = request
        self.task: asyncio.Task | None = None
        self.credit = credit
        self.waiter: asyncio.Future | None = None
        # None while running; "cancel" (the proxy asked: answer with end "cancelled"),
        # "shutdown" (close(): answer with err "cancelled"), "gone" (connection lost).
        self.cancel_reason: str | None = None
        self.tokens = 0
        self.finished = False

    def cancel(self, reason: str) -> None:
        if self.finished or self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        if self.task is not None:
            self.task.cancel()


def _peer_pid(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return 0
    try:
        pid, _uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except OSError:
        return 0
    return pid


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_params(params: Any) -> tuple[dict[str, Any], str]:
    """Fill in defaults and type-check the known keys; returns (params, problem)."""
    if params is None:
        return dict(_PARAM_DEFAULTS), ""
    out = dict(_PARAM_DEFAULTS)
    out.update(params)
    mnt = out["max_new_tokens"]
    if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 0:
        return out, f"params.max_new_tokens must be an integer >= 0, got {mnt!r:.40}"
    for key in ("temperature", "top_p", "repetition_penalty"):
        if not _number(out[key]) or out[key] < 0:
            return out, f"params.{key} must be a number >= 0, got {out[key]!r:.40}"
    return out, ""


def _check_meta(meta: Any) -> tuple[dict[str, Any], str]:
    out: dict[str, Any] = dict(meta) if meta else {}
    for key in _META_FIELDS:
        value = out.get(key)
        if value is None:
            out[key] = ""
        elif not isinstance(value, str):
            return out, f"meta.{key} must be a string, got {type(value).__name__}"
    extra = out.get("extra")
    if extra is None:
        out["extra"] = {}
    elif not isinstance(extra, dict) or not all(
        isinstance(v, str) for v in extra.values()
    ):
        return out, "meta.extra must map strings to strings"
    return out, ""


class _Connection(asyncio.Protocol):
    """One proxy process's connection: decodes its frames, owns its streams."""

    def __init__(self, server: WorkerServer):
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder = wire.FrameDecoder(wire.FROM_PROXY, server.max_frame_bytes)
        self.send_max = server.max_frame_bytes
        self.peer_pid = 0
        self.ready = False  # hello exchanged
        self.closing = False
        self.streams: dict[int, _Stream] = {}
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self.paused = False
        self._writable: asyncio.Future | None = None
        self._side_tasks: set[asyncio.Task] = set()
        self._handlers = {
            "req": self._on_req,
            "credit": self._on_credit,
            "cancel": self._on_cancel,
            "ping": self._on_ping,
            "pong": self._on_pong,
            "ctl": self._on_ctl,
            "hello": self._on_second_hello,
        }

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.peer_pid = _peer_pid(transport)
        self._server._connections.add(self)
        log.info("proxy_connected peer_pid=%s connections=%d", self.peer_pid,
                 len(self._server._connections))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            frames = self._decoder.feed(data)
        except wire.FrameError as exc:
            for frame in exc.frames:  # the good frames before the bad one still count
                if self.closing:
                    return
                self._dispatch(frame)
            if not self.closing:
                self.violation(f"malformed frame: {exc}")
            return
        for frame in frames:
            if self.closing:
                return
            self._dispatch(frame)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        was_closing = self.closing
        self.closing = True
        self._out.clear()
        self._server._connections.discard(self)
        open_streams = len(self.streams)
        for st in list(self.streams.values()):
            st.cancel("gone")
        for task in self._side_tasks:
            task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not was_closing:
            log.info("proxy_disconnected peer_pid=%s streams_cancelled=%d reason=%s",
                     self.peer_pid, open_streams, exc or "eof")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- writing ---------------------------------------------------------------------------

    def send(self, frame: dict) -> None:
        """Queue one frame; it is written at the end of this loop pass (or sooner if big)."""
        if self.closing:
            return
        data = wire.encode(frame, self.send_max)
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= _FLUSH_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        out = self._out
        if not out or self.closing or self._transport is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        self._transport.write(data)

    def write_raw(self, data: bytes) -> None:
        self.flush()
        if not self.closing and self._transport is not None:
            self._transport.write(data)

    async def wait_writable(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()
        await self._writable

    def close(self) -> None:
        """Flush what is queued, then close; abort if the peer does not take it in time."""
        if self.closing or self._transport is None:
            return
        self.flush()
        self.closing = True
        transport = self._transport
        transport.close()
        self._loop.call_later(_CLOSE_FLUSH_SECS, transport.abort)
        for st in list(self.streams.values()):
            st.cancel("gone")
        for task in self._side_tasks:
            task.cancel()

    def violation(self, reason: str) -> None:
        """The proxy broke the protocol: one log line, an err frame, close, cancel streams."""
        log.warning("proxy_protocol_violation peer_pid=%s reason=%r action=close_connection"
                    " streams_cancelled=%d", self.peer_pid, reason, len(self.streams))
        self.send({"t": "err", "code": "invalid", "msg": reason})
        self.close()

    # -- frames from the proxy ---------------------------------------------------------------

    def _dispatch(self, frame: dict) -> None:
        if not self.ready:
            self._on_hello(frame)
            return
        self._handlers[frame["t"]](frame)

    def _on_hello(self, frame: dict) -> None:
        if frame["t"] != "hello":
            self.violation(f"frame kind t={frame['t']!r} before hello")
            return
        version = frame["v"]
        if version != wire.PROTOCOL_VERSION:
            self.violation(f"unsupported protocol version v={version}; this inference "
                           f"worker speaks v={wire.PROTOCOL_VERSION}")
            return
        if frame["role"] != "proxy":
            self.violation(f"hello role={frame['role']!r}, expected 'proxy'")
            return
        peer_max = frame.get("max_frame")
        if peer_max is not None:
            if peer_max < 1:
                self.violation(f"hello max_frame={peer_max} is not a positive size")
                return
            self.send_max = min(self.send_max, peer_max)
        self.peer_pid = frame["pid"] or self.peer_pid
        self.ready = True
        server = self._server
        self.send({
            "t": "hello",
            "v": wire.PROTOCOL_VERSION,
            "role": "worker",
            "pid": os.getpid(),
            "models": list(server.models),
            "state": server.state,
            "eta_ms": server.eta_remaining_ms(),
            "name": server.name,
            "max_frame": server.max_frame_bytes,
        })
        log.info("proxy_hello peer_pid=%s max_frame=%d", self.peer_pid, self.send_max)

    def _on_second_hello(self, frame: dict) -> None:
        self.violation("second hello on an established connection")

    def _reject(self, sid: int, code: str, msg: str) -> None:
        self.send({"t": "err", "s": sid, "code": code, "msg": msg})

    def _on_req(self, frame: dict) -> None:
        sid = frame["s"]
        if sid in self.streams:
            self.violation(f"req for stream {sid}, which is still open")
            return
        server = self._server
        model = frame["model"]
        if server.state != "ready":
            if server.state == "loading":
                eta = server.eta_remaining_ms()
                self._reject(sid, "overloaded",
                             f"model is loading (about {eta} ms left); retry later")
            else:
                self._reject(sid, "overloaded",
                             "inference worker is draining and takes no new streams")
            return
        if not server.accepts_model(model):
            self._reject(sid, "not_found", f"model {model!r} is not served here; "
                         f"models: {', '.join(server.models) or '(none)'}")
            return
        credit = frame["credit"]
        if credit < 0:
            self._reject(sid, "invalid", f"credit={credit} is negative")
            return
        params, problem = _check_params(frame.get("params"))
        if not problem:
            meta, problem = _check_meta(frame.get("meta"))
        if problem:
            self._reject(sid, "invalid", problem)
            return
        request = Request(sid, model, frame["prompt"], params, meta,
                          frame.get("adapter") or "", frame.get("priority") or 0, self)
        st = _Stream(sid, request, credit)
        self.streams[sid] = st
        server.streams_started += 1
        st.task = self._loop.create_task(self._run(st))
        st.task.add_done_callback(lambda _t, st=st: self._stream_done(st))

    def _on_credit(self, frame: dict) -> None:
        st = self.streams.get(frame["s"])
        if st is None:
            return  # the stream ended meanwhile: a race, not an error
        st.credit += frame["n"]
        waiter = st.waiter
        if waiter is not None and st.credit > 0 and not waiter.done():
            waiter.set_result(None)

    def _on_cancel(self, frame: dict) -> None:
        st = self.streams.get(frame["s"])
        if st is not None:
            st.cancel("cancel")

    def _on_ping(self, frame: dict) -> None:
        self.send({"t": "pong", "id": frame["id"]})

    def _on_pong(self, frame: dict) -> None:
        pass  # this SDK never pings first; a pong is harmless

    def _on_ctl(self, frame: dict) -> None:
        task = self._loop.create_task(self._control(frame))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _control(self, frame: dict) -> None:
        cid, cmd = frame["id"], frame["cmd"]
        handler = self._server.control
        reply: dict[str, Any] = {"t": "ctl_reply", "id": cid, "ok": False}
        if handler is None:
            reply["msg"] = f"this inference worker has no control commands (got {cmd!r})"
        else:
            try:
                result = await handler(cmd, dict(frame.get("payload") or {}))
            except WorkerError as exc:
                reply["msg"] = exc.message
            except Exception as exc:  # a broken handler must not take the connection down
                log.exception("control_failed cmd=%s", cmd)
                reply["msg"] = f"control command {cmd!r} failed: {type(exc).__name__}: {exc}"
            else:
                reply["ok"] = True
                reply["payload"] = {str(k): str(v) for k, v in (result or {}).items()}
        self.send(reply)

    # -- streams -----------------------------------------------------------------------------

    async def _wait_credit(self, st: _Stream) -> None:
        st.waiter = self._loop.create_future()
        try:
            await st.waiter
        finally:
            st.waiter = None

    async def _run(self, st: _Stream) -> None:
        """Advance one engine iterator as credit allows; the stream's only task."""
        req = st.request
        sid = st.sid
        send = self.send
        server = self._server
        stamp = server.stamp
        iterator: AsyncIterator[Chunk] | None = None
        first = True
        since_yield = 0
        try:
            iterator = self._server.generate(req).__aiter__()
            step = iterator.__anext__
            while True:
                if st.credit <= 0:
                    await self._wait_credit(st)
                if self.paused:
                    await self.wait_writable()
                try:
                    chunk = await step()
                except StopAsyncIteration:
                    break
                if st.cancel_reason is not None:
                    raise asyncio.CancelledError  # the engine swallowed our cancel
                text, tokens = chunk
                if type(tokens) is not int or tokens < 0 or type(text) is not str:
                    raise WorkerError("internal", "engine yielded an invalid chunk (text "
                                      f"{type(text).__name__}, tokens {type(tokens).__name__} "
                                      f"{tokens!r:.20}; want str and int >= 0)")
                frame = {"t": "chunk", "s": sid, "text": text, "n": tokens}
                if first:
                    first = False
                    prompt = req.prompt_tokens
                    if type(prompt) is int and prompt >= 0:
                        frame["p"] = prompt
                if stamp:
                    frame["ts"] = time.monotonic_ns()
                try:
                    send(frame)
                except wire.FrameError as exc:
                    raise WorkerError("internal", f"chunk does not fit in a frame: {exc}")
                st.credit -= 1
                st.tokens += tokens
                server.tokens_sent += tokens
                since_yield += 1
                if since_yield >= _YIELD_EVERY:
                    since_yield = 0
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            if st.cancel_reason is None:
                # Not our cancel: the loop is shutting down, or the engine raised it. The
                # stream still gets its terminal frame so the proxy does not wait forever.
                self._finish(st)
                self._reject(sid, "internal", "stream task was cancelled inside the engine")
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._close_iterator(iterator, sid)
            self._finish_cancelled(st)
            return
        except WorkerError as exc:
            await self._close_iterator(iterator, sid)
            self._finish(st)
            self._reject(sid, exc.code, exc.message)
            return
        except Exception as exc:
            await self._close_iterator(iterator, sid)
            self._finish(st)
            code = "oom" if "OutOfMemory" in type(exc).__name__ else "internal"
            log.exception("engine_failed stream=%s model=%s code=%s", sid, req.model, code)
            self._reject(sid, code, f"{type(exc).__name__}: {exc}")
            return
        self._finish(st)
        reason = req.finish_reason
        if reason not in ("stop", "length"):
            limit = req.params["max_new_tokens"]
            reason = "length" if limit and st.tokens >= limit else "stop"
        send({"t": "end", "s": sid, "reason": reason, "usage": self._usage(st)})

    @staticmethod
    def _usage(st: _Stream) -> dict[str, int]:
        prompt = st.request.prompt_tokens
        if type(prompt) is not int or prompt < 0:
            prompt = 0
        return {"prompt_tokens": prompt, "completion_tokens": st.tokens}

    def _finish(self, st: _Stream) -> None:
        st.finished = True
        if self.streams.get(st.sid) is st:
            del self.streams[st.sid]

    def _finish_cancelled(self, st: _Stream) -> None:
        self._finish(st)
        if st.cancel_reason == "cancel":
            self.send({"t": "end", "s": st.sid, "reason": "cancelled",
                       "usage": self._usage(st)})
        elif st.cancel_reason == "shutdown":
            self.send({"t": "err", "s": st.sid, "code": "cancelled",
                       "msg": f"inference worker shutting down; stream stopped after "
                              f"{st.tokens} tokens"})

    def _stream_done(self, st: _Stream) -> None:
        # A task cancelled before its first step never ran _run's handler: answer here.
        if not st.finished and st.task is not None and st.task.cancelled():
            if st.cancel_reason is None:
                self._finish(st)
                self._reject(st.sid, "internal", "stream task was cancelled before it ran")
            else:
                self._finish_cancelled(st)

    @staticmethod
    async def _close_iterator(iterator: Any, sid: int) -> None:
        aclose = getattr(iterator, "aclose", None)
        if aclose is None:
            return
        try:
            await asyncio.wait_for(aclose(), _ACLOSE_TIMEOUT_SECS)
        except asyncio.TimeoutError:
            log.warning("engine_close_slow stream=%s secs=%s", sid, _ACLOSE_TIMEOUT_SECS)
        except Exception:
            log.exception("engine_close_failed stream=%s", sid)


class WorkerServer:
    """Serves one engine on a Unix socket to any number of proxy processes.

    ``models`` lists the model ids accepted; "*" accepts any. ``state`` is the initial state
    (use "loading" and call ``set_state("ready")`` once weights are in). ``stamp`` puts
    ``ts`` = time.monotonic_ns() in every chunk frame, taken when the frame is queued.
    """

    def __init__(
        self,
        generate: Generate,
        path: str,
        models: list[str],
        name: str = "engine",
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
        control: Control | None = None,
        state: str = "ready",
        stamp: bool = False,
    ):
        if state not in _STATES:
            raise ValueError(f"state must be one of {', '.join(_STATES)}, got {state!r}")
        if not 256 <= max_frame_bytes <= wire.HARD_MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be 256..{wire.HARD_MAX_FRAME_BYTES}")
        self.generate = generate
        self.path = path
        self.models = list(models)
        self.name = name
        self.max_frame_bytes = max_frame_bytes
        self.control = control
        self.stamp = stamp
        self.state = state
        self._eta_ms = 0
        self._eta_set = time.monotonic()
        self._msg = ""
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self.tokens_sent = 0  # tokens in every chunk frame written since start
        self.streams_started = 0
        self._inode: tuple[int, int] | None = None
        self._closed = asyncio.Event()
        self._closing = False

    # -- state ---------------------------------------------------------------------------------

    def accepts_model(self, model: str) -> bool:
        return model in self.models or "*" in self.models

    def eta_remaining_ms(self) -> int:
        if not self._eta_ms:
            return 0
        left = self._eta_ms - int((time.monotonic() - self._eta_set) * 1000)
        return max(left, 0)

    def set_state(self, state: str, eta_ms: int = 0, msg: str = "",
                  models: list[str] | None = None) -> None:
        """Change the state (and optionally the model list); tell every connected proxy."""
        if state not in _STATES:
            raise ValueError(f"state must be one of {', '.join(_STATES)}, got {state!r}")
        self.state = state
        self._eta_ms = max(int(eta_ms), 0)
        self._eta_set = time.monotonic()
        self._msg = msg
        if models is not None:
            self.models = list(models)
        frame: dict[str, Any] = {"t": "state", "state": state, "eta_ms": self._eta_ms,
                                 "models": list(self.models)}
        if msg:
            frame["msg"] = msg
        log.info("state state=%s eta_ms=%d msg=%r", state, self._eta_ms, msg)
        for conn in list(self._connections):
            if conn.ready:
                conn.send(frame)

    def announce_exit(self, code: str, msg: str) -> None:
        """Tell every connected proxy that this process is about to die, and why.

        For an engine that knows it cannot go on (``code`` "oom" after CUDA ran out of
        memory, or "internal"): each connection gets a connection-level ``err`` frame, written
        to the socket at once, so every proxy names the death in what its callers receive and
        in the usage records, not only the one whose request hit the error. The caller exits
        right after; the proxies see the connections close.
        """
        if code not in _ENGINE_CODES:
            raise ValueError(f"code must be one of {', '.join(_ENGINE_CODES)}, got {code!r}")
        log.error("exiting code=%s msg=%r connections=%d", code, msg, len(self._connections))
        for conn in list(self._connections):
            if conn.ready:
                conn.send({"t": "err", "code": code, "msg": msg})
                conn.flush()

    def info(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": os.getpid(),
            "models": ",".join(self.models),
            "open_streams": sum(len(c.streams) for c in self._connections),
            "connections": len(self._connections),
            "tokens_sent": self.tokens_sent,
            "streams_started": self.streams_started,
        }

    # -- lifecycle -----------------------------------------------------------------------------

    def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: a leftover of a process that died
        except OSError as exc:
            raise OSError(exc.errno, f"cannot probe existing socket: {exc}", self.path)
        else:
            raise OSError(errno.EADDRINUSE, "another process is listening on it", self.path)
        finally:
            probe.close()
        os.unlink(self.path)
        log.info("stale_socket_removed path=%s", self.path)

    async def start(self) -> None:
        """Bind and listen. Raises OSError (EADDRINUSE when a live process holds the path)."""
        if self._server is not None:
            return
        if self._closing:
            raise RuntimeError("WorkerServer was closed; make a new one")
        self._clear_stale_socket()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), self.path)
        os.chmod(self.path, 0o660)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        log.info("listening path=%s name=%s models=%s state=%s", self.path, self.name,
                 ",".join(self.models), self.state)

    async def serve_forever(self) -> None:
        await self.start()
        await self._closed.wait()

    def _open_streams(self) -> list[_Stream]:
        return [st for conn in self._connections for st in conn.streams.values()]

    async def close(self, grace_secs: float = 0.0) -> None:
        """Stop listening; let streams run up to ``grace_secs``; stop the rest; disconnect.

        Streams still open after the grace period get ``err`` code "cancelled"; their
        engine iterators are closed. The socket file is removed if it is still ours.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        if grace_secs > 0 and self._open_streams():
            if self.state != "draining":
                self.set_state("draining", msg="shutting down")
            deadline = loop.time() + grace_secs
            while self._open_streams() and loop.time() < deadline:
                tasks = [st.task for st in self._open_streams() if st.task]
                await asyncio.wait(tasks, timeout=deadline - loop.time())
        streams = self._open_streams()
        for st in streams:
            st.cancel("shutdown")
        tasks = [st.task for st in streams if st.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=_ACLOSE_TIMEOUT_SECS + 1)
        for conn in list(self._connections):
            conn.close()
        self._remove_socket_file()
        self._closed.set()
        log.info("closed path=%s streams_stopped=%d", self.path, len(streams))

    def _remove_socket_file(self) -> None:
        if self._inode is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None
