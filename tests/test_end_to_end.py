"""The main job: Gateway gRPC -> proxy processes -> demo worker, every token metered."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys

import grpc
import pytest

from cy_sidecar.localrun import cli
from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from helpers import collect, new_channel, request, sink_records, wait_until


def records_by_id(stack) -> dict[str, dict]:
    return {r["record_id"]: r for r in sink_records(stack)}


def test_a_prompt_streams_in_order_and_its_usage_reaches_the_sink(running):
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        out = collect(stub.StreamPredict(iter([request(tokens=25, trace_id="e2e-1")]),
                                         timeout=30))

    assert out["indexes"] == list(range(len(out["indexes"])))
    assert out["tokens"] == 25
    assert len(out["text"].split()) >= 20  # real words, not token numbers
    usage = out["usage"]
    assert usage.status == "finished"
    assert usage.delivered_tokens == 25 and usage.generated_tokens == 25
    assert usage.prompt_tokens > 0

    rec = wait_until(lambda: records_by_id(running).get(usage.record_id),
                     what="the record at the sink")
    assert rec["delivered_tokens"] == 25
    assert rec["status"] == "finished"
    assert rec["model"] == "demo" and rec["tenant"] == "t1" and rec["trace_id"] == "e2e-1"


def test_concurrent_streams_on_one_and_many_connections_are_all_metered(running):
    def run(stub, i):
        return collect(stub.StreamPredict(iter([request(tokens=5 + i % 7, trace_id=f"c{i}")]),
                                          timeout=60))

    results = []
    pids = set()
    channels = [new_channel(running.target) for _ in range(12)]
    try:
        stubs = [pb_grpc.AiInferenceStub(ch) for ch in channels]
        for stub in stubs:
            pids.add(stub.Health(pb.WorkerHealthRequest(), timeout=10).metrics["proxy_pid"])
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            # 30 streams multiplexed on one connection, 60 spread over twelve connections.
            futures = [pool.submit(run, stubs[0], i) for i in range(30)]
            futures += [pool.submit(run, stubs[i % 12], i) for i in range(60)]
            results = [f.result() for f in futures]
    finally:
        for ch in channels:
            ch.close()

    assert len(pids) == 2, f"connections reached only proxy pids {pids}"
    received = sum(r["tokens"] for r in results)
    assert received == sum(5 + i % 7 for i in range(30)) + sum(5 + i % 7 for i in range(60))
    ids = {r["usage"].record_id for r in results}
    assert len(ids) == 90
    recs = wait_until(
        lambda: (lambda got: got if ids <= set(got) else None)(records_by_id(running)),
        what="all 90 records at the sink",
    )
    assert sum(recs[i]["delivered_tokens"] for i in ids) == received


def test_a_client_cancel_after_k_chunks_stops_the_worker_and_is_metered(running):
    k = 3
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        call = stub.StreamPredict(
            iter([request(tokens=0, demo_tokens=5000, demo_tps=50, trace_id="cancel-me")]),
            timeout=30,
        )
        got = sum(next(call).token_count for _ in range(k))  # 3 tokens, unless merged
        call.cancel()

        def worker_idle():
            reply = stub.Control(pb.ControlMessage(command="state"), timeout=5)
            return reply.payload.get("open_streams") == "0"

        wait_until(worker_idle, timeout=2, what="the worker to drop the cancelled stream")

    def cancelled_record():
        for rec in sink_records(running):
            if rec["trace_id"] == "cancel-me":
                return rec
        return None

    rec = wait_until(cancelled_record, what="the cancelled record at the sink")
    assert rec["status"] == "cancelled"
    assert rec["delivered_tokens"] == got
    assert rec["prompt_tokens"] > 0


def test_sigterm_lets_open_streams_finish_records_them_and_exits_zero(running):
    channel = new_channel(running.target)
    stub = pb_grpc.AiInferenceStub(channel)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = [
            stub.StreamPredict(iter([request(tokens=0, demo_tokens=40, demo_tps=40,
                                             trace_id=f"term-{i}")]), timeout=30)
            for i in range(4)
        ]
        first = [next(c) for c in calls]  # every stream is open and flowing
        assert all(not m.end_of_stream for m in first)
        running.sidecar.signal(signal.SIGTERM)
        futures = [pool.submit(collect, c) for c in calls]
        outs = [f.result() for f in futures]
    channel.close()
    assert running.sidecar.popen.wait(30) == 0
    for out in outs:
        assert out["usage"].status == "finished"
        assert out["tokens"] + 1 == 40  # plus the first chunk read above

    # The records were committed before exit; the sink got them, or the ledger has them.
    ids = {o["usage"].record_id for o in outs}
    wait_until(lambda: ids <= set(records_by_id(running)), what="drained records at the sink")


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("server", "bind_addr", '"nope"', "server.bind_addr = 'nope'"),
        ("metering", "offline_queue_size", "-5", "metering.offline_queue_size = -5"),
        ("observability", "log_level", '"loud"', "observability.log_level = 'loud'"),
        ("health", "check_interval_secs", '"soon"', "health.check_interval_secs = 'soon'"),
    ],
)
def test_a_bad_config_value_gets_one_line_naming_key_value_and_allowed(
    tmp_path, section, key, value, expected
):
    path = tmp_path / "bad.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    proc = subprocess.run(cli("start", "--config", str(path)), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ") and expected in lines[0]
    assert "expected" in lines[0]


def test_a_port_held_by_another_program_is_refused_with_a_clear_message(stack):
    import socket

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # would silently share
    holder.bind(("127.0.0.1", stack.grpc_port))
    holder.listen()
    try:
        proc = subprocess.run(cli("start", "--config", stack.config_path), capture_output=True,
                              text=True, timeout=60)
    finally:
        holder.close()
    assert proc.returncode == 69
    assert f"127.0.0.1:{stack.grpc_port} is already in use" in proc.stderr
    assert "will not share it" in proc.stderr


def test_worker_errors_become_grpc_statuses_a_human_can_act_on(running):
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(iter([request(model="no-such-model")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "does not serve this model" in err.value.details()

        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(
                iter([request(tokens=0, demo_tokens=50, demo_fault="oom", demo_fault_after=4)]),
                timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of memory" in err.value.details()
        trailers = dict(err.value.trailing_metadata())
        assert trailers["cy-usage-status"] == "worker_oom"
        assert trailers["cy-usage-delivered-tokens"] == "4"


def test_start_from_a_checkout_runs_the_installed_package_not_the_folder(stack, tmp_path):
    # Users run the commands from the checkout, whose cy_sidecar/ folder lacks the process
    # folders that installing maps into the package: it must not shadow the installed one.
    # (An editable install would hide the problem, so this folder refuses to be imported.)
    checkout = tmp_path / "checkout"
    (checkout / "cy_sidecar").mkdir(parents=True)
    (checkout / "cy_sidecar" / "__init__.py").write_text(
        "raise ImportError('the folder in the current directory was imported')\n")
    script = os.path.join(os.path.dirname(sys.executable), "cy-sidecar")
    stack.start_sidecar(procs=1, argv0=[script], cwd=str(checkout))
    with new_channel(stack.target) as channel:
        out = collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
            iter([request(tokens=6)]), timeout=10))
    assert out["tokens"] == 6
    assert stack.sidecar.stop() == 0
