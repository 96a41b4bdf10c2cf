"""Usage records of one proxy process, kept in its region of the shared-memory meter.

A :class:`UsageRecord` is opened when a stream is admitted and closed exactly once, by the
first ending that reaches it. Its counts live in the slot and are rewritten as tokens pass
(generated and delivered together, each time a message is handed to the Gateway, and once
more when the record closes). A crash of this process therefore loses no delivered token:
the supervisor closes the slot as ``interrupted`` with the counts it holds (chunks that had
arrived from the worker but were not yet written to the Gateway are not in its generated
count). After ``close`` the slot belongs to the meter process until it has committed the
record to SQLite.
"""

from __future__ import annotations

import os
import time

from cy_sidecar import logs
from cy_sidecar.meter_store.slots import FREE, MeterFile

log = logs.get("proxy.meter")


class MeterFull(RuntimeError):
    """Every slot of this process's region is open or awaiting commit by the meter."""


class RegionMeter:
    """The owning side of one region: allocates slots and keeps per-model totals."""

    def __init__(self, meter: MeterFile, region: int):
        self.meter = meter
        self.region = region
        self.slots = meter.geometry.slots_per_region
        self._cursor = 0
        self._models: dict[str, int] = {}
        meter.claim_region(region, os.getpid())

    def _model_base(self, model: str) -> int:
        base = self._models.get(model)
        if base is None:
            index = self.meter.model_index(self.region, model)
            base = self.meter.model_word_base(self.region, index)
            self._models[model] = base
        return base

    def open(self, model: str, tenant: str, trace_id: str) -> "UsageRecord":
        meter = self.meter
        for step in range(self.slots):
            slot = (self._cursor + step) % self.slots
            if meter.slot_state(self.region, slot) == FREE:
                self._cursor = (slot + 1) % self.slots
                record_id = os.urandom(16)
                wbase = meter.open_slot(
                    self.region, slot, record_id, model, tenant, trace_id,
                    time.time_ns() // 1_000_000,
                )
                return UsageRecord(self, slot, wbase, self._model_base(model), record_id)
        raise MeterFull(
            f"all {self.slots} usage slots of region {self.region} are in use or waiting "
            "for the meter process to commit them"
        )


class UsageRecord:
    __slots__ = (
        "region", "slot", "wbase", "mbase", "record_id", "prompt", "generated", "delivered",
        "status", "finish_reason", "_words", "_meter", "reported",
    )

    def __init__(self, owner: RegionMeter, slot: int, wbase: int, mbase: int, record_id):
        self._meter = owner.meter
        self.region = owner.region
        self.slot = slot
        self.wbase = wbase
        self.mbase = mbase
        self.record_id = record_id.hex()
        self.prompt = 0
        self.generated = 0
        self.delivered = 0
        self.status: str | None = None
        self.finish_reason = ""
        self.reported = False  # the request's metrics and log line are out

    @property
    def closed(self) -> bool:
        return self.status is not None

    def advance(self, generated: int, prompt: int, delivered: int) -> None:
        """The stream now has `generated` tokens from the worker (a running total) and
        `delivered` more were handed to the Gateway. Written once per Gateway message."""
        if self.status is not None:
            return
        grown = generated - self.generated
        self.generated = generated
        if prompt:
            self.prompt = prompt
        self.delivered += delivered
        meter = self._meter
        meter.set_counts(self.wbase, self.prompt, generated, self.delivered)
        meter.add_delivered(self.mbase, grown, delivered)

    def apply_usage(self, usage: dict | None) -> None:
        """The worker's own usage report (end frame): the prompt tokens, which the chunks
        may not have said; a completion count that differs from the chunks' is logged."""
        if not usage or self.status is not None:
            return
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int) and prompt >= 0:
            self.prompt = prompt
        # Every chunk of the stream arrived before this end frame, so the chunks' own
        # counts are the generated tokens; a usage report that disagrees cannot add any.
        if isinstance(completion, int) and completion != self.generated:
            log.warning(
                "worker usage disagrees record_id=%s completion_tokens=%s chunk_tokens=%s "
                "next=record the chunks' count", self.record_id, completion, self.generated,
            )
        self._meter.set_counts(self.wbase, self.prompt, self.generated, self.delivered)

    def close(self, status: str, finish_reason: str = "") -> bool:
        """Close with `status`; only the first call counts. Returns True if it closed now."""
        if self.status is not None:
            return False
        self.status = status
        self.finish_reason = finish_reason
        meter = self._meter
        meter.set_counts(self.wbase, self.prompt, self.generated, self.delivered)
        meter.add_model_record(self.mbase, self.prompt)
        meter.close_slot(self.region, self.slot, status, finish_reason)
        return True


class UnmeteredRecord:
    """Stands in for a UsageRecord when metering is disabled (benchmarks): counts locally,
    writes nothing to shared memory, and so produces no usage record at all."""

    __slots__ = ("prompt", "generated", "delivered", "status", "finish_reason", "record_id",
                 "reported")

    def __init__(self):
        self.prompt = self.generated = self.delivered = 0
        self.status: str | None = None
        self.finish_reason = ""
        self.record_id = ""
        self.reported = False

    @property
    def closed(self) -> bool:
        return self.status is not None

    def advance(self, generated: int, prompt: int, delivered: int) -> None:
        if self.status is None:
            self.generated = generated
            self.prompt = prompt or self.prompt
            self.delivered += delivered

    def apply_usage(self, usage: dict | None) -> None:
        if usage and isinstance(usage.get("prompt_tokens"), int):
            self.prompt = usage["prompt_tokens"]

    def close(self, status: str, finish_reason: str = "") -> bool:
        if self.status is not None:
            return False
        self.status = status
        self.finish_reason = finish_reason
        return True
