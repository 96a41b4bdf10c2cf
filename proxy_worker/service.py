"""The Gateway API of one proxy process: AiInference.StreamPredict, Control and Health.

How a stream ends decides its usage record, and the code path that ends it names the status
(never a question to the RPC context afterwards):

=====================  ==============================  =======================
ending                 Gateway receives                 record status
=====================  ==============================  =======================
worker end frame       last message, end_of_stream      finished
client cancels         (nothing: it left)               cancelled
our deadline timer     DEADLINE_EXCEEDED                deadline
write to client fails  (nothing: it left)               gateway_disconnected
worker err frame       status mapped from its code      worker_error/worker_oom
worker connection lost UNAVAILABLE naming the cause     worker_crash/worker_oom
held too long          UNAVAILABLE, still loading       shed
sidecar drain deadline UNAVAILABLE, shutting down       shutdown
=====================  ==============================  =======================

On the two endings where the caller is gone (cancel, failed write) the worker is told to
cancel and the record is settled by a background task that waits, briefly, for the worker's
final ``end`` frame: an engine that reports usage only at the end still gets its prompt
tokens into the record.
"""

from __future__ import annotations

import asyncio
import math
import os
import time

import grpc
import orjson
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from cy_sidecar import logs
from cy_sidecar import metrics as m
from cy_sidecar import wire
from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from . import link as wl
from .metering import MeterFull, RegionMeter, UnmeteredRecord, UsageRecord

log = logs.get("proxy.service")
req_log = logs.get("proxy.request")

SETTLE_TIMEOUT_SECS = 1.0
FIRST_MESSAGE_TIMEOUT_SECS = 10.0
DEADLINE_MARGIN_SECS = 0.05
FRAME_MARGIN_BYTES = 64  # the stream id and credit fields added by the link
RETRY_PUSHBACK_MS = 1000
# Merged chunks stop growing at this many characters (at most 1 MiB of UTF-8), far below
# the 4 MiB a gRPC client accepts by default: a Gateway must never get a message it refuses.
MERGE_MAX_CHARS = 256 * 1024
FIELD_MAX_BYTES = 126
SERVICE_NAME = "cy.llm.AiInference"

# A status message carries text from the worker or the caller; gRPC refuses trailers past
# its metadata limit (the caller would get RESOURCE_EXHAUSTED and no usage trailers).
MAX_DETAIL_CHARS = 1000
MAX_COMMAND_CHARS = 128


