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

from helpers import collect, new_channel, request, wait_until


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


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except FileNotFoundError:
        pass
    return False


def test_sigterm_while_the_command_is_still_starting_stops_it_cleanly(stack, tmp_path):
    """A SIGTERM before the supervisor exists, while the command still reads its config
    (a FIFO here, so that moment lasts until the test writes it): exit 0 with a log line,
    no child started."""
    import subprocess

    from cy_sidecar.localrun import cli

    stack.write_config()
    with open(stack.config_path) as f:
        text = f.read()
    fifo = str(tmp_path / "fifo.toml")
    os.mkfifo(fifo)
    popen = subprocess.Popen(cli("start", "--procs", "1", "--config", fifo),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=stack._env())
    try:
        wait_until(lambda: _catches(popen.pid, signal.SIGTERM) or popen.poll() is not None,
                   timeout=20, interval=0.005, what="the command to catch SIGTERM")
        popen.send_signal(signal.SIGTERM)

        def open_writer():  # succeeds once the command has opened the FIFO to read it
            if popen.poll() is not None:
                return "exited"
            try:
                return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return None

        fd = wait_until(open_writer, timeout=20, interval=0.005, what="the config read")
        assert fd != "exited", popen.communicate()[0]
        os.set_blocking(fd, True)
        os.write(fd, text.encode())
        os.close(fd)
        out, _ = popen.communicate(timeout=30)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    assert popen.returncode == 0, out
    assert "before starting any child" in out, out
    assert "proxy ready" not in out
