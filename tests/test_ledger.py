"""The SQLite ledger: idempotent commits, gap-free seq, exact rollups, locking, WAL, errors."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from cy_sidecar.meter_store.ledger import Ledger, LedgerError, utc_hour
from cy_sidecar.meter_store.slots import CLOSED, SlotRecord

HOUR_MS = 3_600_000
BASE_MS = 1_790_000_000_000


def rec(i: int, model: str = "llama", tenant: str = "t1", prompt: int = 7,
        generated: int | None = None, delivered: int | None = None,
        ended_ms: int | None = None) -> SlotRecord:
    generated = 10 + i % 13 if generated is None else generated
    delivered = generated - i % 3 if delivered is None else delivered
    ended = BASE_MS + i * 1000 if ended_ms is None else ended_ms
    return SlotRecord(
        region=0, slot=i % 256, state=CLOSED, status="finished", record_id=uuid.uuid4().hex,
        seq=1, prompt_tokens=prompt, generated_tokens=generated, delivered_tokens=delivered,
        started_unix_ms=ended - 500, ended_unix_ms=ended, finish_reason="stop",
        model=model, tenant=tenant, trace_id=f"trace-{i}",
    )


def rows(ledger: Ledger, where: str = "1", params: tuple = ()) -> list[dict]:
    cur = ledger.conn.execute(f"SELECT * FROM records WHERE {where} ORDER BY pos", params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def sums(ledger: Ledger) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    out = {}
    for model, tenant, *vals in ledger.conn.execute(
        "SELECT model, tenant, SUM(prompt_tokens), SUM(generated_tokens), "
        "SUM(delivered_tokens), SUM(record_count) FROM records GROUP BY model, tenant"
    ):
        out[(model, tenant)] = tuple(vals)
    return out


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(str(tmp_path / "ledger.db"))
    yield led
    led.close()


def test_the_ledger_is_in_wal_mode_with_full_sync(ledger):
    assert ledger.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert ledger.conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_commit_is_idempotent_and_seq_is_gap_free(ledger):
    first = [rec(i) for i in range(10)]
    result = ledger.commit(first, "boot-a")
    assert [r.record_id for r in result.committed] == [r.record_id for r in first]
    assert result.skipped == 0 and result.last_seq == 10

    # A restarted meter re-reads five slots it committed but had not freed, plus new ones.
    again = first[3:8] + [rec(i) for i in range(10, 13)]
    result = ledger.commit(again, "boot-a")
    assert result.skipped == 5
    assert len(result.committed) == 3
    assert result.last_seq == 13

    stored = rows(ledger)
    assert len(stored) == 13
    assert [r["seq"] for r in stored] == list(range(1, 14))
    assert len({r["record_id"] for r in stored}) == 13
    running = 0
    for r in stored:
        running += r["delivered_tokens"]
        assert r["cumulative_delivered"] == running
    assert result.cumulative_delivered == running
    stats = ledger.stats("boot-a")
    assert (stats.last_seq, stats.cumulative_delivered, stats.pending) == (13, running, 13)
    assert stats.committed_total == 13


def test_each_boot_has_its_own_sequence_and_meter_reading(ledger):
    ledger.commit([rec(i, delivered=5) for i in range(4)], "boot-a")
    ledger.commit([rec(i, delivered=2) for i in range(3)], "boot-b")
    ledger.commit([rec(9, delivered=5)], "boot-a")
    a, b = ledger.stats("boot-a"), ledger.stats("boot-b")
    assert (a.last_seq, a.cumulative_delivered) == (5, 25)
    assert (b.last_seq, b.cumulative_delivered) == (3, 6)
    assert ledger.stats().boot_id == "boot-a"  # the boot that committed last
    seqs = [r["seq"] for r in rows(ledger, "boot_id = ?", ("boot-b",))]
    assert seqs == [1, 2, 3]


def test_records_are_ordered_by_end_time_within_a_commit(ledger):
    late, early = rec(1, ended_ms=BASE_MS + 9000), rec(2, ended_ms=BASE_MS + 1000)
    ledger.commit([late, early], "boot-a")
    assert [r["record_id"] for r in rows(ledger)] == [early.record_id, late.record_id]
    assert rows(ledger)[0]["hour"] == utc_hour(BASE_MS + 1000)


def test_a_commit_reads_no_table_in_full_however_large_the_ledger(ledger):
    # Acknowledged rows stay for the retention period, so a commit that scanned the records
    # would slow down as the ledger grows: every read of `records` must go through an index.
    ledger.commit([rec(i) for i in range(50)], "boot-a")
    ledger.mark_acked([r["record_id"] for r in ledger.claim_batch(20)])
    statements: list[str] = []
    ledger.conn.set_trace_callback(statements.append)
    ledger.commit([rec(100 + i) for i in range(10)], "boot-a")
    ledger.conn.set_trace_callback(None)
    reads = [s for s in statements if s.split()[0].upper() in ("SELECT", "INSERT", "UPDATE")]
    assert len(reads) >= 4
    for statement in reads:
        for step in ledger.conn.execute("EXPLAIN QUERY PLAN " + statement).fetchall():
            if step[3].split()[:2] in (["SCAN", "records"], ["SEARCH", "records"]):
                assert "USING" in step[3], (statement, step[3])


def test_claim_ack_and_release_of_an_upload(ledger):
    records = [rec(i) for i in range(6)]
    ledger.commit(records, "boot-a")
    batch = ledger.claim_batch(4)
    assert [b["record_id"] for b in batch] == [r.record_id for r in records[:4]]
    claimed = rows(ledger, "record_id IN (?, ?, ?, ?)", tuple(b["record_id"] for b in batch))
    assert all(r["ambiguous"] == 1 and r["attempts"] == 1 for r in claimed)

    # The call never connected: the claim is taken back as if never made.
    assert ledger.release_claim(batch) == 4
    assert ledger.stats().pending_ambiguous == 0

    batch = ledger.claim_batch(4)
    assert all(b["attempts"] == 1 for b in batch)
    # The Gateway acknowledges three of them; the fourth stays pending and ambiguous.
    assert ledger.mark_acked([b["record_id"] for b in batch[:3]] + ["not-ours"]) == 3
    pending = ledger.pending_batch(10)
    assert [p["record_id"] for p in pending] == [r.record_id for r in records[3:]]
    assert pending[0]["ambiguous"] == 1
    stats = ledger.stats()
    assert stats.pending == 3 and stats.pending_ambiguous == 1
    assert stats.last_ack_unix_ms is not None
    acked = rows(ledger, "acked_unix_ms IS NOT NULL")
    assert len(acked) == 3 and all(r["ambiguous"] == 0 and r["attempts"] == 1 for r in acked)


def test_a_claim_taken_by_another_uploader_is_not_released(ledger):
    ledger.commit([rec(1)], "boot-a")
    first = ledger.claim_batch(1)
    ledger.claim_batch(1)  # a second uploader (cy-sidecar usage flush) sent it meanwhile
    assert ledger.release_claim(first) == 0
    assert ledger.stats().pending_ambiguous == 1


def test_compaction_keeps_exact_sums_and_never_folds_ambiguous_rows(ledger):
    records = []
    for i in range(120):
        records.append(rec(
            i, model=("llama", "mistral")[i % 2], tenant=("t1", "t2", "t3")[i % 3],
            prompt=3 + i % 7, ended_ms=BASE_MS + (i % 2) * HOUR_MS + i,
        ))
    ledger.commit(records[:60], "boot-a")
    ledger.commit(records[60:], "boot-b")
    # Ten of the oldest were handed to an upload that may have reached the Gateway.
    ambiguous = {b["record_id"] for b in ledger.claim_batch(10)}
    before = sums(ledger)

    done = ledger.compact(max_pending=30)
    assert done.folded > 0 and done.rollups > 0
    assert sums(ledger) == before
    stats = ledger.stats()
    assert stats.pending == done.pending_after <= 30
    # 2 boots x 6 (model, tenant, hour) keys: at most 12 rollups.
    assert done.rollups <= 12
    assert stats.folded_total == done.folded
    kept = {r["record_id"] for r in rows(ledger, "kind = 'record'")}
    assert ambiguous <= kept
    rollups = rows(ledger, "kind = 'rollup'")
    assert len(rollups) == done.rollups
    assert sum(r["record_count"] for r in rollups) == done.folded
    for r in rollups:
        assert r["seq"] == 0 and r["ambiguous"] == 0
        assert r["record_id"].startswith("rollup-")
    # A boot's sequence stays accounted for: its records plus its rollups' counts.
    for boot, last in (("boot-a", 60), ("boot-b", 60)):
        (count,) = ledger.conn.execute(
            "SELECT SUM(record_count) FROM records WHERE boot_id = ?", (boot,)
        ).fetchone()
        assert count == last

    # More records while still offline: they join the existing rollups of their key.
    ledger.commit([rec(200 + i, model="llama", tenant="t1", ended_ms=BASE_MS + i)
                   for i in range(40)], "boot-b")
    before = sums(ledger)
    ids_before = {r["record_id"] for r in rows(ledger, "kind = 'rollup'")}
    again = ledger.compact(max_pending=30)
    assert again.folded > 0
    assert sums(ledger) == before
    assert {r["record_id"] for r in rows(ledger, "kind = 'rollup'")} >= ids_before
    assert ambiguous <= {r["record_id"] for r in rows(ledger, "kind = 'record'")}

    # A folded record met again in a slot is still known: no second count.
    result = ledger.commit(records[20:30], "boot-a")
    assert result.committed == [] and result.skipped == 10
    assert sums(ledger) == before


def test_compaction_below_the_bound_does_nothing(ledger):
    ledger.commit([rec(i) for i in range(20)], "boot-a")
    done = ledger.compact(max_pending=20)
    assert (done.folded, done.rollups, done.pending_after) == (0, 0, 20)


def test_an_ambiguous_rollup_is_not_grown(ledger):
    ledger.commit([rec(i, ended_ms=BASE_MS + i) for i in range(30)], "boot-a")
    ledger.compact(max_pending=10)
    (rollup,) = rows(ledger, "kind = 'rollup'")
    ledger.conn.execute("UPDATE records SET ambiguous = 1 WHERE record_id = ?",
                        (rollup["record_id"],))
    ledger.commit([rec(100 + i, ended_ms=BASE_MS + i) for i in range(30)], "boot-a")
    before = sums(ledger)
    ledger.compact(max_pending=10)
    after_rollup = rows(ledger, "record_id = ?", (rollup["record_id"],))[0]
    assert after_rollup["record_count"] == rollup["record_count"]
    assert len(rows(ledger, "kind = 'rollup'")) == 2
    assert sums(ledger) == before


def test_retention_deletes_old_acknowledged_rows_only(tmp_path):
    led = Ledger(str(tmp_path / "ledger.db"), retention_secs=3600)
    try:
        led.commit([rec(i) for i in range(5)], "boot-a")
        ids = [r["record_id"] for r in led.pending_batch(3)]
        now = time.time_ns() // 1_000_000
        led.mark_acked(ids[:2], now_ms=now - 2 * 3_600_000)
        led.mark_acked(ids[2:], now_ms=now)
        assert led.prune(now_ms=now) == 2
        assert len(rows(led)) == 3
        assert led.stats().pending == 2
        # The lifetime totals and the boot's sequence survive retention.
        assert led.stats().totals[0]["records"] == 5
        assert led.commit([rec(99)], "boot-a").last_seq == 6
    finally:
        led.close()


_WRITER = textwrap.dedent("""
    import os, sys, time, uuid
    from cy_sidecar.meter_store.ledger import Ledger
    from cy_sidecar.meter_store.slots import CLOSED, SlotRecord
    path, boot, go, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.002)
    led = Ledger(path)
    for b in range(batches):
        recs = [SlotRecord(0, i, CLOSED, "finished", uuid.uuid4().hex, 1, 1, 2, 2,
                           1, 2 + i, "stop", "m", boot, "") for i in range(5)]
        led.commit(recs, boot)
        if b % 10 == 0:
            led.stats(boot)
            led.compact(max_pending=100_000)
    print("done", boot, flush=True)
