"""The supervisor: no gRPC before fork, fast replacements, a named stop for what cannot boot."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time

import grpc
import psutil

from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from helpers import collect, new_channel, request, sink_records, wait_until


def proxies(stack) -> list[int]:
    sup = stack.sidecar.pid
    ready = re.findall(r"proxy ready index=\d+ pid=(\d+)", stack.sidecar.text())
    live = {p.pid for p in psutil.Process(sup).children()}
    return [int(pid) for pid in ready if int(pid) in live]


def test_the_supervisor_stays_single_threaded_with_no_grpc_object(running):
    # gRPC starts threads as soon as a server or channel exists; fork needs one thread.
    assert psutil.Process(running.sidecar.pid).num_threads() == 1
    assert len(proxies(running)) == 2


def test_killing_a_proxy_over_and_over_under_load_always_gets_a_ready_replacement(stack):
    stack.start_sidecar(procs=2)
    stop = threading.Event()
    errors: list[str] = []

    def load():
        with new_channel(stack.target) as channel:
            stub = pb_grpc.AiInferenceStub(channel)
            n = 0
            while not stop.is_set() and n < 5000:
                n += 1
                try:
                    collect(stub.StreamPredict(iter([request(tokens=3)]), timeout=10))
                except grpc.RpcError as exc:
                    errors.append(exc.code().name)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        workers = [pool.submit(load) for _ in range(2)]
        for round_ in range(20):
            victim = proxies(stack)[round_ % 2]
            mark = len(stack.sidecar.lines)
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            stack.sidecar.wait_for(r"proxy ready index=\d+ pid=\d+", timeout=5, start=mark)
            assert time.monotonic() - killed < 5
        stop.set()
        for w in workers:
            w.result()
    assert psutil.Process(stack.sidecar.pid).num_threads() == 1
    # Streams on a killed proxy fail (UNAVAILABLE); nothing ever hangs until a deadline.
    assert set(errors) <= {"UNAVAILABLE", "CANCELLED", "INTERNAL"}, errors
    with new_channel(stack.target) as channel:
        assert collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
            iter([request(tokens=4)]), timeout=10))["tokens"] == 4


def test_a_child_that_cannot_boot_stops_the_sidecar_with_its_exit_code(running):
    os.unlink(os.path.join(running.state_dir, "meter.shm"))  # a replacement cannot map it
    os.kill(proxies(running)[0], signal.SIGKILL)
    assert running.sidecar.popen.wait(30) == 73
    text = running.sidecar.text()
    assert "cannot open meter file" in text
    assert "cannot boot" in text and "stopping the sidecar" in text



def test_children_of_a_killed_supervisor_finish_their_work_and_leave(stack):
    """SIGKILL to the supervisor alone: the proxies drain and exit, the meter commits what
    they closed and exits too (none is left holding the port), and a new start serves."""
    stack.start_sidecar(procs=2)
    children = psutil.Process(stack.sidecar.pid).children()
    assert len(children) == 3
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        for i in range(5):
            collect(stub.StreamPredict(iter([request(tokens=3, trace_id=f"orphan-{i}")]),
                                       timeout=10))
    os.kill(stack.sidecar.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]
    text = stack.sidecar.text()
    assert "proxy lost its supervisor" in text and "meter lost its supervisor" in text
    stack.start_sidecar(procs=1)
    wait_until(lambda: {f"orphan-{i}" for i in range(5)}
               <= {r["trace_id"] for r in sink_records(stack)}, timeout=30,
               what="every record at the sink")
