"""Streams whose caller leaves: handlers end, the worker stops, records are exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import psutil

from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from helpers import collect, new_channel, record_for, request, sink_records, wait_until


def only_proxy(stack) -> psutil.Process:
    """The proxy process serving this test's connections (procs=1)."""
    procs = psutil.Process(stack.sidecar.pid).children()
    with new_channel(stack.target) as channel:
        health = pb_grpc.AiInferenceStub(channel).Health(pb.WorkerHealthRequest(), timeout=5)
    pid = int(health.metrics["proxy_pid"])
    assert pid in {p.pid for p in procs}
    return psutil.Process(pid)


def proxy_health(stub) -> dict:
    return dict(stub.Health(pb.WorkerHealthRequest(), timeout=5).metrics)


def worker_open_streams(stub) -> int:
    return int(stub.Control(pb.ControlMessage(command="state"), timeout=5)
               .payload["open_streams"])


def test_two_hundred_cancelled_streams_leave_no_fds_tasks_or_streams_behind(stack):
    stack.start_sidecar(procs=1)
    proxy = only_proxy(stack)
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        collect(stub.StreamPredict(iter([request(tokens=3)]), timeout=10))  # warm up
        fds_before = proxy.num_fds()
        read: dict[str, int] = {}
        tasks_before = int(proxy_health(stub)["asyncio_tasks"])
        for i in range(200):
            call = stub.StreamPredict(iter([request(
                tokens=0, demo_tokens=5000, demo_tps=200, trace_id=f"c1-{i}")]), timeout=30)
            read[f"c1-{i}"] = sum(next(call).token_count for _ in range(3))
            call.cancel()
        wait_until(lambda: proxy_health(stub)["open_streams"] == "0", timeout=5,
                   what="open streams back to 0")
        wait_until(lambda: worker_open_streams(stub) == 0, timeout=5,
                   what="the worker to have dropped every cancelled stream")
        wait_until(lambda: abs(int(proxy_health(stub)["asyncio_tasks"]) - tasks_before) <= 2,
                   timeout=5, what="asyncio tasks back to their count before")
        assert abs(proxy.num_fds() - fds_before) <= 2
    recs = wait_until(
        lambda: (lambda r: r if len(r) >= 200 else None)(
            [x for x in sink_records(stack) if x["trace_id"].startswith("c1-")]),
        timeout=30, what="200 cancelled records")
    assert {r["status"] for r in recs} == {"cancelled"}
    # At 5 ms a token a message or two may be in flight when the cancel lands, each of up
    # to server.merge_chunks (32) tokens when the proxy merged waiting chunks; the exact
    # count at 20 ms a token is asserted in the end-to-end cancel test.
    bad = [(read[r["trace_id"]], r["delivered_tokens"], r["generated_tokens"]) for r in recs
           if not read[r["trace_id"]] <= r["delivered_tokens"] <= r["generated_tokens"]
           <= read[r["trace_id"]] + 2 * 32 + 64]
    assert not bad


def test_a_client_that_stops_reading_is_bounded_and_ends_at_its_deadline(stack):
    stack.start_sidecar(procs=1)
    proxy = only_proxy(stack)
    rss_before = proxy.memory_info().rss
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        call = stub.StreamPredict(iter([request(
            tokens=0, demo_tokens=1_000_000, demo_tps=100_000,
            prompt="x " * 2000, trace_id="slow-reader")]), timeout=3)
        next(call)  # then read nothing until the deadline
        wait_until(lambda: call.done(), timeout=10, what="the deadline")
    rec = record_for(stack, "slow-reader")
    assert rec["status"] in ("deadline", "cancelled")
    # The gRPC connection's own HTTP/2 window absorbs some output; beyond it the proxy
    # buffers at most one credit window (64 chunks) before the worker is paused.
    assert rec["generated_tokens"] - rec["delivered_tokens"] <= 64
    assert rec["generated_tokens"] < 1_000_000, "the worker must be paused by flow control"
    assert proxy.memory_info().rss - rss_before < 30 * 1024 * 1024


