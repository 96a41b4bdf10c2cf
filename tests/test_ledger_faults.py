"""The fault matrix of the meter: three independent counts must agree.

For every scenario the tests compare what the inference worker sent (its own counter of
tokens in chunk frames), what the clients received, and what the usage receiver accepted
(unique record ids only). Nothing may be lost and no record id may be accepted twice.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal

import grpc
import psutil
import pytest

from cy_sidecar.meter_store import slots
from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from helpers import collect, new_channel, request, wait_until, worker_state


@pytest.fixture
def matrix(stack):
    """The stack with a sink that remembers accepted ids in SQLite across its restarts."""
    stack.sink.stop()
    stack.sink_db = os.path.join(stack.root, "sink.db")
    stack.old_sinks = []
    stack.start_sink("--db", stack.sink_db)
    return stack


def restart_sink(stack, *args: str) -> None:
    stack.old_sinks.append(stack.sink)
    stack.start_sink("--db", stack.sink_db, *args)


def accepted(stack, prefix: str) -> list[dict]:
    """Records accepted by every sink of this test whose trace id starts with prefix."""
    out = []
    for sink in [*stack.old_sinks, stack.sink]:
        out += [r for r in sink.json_lines("accepted")
                if r.get("trace_id", "").startswith(prefix) or r.get("kind") == "rollup"]
    return out


def wait_for_records(stack, prefix: str, count: int, timeout: float = 30.0) -> list[dict]:
    def enough():
        recs = accepted(stack, prefix)
        folded = sum(r["record_count"] for r in recs)
        return recs if folded >= count else None

    recs = wait_until(enough, timeout=timeout, what=f"{count} records {prefix}*")
    ids = [r["record_id"] for r in recs]
    assert len(ids) == len(set(ids)), "a record id was accepted twice"
    return recs


def sent_by_worker(stack) -> int:
    return int(worker_state(stack.worker_path)["tokens_sent"])


def run_streams(target: str, prefix: str, n: int, tokens: int, workers: int = 8) -> int:
    """n streams of exactly `tokens` tokens over a few connections; returns tokens received."""
    channels = [new_channel(target) for _ in range(4)]
    try:
        stubs = [pb_grpc.AiInferenceStub(ch) for ch in channels]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [
                pool.submit(collect, stubs[i % 4].StreamPredict(iter([request(
                    tokens=0, demo_tokens=tokens, trace_id=f"{prefix}{i}")]), timeout=60))
                for i in range(n)
            ]
            return sum(f.result()["tokens"] for f in futures)
    finally:
        for ch in channels:
            ch.close()


def test_a_proxy_killed_with_open_streams_leaves_interrupted_records(matrix):
    matrix.start_sidecar(procs=2)
    before = sent_by_worker(matrix)
    channels = [new_channel(matrix.target) for _ in range(6)]
    stubs = [pb_grpc.AiInferenceStub(ch) for ch in channels]
    pids = {int(s.Health(pb.WorkerHealthRequest(), timeout=5).metrics["proxy_pid"])
            for s in stubs}
    victim = sorted(pids)[0]
    calls = [s.StreamPredict(iter([request(tokens=0, demo_tokens=3000, demo_tps=100,
                                           trace_id=f"pk-{i}")]), timeout=60)
             for i, s in enumerate(stubs)]
    received = [sum(next(c).token_count for _ in range(5)) for c in calls]
    os.kill(victim, signal.SIGKILL)

    outcomes = []
    for call, got in zip(calls, received):
        try:
            for msg in call:
                got += msg.token_count
                if got >= 60:
                    call.cancel()
                    break
            outcomes.append(("ok", got))
        except grpc.RpcError as exc:
            outcomes.append((exc.code().name, got))
    for ch in channels:
        ch.close()

    recs = wait_for_records(matrix, "pk-", len(calls))
    by_trace = {r["trace_id"]: r for r in recs}
    interrupted = [r for r in recs if r["status"] == "interrupted"]
    assert interrupted, "the killed proxy's streams must become interrupted records"
    for i, (outcome, got) in enumerate(outcomes):
        rec = by_trace[f"pk-{i}"]
        if rec["status"] == "interrupted":
            assert outcome != "ok"
            assert rec["delivered_tokens"] >= got  # what was in flight may be lost
        else:
            assert rec["status"] == "cancelled"
    wait_until(lambda: int(worker_state(matrix.worker_path)["open_streams"]) == 0,
               what="the worker to drop every stream")
    assert sum(r["generated_tokens"] for r in recs) <= sent_by_worker(matrix) - before
    # The supervisor started a replacement that serves.
    matrix.sidecar.wait_for(r"proxy ready index=\d+ pid=(?!%d)" % victim)
    assert run_streams(matrix.target, "after-", 4, 5) == 20


def test_the_meter_killed_while_records_flow_loses_and_doubles_nothing(matrix):
    matrix.start_sidecar(procs=2)
    before = sent_by_worker(matrix)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        flow = pool.submit(run_streams, matrix.target, "mk-", 80, 20)
        meter = wait_until(
            lambda: [p for p in psutil.Process(matrix.sidecar.pid).children()
                     if _is_meter(matrix, p.pid)], what="the meter pid")[0]
        wait_until(lambda: len(accepted(matrix, "mk-")) >= 5, what="the first records")
        os.kill(meter.pid, signal.SIGKILL)
        received = flow.result()
    recs = wait_for_records(matrix, "mk-", 80)
    assert len(recs) == 80
    assert received == 80 * 20 == sum(r["delivered_tokens"] for r in recs)
    assert sent_by_worker(matrix) - before == sum(r["generated_tokens"] for r in recs)
    matrix.sidecar.wait_for(r"meter killed .* next=restart")


def _is_meter(stack, pid: int) -> bool:
    import json

    try:
        with open(os.path.join(stack.state_dir, "meter-status.json")) as fh:
            return json.load(fh).get("pid") == pid
    except (OSError, ValueError):
        return False


def test_the_whole_sidecar_killed_at_once_is_recovered_by_the_next_start(matrix):
    matrix.write_config(**{"metering.batch_interval_secs": 30.0})
    matrix.start_sidecar(procs=2)
    before = sent_by_worker(matrix)
    received = run_streams(matrix.target, "wk-", 20, 10)
    channel = new_channel(matrix.target)
    stub = pb_grpc.AiInferenceStub(channel)
    open_calls = [stub.StreamPredict(iter([request(tokens=0, demo_tokens=3000, demo_tps=100,
                                                   trace_id=f"wk-open-{i}")]), timeout=60)
                  for i in range(3)]
    open_got = [sum(next(c).token_count for _ in range(4)) for c in open_calls]
    matrix.sidecar.kill_group()  # every process of the sidecar at the same instant
    channel.close()
    assert not accepted(matrix, "wk-"), "the upload interval is long: nothing sent yet"

    matrix.write_config(**{"metering.batch_interval_secs": 0.2})
    matrix.start_sidecar(procs=2)
    recs = wait_for_records(matrix, "wk-", 23)
    finished = [r for r in recs if not r["trace_id"].startswith("wk-open-")]
    assert len(finished) == 20 and {r["status"] for r in finished} == {"finished"}
    assert sum(r["delivered_tokens"] for r in finished) == received == 200
    opened = sorted((r for r in recs if r["trace_id"].startswith("wk-open-")),
                    key=lambda r: r["trace_id"])
    assert [r["status"] for r in opened] == ["interrupted"] * 3
    for rec, got in zip(opened, open_got):
        assert rec["delivered_tokens"] >= got
    wait_until(lambda: int(worker_state(matrix.worker_path)["open_streams"]) == 0,
               what="the worker to notice the dead connections")
    assert sum(r["generated_tokens"] for r in recs) <= sent_by_worker(matrix) - before


def test_the_receiver_down_for_a_while_then_back_gets_everything_once(matrix):
    matrix.start_sidecar(procs=2)
    matrix.sink.stop()
    before = sent_by_worker(matrix)
    received = run_streams(matrix.target, "rd-", 30, 7)
    restart_sink(matrix)
    recs = wait_for_records(matrix, "rd-", 30, timeout=60)
    assert received == 210 == sum(r["delivered_tokens"] for r in recs)
    assert sent_by_worker(matrix) - before == sum(r["generated_tokens"] for r in recs)


def test_acknowledgements_lost_after_the_receiver_stored_a_batch_count_once(matrix):
    matrix.sink.stop()
    restart_sink(matrix, "--drop-acks", "3")
    matrix.start_sidecar(procs=2)
    received = run_streams(matrix.target, "al-", 30, 9)
    recs = wait_for_records(matrix, "al-", 30, timeout=60)
    assert len(recs) == 30
    assert received == 270 == sum(r["delivered_tokens"] for r in recs)
    wait_until(lambda: matrix.sink.json_lines("duplicate"), timeout=30,
               what="the retried batch to be answered as duplicates")


def test_a_full_offline_queue_rolls_up_exactly_and_drops_no_token(matrix):
    matrix.write_config(**{"metering.offline_queue_size": 10})
    matrix.start_sidecar(procs=2)
    matrix.sink.stop()
    received = run_streams(matrix.target, "qb-", 40, 11)
    matrix.sidecar.wait_for(r"folded|rollup", timeout=20)
    restart_sink(matrix)
    recs = wait_for_records(matrix, "qb-", 40, timeout=60)
    rollups = [r for r in recs if r["kind"] == "rollup"]
    assert rollups, "beyond the bound the oldest records are rolled up"
    assert sum(r["record_count"] for r in recs) == 40
    assert sum(r["delivered_tokens"] for r in recs) == received == 440
    assert {(r["model"], r["tenant"]) for r in rollups} == {("demo", "t1")}


def test_eight_processes_adding_to_one_model_total_lose_no_update(tmp_path):
    path = str(tmp_path / "meter.shm")
    meter = slots.MeterFile.create(path, slots.Geometry(regions=8, slots_per_region=16))
    pids = []
    for region in range(8):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                mine = slots.MeterFile.open(path)
                base = mine.model_word_base(region, mine.model_index(region, "llama"))
                for _ in range(100_000):
                    mine.add_delivered(base, 0, 1)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert meter.model_totals()["llama"]["delivered"] == 800_000


def test_four_proxies_fifty_streams_each_total_exactly_in_shared_memory(matrix):
    import json
    import subprocess

    from cy_sidecar.localrun import cli

    matrix.start_sidecar(procs=4)
    received = run_streams(matrix.target, "c7-", 200, 200, workers=16)
    assert received == 40_000
    recs = wait_for_records(matrix, "c7-", 200, timeout=60)
    assert sum(r["delivered_tokens"] for r in recs) == 40_000
    status = json.loads(subprocess.run(
        cli("status", "--json", "--config", matrix.config_path), capture_output=True,
        text=True, timeout=30, check=True).stdout)
    assert status["models"]["demo"]["delivered"] == 40_000
    assert status["models"]["demo"]["records"] == 200
