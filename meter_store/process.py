"""The meter process: shared-memory slots -> SQLite ledger -> Gateway usage service.

Owner: one meter process per sidecar, forked by the supervisor (``run_meter``), or run alone
with ``python -m cy_sidecar.meter_store.process --config PATH --meter-file PATH``. It is the
only writer of the ledger's records and the only process that frees meter slots.

Main loop, every 100 ms: commit every CLOSED slot of the meter file (and of old meter files
left by an earlier run, each deleted once drained) in one durable transaction per file, then
mark the slots FREE. Every second: ledger gauges, compaction when more records wait than
``offline_queue_size`` holds, WAL checkpoint, and ``<state_dir>/meter-status.json`` (written
to a temporary file and renamed). An upload thread sends pending rows every
``batch_interval_secs`` when ``upload_target`` is set. The process serves the Prometheus
metrics of every sidecar process (multiprocess mode) on ``metrics_port``.

Retried: a ledger that cannot be opened or written (disk full, read-only state directory)
every second, while the records wait in their CLOSED slots; uploads with exponential backoff
(see uploader.py). Lost on a crash: nothing. A record is freed from shared memory only after
its commit is on disk; a crash after the commit and before the free is harmless (the commit
is idempotent by record id); an upload in flight stays pending and is sent again.

On SIGTERM or SIGINT: a last commit pass, one last upload attempt bounded to ~3 s, exit 0.

Readiness: meter-status.json appears after the ledger is open and the first commit pass ran
(with ``ledger_error`` set, instead, while the ledger cannot be opened).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, TextIO

from cy_sidecar import exitcodes, logs
from cy_sidecar.meter_store.ledger import (
    COLUMNS, CommitResult, Ledger, LedgerError, LedgerStats, ledger_path,
)
from cy_sidecar.meter_store.slots import CLOSED, OPEN, MeterFile, MeterFileError

log = logs.get("meter")

STATUS_FILE = "meter-status.json"
REJECTED_FILE = "rejected-records.jsonl"
COMMIT_INTERVAL_SECS = 0.1  # records wait in shared memory at most this long
TICK_SECS = 1.0
LEDGER_RETRY_SECS = 1.0
# While the ledger stays unwritable, repeat the error line this often (not every retry),
# or sooner when the number of records waiting in shared memory changed.
ERROR_REPEAT_SECS = 60.0
ERROR_CHANGE_SECS = 2.0
FINAL_UPLOAD_SECS = 3.0
# Without a supervisor, wait for the proxies at most their drain period plus this long.
ORPHAN_EXTRA_SECS = 10.0
PRUNE_INTERVAL_SECS = 3600.0
FORCE_FLUSH_SECS = 30.0


@dataclasses.dataclass
class _Source:
    """A mapped meter file whose CLOSED slots the meter commits."""

    path: str
    meter: MeterFile
    old: bool
    # closed_counts() when every CLOSED slot had been committed; None: scan next time.
    seen_closed: list[int] | None = None


class _UploadState:
    """Counters shared by the upload thread (writer) and the status file (reader)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.uploads_ok = 0
        self.upload_errors = 0
        self.last_upload_ok_unix: float | None = None
        self.last_upload_error: str | None = None
        self.last_upload_error_unix: float | None = None


