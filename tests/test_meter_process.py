"""The meter process, run alone as a real process, with a real usage sink on loopback.

Records are written into a real meter file through the MeterFile API, as a proxy process
writes them; the meter commits them to its SQLite ledger and uploads them to the sink.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
import uuid

import pytest

from cy_sidecar import config
from cy_sidecar.localrun import Proc, free_port
from cy_sidecar.meter_store.ledger import Ledger
from cy_sidecar.meter_store.process import export_records, force_flush, ledger_report
from cy_sidecar.meter_store.uploader import Backoff, Uploader
from cy_sidecar.meter_store.slots import CLOSED, FREE, Geometry, MeterFile, SlotRecord

from helpers import wait_until


class Writer:
    """Writes finished usage records into region 0 of a meter file, like a proxy does."""

    def __init__(self, path: str):
        self.meter = MeterFile.open(path)
        self.written: dict[str, dict] = {}
        self.lock = threading.Lock()

    def write(self, n: int, models=("llama",), tenants=("t1",), pace: float = 0.0,
              timeout: float = 30.0) -> list[str]:
        ids = []
        pause = threading.Event()
        for _ in range(n):
            deadline = time.monotonic() + timeout
            while not (free := self.meter.slots_in_state(FREE, 0)):
                if time.monotonic() > deadline:
                    raise AssertionError("no free meter slot: the meter is not draining")
                pause.wait(0.005)
            region, slot = free[0]
            with self.lock:
                k = len(self.written)
            rid = uuid.uuid4()
            rec = {
                "model": models[k % len(models)], "tenant": tenants[(k // 2) % len(tenants)],
                "prompt_tokens": 5 + k % 11, "generated_tokens": 20 + k % 17,
                "delivered_tokens": 20 + k % 17 - k % 3,
            }
            base = self.meter.open_slot(
                region, slot, rid.bytes, rec["model"], rec["tenant"], f"trace-{k}",
                time.time_ns() // 1_000_000,
            )
            self.meter.set_counts(base, rec["prompt_tokens"], rec["generated_tokens"],
                                  rec["delivered_tokens"])
            self.meter.close_slot(region, slot, "finished", "stop")
            with self.lock:
                self.written[rid.hex] = rec
            ids.append(rid.hex)
            if pace:
                pause.wait(pace)
        return ids

    def states(self) -> dict[int, int]:
        g = self.meter.geometry
        out = {FREE: 0, CLOSED: 0}
        for r in range(g.regions):
            for s in range(g.slots_per_region):
                state = self.meter.slot_state(r, s)
                out[state] = out.get(state, 0) + 1
        return out


class Env:
    """A state directory, a meter file, a config, and the processes started on them."""

    def __init__(self, root, **metering):
        self.root = str(root)
        self.state = os.path.join(self.root, "state")
        os.makedirs(self.state)
        self.meter_path = os.path.join(self.state, "meter")
        MeterFile.create(self.meter_path, Geometry(regions=2, slots_per_region=128)).close()
        self.sink_port = free_port()
        self.metrics_port = free_port()
        self.metrics_dir = os.path.join(self.root, "metrics")
        os.makedirs(self.metrics_dir)
        settings = {
            "state_dir": self.state,
            "batch_interval_secs": 0.1,
            "upload_target": f"127.0.0.1:{self.sink_port}",
            "upload_batch_size": 50,
            "offline_queue_size": 10_000,
            "sidecar_id": "node-test",
        }
        settings.update(metering)
        self.config = os.path.join(self.root, "sidecar.toml")
        with open(self.config, "w", encoding="utf-8") as fh:
            fh.write("[metering]\n")
            for key, value in settings.items():
                fh.write(f"{key} = {json.dumps(value)}\n")
            fh.write("[observability]\n")
            fh.write(f"metrics_port = {self.metrics_port}\nmetrics_host = \"127.0.0.1\"\n")
        self.procs: list[Proc] = []
        self.writer = Writer(self.meter_path)

    # -- processes -----------------------------------------------------------------------

    def start_meter(self, *extra: str, ready: bool = True) -> Proc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        proc = Proc(
            "meter",
            [sys.executable, "-m", "cy_sidecar.meter_store.process", "--config", self.config,
             "--meter-file", self.meter_path, *extra],
            env=env,
        )
        self.procs.append(proc)
        if ready:
            self.wait_status(lambda st: st["pid"] == proc.pid and st["ledger_error"] is None,
                             proc, what="the meter to be ready")
        return proc

    def start_sink(self, *extra: str) -> Proc:
        proc = Proc("sink", [sys.executable, "-m", "cy_sidecar.usage_sink",
                             "--listen", f"127.0.0.1:{self.sink_port}", *extra])
        self.procs.append(proc)
        proc.wait_for(r'"event":"listening"', timeout=20)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(15)

    # -- observing -----------------------------------------------------------------------

    def status(self) -> dict | None:
        try:
            with open(os.path.join(self.state, "meter-status.json"), encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def wait_status(self, predicate, proc: Proc | None = None, timeout: float = 30.0,
                    what: str = "a meter status") -> dict:
        def check():
            if proc is not None and proc.popen.poll() is not None:
                raise AssertionError(
                    f"meter exited with {proc.popen.returncode}:\n{proc.text()[-3000:]}"
                )
            st = self.status()
            return st if st is not None and predicate(st) else None

        return wait_until(check, timeout=timeout, what=what)

    def ledger_rows(self) -> list[dict]:
        with Ledger(os.path.join(self.state, "ledger.db"), create=False) as led:
            return list(led.iter_rows())


def accepted(sink: Proc) -> list[dict]:
    return sink.json_lines("accepted")


def wait_accepted(sink: Proc, count: int, timeout: float = 30.0) -> list[dict]:
    """Accepted lines once their record_count adds up to `count`."""
    return wait_until(
        lambda: (got := accepted(sink)) and sum(a["record_count"] for a in got) >= count
        and got,
        timeout=timeout, what=f"{count} records at the sink",
    )


def assert_exactly_once(lines: list[dict], written: dict[str, dict]) -> None:
    ids = [a["record_id"] for a in lines]
    assert len(ids) == len(set(ids)), "a record was accepted twice"
    assert set(ids) == set(written)
    for a in lines:
        want = written[a["record_id"]]
        got = {k: a[k] for k in want}
        assert got == want


def assert_gap_free(lines: list[dict]) -> None:
    by_boot: dict[str, list[dict]] = {}
    for a in lines:
        by_boot.setdefault(a["boot_id"], []).append(a)
    for boot, recs in by_boot.items():
        recs.sort(key=lambda a: a["seq"])
        assert [a["seq"] for a in recs] == list(range(1, len(recs) + 1)), boot
        running = 0
        for a in recs:
            running += a["delivered_tokens"]
            assert a["cumulative_delivered"] == running


@pytest.fixture
def make_env(tmp_path):
    envs: list[Env] = []

    def make(**metering) -> Env:
        env = Env(tmp_path / f"env{len(envs)}", **metering)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.stop_all()


def test_records_reach_the_sink_exactly_once_and_the_metrics_say_so(make_env):
    env = make_env()
    sink = env.start_sink()
    meter = env.start_meter()
    env.writer.write(60, models=("llama", "mistral"), tenants=("t1", "t2", "t3"))

    lines = wait_accepted(sink, 60)
    assert_exactly_once(lines, env.writer.written)
    assert_gap_free(lines)
    assert {a["sidecar_id"] for a in lines} == {"node-test"}
    assert {a["boot_id"] for a in lines} == {env.writer.meter.boot_id}
    st = env.wait_status(lambda st: st["pending"] == 0 and st["uploads_ok"] > 0)
    assert st["committed_total"] == 60 and st["last_seq"] == 60
    assert st["cumulative_delivered"] == sum(
        r["delivered_tokens"] for r in env.writer.written.values()
    )
    assert env.writer.states()[CLOSED] == 0

    url = f"http://127.0.0.1:{env.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(r'^sidecar_ledger_records_committed_total\{status="finished"\} (\S+)$',
                      text, re.M)
    assert match and float(match.group(1)) == 60.0
    assert re.search(r"^sidecar_meter_last_seq(\{[^}]*\})? 60\.0$", text, re.M)

    meter.signal(signal.SIGTERM)
    assert meter.popen.wait(15) == 0
    meter.stop(5)
    assert "Traceback" not in meter.text()


def test_the_sink_down_for_a_while_then_up_gets_every_record_once(make_env):
    env = make_env()
    env.start_meter()
    env.writer.write(40, tenants=("t1", "t2"))
    env.wait_status(lambda st: st["committed_total"] == 40 and st["upload_errors"] >= 2,
                    what="upload attempts against the stopped sink")
    assert env.status()["pending"] == 40
    sink = env.start_sink()
    lines = wait_accepted(sink, 40)
    env.wait_status(lambda st: st["pending"] == 0)
    assert_exactly_once(accepted(sink), env.writer.written)
    assert_gap_free(lines)


def test_lost_acks_are_resent_and_counted_once(make_env):
    env = make_env(upload_batch_size=8)
    sink = env.start_sink("--drop-acks", "2")
    env.start_meter()
    env.writer.write(30)
    env.wait_status(lambda st: st["committed_total"] == 30 and st["pending"] == 0,
                    what="every record acknowledged")
    lines = wait_accepted(sink, 30)
    assert_exactly_once(lines, env.writer.written)
    assert len(sink.json_lines("ack_dropped")) == 2
    assert len(sink.json_lines("duplicate")) >= 1
    rows = env.ledger_rows()
    assert len(rows) == 30 and all(r["acked_unix_ms"] for r in rows)
    # The rows whose acknowledgement was dropped were sent again; once acknowledged,
    # nothing about any row is ambiguous.
    assert sum(r["attempts"] > 1 for r in rows) >= 1
    assert not any(r["ambiguous"] for r in rows)


def test_a_meter_killed_while_records_flow_loses_and_duplicates_nothing(make_env):
    env = make_env(upload_batch_size=20)
    sink = env.start_sink()
    meter = env.start_meter()
    total = 400
    errors: list[BaseException] = []

    def produce():
        try:
            env.writer.write(total, models=("llama", "mistral"), pace=0.002)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    env.wait_status(lambda st: (st["committed_total"] or 0) >= 80, meter,
                    what="records flowing")
    meter.signal(signal.SIGKILL)
    assert meter.popen.wait(10) == -signal.SIGKILL
    meter.stop(5)
    again = env.start_meter()
    producer.join(60)
    assert not producer.is_alive() and not errors, errors

    lines = wait_accepted(sink, total, timeout=60)
    env.wait_status(lambda st: st["pending"] == 0 and st["committed_total"] == total, again)
    assert_exactly_once(accepted(sink), env.writer.written)
    assert_gap_free(lines)
    rows = env.ledger_rows()
    assert len(rows) == total
    assert sorted(r["seq"] for r in rows) == list(range(1, total + 1))
    assert env.writer.states()[CLOSED] == 0


def test_sigterm_commits_the_last_records_uploads_them_and_exits_0(make_env):
    # A long batch interval: only the shutdown's last upload can carry these records.
    env = make_env(batch_interval_secs=600.0)
    sink = env.start_sink()
    meter = env.start_meter()
    env.writer.write(12)
    meter.signal(signal.SIGTERM)
    assert meter.popen.wait(15) == 0
    assert env.writer.states()[CLOSED] == 0
    rows = env.ledger_rows()
    assert {r["record_id"] for r in rows} == set(env.writer.written)
    lines = wait_accepted(sink, 12, timeout=10)
    assert_exactly_once(lines, env.writer.written)
    assert all(r["acked_unix_ms"] for r in env.ledger_rows())
    meter.stop(5)
    assert "meter_stopped" in meter.text() and "Traceback" not in meter.text()


def test_the_queue_bound_with_the_sink_down_rolls_up_exact_sums(make_env):
    env = make_env(offline_queue_size=10, upload_batch_size=7)
    meter = env.start_meter()
    total = 90
    env.writer.write(total, models=("llama", "mistral"), tenants=("t1", "t2"))
    st = env.wait_status(
        lambda st: st["committed_total"] == total and st["pending"] <= 10
        and st["folded_total"] > 0,
        what="compaction of the offline queue",
    )
    assert st["rollups_total"] >= 1
    assert re.search(r"offline_queue_full folded=\d+ records into rollups=\d+", meter.text())

    sink = env.start_sink()
    lines = wait_accepted(sink, total)
    env.wait_status(lambda st: st["pending"] == 0)
    lines = accepted(sink)
    ids = [a["record_id"] for a in lines]
    assert len(ids) == len(set(ids))
    assert {a["kind"] for a in lines} == {"record", "rollup"}
    assert sum(a["record_count"] for a in lines) == total

    def sums(items, key_count):
        out: dict[tuple, list[int]] = {}
        for item in items:
            key = (item["model"], item["tenant"])
            acc = out.setdefault(key, [0, 0, 0, 0])
            acc[0] += item["prompt_tokens"]
            acc[1] += item["generated_tokens"]
            acc[2] += item["delivered_tokens"]
            acc[3] += key_count(item)
        return out

    assert sums(lines, lambda a: a["record_count"]) == sums(
        env.writer.written.values(), lambda r: 1
    )
    # Every single record that arrived as itself was written, and none also in a rollup.
    singles = {a["record_id"] for a in lines if a["kind"] == "record"}
    assert singles <= set(env.writer.written)
    folded = sum(a["record_count"] for a in lines if a["kind"] == "rollup")
    assert folded + len(singles) == total


def test_an_unusable_ledger_keeps_records_in_shared_memory_until_it_works(make_env):
    env = make_env(upload_target="")
    blocker = os.path.join(env.state, "ledger.db")
    os.mkdir(blocker)  # a directory where the ledger file should be: it cannot be opened
    meter = env.start_meter(ready=False)
    env.wait_status(lambda st: st["ledger_error"], meter, what="the ledger error")
    env.writer.write(5)
    meter.wait_for(r"ledger_unwritable records_in_shared_memory=5 retry_every=1", timeout=20)
    assert env.writer.states()[CLOSED] == 5
    assert meter.popen.poll() is None

    os.rmdir(blocker)
    st = env.wait_status(lambda st: st["ledger_error"] is None and st["committed_total"] == 5,
                         meter, what="recovery")
    assert st["last_seq"] == 5
    assert env.writer.states()[CLOSED] == 0
    assert "ledger_writable_again" in meter.text()
    # Checkpointed at once on recovery: the WAL gave its space back.
    assert os.path.getsize(blocker + "-wal") == 0


def test_old_meter_files_are_drained_then_deleted(make_env):
    env = make_env(upload_target="")
    old_path = env.meter_path + ".1000.old"
    old = MeterFile.create(old_path, Geometry(regions=1, slots_per_region=8))
    old_ids = []
    for slot in range(3):
        rid = uuid.uuid4()
        base = old.open_slot(0, slot, rid.bytes, "llama", "t9", "", 1)
        old.set_counts(base, 1, 2, 2)
        old.close_slot(0, slot, "interrupted")
        old_ids.append(rid.hex)
    old_boot = old.boot_id
    old.close()

    env.start_meter("--old-meter-file", old_path)
    env.wait_status(lambda st: st["committed_total"] == 3 and not st["old_meter_files"])
    assert not os.path.exists(old_path)
    rows = env.ledger_rows()
    assert sorted(r["record_id"] for r in rows) == sorted(old_ids)
    assert {(r["boot_id"], r["status"]) for r in rows} == {(old_boot, "interrupted")}


def test_a_missing_meter_file_is_exit_code_cant_create(make_env):
    env = make_env()
    os.unlink(env.meter_path)
    meter = env.start_meter(ready=False)
    assert meter.popen.wait(20) == 73
    meter.stop(5)
    assert "meter_file_unusable" in meter.text()


def test_report_export_and_force_flush_for_the_cli(make_env):
    env = make_env(upload_target="")
    env.start_meter()
    env.writer.write(15, models=("llama", "mistral"))
    env.wait_status(lambda st: st["committed_total"] == 15)

    report = ledger_report(env.state)
    assert report["pending"] == 15 and report["last_seq"] == 15
    assert report["last_upload_ok_unix"] is None
    by_model: dict[str, int] = {}
    for rec in env.writer.written.values():
        by_model[rec["model"]] = by_model.get(rec["model"], 0) + rec["delivered_tokens"]
    assert {t["model"]: t["delivered_tokens"] for t in report["totals"]} == by_model

    out = io.StringIO()
    assert export_records(env.state, "jsonl", out) == 15
    exported = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {e["record_id"] for e in exported} == set(env.writer.written)
    out = io.StringIO()
    assert export_records(env.state, "csv", out) == 15
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert sorted(int(r["seq"]) for r in table) == list(range(1, 16))

    cfg = config.load(env.config).with_overrides(upload_target=f"127.0.0.1:{env.sink_port}")
    down = force_flush(cfg)
    assert not down["ok"] and not down["connected"] and down["pending_after"] == 15

    sink = env.start_sink()
    result = force_flush(cfg)
    assert result["ok"] and result["acked"] == 15 and result["pending_after"] == 0
    assert_exactly_once(wait_accepted(sink, 15), env.writer.written)
    assert ledger_report(env.state)["last_upload_ok_unix"] is not None


def test_only_a_failure_to_connect_leaves_rows_unambiguous(make_env, tmp_path):
    env = make_env(upload_target="")
    led = Ledger(str(tmp_path / "own-ledger.db"))
    try:
        recs = [SlotRecord(0, i, CLOSED, "finished", uuid.uuid4().hex, 1, 1, 2, 2, 1, 2,
                           "stop", "llama", "t1", "") for i in range(4)]
        led.commit(recs, "boot-x")
        up = Uploader(f"127.0.0.1:{env.sink_port}", led, batch_size=10)
        res = up.upload_batch()
        assert not res.ok and not res.connected
        assert led.stats().pending_ambiguous == 0

        sink = env.start_sink("--fail-first", "1")
        # The channel reconnects after its own backoff; until then calls fail to connect.
        res = wait_until(lambda: (r := up.upload_batch()).connected and r, timeout=15,
                         interval=0.05, what="a call that reaches the sink")
        assert not res.ok  # the sink answered UNAVAILABLE: it may have stored them
        assert led.stats().pending_ambiguous == 4
        wait_until(lambda: len(sink.json_lines("rejected")) == 1, what="the rejected call")
        res = up.upload_batch()
        assert res.ok and res.acked == 4 and led.stats().pending == 0
        assert len(wait_accepted(sink, 4)) == 4
        up.close()
    finally:
        led.close()


def test_backoff_doubles_from_half_a_second_to_thirty_with_jitter():
    fixed = Backoff(jitter=0.0)
    assert [fixed.failure() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    fixed.reset()
    assert fixed.failure() == 0.5
    low, high = Backoff(rng=lambda: 0.0), Backoff(rng=lambda: 1.0)
    assert low.failure() == pytest.approx(0.4) and high.failure() == pytest.approx(0.6)
    assert all(0.4 <= Backoff().failure() <= 0.6 for _ in range(50))


def test_a_record_the_ledger_cannot_store_is_set_aside_and_blocks_nothing(make_env):
    env = make_env()
    sink = env.start_sink()
    env.start_meter()
    good_before = env.writer.write(3)
    # A corrupt slot: a count beyond SQLite's 64-bit integers (no proxy writes this; the
    # worker protocol bounds every count, but a damaged meter file must not stop the meter).
    region, slot = env.writer.meter.slots_in_state(FREE, 0)[0]
    base = env.writer.meter.open_slot(region, slot, uuid.uuid4().bytes, "llama", "t1",
                                      "corrupt", time.time_ns() // 1_000_000)
    env.writer.meter.set_counts(base, 1 << 63, 1, 1)
    env.writer.meter.close_slot(region, slot, "finished", "stop")
    good_after = env.writer.write(3)

    got = wait_accepted(sink, 6)
    assert {r["record_id"] for r in got} == set(good_before + good_after)
    rejected = os.path.join(env.state, "rejected-records.jsonl")
    wait_until(lambda: os.path.exists(rejected), what="the rejected-records file")
    with open(rejected, encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh]
    assert len(lines) == 1 and lines[0]["trace_id"] == "corrupt"
    assert lines[0]["prompt_tokens"] == 1 << 63
    assert env.writer.meter.slot_state(region, slot) == FREE