CLIENT = r"""
import sys, grpc
from cy_sidecar.protos import cy_llm_pb2 as pb, cy_llm_pb2_grpc as g
stub = g.AiInferenceStub(grpc.insecure_channel(sys.argv[1]))
req = pb.StreamPredictRequest(model_id="demo", prompt="go on",
    metadata=pb.StreamMetadata(trace_id="killed-client",
                               extra={"demo_tokens": "2000", "demo_tps": "50"}))
for msg in stub.StreamPredict(iter([req]), timeout=60):
    print(msg.token_count, flush=True)
"""


def test_a_cancel_reaches_the_worker_fast_and_the_record_has_what_was_delivered(running):
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        call = stub.StreamPredict(iter([request(tokens=0, demo_tokens=2000, demo_tps=50,
                                                trace_id="c4a")]), timeout=60)
        got = 0
        started = time.monotonic()
        for msg in call:
            got += msg.token_count
            if time.monotonic() - started > 1.0:
                break
        call.cancel()
        cancelled_at = time.monotonic()
        wait_until(lambda: worker_open_streams(stub) == 0, timeout=1.0, interval=0.01,
                   what="the worker to get the cancel")
        assert time.monotonic() - cancelled_at < 0.5
    rec = record_for(running, "c4a")
    assert rec["status"] == "cancelled"
    assert got <= rec["delivered_tokens"] <= got + 2
    assert rec["generated_tokens"] < 200


def test_a_killed_client_process_stops_its_stream_on_the_worker(running):
    client = subprocess.Popen([sys.executable, "-c", CLIENT, running.target],
                              stdout=subprocess.PIPE, text=True)
    printed = 0
    for line in client.stdout:
        printed += int(line)
        if printed >= 20:
            break
    os.kill(client.pid, signal.SIGKILL)
    client.wait(5)
    killed_at = time.monotonic()
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        wait_until(lambda: worker_open_streams(stub) == 0, timeout=2.0, interval=0.02,
                   what="the worker to drop the dead client's stream")
    assert time.monotonic() - killed_at < 1.5
    rec = record_for(running, "killed-client")
    assert rec["status"] in ("cancelled", "gateway_disconnected")
    assert printed <= rec["delivered_tokens"] < 200


def test_usage_reported_only_at_the_end_still_reaches_a_cancelled_record(running):
    read: list[int] = []
    for i in range(5):
        with new_channel(running.target) as channel:
            stub = pb_grpc.AiInferenceStub(channel)
            call = stub.StreamPredict(iter([request(
                prompt="one two three four five six", tokens=0, demo_tokens=500,
                demo_tps=50, demo_usage_at_end_only="1", trace_id=f"c5-{i}")]), timeout=30)
            read.append(sum(next(call).token_count for _ in range(3)))
            call.cancel()
    for i in range(5):
        rec = record_for(running, f"c5-{i}")
        assert rec["prompt_tokens"] == 6
        assert rec["delivered_tokens"] == read[i]
        assert rec["status"] == "cancelled"
    ids = [r["record_id"] for r in sink_records(running) if r["trace_id"].startswith("c5-")]
    assert len(ids) == 5 == len(set(ids))


def test_a_thousand_slow_readers_keep_the_proxy_memory_bounded(stack):
    import asyncio

    # Pings at the product's default pace: a thousand streams starting at once on two
    # shared cores can keep the worker busy for seconds, which is not what this measures.
    stack.write_config(**{"server.max_concurrent_streams": 1200,
                          "health.check_interval_secs": 5.0})
    stack.start_sidecar(procs=1)
    proxy = only_proxy(stack)
    rss_before = proxy.memory_info().rss

    async def readers():
        channel = grpc.aio.insecure_channel(stack.target)
        stub = pb_grpc.AiInferenceStub(channel)
        calls = [stub.StreamPredict(iter([request(tokens=0, demo_tokens=100_000,
                                                  demo_tps=200, trace_id=f"slow-{i}")]),
                                    timeout=60) for i in range(1000)]
        for call in calls:
            await call.read()  # one message each, then they stop reading
        peak = 0
        for _ in range(20):
            await asyncio.sleep(0.1)
            peak = max(peak, proxy.memory_info().rss)
        for call in calls:
            call.cancel()
        await channel.close()
        return peak

    peak = asyncio.run(readers())
    # 1000 streams, each with at most one credit window buffered in the proxy.
    assert peak - rss_before < 200 * 1024 * 1024
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        wait_until(lambda: proxy_health(stub)["open_streams"] == "0", timeout=20,
                   what="all slow streams to end")