class _UploadThread(threading.Thread):
    """Uploads pending rows every batch interval, with backoff while the target is down."""

    def __init__(self, cfg: Any, path: str, state: _UploadState):
        super().__init__(name="meter-upload", daemon=True)
        self.cfg = cfg
        self.path = path
        self.state = state
        self._wake = threading.Event()
        self._final_at: float | None = None
        self._uploader: Any = None
        self._error_logged_at = 0.0

    def finish(self, deadline: float) -> None:
        """Ask for one last pass that ends by `deadline` (monotonic); then the thread ends."""
        self._final_at = deadline
        if self._uploader is not None:
            self._uploader.abort_by(deadline)
        self._wake.set()

    def run(self) -> None:
        from cy_sidecar.meter_store.uploader import Backoff

        backoff = Backoff()
        ledger: Ledger | None = None
        delay = self.cfg.batch_interval_secs
        try:
            while True:
                self._wake.wait(delay)
                self._wake.clear()
                if self._final_at is not None:
                    break
                ledger, delay = self._pass(ledger, backoff, None)
            if time.monotonic() < self._final_at:
                self._pass(ledger, backoff, self._final_at)
        finally:
            if self._uploader is not None:
                self._uploader.close()
            if ledger is not None:
                ledger.close()

    def _failed(self, error: str) -> None:
        now = time.monotonic()
        with self.state.lock:
            repeat = error == self.state.last_upload_error
            self.state.last_upload_error = error
            self.state.last_upload_error_unix = time.time()
        if not repeat or now - self._error_logged_at >= ERROR_REPEAT_SECS:
            self._error_logged_at = now
            log.error("upload_ledger_error error=%s retry_in=%ss", error, LEDGER_RETRY_SECS)

    def _pass(
        self, ledger: Ledger | None, backoff: Any, deadline: float | None
    ) -> tuple[Ledger | None, float]:
        from cy_sidecar import metrics
        from cy_sidecar.meter_store.uploader import Uploader

        try:
            if ledger is None:
                ledger = Ledger(self.path)
                self._uploader = Uploader(
                    self.cfg.upload_target, ledger,
                    sidecar_id=self.cfg.sidecar_id or socket.gethostname(),
                    batch_size=self.cfg.upload_batch_size,
                )
                if self._final_at is not None:
                    self._uploader.abort_by(self._final_at)
            final = deadline is not None
            result = self._uploader.upload_pass(
                deadline, stop=lambda: not final and self._final_at is not None
            )
        except LedgerError as exc:
            self._failed(str(exc))
            return ledger, LEDGER_RETRY_SECS
        except Exception as exc:  # keep uploading: this thread must not die on a surprise
            log.exception("upload_pass_crashed target=%s", self.cfg.upload_target)
            self._failed(f"{type(exc).__name__}: {exc}")
            return ledger, backoff.failure()
        if result.ok_calls:
            metrics.UPLOADS.labels(result="ok").inc(result.ok_calls)
        with self.state.lock:
            self.state.uploads_ok += result.ok_calls
            if result.ok_calls:
                self.state.last_upload_ok_unix = time.time()
            if not result.ok:
                self.state.upload_errors += 1
                self.state.last_upload_error = result.error
                self.state.last_upload_error_unix = time.time()
        if result.acked:
            log.info(
                "uploaded target=%s records=%s accepted=%s duplicates=%s calls=%s",
                self.cfg.upload_target, result.acked, result.accepted, result.duplicates,
                result.calls,
            )
        if result.ok:
            backoff.reset()
            return ledger, self.cfg.batch_interval_secs
        metrics.UPLOADS.labels(result="unreachable" if not result.connected else "error").inc()
        metrics.UPLOAD_ERRORS.inc()
        delay = backoff.failure()
        level = log.warning if backoff.failures <= 3 or backoff.failures % 20 == 0 else log.debug
        level(
            "upload_failed target=%s error=%s attempt=%s retry_in=%.2fs",
            self.cfg.upload_target, result.error, backoff.failures, delay,
        )
        return ledger, delay