def _clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text`, cut to `limit` characters with a note of how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters in all)"


_ERR_STATUS = {
    "oom": (grpc.StatusCode.RESOURCE_EXHAUSTED, "worker_oom"),
    "not_found": (grpc.StatusCode.NOT_FOUND, "worker_error"),
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "worker_error"),
    "overloaded": (grpc.StatusCode.RESOURCE_EXHAUSTED, "worker_error"),
    "internal": (grpc.StatusCode.INTERNAL, "worker_error"),
    # The worker stopped the stream itself (it is shutting down): not the caller's cancel,
    # and worth retrying elsewhere.
    "cancelled": (grpc.StatusCode.UNAVAILABLE, "worker_error"),
    "protocol": (grpc.StatusCode.INTERNAL, "worker_error"),
}
_ERR_HINT = {
    "oom": "the inference worker ran out of memory; retry later or with a shorter request",
    "not_found": "the inference worker does not serve this model",
    "invalid": "the inference worker rejected the request",
    "overloaded": "the inference worker is overloaded; retry after the pushback delay",
    "internal": "the inference worker failed on this request",
    "cancelled": "the inference worker stopped this stream; retry after the pushback delay",
    "protocol": "the inference worker sent a malformed frame; the sidecar reset the "
    "connection",
}


class _Shutdown:
    """Pushed into open streams when the drain deadline of the sidecar has come."""


SHUTDOWN = _Shutdown()


def _usage_trailers(rec: UsageRecord, status: str = "") -> tuple[tuple[str, str], ...]:
    return (
        ("cy-usage-record-id", rec.record_id),
        ("cy-usage-prompt-tokens", str(rec.prompt)),
        ("cy-usage-generated-tokens", str(rec.generated)),
        ("cy-usage-delivered-tokens", str(rec.delivered)),
        ("cy-usage-status", rec.status or status),
    )


def _usage_message(rec: UsageRecord) -> pb.Usage:
    return pb.Usage(
        record_id=rec.record_id, prompt_tokens=rec.prompt, generated_tokens=rec.generated,
        delivered_tokens=rec.delivered, status=rec.status or "",
        finish_reason=rec.finish_reason,
    )


def validate(req: pb.StreamPredictRequest, max_prompt_bytes: int) -> str | None:
    """What is wrong with a request, or None. Checked before anything reaches the worker."""
    if not req.model_id:
        return "model_id is required"
    if len(req.model_id.encode()) > FIELD_MAX_BYTES:
        return f"model_id is longer than {FIELD_MAX_BYTES} bytes"
    if not req.prompt:
        return "prompt is empty"
    size = len(req.prompt.encode())
    if size > max_prompt_bytes:
        return f"prompt is {size} bytes, over the limit of {max_prompt_bytes} bytes"
    g = req.generation
    checks = (
        ("generation.temperature", g.temperature, 0.0, 10.0),
        ("generation.top_p", g.top_p, 0.0, 1.0),
        ("generation.repetition_penalty", g.repetition_penalty, 0.0, 10.0),
    )
    for name, value, lo, hi in checks:
        if math.isnan(value) or not lo <= value <= hi:
            return f"{name} = {value!r} is out of range {lo:g}..{hi:g}"
    if g.max_new_tokens > 1_000_000:
        return f"generation.max_new_tokens = {g.max_new_tokens} is over 1000000"
    md = req.metadata
    for name, value in (("metadata.tenant", md.tenant), ("metadata.trace_id", md.trace_id)):
        if len(value.encode()) > FIELD_MAX_BYTES:
            return f"{name} is longer than {FIELD_MAX_BYTES} bytes"
    return None


def _request_frame(req: pb.StreamPredictRequest) -> dict:
    g, md = req.generation, req.metadata
    # proto3 cannot tell a field left unset from 0. top_p and repetition_penalty of 0 mean
    # nothing to an engine, so 0 is "unset" and the key is left out (the engine's default,
    # 1.0); max_new_tokens 0 already means the engine's default, and temperature 0 is
    # greedy decoding, so both are passed as they are.
    params: dict = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature}
    if g.top_p:
        params["top_p"] = g.top_p
    if g.repetition_penalty:
        params["repetition_penalty"] = g.repetition_penalty
    return {
        "t": "req",
        "model": req.model_id,
        "prompt": req.prompt,
        "adapter": req.adapter,
        "priority": req.priority,
        "params": params,
        "meta": {
            "trace_id": md.trace_id,
            "tenant": md.tenant,
            "player_id": md.player_id,
            "locale": md.locale,
            "extra": dict(md.extra),
            "worker_hint": req.worker_hint,
        },
    }


class ProxyService(pb_grpc.AiInferenceServicer):
    """Servicer state of one proxy process (single asyncio loop, no locks needed)."""

    def __init__(self, cfg, link: wl.WorkerLink, meter: RegionMeter, health):
        self.cfg = cfg
        self.link = link
        self.meter = meter
        self.health = health
        self.metering = cfg.get("metering", "enabled")
        self.merge_chunks = cfg.merge_chunks
        self.max_streams = cfg.max_concurrent_streams
        self.max_prompt = cfg.max_prompt_bytes
        self.grace = cfg.reload_grace_secs
        self.open_streams = 0
        self.opening = 0  # streams waiting for their first message
        self.draining = False
        self.active: set[wl.Stream] = set()
        self.settling: set[asyncio.Task] = set()
        self.planned_restart_until = 0.0
        self.requests_total = 0
        self.last_call_at = 0.0  # monotonic time the latest StreamPredict arrived

    # -- worker state -----------------------------------------------------------------

    def on_link_state(self, state: str, info: dict) -> None:
        """Called by the link on every state change: health, metrics, restart planning."""
        previous = info.get("previous")
        if state == wl.DEAD and previous in (wl.DRAINING, wl.LOADING):
            # The worker announced a restart: hold requests for the grace period.
            self.planned_restart_until = time.monotonic() + self.grace
        elif state == wl.READY:
            self.planned_restart_until = 0.0
        self.meter.meter.set_worker_info(
            self.meter.region, state, self.link.worker_pid, ",".join(self.link.models)
        )
        for s in (wl.CONNECTING, wl.READY, wl.LOADING, wl.DEAD, wl.DRAINING):
            m.WORKER_STATE.labels(s).set(1 if s == state else 0)
        m.worker_connection_status().set(1 if state == wl.READY else 0)
        asyncio.ensure_future(self._set_health(state == wl.READY and not self.draining))

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def _holding(self) -> bool:
        state = self.link.state
        if state in (wl.LOADING, wl.CONNECTING, wl.DRAINING):
            return True
        return state == wl.DEAD and time.monotonic() < self.planned_restart_until

    # -- StreamPredict ----------------------------------------------------------------

    async def StreamPredict(self, request_iterator, context):
        # A stream waiting for its first message holds a place under the limit too, and
        # waits a bounded time: silent callers cannot pile up.
        self.last_call_at = time.monotonic()
        if self.open_streams + self.opening >= self.max_streams:
            await self._refuse_over_limit(context)
        self.opening += 1
        try:
            req = await self._first_message(context)
        finally:
            self.opening -= 1
        problem = validate(req, self.max_prompt)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        frame = _request_frame(req)
        size = len(orjson.dumps(frame)) + FRAME_MARGIN_BYTES
        if size > self.link.send_max:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is {size} bytes as a worker frame (JSON escapes included), "
                f"over the {self.link.send_max}-byte frame limit (server.max_frame_bytes, "
                "or less if the inference worker accepts less)",
            )
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "sidecar is shutting down; retry on another connection",
                trailing_metadata=(("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),),
            )
        if self.open_streams >= self.max_streams:
            await self._refuse_over_limit(context)
        if self.link.state == wl.DEAD and not self._holding():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"inference worker is down (not connected at {self.link.path}); the "
                "sidecar is reconnecting, retry after the pushback delay",
                trailing_metadata=(("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),),
            )
        md = req.metadata
        try:
            rec = (
                self.meter.open(req.model_id, md.tenant, md.trace_id)
                if self.metering else UnmeteredRecord()
            )
        except MeterFull as exc:
            log.error("stream refused reason=meter_full detail=%r", str(exc))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"usage meter is full: {exc}",
                trailing_metadata=(("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),),
            )
        self.open_streams += 1
        self.requests_total += 1
        m.REQUESTS.inc()
        m.ACTIVE_CONNECTIONS.inc()
        started = time.monotonic()
        try:
            await self._run_stream(req, frame, rec, context, started)
        finally:
            self.open_streams -= 1
            m.ACTIVE_CONNECTIONS.dec()
            if rec.status is not None:
                self._request_done(req, rec, started)
            # Otherwise a settle task closes the record and calls _request_done.

    async def _refuse_over_limit(self, context) -> None:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"proxy pid={os.getpid()} has {self.open_streams + self.opening} open streams, "
            "its limit (server.max_concurrent_streams); retry after the pushback delay",
            trailing_metadata=(("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),),
        )

    async def _first_message(self, context) -> pb.StreamPredictRequest:
        read = asyncio.ensure_future(context.read())
        done, _ = await asyncio.wait((read,), timeout=FIRST_MESSAGE_TIMEOUT_SECS)
        if not done:
            # Aborting ends the call; the read then fails, and nobody needs its error.
            read.add_done_callback(lambda t: t.cancelled() or t.exception())
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no StreamPredictRequest within {FIRST_MESSAGE_TIMEOUT_SECS:.0f} s of "
                "opening the stream",
            )
        try:
            req = read.result()
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the first message is not a StreamPredictRequest: {exc}")
        if req is grpc.aio.EOF:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the stream was closed before its first StreamPredictRequest",
            )
        return req

    def _request_done(self, req, rec: UsageRecord, started: float) -> None:
        """Metrics and the request log line of a stream, once its record is closed.

        Reached from the handler's exit and from a settle task (whichever sees the record
        closed); only the first call reports."""
        if rec.reported:
            return
        rec.reported = True
        elapsed = time.monotonic() - started
        m.REQUEST_DURATION.observe(elapsed)
        if rec.status == "finished":
            m.REQUESTS_SUCCESS.inc()
        else:
            m.REQUESTS_FAILED.labels(rec.status).inc()
        m.TOKENS_BY_STATUS.labels(req.model_id, rec.status).inc(rec.delivered)
        req_log.info(
            "request done trace_id=%s model=%s tenant=%s status=%s prompt=%s generated=%s "
            "delivered=%s duration_ms=%.1f record_id=%s",
            req.metadata.trace_id or "-", req.model_id, req.metadata.tenant or "-",
            rec.status, rec.prompt, rec.generated, rec.delivered, elapsed * 1000,
            rec.record_id, extra={"trace_id": req.metadata.trace_id},
        )

    async def _hold(self, req, rec: UsageRecord, context, deadline: float | None) -> int:
        """Wait for a loading worker, telling the caller so. Returns messages written."""
        written = 0
        hold_until = time.monotonic() + self.grace
        last_note = 0.0
        while self._holding() and not self.draining:
            now = time.monotonic()
            if now >= hold_until or (deadline is not None and now >= deadline):
                break
            if now - last_note >= 5.0:
                eta = self.link.eta_ms
                text = (
                    f"Loading {req.model_id}... about {math.ceil(eta / 1000)} s"
                    if eta else f"Loading {req.model_id}..."
                )
                await context.write(pb.StreamPredictResponse(
                    trace_id=req.metadata.trace_id, chunk=text, index=written,
                    is_system=True, eta_ms=eta,
                ))
                written += 1
                last_note = now
            await self.link.wait_state_change(0.25)
        return written

    async def _run_stream(self, req, frame: dict, rec: UsageRecord, context,
                          started: float) -> None:
        remaining = context.time_remaining()
        # Our own timer fires a little before gRPC's, so that a deadline ends on our path:
        # DEADLINE_EXCEEDED with the usage trailers and a `deadline` record.
        deadline = (
            started + remaining - min(DEADLINE_MARGIN_SECS, remaining / 10)
            if remaining is not None else None
        )
        trace_id = req.metadata.trace_id
        index = 0
        stream = None
        tokens_metric = m.TOKENS_PROCESSED.labels(req.model_id)
        first_token_at = 0.0
        last_token_at = 0.0
        gaps = 0
        merge = self.merge_chunks

        def done() -> None:
            self._request_done(req, rec, started)

        try:
            if self._holding():
                index = await self._hold(req, rec, context, deadline)
                if self.link.state != wl.READY:
                    status = "shutdown" if self.draining else "shed"
                    rec.close(status)
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        "sidecar is shutting down" if self.draining else
                        f"inference worker still {self.link.state} after this call waited "
                        f"{time.monotonic() - started:.1f} s (requests are held at most "
                        f"health.reload_grace_secs = {self.grace:g} s); retry later",
                        trailing_metadata=_usage_trailers(rec)
                        + (("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),),
                    )
            stream = self.link.open_stream(frame)
            self.active.add(stream)
            async with asyncio.timeout_at(
                None if deadline is None
                else asyncio.get_running_loop().time() + (deadline - time.monotonic())
            ):
                while True:
                    event = await stream.get()
                    if type(event) is not dict or event["t"] != "chunk":
                        # Every ending below closes the record: bring its counts up to date.
                        rec.advance(stream.tokens, stream.prompt, 0)
                    if type(event) is dict:
                        kind = event["t"]
                        if kind == "chunk":
                            n = event["n"]
                            text = event["text"]
                            frames = 1
                            queue = stream.queue
                            if merge and queue and type(queue[0]) is dict:
                                # The Gateway reads slower than the worker writes: send the
                                # chunks already waiting as one message (exact token_count).
                                parts = [text]
                                size = len(text)
                                while (queue and frames < merge and type(queue[0]) is dict
                                       and queue[0]["t"] == "chunk"
                                       and size + len(queue[0]["text"]) <= MERGE_MAX_CHARS):
                                    more = queue.popleft()
                                    parts.append(more["text"])
                                    size += len(more["text"])
                                    n += more["n"]
                                    frames += 1
                                text = "".join(parts)
                            msg = pb.StreamPredictResponse(
                                trace_id=trace_id, chunk=text, index=index, token_count=n,
                            )
                            if not first_token_at:
                                first_token_at = time.monotonic()
                                msg.ttft_ms = (first_token_at - started) * 1000
                                m.TTFT.observe(first_token_at - started)
                            else:
                                gaps += 1
                            last_token_at = time.monotonic()
                            # Counted when handed to the Gateway connection: a cancel that
                            # lands while this write is in flight must not lose the chunk
                            # the caller may already have read.
                            rec.advance(stream.tokens, stream.prompt, n)
                            tokens_metric.inc(n)
                            index += 1
                            await context.write(msg)
                            stream.consumed(frames)
                            continue
                        if kind == "end":
                            rec.apply_usage(event.get("usage"))
                            reason = event.get("reason", "stop")
                            rec.close("finished", reason)
                            elapsed = max(time.monotonic() - started, 1e-9)
                            final = pb.StreamPredictResponse(
                                trace_id=trace_id, end_of_stream=True, index=index,
                                tokens_per_sec=rec.delivered / elapsed,
                                usage=_usage_message(rec),
                            )
                            if first_token_at:
                                final.ttft_ms = (first_token_at - started) * 1000
                            context.set_trailing_metadata(_usage_trailers(rec))
                            await context.write(final)
                            return
                        # An err frame from the worker (or a protocol reset of the link).
                        code = event.get("code", "internal")
                        grpc_code, status = _ERR_STATUS.get(code, _ERR_STATUS["internal"])
                        rec.close(status, code)
                        trailers = _usage_trailers(rec)
                        if code in ("oom", "overloaded", "cancelled"):
                            trailers += (("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),)
                        await context.abort(
                            grpc_code,
                            f"{_ERR_HINT.get(code, 'inference worker error')}: "
                            f"{_clip(str(event.get('msg', '')))}",
                            trailing_metadata=trailers,
                        )
                    if isinstance(event, wl.Lost):
                        rec.close("worker_oom" if event.oom else "worker_crash")
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE,
                            f"{event.reason}; the stream was cut after {rec.delivered} "
                            "tokens, the sidecar is reconnecting",
                            trailing_metadata=_usage_trailers(rec)
                            + (("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),),
                        )
                    if event is SHUTDOWN:
                        self.link.cancel_stream(stream)
                        rec.close("shutdown")
                        self._settle(stream, rec, "shutdown", lambda: None)
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE,
                            "sidecar is shutting down and the drain period is over; "
                            f"the stream was cut after {rec.delivered} tokens",
                            trailing_metadata=_usage_trailers(rec),
                        )
        except TimeoutError:
            if stream is not None:
                self.link.cancel_stream(stream)
                self._settle(stream, rec, "deadline", done)
            else:
                rec.close("deadline")
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline reached after {rec.delivered} tokens",
                trailing_metadata=_usage_trailers(rec, "deadline"),
            )
        except asyncio.CancelledError:
            # The caller cancelled (or its connection went away).
            status = "cancelled"
            if deadline is not None and time.monotonic() >= deadline - DEADLINE_MARGIN_SECS:
                status = "deadline"
            if stream is not None:
                self.link.cancel_stream(stream)
                self._settle(stream, rec, status, done)
            else:
                rec.close(status)
            raise
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            if rec.closed:
                raise
            # A failed write: the Gateway stream is gone.
            m.GATEWAY_SEND_ERRORS.inc()
            log.info("gateway write failed trace_id=%s reason=the Gateway stream is gone "
                     "error=%r next=cancel upstream", trace_id or "-", exc)
            if stream is not None:
                self.link.cancel_stream(stream)
                self._settle(stream, rec, "gateway_disconnected", done)
            else:
                rec.close("gateway_disconnected")
        finally:
            if stream is not None:
                self.active.discard(stream)
                if rec.closed:
                    self.link.forget_stream(stream)
            if gaps and last_token_at > first_token_at:
                m.INTER_TOKEN.observe((last_token_at - first_token_at) / gaps)

    def _settle(self, stream: wl.Stream, rec: UsageRecord, status: str, done) -> None:
        """Close `rec` once the worker's final frame arrives (or after a short wait)."""
        task = asyncio.get_running_loop().create_task(
            self._settle_task(stream, rec, status, done)
        )
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    async def _settle_task(self, stream: wl.Stream, rec: UsageRecord, status, done) -> None:
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT_SECS):
                while not stream.ended or stream.queue:
                    event = await stream.get()
                    if type(event) is dict and event["t"] in ("end", "err"):
                        rec.advance(stream.tokens, stream.prompt, 0)
                        rec.apply_usage(event.get("usage"))
                        break
                    if type(event) is not dict:
                        break
        except TimeoutError:
            pass
        finally:
            self.link.forget_stream(stream)
            rec.advance(stream.tokens, stream.prompt, 0)
            if rec.close(status):
                done()

    async def end_all_for_shutdown(self) -> None:
        """Drain deadline: end every open stream with UNAVAILABLE and status shutdown."""
        for stream in list(self.active):
            stream.push(SHUTDOWN)

    # -- Control and Health ---------------------------------------------------------------

    async def Control(self, request, context):
        command = request.command
        if not command or len(command) > MAX_COMMAND_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"command is {len(command)} characters; expected 1 to {MAX_COMMAND_CHARS}",
            )
        payload = dict(request.payload)
        try:
            reply = await self.link.control(command, payload)
        except ConnectionError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"control not delivered: {exc}")
        except wire.FrameError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"control command {command!r} is too large to send: {exc}")
        except asyncio.TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"inference worker did not answer control command {command!r}",
            )
        if not reply.get("ok"):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"inference worker refused {command!r}: {_clip(str(reply.get('msg', '')))}",
            )
        out = {str(k): str(v) for k, v in (reply.get("payload") or {}).items()}
        return pb.ControlMessage(trace_id=request.trace_id, command=request.command, payload=out)

    async def Health(self, request, context):
        link = self.link
        return pb.WorkerHealthResponse(
            healthy=link.state == wl.READY and not self.draining,
            metrics={
                "state": link.state,
                "state_since_unix": f"{link.state_since:.3f}",
                "worker_pid": str(link.worker_pid),
                "models": ",".join(link.models),
                "eta_ms": str(link.eta_ms),
                "open_streams": str(self.open_streams),
                "proxy_pid": str(os.getpid()),
                "draining": "true" if self.draining else "false",
                "asyncio_tasks": str(len(asyncio.all_tasks())),
            },
        )