""")


def test_two_writer_processes_never_see_database_is_locked(tmp_path):
    path = str(tmp_path / "ledger.db")
    go = str(tmp_path / "go")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, path, boot, go, "150"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for boot in ("boot-a", "boot-b")
    ]
    try:
        open(go, "w").close()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err
        assert out.startswith("done")
    with Ledger(path) as led:
        for boot in ("boot-a", "boot-b"):
            seqs = [r["seq"] for r in rows(led, "boot_id = ?", (boot,))]
            assert sorted(seqs) == list(range(1, 751))
            assert led.stats(boot).last_seq == 750


def test_the_wal_shrinks_under_its_bound_once_a_long_reader_lets_go(tmp_path):
    path = str(tmp_path / "ledger.db")
    bound = 256 * 1024
    led = Ledger(path, wal_limit_bytes=bound)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        led.commit([rec(0)], "boot-a")
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM records").fetchone()  # holds a snapshot
        for batch in range(30):
            led.commit([rec(batch * 100 + i) for i in range(100)], "boot-a")
            led.checkpoint()
        assert led.wal_size() > bound, "the reader should have pinned the WAL"
        reader.execute("COMMIT")
        sizes = []
        for _ in range(3):
            sizes.append(led.checkpoint())
            if sizes[-1] <= bound:
                break
        assert sizes[-1] <= bound, sizes
        assert led.stats().pending == 3001
    finally:
        reader.close()
        led.close()


def test_a_full_disk_is_a_clear_ledger_error_and_loses_nothing(ledger):
    ledger.commit([rec(i) for i in range(5)], "boot-a")
    (pages,) = ledger.conn.execute("PRAGMA page_count").fetchone()
    ledger.conn.execute(f"PRAGMA max_page_count = {pages + 1}")
    big = [rec(100 + i) for i in range(2000)]
    with pytest.raises(LedgerError) as info:
        ledger.commit(big, "boot-a")
    assert info.value.cause == "disk_full"
    assert ledger.path in str(info.value) and "full" in str(info.value)
    assert ledger.stats().pending == 5  # the failed transaction left nothing behind
    ledger.conn.execute("PRAGMA max_page_count = 1073741823")
    assert len(ledger.commit(big, "boot-a").committed) == 2000
    assert ledger.stats("boot-a").last_seq == 2005


def _open_as_nobody(path: str) -> dict:
    """Open a ledger in a forked child that dropped root, so that permissions apply."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                Ledger(path).close()
                out = {"opened": True}
            except LedgerError as exc:
                out = {"cause": exc.cause, "message": str(exc), "path": exc.path}
            os.write(wfd, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_a_read_only_state_directory_is_a_clear_ledger_error():
    state = tempfile.mkdtemp(prefix="cy-ledger-ro-")
    path = os.path.join(state, "ledger.db")
    try:
        os.chmod(state, 0o555)
        if os.geteuid() == 0:
            result = _open_as_nobody(path)
        else:
            try:
                Ledger(path).close()
                result = {"opened": True}
            except LedgerError as exc:
                result = {"cause": exc.cause, "message": str(exc), "path": exc.path}
    finally:
        os.chmod(state, 0o755)
    try:
        assert result.get("cause") == "read_only", result
        assert result["path"] == path
        assert path in result["message"] and "read-only" in result["message"]
    finally:
        for name in os.listdir(state):
            os.unlink(os.path.join(state, name))
        os.rmdir(state)


def test_opening_a_missing_ledger_without_create_says_so(tmp_path):
    with pytest.raises(LedgerError) as info:
        Ledger(str(tmp_path / "none.db"), create=False)
    assert info.value.cause == "missing"
    assert not (tmp_path / "none.db").exists()