class _Meter:
    """State of the meter process's main loop."""

    def __init__(self, cfg: Any, sources: list[_Source]):
        from cy_sidecar import metrics

        self.metrics = metrics
        self.cfg = cfg
        self.sources = sources
        self.current = sources[0]
        self.path = ledger_path(cfg.state_dir)
        self.status_path = os.path.join(cfg.state_dir, STATUS_FILE)
        self.ledger: Ledger | None = None
        self.ledger_error: str | None = None
        self._error_logged_at = 0.0
        self._error_logged_waiting = -1
        self._retry_at = 0.0
        self._next_prune = 0.0
        self._pending_estimate = 0
        self._stats: LedgerStats | None = None
        self._status_error_logged = False
        self.uploads = _UploadState()

    # -- ledger --------------------------------------------------------------------------

    def _open_ledger(self) -> bool:
        try:
            self.ledger = Ledger(self.path)
        except LedgerError as exc:
            self._ledger_failed(exc)
            return False
        return True

    def _ledger_failed(self, exc: LedgerError) -> None:
        # Drop the connection: the next retry opens the file afresh (it may be replaced).
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        now = time.monotonic()
        waiting = sum(len(s.meter.slots_in_state(CLOSED)) for s in self.sources)
        first = self.ledger_error is None
        self.ledger_error = str(exc)
        self._retry_at = now + LEDGER_RETRY_SECS
        since = now - self._error_logged_at
        changed = waiting != self._error_logged_waiting and since >= ERROR_CHANGE_SECS
        if first or changed or since >= ERROR_REPEAT_SECS:
            self._error_logged_at = now
            self._error_logged_waiting = waiting
            log.error(
                "ledger_unwritable records_in_shared_memory=%s retry_every=%ss cause=%s "
                "error=%s (the records stay in their slots; nothing is lost)",
                waiting, LEDGER_RETRY_SECS, exc.cause, exc,
            )

    def _ledger_recovered(self) -> None:
        if self.ledger_error is not None:
            log.info("ledger_writable_again path=%s", self.path)
            # After a full disk, move the WAL into the database and truncate it now rather
            # than once it passes its bound: on a nearly full disk that space is needed.
            if self.ledger is not None:
                try:
                    self.ledger.checkpoint(force=True)
                except LedgerError as exc:
                    log.warning("checkpoint_after_recovery_failed error=%s", exc)
        self.ledger_error = None

    # -- commit --------------------------------------------------------------------------

    def commit_pass(self, force: bool = False) -> int:
        """Commit and free every CLOSED slot; returns how many records were new."""
        if self.ledger_error is not None and not force and time.monotonic() < self._retry_at:
            return 0
        if self.ledger is None and not self._open_ledger():
            return 0
        assert self.ledger is not None
        new = 0
        attempted = False
        for source in list(self.sources):
            # Read the counters before the scan: a slot closed during the scan bumps them
            # again and is picked up by the next pass. Idle passes cost a few reads.
            counts = source.meter.closed_counts()
            if counts == source.seen_closed and not force:
                continue
            pairs = source.meter.slots_in_state(CLOSED)
            if not pairs:
                source.seen_closed = counts
            if pairs:
                attempted = True
                records = [source.meter.read_slot(r, s) for r, s in pairs]
                try:
                    result = self.ledger.commit(records, source.meter.boot_id)
                except LedgerError as exc:
                    self._ledger_failed(exc)
                    return new
                except (OverflowError, ValueError, TypeError) as exc:
                    # A record the ledger cannot store (a corrupt slot): it must neither
                    # block every other record nor vanish.
                    result = self._commit_one_by_one(records, source, exc)
                for rec in records:
                    source.meter.free_slot(rec.region, rec.slot)
                source.seen_closed = counts
                new += len(result.committed)
                self._count(result.committed)
                if source is self.current:
                    self.metrics.METER_SEQ.set(result.last_seq)
                    self.metrics.METER_DELIVERED.set(result.cumulative_delivered)
            if source.old:
                self._maybe_drop_old(source)
        if attempted or self.ledger_error is not None:
            self._ledger_recovered()
        self._pending_estimate += new
        if new and self._pending_estimate > self.cfg.offline_queue_size:
            self.compact()
        return new

    def _commit_one_by_one(self, records: list[Any], source: _Source,
                           first: Exception) -> CommitResult:
        """Commit each record alone; set aside (in a JSON lines file) what cannot be stored."""
        assert self.ledger is not None
        rejected_path = os.path.join(self.cfg.state_dir, REJECTED_FILE)
        log.error("commit_failed error=%r records=%s next=commit one by one", first,
                  len(records))
        committed: list[Any] = []
        last = CommitResult(committed=[], skipped=0, last_seq=0, cumulative_delivered=0)
        for rec in records:
            try:
                last = self.ledger.commit([rec], source.meter.boot_id)
                committed += last.committed
            except (OverflowError, ValueError, TypeError) as exc:
                with open(rejected_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"error": repr(exc), **dataclasses.asdict(rec)}) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                log.error(
                    "record_rejected record_id=%s error=%r kept_in=%s (not in the ledger; "
                    "its counts are kept there for a human)", rec.record_id, exc,
                    rejected_path,
                )
        return dataclasses.replace(last, committed=committed)

    def _count(self, committed: list[Any]) -> None:
        # Tokens by status are counted by the proxies when they close a record; here only
        # the commits, so that a record re-read after a crash is not counted twice.
        for rec in committed:
            self.metrics.RECORDS_COMMITTED.labels(status=rec.status).inc()

    def _maybe_drop_old(self, source: _Source) -> None:
        meter = source.meter
        if meter.slots_in_state(OPEN):
            # An old file has no live owner: what was open when it was left is interrupted.
            closed = meter.interrupt_open_slots()
            log.warning("old_meter_open_slots path=%s interrupted=%s", source.path, closed)
            return
        if meter.slots_in_state(CLOSED):
            return
        meter.close()
        self.sources.remove(source)
        try:
            os.unlink(source.path)
        except FileNotFoundError:
            pass
        log.info("old_meter_file_drained path=%s", source.path)

    # -- compaction, gauges, status ----------------------------------------------------

    def compact(self) -> None:
        if self.ledger is None:
            return
        try:
            done = self.ledger.compact(self.cfg.offline_queue_size)
        except LedgerError as exc:
            self._ledger_failed(exc)
            return
        self._pending_estimate = done.pending_after
        if done.folded:
            self.metrics.ROLLUPS.inc(done.folded)
            log.warning(
                "offline_queue_full folded=%s records into rollups=%s pending=%s "
                "offline_queue_size=%s (token sums are kept exactly)",
                done.folded, done.rollups, done.pending_after, self.cfg.offline_queue_size,
            )

    def tick(self) -> None:
        """Once a second: gauges, compaction, checkpoint, retention, status file."""
        if self.ledger is not None:
            try:
                stats = self.ledger.stats(self.current.meter.boot_id)
                self._pending_estimate = stats.pending
                if stats.pending > self.cfg.offline_queue_size:
                    self.compact()
                    stats = self.ledger.stats(self.current.meter.boot_id)
                self._stats = stats
                self.metrics.LEDGER_PENDING.set(stats.pending)
                self.metrics.LEDGER_OLDEST_AGE.set(stats.oldest_pending_age_s)
                self.metrics.METER_SEQ.set(stats.last_seq)
                self.metrics.METER_DELIVERED.set(stats.cumulative_delivered)
                self.ledger.checkpoint()
                if time.monotonic() >= self._next_prune:
                    self._next_prune = time.monotonic() + PRUNE_INTERVAL_SECS
                    pruned = self.ledger.prune()
                    if pruned:
                        log.info("ledger_pruned acknowledged_records=%s", pruned)
            except LedgerError as exc:
                self._ledger_failed(exc)
        self.write_status()

    def status(self) -> dict[str, Any]:
        s = self._stats
        with self.uploads.lock:
            uploads = {
                "uploads_ok": self.uploads.uploads_ok,
                "upload_errors": self.uploads.upload_errors,
                "last_upload_ok_unix": self.uploads.last_upload_ok_unix,
                "last_upload_error": self.uploads.last_upload_error,
                "last_upload_error_unix": self.uploads.last_upload_error_unix,
            }
        return {
            "pid": os.getpid(),
            "boot_id": self.current.meter.boot_id,
            "pending": s.pending if s else None,
            "oldest_pending_age_s": s.oldest_pending_age_s if s else None,
            "committed_total": s.committed_total if s else None,
            "last_seq": s.last_seq if s else None,
            "cumulative_delivered": s.cumulative_delivered if s else None,
            "rollups_total": s.rollups_total if s else None,
            "folded_total": s.folded_total if s else None,
            **uploads,
            "upload_target": self.cfg.upload_target,
            "ledger_error": self.ledger_error,
            "old_meter_files": [src.path for src in self.sources if src.old],
            "updated_unix": time.time(),
        }

    def write_status(self) -> None:
        tmp = self.status_path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.status(), fh)
            os.replace(tmp, self.status_path)
            self._status_error_logged = False
        except OSError as exc:
            if not self._status_error_logged:
                self._status_error_logged = True
                log.error("status_file_unwritable path=%s error=%s", self.status_path, exc)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        for source in self.sources:
            source.meter.close()


