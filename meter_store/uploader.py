"""Upload of pending ledger rows to the Gateway's UsageService (or ``cy-sidecar usage-sink``).

Owner: the meter process's upload thread, and ``cy-sidecar usage flush`` (through
:func:`cy_sidecar.meter_store.process.force_flush`). Each owner has its own :class:`Uploader`
and its own ledger connection; the channel is created on first use, never at import.

Delivery is at-least-once. A call sends up to ``upload_batch_size`` of the oldest pending rows;
a row leaves the queue only when its id comes back in ``accepted_ids`` or ``duplicate_ids``.
Retried: every failed call, with the same record ids (the rows stay pending), after an
exponential backoff with jitter (0.5 s doubling to 30 s) chosen by the caller through
:class:`Backoff`. Before a call its rows are marked ambiguous in the ledger (the call may
reach the Gateway); only a failure to connect, where nothing left this host, takes the mark
back. So a crash during a call loses nothing and leaves its rows ambiguous: sent again, never
folded into a rollup.
"""

from __future__ import annotations

import dataclasses
import random
import socket
import time
from typing import Any, Callable

import grpc

from cy_sidecar import logs
from cy_sidecar.meter_store.ledger import Ledger
from cy_sidecar.protos import usage_pb2, usage_pb2_grpc

log = logs.get("uploader")

CALL_TIMEOUT_SECS = 10.0
BACKOFF_INITIAL_SECS = 0.5
BACKOFF_MAX_SECS = 30.0
MAX_MESSAGE_BYTES = 64 << 20

_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Our own backoff paces the calls; keep the channel's reconnects prompt so that a
    # target that came back is seen at the next attempt (a call made while the channel
    # waits to reconnect fails at once with "failed to connect", and is not ambiguous).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

# Texts of an UNAVAILABLE status that gRPC's client library raises itself when it has no
# connection to send on (the request never left this host).
_NOT_CONNECTED = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "dns resolution failed",
)

_PROTO_FIELDS = (
    "record_id", "kind", "model", "tenant", "trace_id", "status", "finish_reason",
    "prompt_tokens", "generated_tokens", "delivered_tokens", "started_unix_ms",
    "ended_unix_ms", "record_count", "boot_id", "seq", "cumulative_delivered", "hour",
)


