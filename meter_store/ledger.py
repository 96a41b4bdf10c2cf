"""The usage ledger: finished usage records in SQLite, until the Gateway acknowledges them.

Owner: the meter process (one per sidecar) writes it; its upload thread, and the CLI's
``cy-sidecar usage`` commands, open their own connections to the same file. Every write runs
in ``BEGIN IMMEDIATE`` (a deferred transaction that later wants to write fails with "database
is locked" without waiting on the busy timeout), every read in a short transaction.

Durability: WAL mode with ``synchronous=FULL``, so a record is on disk when :meth:`commit`
returns; only then does the meter process free its shared-memory slot. A crash loses nothing
that was committed; a crash between the commit and the freeing of the slot makes the next
meter process read the slot again, and :meth:`Ledger.commit` skips a record id it already
holds (also one already folded into a rollup), without consuming a sequence number.

Retried: nothing here; a failed write raises :class:`LedgerError` (naming the path and the
cause: disk full, read-only state directory, ...) and the caller keeps its records and tries
again. Uploads are tracked per row: ``attempts``, and ``ambiguous`` = 1 from the moment a row
is handed to an upload call until that call is known not to have reached the Gateway (a
failure to connect). An ambiguous row is never folded into a rollup: the Gateway may already
count it.

Compaction: when more records are pending than the offline queue holds, the oldest pending
single records that are not ambiguous are folded, in one transaction, into exact rollups per
(boot, model, tenant, UTC hour of the end) holding the sums of the three token counts and the
number of records. A pending rollup that was never possibly delivered absorbs later folds of
the same key, so the number of rollups stays bounded by the number of keys. Rollups have
seq 0; a boot's sequence is accounted for by its records plus its rollups' record_count.

The WAL is kept bounded: ``journal_size_limit`` truncates it after a reset, and
:meth:`Ledger.checkpoint` runs ``wal_checkpoint(TRUNCATE)`` (with a short busy timeout, so a
long reader delays it instead of blocking the meter) when the file is over its bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sqlite3
import time
from typing import Any, Iterable, Iterator, Sequence

import sqlite_utils

from cy_sidecar.meter_store.slots import SlotRecord

SCHEMA_VERSION = 1
DEFAULT_BUSY_TIMEOUT_MS = 5_000
DEFAULT_WAL_LIMIT_BYTES = 16 << 20
DEFAULT_RETENTION_SECS = 7 * 86_400
# While checkpointing, wait this long at most for readers of old snapshots.
CHECKPOINT_BUSY_MS = 50

LEDGER_FILE = "ledger.db"

# Columns of the records table, in order; also the fields of an exported row.
COLUMNS = (
    "record_id", "kind", "boot_id", "seq", "model", "tenant", "trace_id", "status",
    "finish_reason", "prompt_tokens", "generated_tokens", "delivered_tokens",
    "started_unix_ms", "ended_unix_ms", "committed_unix_ms", "record_count", "hour",
    "cumulative_delivered", "acked_unix_ms", "attempts", "ambiguous", "pos",
)
_SELECT = ", ".join(COLUMNS)
# commit() builds each fresh row as a tuple in COLUMNS order.
_INSERT_RECORD = f"INSERT INTO records({_SELECT}) VALUES ({', '.join('?' * len(COLUMNS))})"


class LedgerError(RuntimeError):
    """The ledger cannot be opened, read or written. str() names the path and the cause.

    ``cause`` is a short word for programs: disk_full, read_only, cant_open, busy, io,
    corrupt, missing or sqlite.
    """

    def __init__(self, path: str, cause: str, message: str):
        super().__init__(message)
        self.path = path
        self.cause = cause


@dataclasses.dataclass(frozen=True)
class CommitResult:
    committed: list[SlotRecord]  # newly stored, in seq order
    skipped: int                 # ids the ledger already held
    last_seq: int                # of the boot, after this commit
    cumulative_delivered: int


@dataclasses.dataclass(frozen=True)
class Compaction:
    folded: int   # single records removed from the queue
    rollups: int  # rollups created or grown to hold them
    pending_after: int


@dataclasses.dataclass(frozen=True)
class LedgerStats:
    pending: int
    pending_rollups: int
    pending_ambiguous: int
    oldest_pending_age_s: float
    boot_id: str
    last_seq: int
    cumulative_delivered: int
    committed_total: int  # single records ever committed
    folded_total: int     # single records ever folded into rollups
    rollups_total: int    # rollups ever created
    last_ack_unix_ms: int | None
    totals: list[dict[str, Any]]  # per (model, tenant), over every record ever committed


def utc_hour(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H", time.gmtime(unix_ms / 1000))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def ledger_path(state_dir: str) -> str:
    return os.path.join(state_dir, LEDGER_FILE)


def _explain(path: str, action: str, exc: BaseException) -> LedgerError:
    """A LedgerError that says in one line what went wrong, for an operator."""
    directory = os.path.dirname(os.path.abspath(path))
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    dir_writable = os.access(directory, os.W_OK)
    cant_open = name.startswith("SQLITE_CANTOPEN") or "unable to open" in text
    read_only = name.startswith("SQLITE_READONLY") or "readonly" in text
    if name == "SQLITE_FULL" or "disk is full" in text or getattr(exc, "errno", 0) == 28:
        cause, why = "disk_full", f"the filesystem of {directory} is full"
    elif (read_only or cant_open) and not dir_writable:
        cause = "read_only"
        why = (
            f"the state directory {directory} is read-only or not writable by uid "
            f"{os.geteuid()}"
        )
    elif read_only:
        cause, why = "read_only", f"the file {path} (or its -wal/-shm) is read-only"
    elif cant_open:
        cause, why = "cant_open", f"{path} cannot be opened"
    elif name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
        cause, why = "busy", "another connection held the write lock past the busy timeout"
    elif name.startswith("SQLITE_IOERR") or isinstance(exc, OSError):
        cause, why = "io", f"an I/O error on {directory}"
    elif name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        cause, why = "corrupt", f"{path} is not a usable SQLite database"
    else:
        cause, why = "sqlite", "an SQLite error"
    return LedgerError(path, cause, f"ledger {path}: cannot {action}: {why} ({text})")


def _switch_to_wal(conn: sqlite3.Connection, busy_timeout_ms: int) -> str:
    """Set WAL mode and return the journal mode in effect.

    Changing the journal mode takes an exclusive lock, and SQLite answers SQLITE_BUSY at once,
    without calling the busy handler, when two connections open a fresh file at the same
    moment (waiting could deadlock them). So the switch is retried here, within the busy
    timeout, like any other wait for the lock.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    delay = 0.001
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            busy = code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class Ledger:
    """One connection to the ledger file. Not shared between threads: open one per thread."""

    def __init__(
        self,
        path: str,
        *,
        create: bool = True,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        wal_limit_bytes: int = DEFAULT_WAL_LIMIT_BYTES,
        retention_secs: float = DEFAULT_RETENTION_SECS,
    ):
        self.path = path
        self.wal_limit_bytes = wal_limit_bytes
        self.retention_secs = retention_secs
        self._busy_timeout_ms = busy_timeout_ms
        if not create and not os.path.exists(path):
            raise LedgerError(path, "missing", f"ledger {path}: does not exist")
        # create=False: an existing ledger is only used, never set up (the CLI's case).
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, timeout=busy_timeout_ms / 1000
            )
        except sqlite3.Error as exc:
            raise _explain(path, "open", exc) from exc
        self.conn = conn
        try:
            self.db = sqlite_utils.Database(conn)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = _switch_to_wal(conn, busy_timeout_ms)
            if str(mode).lower() != "wal":
                raise LedgerError(
                    path, "read_only",
                    f"ledger {path}: cannot switch to WAL mode (journal mode {mode}); "
                    f"is {os.path.dirname(os.path.abspath(path))} writable?",
                )
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA journal_size_limit = {int(wal_limit_bytes)}")
            if create:
                self._create_schema()
            else:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version != SCHEMA_VERSION:
                    raise LedgerError(
                        path, "corrupt",
                        f"ledger {path}: schema version {version}, expected {SCHEMA_VERSION}",
                    )
        except LedgerError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise _explain(path, "open", exc) from exc

    # -- plumbing ------------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with BEGIN IMMEDIATE; errors become LedgerError."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _explain(self.path, action, exc) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _explain(self.path, action, exc) from exc
            raise

    @contextlib.contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        """A short read transaction: one consistent snapshot, released on exit."""
        conn = self.conn
        try:
            conn.execute("BEGIN")
            yield conn
        except sqlite3.Error as exc:
            raise _explain(self.path, action, exc) from exc
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")

    def _create_schema(self) -> None:
        db = self.db
        with self._write("create its tables"):
            db.table("records").create(
                {
                    "record_id": str, "kind": str, "boot_id": str, "seq": int,
                    "model": str, "tenant": str, "trace_id": str, "status": str,
                    "finish_reason": str, "prompt_tokens": int, "generated_tokens": int,
                    "delivered_tokens": int, "started_unix_ms": int, "ended_unix_ms": int,
                    "committed_unix_ms": int, "record_count": int, "hour": str,
                    "cumulative_delivered": int, "acked_unix_ms": int, "attempts": int,
                    "ambiguous": int, "pos": int,
                },
                pk="record_id",
                not_null=[c for c in COLUMNS if c != "acked_unix_ms"],
                defaults={"attempts": 0, "ambiguous": 0},
                column_order=list(COLUMNS),
                if_not_exists=True,
            )
            db.table("boots").create(
                {"boot_id": str, "last_seq": int, "cumulative_delivered": int,
                 "first_unix_ms": int, "last_unix_ms": int, "last_pos": int},
                pk="boot_id", if_not_exists=True,
            )
            db.table("totals").create(
                {"model": str, "tenant": str, "records": int, "prompt_tokens": int,
                 "generated_tokens": int, "delivered_tokens": int},
                pk=("model", "tenant"), if_not_exists=True,
            )
            db.table("folded").create(
                {"record_id": str, "rollup_id": str, "folded_unix_ms": int},
                pk="record_id", if_not_exists=True,
            )
            db.table("meta").create({"key": str, "value": int}, pk="key", if_not_exists=True)
            # Partial indexes: the pending queue in commit order, and acked rows by age.
            db.execute(
                "CREATE INDEX IF NOT EXISTS records_pending ON records(pos) "
                "WHERE acked_unix_ms IS NULL"
            )
            db.execute(
                "CREATE INDEX IF NOT EXISTS records_acked ON records(acked_unix_ms) "
                "WHERE acked_unix_ms IS NOT NULL"
            )
            db.execute("CREATE INDEX IF NOT EXISTS folded_age ON folded(folded_unix_ms)")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _meta_add(self, conn: sqlite3.Connection, key: str, delta: int) -> None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, delta),
        )

    def _meta_set(self, conn: sqlite3.Connection, key: str, value: int) -> None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- commit --------------------------------------------------------------------------

    def commit(
        self, records: Sequence[SlotRecord], boot_id: str, now_ms: int | None = None
    ) -> CommitResult:
        """Store closed slots of one boot, durably, in one transaction.

        Records are ordered by end time and given the boot's next sequence numbers; each
        adds its delivered tokens to the boot's meter reading. An id already in the ledger
        (or folded into a rollup) is skipped and consumes no sequence number.
        """
        now_ms = _now_ms() if now_ms is None else now_ms
        ordered = sorted(records, key=lambda r: (r.ended_unix_ms, r.region, r.slot))
        with self._write(f"commit {len(ordered)} records") as conn:
            row = conn.execute(
                "SELECT last_seq, cumulative_delivered FROM boots WHERE boot_id = ?",
                (boot_id,),
            ).fetchone()
            last_seq, cumulative = row if row else (0, 0)
            known = self._known_ids(conn, [r.record_id for r in ordered])
            # A ledger-wide commit counter, kept in meta: never reused, even when the newest
            # rows were folded or pruned. (No scan of the records: it grows with the ledger.)
            row = conn.execute("SELECT value FROM meta WHERE key = 'pos'").fetchone()
            if row is None:  # nothing committed yet, or a ledger written without the counter
                row = conn.execute("SELECT COALESCE(MAX(pos), 0) FROM records").fetchone()
            (pos,) = row
            fresh: list[SlotRecord] = []
            rows: list[tuple[Any, ...]] = []
            skipped = 0
            for rec in ordered:
                if rec.record_id in known:
                    skipped += 1
                    continue
                known.add(rec.record_id)
                last_seq += 1
                pos += 1
                cumulative += rec.delivered_tokens
                fresh.append(rec)
                rows.append((
                    rec.record_id, "record", boot_id, last_seq, rec.model, rec.tenant,
                    rec.trace_id, rec.status, rec.finish_reason, rec.prompt_tokens,
                    rec.generated_tokens, rec.delivered_tokens, rec.started_unix_ms,
                    rec.ended_unix_ms, now_ms, 1, utc_hour(rec.ended_unix_ms or now_ms),
                    cumulative, None, 0, 0, pos,
                ))
            if rows:
                # One prepared statement for the batch: sqlite-utils' insert_all rebuilds
                # and type-checks every row, which was two thirds of a commit's time.
                conn.executemany(_INSERT_RECORD, rows)
                conn.execute(
                    "INSERT INTO boots(boot_id, last_seq, cumulative_delivered, "
                    "first_unix_ms, last_unix_ms, last_pos) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(boot_id) DO UPDATE SET last_seq = excluded.last_seq, "
                    "cumulative_delivered = excluded.cumulative_delivered, "
                    "last_unix_ms = excluded.last_unix_ms, last_pos = excluded.last_pos",
                    (boot_id, last_seq, cumulative, now_ms, now_ms, pos),
                )
                conn.executemany(
                    "INSERT INTO totals(model, tenant, records, prompt_tokens, "
                    "generated_tokens, delivered_tokens) VALUES (?, ?, 1, ?, ?, ?) "
                    "ON CONFLICT(model, tenant) DO UPDATE SET records = records + 1, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "generated_tokens = generated_tokens + excluded.generated_tokens, "
                    "delivered_tokens = delivered_tokens + excluded.delivered_tokens",
                    [(r.model, r.tenant, r.prompt_tokens, r.generated_tokens,
                      r.delivered_tokens) for r in fresh],
                )
                self._meta_add(conn, "committed", len(rows))
                self._meta_set(conn, "pos", pos)
        return CommitResult(fresh, skipped, last_seq, cumulative)

    def _known_ids(self, conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = list(ids[i : i + 500])
            marks = ",".join("?" * len(chunk))
            for table in ("records", "folded"):
                known.update(
                    r[0] for r in conn.execute(
                        f"SELECT record_id FROM {table} WHERE record_id IN ({marks})", chunk
                    )
                )
        return known

    # -- the upload queue ----------------------------------------------------------------

    def pending_batch(self, limit: int) -> list[dict[str, Any]]:
        """The oldest `limit` pending rows (records and rollups), read-only."""
        with self._read("read pending records") as conn:
            cur = conn.execute(
                f"SELECT {_SELECT} FROM records WHERE acked_unix_ms IS NULL "
                "ORDER BY pos LIMIT ?",
                (limit,),
            )
            return [dict(zip(COLUMNS, row)) for row in cur.fetchall()]

    def claim_batch(self, limit: int) -> list[dict[str, Any]]:
        """The oldest pending rows, marked as handed to an upload call.

        In the same transaction each row gets attempts + 1 and ambiguous = 1, so that from
        now on compaction leaves it alone (the call may reach the Gateway). The returned
        dicts carry ``prior_ambiguous`` and the new ``attempts`` for :meth:`release_claim`.
        """
        with self._write("claim records for upload") as conn:
            cur = conn.execute(
                f"SELECT {_SELECT} FROM records WHERE acked_unix_ms IS NULL "
                "ORDER BY pos LIMIT ?",
                (limit,),
            )
            rows = [dict(zip(COLUMNS, row)) for row in cur.fetchall()]
            for row in rows:
                row["prior_ambiguous"] = row["ambiguous"]
                row["attempts"] += 1
                row["ambiguous"] = 1
            conn.executemany(
                "UPDATE records SET attempts = ?, ambiguous = 1 WHERE record_id = ?",
                [(r["attempts"], r["record_id"]) for r in rows],
            )
        return rows

    def release_claim(self, rows: Iterable[dict[str, Any]]) -> int:
        """Undo a claim whose call never reached the Gateway (it could not connect).

        Each row that no other upload claimed since (its attempts are still ours) gets its
        attempts and its ambiguity back as they were before the claim. Returns how many.
        """
        params = [(r["prior_ambiguous"], r["record_id"], r["attempts"]) for r in rows]
        if not params:
            return 0
        with self._write("release an upload claim") as conn:
            cur = conn.executemany(
                "UPDATE records SET attempts = attempts - 1, ambiguous = ? "
                "WHERE record_id = ? AND attempts = ? AND acked_unix_ms IS NULL",
                params,
            )
            return cur.rowcount

    def mark_acked(self, ids: Iterable[str], now_ms: int | None = None) -> int:
        """Mark rows acknowledged by the Gateway; they leave the queue, and nothing about
        them is ambiguous any more. Returns how many."""
        now_ms = _now_ms() if now_ms is None else now_ms
        params = [(now_ms, i) for i in dict.fromkeys(ids)]
        if not params:
            return 0
        with self._write(f"mark {len(params)} records acknowledged") as conn:
            cur = conn.executemany(
                "UPDATE records SET acked_unix_ms = ?, ambiguous = 0 "
                "WHERE record_id = ? AND acked_unix_ms IS NULL",
                params,
            )
            count = cur.rowcount
            self._meta_set(conn, "last_ack_ms", now_ms)
        return count

    # -- compaction and retention --------------------------------------------------------

    def compact(self, max_pending: int, low_water: int | None = None) -> Compaction:
        """Fold the oldest foldable records into rollups when more than max_pending wait.

        Folds until at most `low_water` rows are pending (default: 90 % of max_pending), or
        no foldable record is left. One transaction; sums are exact.
        """
        if low_water is None:
            low_water = max(1, max_pending - max(1, max_pending // 10))
        now_ms = _now_ms()
        with self._write("fold records into rollups") as conn:
            (pending,) = conn.execute(
                "SELECT COUNT(*) FROM records WHERE acked_unix_ms IS NULL"
            ).fetchone()
            if pending <= max_pending:
                return Compaction(0, 0, pending)
            mergeable = {
                (r[1], r[2], r[3], r[4]): r[0]
                for r in conn.execute(
                    "SELECT record_id, boot_id, model, tenant, hour FROM records "
                    "WHERE kind = 'rollup' AND acked_unix_ms IS NULL AND ambiguous = 0"
                )
            }
            groups: dict[tuple[str, str, str, str], list[tuple]] = {}
            new_keys = 0
            folded = 0
            cur = conn.execute(
                "SELECT record_id, boot_id, model, tenant, hour, prompt_tokens, "
                "generated_tokens, delivered_tokens, started_unix_ms, ended_unix_ms, "
                "committed_unix_ms, record_count, cumulative_delivered, pos FROM records "
                "WHERE acked_unix_ms IS NULL AND kind = 'record' AND ambiguous = 0 "
                "ORDER BY pos"
            )
            while pending - folded + new_keys > low_water:
                row = cur.fetchone()
                if row is None:
                    break
                key = (row[1], row[2], row[3], row[4])
                if key not in groups:
                    groups[key] = []
                    if key not in mergeable:
                        new_keys += 1
                groups[key].append(row)
                folded += 1
            cur.close()
            for key, rows in groups.items():
                self._fold(conn, key, rows, mergeable.get(key), now_ms)
            if groups:
                self._meta_add(conn, "folded", folded)
                self._meta_add(conn, "rollups", new_keys)
        return Compaction(folded, len(groups), pending - folded + new_keys)

    def _fold(
        self, conn: sqlite3.Connection, key: tuple[str, str, str, str], rows: list[tuple],
        into: str | None, now_ms: int,
    ) -> None:
        boot_id, model, tenant, hour = key
        ids = [r[0] for r in rows]
        prompt = sum(r[5] for r in rows)
        generated = sum(r[6] for r in rows)
        delivered = sum(r[7] for r in rows)
        started = min(r[8] for r in rows)
        ended = max(r[9] for r in rows)
        committed = min(r[10] for r in rows)
        count = sum(r[11] for r in rows)
        reading = max(r[12] for r in rows)
        pos = min(r[13] for r in rows)
        if into is None:
            digest = hashlib.sha256("\n".join([*key, *sorted(ids)]).encode()).hexdigest()
            into = "rollup-" + digest[:32]
            self.db.table("records").insert({
                "record_id": into, "kind": "rollup", "boot_id": boot_id, "seq": 0,
                "model": model, "tenant": tenant, "trace_id": "", "status": "rollup",
                "finish_reason": "", "prompt_tokens": prompt, "generated_tokens": generated,
                "delivered_tokens": delivered, "started_unix_ms": started,
                "ended_unix_ms": ended, "committed_unix_ms": committed,
                "record_count": count, "hour": hour, "cumulative_delivered": reading,
                "acked_unix_ms": None, "attempts": 0, "ambiguous": 0, "pos": pos,
            })
        else:
            conn.execute(
                "UPDATE records SET prompt_tokens = prompt_tokens + ?, "
                "generated_tokens = generated_tokens + ?, "
                "delivered_tokens = delivered_tokens + ?, record_count = record_count + ?, "
                "started_unix_ms = MIN(started_unix_ms, ?), "
                "ended_unix_ms = MAX(ended_unix_ms, ?), "
                "committed_unix_ms = MIN(committed_unix_ms, ?), "
                "cumulative_delivered = MAX(cumulative_delivered, ?), pos = MIN(pos, ?) "
                "WHERE record_id = ? AND ambiguous = 0",
                (prompt, generated, delivered, count, started, ended, committed, reading,
                 pos, into),
            )
        conn.executemany(
            "DELETE FROM records WHERE record_id = ? AND ambiguous = 0", [(i,) for i in ids]
        )
        conn.executemany(
            "INSERT INTO folded(record_id, rollup_id, folded_unix_ms) VALUES (?, ?, ?)",
            [(i, into, now_ms) for i in ids],
        )

    def prune(self, now_ms: int | None = None) -> int:
        """Delete acknowledged rows (and fold tombstones) older than the retention."""
        now_ms = _now_ms() if now_ms is None else now_ms
        cutoff = now_ms - int(self.retention_secs * 1000)
        with self._write("delete old acknowledged records") as conn:
            cur = conn.execute(
                "DELETE FROM records WHERE acked_unix_ms IS NOT NULL AND acked_unix_ms < ?",
                (cutoff,),
            )
            count = cur.rowcount
            conn.execute("DELETE FROM folded WHERE folded_unix_ms < ?", (cutoff,))
        return count

    # -- WAL ---------------------------------------------------------------------------

    def wal_size(self) -> int:
        try:
            return os.stat(self.path + "-wal").st_size
        except FileNotFoundError:
            return 0

    def checkpoint(self, force: bool = False) -> int:
        """Checkpoint and truncate the WAL when it is over its bound; returns its size.

        A reader still using an old snapshot makes the truncation wait for a later call;
        the busy timeout is cut short meanwhile so that the caller is not held up.
        """
        if not force and self.wal_size() <= self.wal_limit_bytes:
            return self.wal_size()
        conn = self.conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_BUSY_MS}")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if busy:
                    # Readers hold old frames: copy what can be copied now, retry later.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        except sqlite3.Error as exc:
            raise _explain(self.path, "checkpoint its WAL", exc) from exc
        return self.wal_size()

    # -- reading -------------------------------------------------------------------------

    def stats(self, boot_id: str | None = None, now_ms: int | None = None) -> LedgerStats:
        """Queue and meter figures in one short read transaction.

        boot_id selects whose last seq and meter reading are reported (default: the boot
        that committed last).
        """
        now_ms = _now_ms() if now_ms is None else now_ms
        with self._read("read its statistics") as conn:
            pending, rollups, ambiguous = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(kind = 'rollup'), 0), "
                "COALESCE(SUM(ambiguous), 0) FROM records WHERE acked_unix_ms IS NULL"
            ).fetchone()
            oldest = conn.execute(
                "SELECT committed_unix_ms FROM records WHERE acked_unix_ms IS NULL "
                "ORDER BY pos LIMIT 1"
            ).fetchone()
            if boot_id is None:
                boot = conn.execute(
                    "SELECT boot_id, last_seq, cumulative_delivered FROM boots "
                    "ORDER BY last_pos DESC LIMIT 1"
                ).fetchone()
            else:
                boot = conn.execute(
                    "SELECT boot_id, last_seq, cumulative_delivered FROM boots "
                    "WHERE boot_id = ?",
                    (boot_id,),
                ).fetchone()
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            totals = [
                dict(zip(("model", "tenant", "records", "prompt_tokens",
                          "generated_tokens", "delivered_tokens"), row))
                for row in conn.execute(
                    "SELECT model, tenant, records, prompt_tokens, generated_tokens, "
                    "delivered_tokens FROM totals ORDER BY model, tenant"
                ).fetchall()
            ]
        boot = boot or (boot_id or "", 0, 0)
        return LedgerStats(
            pending=pending,
            pending_rollups=rollups,
            pending_ambiguous=ambiguous,
            oldest_pending_age_s=max(0.0, (now_ms - oldest[0]) / 1000) if oldest else 0.0,
            boot_id=boot[0],
            last_seq=boot[1],
            cumulative_delivered=boot[2],
            committed_total=meta.get("committed", 0),
            folded_total=meta.get("folded", 0),
            rollups_total=meta.get("rollups", 0),
            last_ack_unix_ms=meta.get("last_ack_ms"),
            totals=totals,
        )

    def iter_rows(self, chunk: int = 1000) -> Iterator[dict[str, Any]]:
        """Every row in commit order, read in chunks of short transactions."""
        after: tuple[int, str] = (-1, "")
        while True:
            with self._read("read records") as conn:
                rows = conn.execute(
                    f"SELECT {_SELECT} FROM records WHERE (pos, record_id) > (?, ?) "
                    "ORDER BY pos, record_id LIMIT ?",
                    (*after, chunk),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield dict(zip(COLUMNS, row))
            last = rows[-1]
            after = (last[COLUMNS.index("pos")], last[0])