def _metrics_registry() -> Any:
    import prometheus_client
    from prometheus_client import CollectorRegistry, multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return prometheus_client.REGISTRY  # run alone: this process's own metrics


def run_meter(cfg: Any, meter_path: str, old_meter_files: list[str]) -> int:
    """The meter process's body; returns its exit code (see cy_sidecar.exitcodes)."""
    try:
        current = MeterFile.open(meter_path)
    except MeterFileError as exc:
        log.error("meter_file_unusable path=%s error=%s", meter_path, exc)
        return exitcodes.CANT_CREATE
    sources = [_Source(meter_path, current, False)]
    for path in old_meter_files:
        try:
            sources.append(_Source(path, MeterFile.open(path), True))
        except MeterFileError as exc:
            log.error("old_meter_file_unusable path=%s error=%s (left in place)", path, exc)

    # The handler only records the signal: calling Event.set() from a handler can deadlock
    # when the signal lands while the main thread holds that Event's lock inside wait().
    stopping: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = None
    if cfg.metrics_port:
        from prometheus_client import start_http_server

        try:
            server, _ = start_http_server(
                cfg.metrics_port, cfg.metrics_host, registry=_metrics_registry()
            )
        except OSError as exc:
            log.error(
                "metrics_port_unavailable addr=%s:%s error=%s",
                cfg.metrics_host, cfg.metrics_port, exc.strerror or exc,
            )
            for source in sources:
                source.meter.close()
            return exitcodes.UNAVAILABLE

    meter = _Meter(cfg, sources)
    uploader: _UploadThread | None = None
    try:
        meter.commit_pass(force=True)
        meter.tick()
        log.info(
            "meter_ready pid=%s boot_id=%s ledger=%s old_files=%s upload_target=%s "
            "metrics_port=%s",
            os.getpid(), current.boot_id, meter.path, len(sources) - 1,
            cfg.upload_target or "-", cfg.metrics_port,
        )
        if cfg.upload_target:
            uploader = _UploadThread(cfg, meter.path, meter.uploads)
            uploader.start()
        next_tick = time.monotonic() + TICK_SECS
        parent = os.getppid()
        orphaned_at: float | None = None
        while not stopping:
            time.sleep(COMMIT_INTERVAL_SECS)
            if stopping:
                break
            meter.commit_pass()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_SECS
                meter.tick()
            if orphaned_at is None and os.getppid() != parent:
                # The supervisor died: its proxies drain and exit by themselves; commit
                # what they close until they are gone (bounded), then stop like on SIGTERM.
                orphaned_at = time.monotonic()
                log.error("meter lost its supervisor parent=%s next=commit what the proxies "
                          "close, then exit", parent)
            if orphaned_at is not None and (
                not _proxies_alive(current)
                or time.monotonic() - orphaned_at > cfg.drain_grace_secs + ORPHAN_EXTRA_SECS
            ):
                break
        # Shutdown: what the proxies closed until now is committed, then uploaded once more.
        meter.commit_pass(force=True)
        if uploader is not None:
            deadline = time.monotonic() + FINAL_UPLOAD_SECS
            uploader.finish(deadline)
            uploader.join(max(0.0, deadline - time.monotonic()) + 0.5)
        meter.tick()
        log.info(
            "meter_stopped committed_total=%s pending=%s",
            meter._stats.committed_total if meter._stats else None,
            meter._stats.pending if meter._stats else None,
        )
        return exitcodes.OK
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        meter.close()