class Backoff:
    """Exponential backoff with jitter: initial, doubling, at most `maximum` seconds."""

    def __init__(
        self, initial: float = BACKOFF_INITIAL_SECS, maximum: float = BACKOFF_MAX_SECS,
        jitter: float = 0.2, rng: Callable[[], float] = random.random,
    ):
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._rng = rng
        self.failures = 0

    def failure(self) -> float:
        """Count a failure; returns the delay before the next attempt."""
        base = min(self.maximum, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        spread = 1 + self.jitter * (2 * self._rng() - 1)
        return min(self.maximum, base * spread)

    def reset(self) -> None:
        self.failures = 0


@dataclasses.dataclass
class UploadResult:
    """What one call, or one pass of calls, did."""

    calls: int = 0
    ok_calls: int = 0
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    acked: int = 0
    ok: bool = True
    connected: bool = True
    error: str | None = None

    def add(self, other: "UploadResult") -> None:
        self.calls += other.calls
        self.ok_calls += other.ok_calls
        self.sent += other.sent
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.acked += other.acked
        self.ok = other.ok
        self.connected = other.connected
        self.error = other.error

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def to_proto(row: dict[str, Any]) -> usage_pb2.UsageRecord:
    """A ledger row as the UsageRecord message."""
    return usage_pb2.UsageRecord(**{name: row[name] for name in _PROTO_FIELDS})


def never_sent(err: grpc.RpcError) -> bool:
    """True when the call failed for want of a connection, so nothing reached the target."""
    code = err.code() if hasattr(err, "code") else None
    if code != grpc.StatusCode.UNAVAILABLE:
        return False
    details = ((err.details() if hasattr(err, "details") else "") or "").lower()
    return any(text in details for text in _NOT_CONNECTED)


class Uploader:
    """Sends the ledger's pending rows to one UsageService target."""

    def __init__(
        self,
        target: str,
        ledger: Ledger,
        *,
        sidecar_id: str = "",
        batch_size: int = 500,
        call_timeout: float = CALL_TIMEOUT_SECS,
    ):
        if not target:
            raise ValueError("an upload target (host:port) is required")
        self.target = target
        self.ledger = ledger
        self.sidecar_id = sidecar_id or socket.gethostname()
        self.batch_size = batch_size
        self.call_timeout = call_timeout
        self._channel: grpc.Channel | None = None
        self._stub: usage_pb2_grpc.UsageServiceStub | None = None
        self._abort_at: float | None = None

    # -- channel -------------------------------------------------------------------------

    def _ensure_stub(self) -> usage_pb2_grpc.UsageServiceStub:
        if self._stub is None:
            self._channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
            self._stub = usage_pb2_grpc.UsageServiceStub(self._channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    def abort_by(self, deadline: float | None) -> None:
        """From another thread: cancel any call still running at `deadline` (monotonic)."""
        self._abort_at = deadline

    def _limit(self, deadline: float | None) -> float | None:
        limits = [d for d in (deadline, self._abort_at) if d is not None]
        return min(limits) if limits else None

    # -- uploading -----------------------------------------------------------------------

    def upload_batch(self, deadline: float | None = None) -> UploadResult:
        """One call with the oldest pending rows. deadline: monotonic time to give up.

        Raises LedgerError when the ledger cannot be read or written.
        """
        if not self.ledger.pending_batch(1):
            return UploadResult()
        stub = self._ensure_stub()
        rows = self.ledger.claim_batch(self.batch_size)
        if not rows:
            return UploadResult()
        result = UploadResult(calls=1, sent=len(rows))
        batch = usage_pb2.UsageBatch(
            sidecar_id=self.sidecar_id, records=[to_proto(r) for r in rows]
        )
        timeout = self.call_timeout
        limit = self._limit(deadline)
        if limit is not None:
            timeout = max(0.05, min(timeout, limit - time.monotonic()))
        try:
            ack = self._wait(stub.Upload.future(batch, timeout=timeout))
        except grpc.FutureCancelledError:
            # Cancelled at shutdown: the request may have gone out; the rows stay ambiguous.
            result.ok = False
            result.error = "upload cancelled at shutdown"
            return result
        except grpc.RpcError as err:
            result.ok = False
            code = err.code() if hasattr(err, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            result.error = f"{name}: {err.details() if hasattr(err, 'details') else err}"
            if never_sent(err):
                result.connected = False
                result.calls = result.sent = 0
                result.error = f"cannot connect to {self.target}: {result.error}"
                self.ledger.release_claim(rows)
            return result
        sent_ids = {r["record_id"] for r in rows}
        accepted = [i for i in ack.accepted_ids if i in sent_ids]
        duplicates = [i for i in ack.duplicate_ids if i in sent_ids]
        result.ok_calls = 1
        result.accepted = len(accepted)
        result.duplicates = len(duplicates)
        result.acked = self.ledger.mark_acked(accepted + duplicates)
        unlisted = len(sent_ids) - len(set(accepted) | set(duplicates))
        if unlisted:
            log.warning(
                "upload_unacknowledged target=%s records=%s (kept pending, sent again)",
                self.target, unlisted,
            )
        return result

    def _wait(self, future: Any) -> usage_pb2.UsageAck:
        while True:
            try:
                return future.result(timeout=0.05)
            except grpc.FutureTimeoutError:
                if self._abort_at is not None and time.monotonic() >= self._abort_at:
                    future.cancel()

    def upload_pass(
        self, deadline: float | None = None, stop: Callable[[], bool] | None = None,
        max_calls: int | None = None,
    ) -> UploadResult:
        """Calls until the queue is empty, a call fails, `stop()` is true or time is up."""
        total = UploadResult()
        while True:
            if stop is not None and stop():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if max_calls is not None and total.calls >= max_calls:
                break
            one = self.upload_batch(deadline)
            total.add(one)
            if not one.ok or one.sent == 0 or one.acked == 0:
                break
        return total