def _proxies_alive(meter: MeterFile) -> bool:
    """Whether a process that owns a region of the meter file still exists."""
    for region in range(meter.geometry.regions):
        pid, _ = meter.region_owner(region)
        if pid and pid != os.getpid():
            try:
                os.kill(pid, 0)
                return True
            except ProcessLookupError:
                continue
            except PermissionError:
                return True
    return False


# -- for the CLI (`cy-sidecar usage ...`) ---------------------------------------------------


def _read_status(state_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(state_dir, STATUS_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def ledger_report(state_dir: str) -> dict[str, Any]:
    """Totals by model and tenant, the queue and the last successful upload.

    Raises LedgerError when there is no usable ledger in state_dir.
    """
    path = ledger_path(state_dir)
    with Ledger(path, create=False) as ledger:
        stats = ledger.stats()
    status = _read_status(state_dir)
    last_ack = stats.last_ack_unix_ms / 1000 if stats.last_ack_unix_ms else None
    return {
        "ledger": path,
        "pending": stats.pending,
        "pending_rollups": stats.pending_rollups,
        "pending_ambiguous": stats.pending_ambiguous,
        "oldest_pending_age_s": stats.oldest_pending_age_s,
        "committed_total": stats.committed_total,
        "folded_total": stats.folded_total,
        "rollups_total": stats.rollups_total,
        "boot_id": stats.boot_id,
        "last_seq": stats.last_seq,
        "cumulative_delivered": stats.cumulative_delivered,
        "last_upload_ok_unix": last_ack,
        "last_upload_error": status.get("last_upload_error"),
        "last_upload_error_unix": status.get("last_upload_error_unix"),
        "totals": stats.totals,
    }


def export_records(state_dir: str, fmt: str, out: TextIO) -> int:
    """Write every ledger row to `out` as JSON lines (fmt "jsonl"/"json") or "csv".

    Rows are read in chunks, each in its own short read transaction. Returns the count.
    """
    if fmt not in ("jsonl", "json", "csv"):
        raise ValueError(f"export format {fmt!r}: expected jsonl or csv")
    count = 0
    with Ledger(ledger_path(state_dir), create=False) as ledger:
        writer = csv.DictWriter(out, fieldnames=list(COLUMNS)) if fmt == "csv" else None
        if writer is not None:
            writer.writeheader()
        for row in ledger.iter_rows():
            if writer is not None:
                writer.writerow(row)
            else:
                out.write(json.dumps(row, separators=(",", ":")) + "\n")
            count += 1
    out.flush()
    return count


def force_flush(cfg: Any) -> dict[str, Any]:
    """One upload pass now (all pending rows, or until a call fails; at most ~30 s)."""
    from cy_sidecar.meter_store.uploader import UploadResult, Uploader

    if not cfg.upload_target:
        result = UploadResult(ok=False, error="metering.upload_target is empty")
        return {"target": "", "pending_before": None, "pending_after": None,
                **result.as_dict()}
    with Ledger(ledger_path(cfg.state_dir), create=False) as ledger:
        before = ledger.stats().pending
        uploader = Uploader(
            cfg.upload_target, ledger,
            sidecar_id=cfg.sidecar_id or socket.gethostname(),
            batch_size=cfg.upload_batch_size,
        )
        try:
            result = uploader.upload_pass(time.monotonic() + FORCE_FLUSH_SECS)
        finally:
            uploader.close()
        after = ledger.stats().pending
    return {"target": cfg.upload_target, "pending_before": before, "pending_after": after,
            **result.as_dict()}


def main(argv: list[str] | None = None) -> int:
    from cy_sidecar import config

    parser = argparse.ArgumentParser(
        prog="python -m cy_sidecar.meter_store.process",
        description="run the meter process alone",
    )
    parser.add_argument("--config", default=None, help="sidecar.toml")
    parser.add_argument("--meter-file", required=True, help="shared-memory meter file")
    parser.add_argument(
        "--old-meter-file", action="append", default=[],
        help="a meter file of an earlier run to drain, then delete (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"cy-sidecar meter: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    logs.setup("meter", cfg.log_level, cfg.log_format)
    return run_meter(cfg, args.meter_file, args.old_meter_file)


if __name__ == "__main__":
    sys.exit(main())
