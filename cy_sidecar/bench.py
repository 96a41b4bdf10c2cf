"""`cy-sidecar bench`: what the sidecar costs on this machine, next to a direct server and nginx.

One run starts everything itself, on loopback and on Unix sockets in a temporary directory,
and measures these targets with the same client and the same requests:

* ``direct``: a gRPC server written here (grpc.aio, AiInference) that generates the demo
  worker's tokens itself: the world without a sidecar, where the worker speaks gRPC.
* ``nginx wN``: nginx ``grpc_pass`` in front of that server, ``worker_processes N`` (when
  ``nginx`` is on PATH; otherwise the output says how to install it).
* ``cy pN on|off``: ``cy-sidecar start --procs N`` (through :class:`localrun.Stack`) with the
  demo worker in fast mode with stamps, metering on and off (``metering.enabled = false``);
  ``cy pN 1msg``: metering on, ``server.merge_chunks = 0`` (one message per token, as the
  direct server sends them), when the configuration has that key.

For each target: Health calls per second at 1 and at many callers with p50/p99 latency;
tokens per second with many concurrent streams; time to first token (TTFT) of one stream and
what it adds to direct's; the latency of every token from its producer to the client and
what it adds; memory (RSS and PSS) of the target's processes; CPU when idle and at a fixed
token rate. Then, separately, records per second through the usage ledger
(:mod:`cy_sidecar.meter_store.ledger`) and uploaded by :class:`meter_store.uploader.Uploader`
to a real ``cy-sidecar usage-sink`` on loopback.

How token latency is measured. The proxy does not forward the demo worker's ``ts`` stamp, and
this benchmark adds nothing to the product, so the stamp cannot reach the client. For the
latency probe the demo worker is therefore replaced, on the same socket, by a probe worker
written here on the public worker SDK: it paces tokens (``probe_tps`` a second, far below
capacity, so nothing queues) and sends as each chunk's text the ``time.monotonic_ns()`` taken
when it hands the chunk to the SDK. The client subtracts that from its own
``time.monotonic_ns()`` at receipt (CLOCK_MONOTONIC is one clock for all processes of a
machine). The direct server does exactly the same just before its write, so the difference
of the two medians is what the sidecar adds to every token. Inter-arrival of an unpaced
stream is reported too (``gap``): it is the per-token cost of the slowest stage, not latency.

Load comes from ``clients`` client processes (multiprocessing, spawn: a script that calls
:func:`main` needs the usual ``if __name__ == "__main__":`` guard), each with its own
grpc.aio channels (one TCP connection each), released in step. Every loop is bounded in
count and in time and stops by itself. Client and servers share the machine's cores, so the
figures compare targets on one machine; they are not capacities. The CPU that other programs
use during a target's phases is measured (machine busy time minus every process of ours);
above ``busy_pct`` the target is measured again, ``busy_retries`` times at most, and the
quietest attempt is kept.

Internal roles, started by the benchmark as separate processes::

    python -m cy_sidecar.bench direct-server --port 0
    python -m cy_sidecar.bench probe-worker --uds PATH
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from typing import Any, Callable, TextIO

import grpc
import psutil

from cy_sidecar import exitcodes
from cy_sidecar.localrun import Proc, Stack, StackError, cli, free_port
from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

MODEL = "demo"
DEFAULT_TOKENS = 48
MIB = 1 << 20
PROMPTS = tuple(f"Tell me about the harbour town, chapter {i}." for i in range(8))
NGINX_HINT = "apt-get install -y nginx (Debian/Ubuntu), then run the benchmark again"
PYSPY_HINT = "pip install py-spy (into the same virtual environment)"
CLIENT_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)
# The direct server keeps the proxies' keepalive settings, so transports behave alike.
DIRECT_SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)


class BenchError(RuntimeError):
    """A piece of the benchmark did not start or did not answer in time."""


@dataclasses.dataclass
class BenchOptions:
    """Sizes of one benchmark run. Every phase is bounded by these counts and times."""

    duration: float = 4.0            # seconds of each load phase
    idle_secs: float = 3.0           # CPU sampling window when idle
    health_concurrency: int = 64     # callers of the many-callers Health phase
    streams: int = 64                # concurrent streams of the throughput phase
    stream_tokens: int = 128         # tokens per stream in the throughput phase
    ttft_streams: int = 30           # sequential streams of the TTFT phase
    ttft_tokens: int = 256           # long enough for several messages (see merge_chunks)
    probe_streams: int = 4           # sequential paced streams of the latency probe
    probe_tokens: int = 50
    probe_tps: float = 200.0
    rate_tokens_per_sec: float = 2000.0  # fixed token rate of the CPU phase
    rate_stream_tokens: int = 50
    clients: int = 2                 # client processes
    channels_per_client: int = 8
    procs: tuple[int, ...] = (1, 2)  # proxy processes (and nginx worker_processes)
    repeat: int = 1
    max_calls_per_caller: int = 200_000
    ledger_records: int = 20_000     # committed in batches of ledger_batch
    ledger_batch: int = 100
    ledger_single: int = 500         # committed one per transaction
    upload_batch: int = 500
    nginx: bool = True
    metering_off: bool = True
    profile: bool = False            # sample a proxy with py-spy under load
    profile_secs: int = 8
    busy_pct: float = 25.0           # other programs' CPU (% of a core) that spoils a target
    busy_retries: int = 2            # measurements again of a target spoilt by them
    quick: bool = False

    @classmethod
    def quick_run(cls) -> "BenchOptions":
        return cls(duration=1.5, idle_secs=1.5, ttft_streams=10, probe_streams=2,
                   probe_tokens=30, ledger_records=3_000, ledger_single=100,
                   profile_secs=4, quick=True)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str        # key in the JSON
    label: str       # column header
    kind: str        # direct | nginx | sidecar
    procs: int = 1
    metering: bool = True
    merge: int | None = None  # server.merge_chunks; None: the product's default


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str
    kind: str  # rate | ms | us | mib | pct | int | delta | info (no ratio)


def rows_for(opts: BenchOptions) -> list[Row]:
    """The rows of the results table, in order (also the metric keys of the JSON)."""
    n, s = opts.health_concurrency, opts.streams
    return [
        Row("health_c1_rps", "Health calls/s, 1 caller", "rate"),
        Row("health_c1_p50_ms", "  p50 (ms)", "ms"),
        Row("health_c1_p99_ms", "  p99 (ms)", "ms"),
        Row(f"health_c{n}_rps", f"Health calls/s, {n} callers", "rate"),
        Row(f"health_c{n}_p50_ms", "  p50 (ms)", "ms"),
        Row(f"health_c{n}_p99_ms", "  p99 (ms)", "ms"),
        Row("stream_tps", f"tokens/s, {s} streams", "rate"),
        Row("stream_ttft_p50_ms", "  TTFT p50 under load (ms)", "ms"),
        Row("ttft_p50_ms", "TTFT p50, 1 stream (ms)", "ms"),
        Row("ttft_p99_ms", "  p99 (ms)", "ms"),
        Row("ttft_added_ms", "  added vs direct (ms)", "delta"),
        Row("ttft_server_ms", "  of it inside server (ms)", "ms"),
        Row("gap_us", "gap/token, 1 fast stream (us)", "us"),
        Row("token_latency_p50_ms", "token latency p50 (ms)", "ms"),
        Row("token_latency_p99_ms", "  p99 (ms)", "ms"),
        Row("token_latency_added_ms", "  added vs direct (ms)", "delta"),
        Row("rss_mib", "RSS, all processes (MiB)", "mib"),
        Row("pss_mib", "PSS, all processes (MiB)", "mib"),
        Row("processes", "processes", "int"),
        Row("cpu_idle_pct", "CPU idle (% of a core)", "pct"),
        Row("cpu_rate_pct", f"CPU at {opts.rate_tokens_per_sec:g} tok/s (%)", "pct"),
        Row("cpu_rate_us_per_token", "  CPU per token (us)", "us"),
        Row("cpu_rate_total_pct", "  with backend (%)", "pct"),
        Row("cpu_load_pct", f"CPU at {s} streams (%)", "pct"),
        Row("cpu_load_total_pct", "  with backend (%)", "pct"),
        Row("cpu_load_client_pct", "  client processes (%)", "pct"),
        Row("foreign_cpu_pct", "other programs' CPU (%)", "info"),
    ]


# -- small helpers ---------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q from 0 to 1); None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(nums) if nums else None


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.pop("NOTIFY_SOCKET", None)
    return env


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = times.user + times.system
    return out


def _memory(roles: list[tuple[str, int]]) -> list[dict[str, Any]]:
    out = []
    for role, pid in roles:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        out.append({"role": role, "pid": pid, "rss_mib": info.rss / MIB,
                    "pss_mib": info.pss / MIB, "uss_mib": info.uss / MIB})
    return out


def _wait_tcp(port: int, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with code {proc.popen.returncode}:\n"
                             + proc.text()[-2000:])
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name} did not accept connections on port {port} "
                             f"within {timeout:.0f} s")
        time.sleep(0.05)


def _stream_request(prompt: str, tokens: int, trace_id: str,
                    extra: dict[str, str] | None = None) -> pb.StreamPredictRequest:
    return pb.StreamPredictRequest(
        model_id=MODEL, prompt=prompt,
        generation=pb.GenerationParameters(max_new_tokens=tokens),
        metadata=pb.StreamMetadata(trace_id=trace_id, tenant="bench", extra=extra or {}),
    )


# -- the direct server (a worker that speaks gRPC itself) -------------------------------------


class DirectService(pb_grpc.AiInferenceServicer):
    """AiInference answered in this process with the demo worker's tokens, as fast as it can.

    A request with ``meta.extra`` ``bench_probe=1`` is paced at ``bench_tps`` tokens a second
    and each chunk's text is the ``time.monotonic_ns()`` taken just before its write.
    """

    def __init__(self) -> None:
        from cy_sidecar.worker_sdk.demo import words_for

        self.words_for = words_for
        self.since = time.time()
        self.open_streams = 0

    async def StreamPredict(self, request_iterator, context):
        req = await context.read()
        if req is grpc.aio.EOF:
            return
        started = time.monotonic()
        self.open_streams += 1
        try:
            await self._stream(req, context, started)
        finally:
            self.open_streams -= 1

    async def _stream(self, req, context, started: float) -> None:
        trace_id = req.metadata.trace_id
        count = req.generation.max_new_tokens or DEFAULT_TOKENS
        extra = req.metadata.extra
        probe = extra.get("bench_probe") == "1"
        tps = float(extra.get("bench_tps", "200")) if probe else 0.0
        words = [] if probe else self.words_for(req.prompt, count)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first_at = started
        for i in range(count):
            if probe:
                delay = t0 + i / tps - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                text = f" {time.monotonic_ns()}"
            else:
                text = words[i] if i == 0 else " " + words[i]
            msg = pb.StreamPredictResponse(trace_id=trace_id, chunk=text, index=i,
                                           token_count=1)
            if i == 0:
                first_at = time.monotonic()
                msg.ttft_ms = (first_at - started) * 1000
            await context.write(msg)
        elapsed = max(time.monotonic() - started, 1e-9)
        usage = pb.Usage(
            record_id=uuid.uuid4().hex, prompt_tokens=max(len(req.prompt.split()), 1),
            generated_tokens=count, delivered_tokens=count, status="finished",
            finish_reason="length",
        )
        final = pb.StreamPredictResponse(
            trace_id=trace_id, end_of_stream=True, index=count,
            tokens_per_sec=count / elapsed, usage=usage,
        )
        if count:
            final.ttft_ms = (first_at - started) * 1000
        # The same trailers as the proxy's, so both answers weigh the same.
        context.set_trailing_metadata((
            ("cy-usage-record-id", usage.record_id),
            ("cy-usage-prompt-tokens", str(usage.prompt_tokens)),
            ("cy-usage-generated-tokens", str(count)),
            ("cy-usage-delivered-tokens", str(count)),
            ("cy-usage-status", "finished"),
        ))
        await context.write(final)

    async def Control(self, request, context):
        return pb.ControlMessage(trace_id=request.trace_id, command=request.command,
                                 payload={"state": "ready"})

    async def Health(self, request, context):
        pid = str(os.getpid())
        return pb.WorkerHealthResponse(healthy=True, metrics={
            "state": "ready", "state_since_unix": f"{self.since:.3f}", "worker_pid": pid,
            "models": MODEL, "eta_ms": "0", "open_streams": str(self.open_streams),
            "proxy_pid": pid, "draining": "false",
        })


async def _direct_main(port: int) -> int:
    server = grpc.aio.server(options=DIRECT_SERVER_OPTIONS)
    pb_grpc.add_AiInferenceServicer_to_server(DirectService(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench direct server listening port={bound} pid={os.getpid()}", file=sys.stderr,
          flush=True)
    await stop.wait()
    await server.stop(1.0)
    return exitcodes.OK


# -- the probe worker (paced, a stamp in every chunk's text) ----------------------------------


async def _probe_generate(req):
    from cy_sidecar.worker_sdk import Chunk

    count = req.max_new_tokens or DEFAULT_TOKENS
    tps = float(req.extra.get("bench_tps", "200"))
    req.prompt_tokens = max(len(req.prompt.split()), 1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(count):
        delay = t0 + i / tps - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield Chunk(f" {time.monotonic_ns()}", 1)


async def _probe_main(uds: str) -> int:
    from cy_sidecar.worker_sdk import WorkerServer

    server = WorkerServer(_probe_generate, uds, [MODEL], name="bench-probe")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench probe worker listening uds={uds} pid={os.getpid()}", file=sys.stderr,
          flush=True)
    await stop.wait()
    await server.close()
    return exitcodes.OK


# -- client processes -------------------------------------------------------------------------


def _client_process(conn) -> None:
    """Main of one client process: run the parent's jobs until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            result = asyncio.run(_client_job(job, conn))
        except Exception as exc:  # handed to the parent, which names the target
            result = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            conn.send(result)
        except (BrokenPipeError, EOFError):
            return


async def _client_job(job: dict, conn) -> dict:
    """Connect, warm every channel up, report ready, wait for the start time, run the job."""
    channels = [grpc.aio.insecure_channel(job["target"], options=CLIENT_CHANNEL_OPTIONS)
                for _ in range(max(1, job.get("channels", 1)))]
    try:
        stubs = [pb_grpc.AiInferenceStub(ch) for ch in channels]
        await asyncio.gather(*(
            stub.Health(pb.WorkerHealthRequest(trace_id="warm-up"), timeout=20,
                        wait_for_ready=True)
            for stub in stubs
        ))
        conn.send({"ready": True})
        start_at = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        return await _JOBS[job["kind"]](job, stubs, start_at)
    finally:
        for ch in channels:
            await ch.close()


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {(exc.details() or '')[:120]}"


async def _job_health(job: dict, stubs: list, start_at: float) -> dict:
    end = start_at + job["duration"]
    lat: list[float] = []
    errors: list[str] = []
    req = pb.WorkerHealthRequest(trace_id="bench")

    async def caller(stub) -> None:
        for _ in range(job["max_calls"]):
            t0 = time.monotonic()
            if t0 >= end:
                return
            try:
                await stub.Health(req, timeout=10)
            except grpc.aio.AioRpcError as exc:
                errors.append(_rpc_error(exc))
                continue
            lat.append(time.monotonic() - t0)

    await asyncio.gather(*(caller(stubs[i % len(stubs)]) for i in range(job["callers"])))
    return {"calls": len(lat), "elapsed": time.monotonic() - start_at, "lat": lat,
            "errors": errors[:3], "error_count": len(errors)}


async def _job_streams(job: dict, stubs: list, start_at: float) -> dict:
    """`callers` loops of streams, back to back, until the end; tokens counted until then."""
    end = start_at + job["duration"]
    state = {"tokens": 0, "streams": 0}
    ttft: list[float] = []
    errors: list[str] = []

    async def loop_(i: int, stub) -> None:
        for k in range(job["max_streams"]):
            if time.monotonic() >= end:
                return
            req = _stream_request(PROMPTS[(i + k) % len(PROMPTS)], job["tokens"],
                                  f"bench-{job['client']}-{i}-{k}")
            t0 = time.monotonic()
            call = stub.StreamPredict(iter((req,)), timeout=job["duration"] + 30)
            first = True
            try:
                async for msg in call:
                    now = time.monotonic()
                    if now >= end:
                        call.cancel()
                        return
                    if msg.end_of_stream:
                        state["streams"] += 1
                    elif not msg.is_system:
                        if first:
                            ttft.append(now - t0)
                            first = False
                        state["tokens"] += msg.token_count
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors.append(_rpc_error(exc))

    await asyncio.gather(*(loop_(i, stubs[i % len(stubs)]) for i in range(job["callers"])))
    return {"tokens": state["tokens"], "streams": state["streams"], "ttft": ttft,
            "elapsed": job["duration"], "errors": errors[:3], "error_count": len(errors)}


async def _job_ttft(job: dict, stubs: list, start_at: float) -> dict:
    """One stream at a time: client TTFT, the server's own ttft_ms, time per token after
    the first message (tokens counted by token_count: a message may carry several)."""
    stub = stubs[0]
    ttft: list[float] = []
    server: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    limit = start_at + job["time_limit"]
    for k in range(job["count"]):
        if time.monotonic() >= limit:
            break
        req = _stream_request(PROMPTS[k % len(PROMPTS)], job["tokens"], f"bench-ttft-{k}")
        first = last = None
        later = 0  # tokens after the first message (a message may carry several)
        t0 = time.monotonic()
        try:
            async for msg in stub.StreamPredict(iter((req,)), timeout=30):
                now = time.monotonic()
                if msg.end_of_stream:
                    server.append(msg.ttft_ms / 1000.0)
                    continue
                if msg.is_system:
                    continue
                if first is None:
                    first = now
                else:
                    later += msg.token_count
                last = now
        except grpc.aio.AioRpcError as exc:
            errors.append(_rpc_error(exc))
            continue
        if first is not None:
            ttft.append(first - t0)
        if later:
            gaps.append((last - first) / later)
    return {"ttft": ttft, "server_ttft": server, "gaps": gaps, "errors": errors[:3],
            "error_count": len(errors)}


async def _job_rate(job: dict, stubs: list, start_at: float) -> dict:
    """Streams started on a fixed schedule (a fixed token rate), each read to its end."""
    state = {"tokens": 0, "late": 0.0}
    errors: list[str] = []

    async def one(k: int) -> None:
        req = _stream_request(PROMPTS[k % len(PROMPTS)], job["tokens"], f"bench-rate-{k}")
        try:
            async for msg in stubs[k % len(stubs)].StreamPredict(iter((req,)), timeout=30):
                if not msg.end_of_stream and not msg.is_system:
                    state["tokens"] += msg.token_count
        except grpc.aio.AioRpcError as exc:
            errors.append(_rpc_error(exc))

    tasks = []
    for k in range(job["count"]):
        delay = start_at + k * job["interval"] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            state["late"] = max(state["late"], -delay)
        tasks.append(asyncio.ensure_future(one(k)))
    await asyncio.gather(*tasks)
    return {"tokens": state["tokens"], "elapsed": time.monotonic() - start_at,
            "late_max": state["late"], "errors": errors[:3], "error_count": len(errors)}


async def _job_probe(job: dict, stubs: list, start_at: float) -> dict:
    """Paced streams whose chunk texts are producer stamps: receipt minus stamp per token."""
    stub = stubs[0]
    lat: list[float] = []
    errors: list[str] = []
    extra = {"bench_probe": "1", "bench_tps": str(job["tps"])}
    for k in range(job["count"]):
        req = _stream_request(PROMPTS[k % len(PROMPTS)], job["tokens"], f"bench-probe-{k}",
                              extra)
        try:
            async for msg in stub.StreamPredict(iter((req,)), timeout=60):
                received = time.monotonic_ns()
                if msg.end_of_stream or msg.is_system:
                    continue
                # One stamp per token; several when the server merged waiting chunks.
                for stamp in msg.chunk.split():
                    try:
                        lat.append((received - int(stamp)) / 1e9)
                    except ValueError:
                        errors.append(f"chunk {msg.chunk[:30]!r} is not a stamp")
                        break
        except grpc.aio.AioRpcError as exc:
            errors.append(_rpc_error(exc))
    return {"lat": lat, "errors": errors[:3], "error_count": len(errors)}


_JOBS = {
    "health": _job_health,
    "streams": _job_streams,
    "ttft": _job_ttft,
    "rate": _job_rate,
    "probe": _job_probe,
}


class Clients:
    """The client processes, started once and reused for every phase of every target."""

    def __init__(self, count: int):
        ctx = multiprocessing.get_context("spawn")
        self.conns = []
        self.procs = []
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_process, args=(child,),
                               name=f"cy-bench-client-{i}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @staticmethod
    def _recv(conn, timeout: float) -> dict:
        try:
            if not conn.poll(timeout):
                raise BenchError(f"a client process did not answer within {timeout:.0f} s")
            return conn.recv()
        except (EOFError, OSError) as exc:
            raise BenchError(f"a client process went away ({exc!r})") from None

    def run(self, jobs: list[dict], timeout: float,
            at_start: Callable[[float], None] | None = None) -> list[dict]:
        """Give job i to client i; start them together; returns their results in order."""
        conns = self.conns[: len(jobs)]
        for i, (conn, job) in enumerate(zip(conns, jobs)):
            conn.send(dict(job, client=i))
        first = [self._recv(conn, 60.0) for conn in conns]
        ready = [i for i, msg in enumerate(first) if msg.get("ready")]
        start_at = time.monotonic() + 0.1
        for i in ready:
            conns[i].send(start_at)
        if at_start is not None and ready:
            at_start(start_at)
        results = list(first)
        for i in ready:
            results[i] = self._recv(conns[i], timeout)
        return results

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()  # our own child, by pid
                proc.join(2)


def _split(total: int, parts: int) -> list[int]:
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts) if base or i < rest]


def _errors_of(results: list[dict]) -> list[str]:
    out = []
    for res in results:
        if res.get("error"):
            out.append(res["error"])
        if res.get("error_count"):
            out.append(f"{res['error_count']} failed calls, e.g. {res['errors'][:1]}")
    return out


# -- nginx --------------------------------------------------------------------------------


def nginx_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
    return match.group(1) if match else "unknown"


def nginx_conf(root: str, port: int, upstream_port: int, workers: int) -> str:
    """An nginx.conf for grpc_pass from 127.0.0.1:port to 127.0.0.1:upstream_port."""
    # reuseport: the kernel spreads connections over the workers, as it does over the
    # sidecar's proxies (without it one worker tends to accept them all).
    # A master running as root would switch its workers to "nobody", who cannot enter the
    # private temporary directory; on loopback in our own directory, keep the same user.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp_body;
    proxy_temp_path {root}/tmp_proxy;
    fastcgi_temp_path {root}/tmp_fastcgi;
    uwsgi_temp_path {root}/tmp_uwsgi;
    scgi_temp_path {root}/tmp_scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 1024;
    upstream direct {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} http2 reuseport;
        location / {{
            grpc_pass grpc://direct;
            grpc_read_timeout 120s;
            grpc_send_timeout 120s;
        }}
    }}
}}
"""


# -- the sidecar's processes ------------------------------------------------------------------


def sidecar_roles(supervisor_pid: int, control_path: str) -> list[tuple[str, int]]:
    """(role, pid) of the supervisor and its children, from `cy-sidecar status` data."""
    from cy_sidecar.supervisor.control import ControlError, request

    roles = [("supervisor", supervisor_pid)]
    try:
        status = request(control_path, "status")["status"]
        roles += [(c["role"], int(c["pid"])) for c in status["children"]]
    except (ControlError, KeyError, OSError, ValueError):
        try:
            kids = psutil.Process(supervisor_pid).children(recursive=True)
        except psutil.Error:
            kids = []
        roles += [("child", k.pid) for k in kids]
    return roles


def _proxy_states(control_path: str) -> list[str]:
    from cy_sidecar.supervisor.control import ControlError, request

    try:
        status = request(control_path, "status")["status"]
    except (ControlError, KeyError, OSError, ValueError):
        return []
    return [str(c.get("worker_state")) for c in status["children"] if c["role"] == "proxy"]


def _wait_proxies(control_path: str, ready: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = _proxy_states(control_path)
        if states and all((s == "ready") == ready for s in states):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"proxies still report worker states {states} after "
                             f"{timeout:.0f} s (waiting for {'ready' if ready else 'gone'})")
        time.sleep(0.05)


def metering_off_supported(root: str) -> tuple[bool, str]:
    """Does `cy-sidecar config check` accept metering.enabled = false?"""
    path = os.path.join(root, "check-metering-off.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f'[metering]\nenabled = false\nstate_dir = "{root}/check-state"\n')
    try:
        out = subprocess.run(cli("config", "check", path), capture_output=True, text=True,
                             timeout=60, env=_clean_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return out.returncode == 0, (out.stderr or out.stdout).strip()


# -- the benchmark ------------------------------------------------------------------------


class Progress:
    """One progress line on stderr (rewritten in place on a terminal)."""

    def __init__(self, stream: TextIO, total: int):
        self.stream = stream
        self.total = max(1, total)
        self.step = 0
        self.t0 = time.monotonic()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.width = 0

    def show(self, what: str, phase: str) -> None:
        text = (f"bench {time.monotonic() - self.t0:4.0f}s [{min(self.step + 1, self.total)}/"
                f"{self.total}] {what}: {phase}")
        if self.tty:
            self.stream.write("\r" + text + " " * max(0, self.width - len(text)))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def advance(self) -> None:
        self.step += 1

    def end(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


@dataclasses.dataclass
class _Probe:
    """What a target under measurement offers: an address and its processes."""

    address: str
    own: Callable[[], list[tuple[str, int]]]
    backend: Callable[[], list[tuple[str, int]]]
    to_probe: Callable[[], None] | None = None


class Bench:
    def __init__(self, opts: BenchOptions, err: TextIO):
        self.opts = opts
        self.err = err
        self.root = tempfile.mkdtemp(prefix="cy-bench-")
        self.notes: list[str] = []
        self.nginx = shutil.which("nginx") if opts.nginx else None
        self.targets = self._targets()
        self.clients: Clients | None = None
        steps = opts.repeat * (len(self.targets) + 1) + (1 if opts.profile else 0)
        self.progress = Progress(err, steps)

    def _targets(self) -> list[Target]:
        opts = self.opts
        targets = [Target("direct", "direct", "direct")]
        if self.nginx:
            targets += [Target(f"nginx_w{n}", f"nginx w{n}", "nginx", n) for n in opts.procs]
        elif opts.nginx:
            self.notes.append(f"nginx is not on PATH, so its columns are missing; install "
                              f"it with: {NGINX_HINT}")
        from cy_sidecar import config as config_mod

        merge = next((s.default for s in config_mod.SETTINGS if s.key == "merge_chunks"), 0)
        if merge:
            self.notes.append(
                f"the sidecar sends up to {merge} chunks that wait for a slow reader as one "
                "message (server.merge_chunks, its default); the direct server, and nginx "
                "in front of it, send one message per token")
        metering = [True]
        if opts.metering_off:
            ok, why = metering_off_supported(self.root)
            if ok:
                metering.append(False)
            else:
                self.notes.append("metering off was not measured: `cy-sidecar config check` "
                                  f"rejects metering.enabled = false ({why.splitlines()[-1]})")
        for n in opts.procs:
            for on in metering:
                state = "on" if on else "off"
                targets.append(Target(f"cy_p{n}_{state}", f"cy p{n} {state}", "sidecar", n, on))
            if merge:
                # Like for like with direct and nginx: one message per token.
                targets.append(Target(f"cy_p{n}_1msg", f"cy p{n} 1msg", "sidecar", n, True, 0))
        return targets

    # -- running --------------------------------------------------------------------------

    def run(self) -> dict:
        opts = self.opts
        started = time.time()
        runs: dict[str, list[dict]] = {t.name: [] for t in self.targets}
        details: dict[str, dict] = {}
        errors: dict[str, list[str]] = {t.name: [] for t in self.targets}
        ledger_runs: list[dict] = []
        profile = None
        self.clients = Clients(opts.clients)
        try:
            for rep in range(opts.repeat):
                for target, measure in self._one_repeat(rep):
                    result = self._quiet(target, measure)
                    self.progress.advance()
                    if "error" in result:
                        errors[target.name].append(result["error"])
                    errors[target.name] += result.pop("phase_errors", [])
                    details[target.name] = result.pop("detail", {})
                    runs[target.name].append(result)
                self.progress.show("ledger", "commit and upload")
                try:
                    ledger_runs.append(self._ledger(rep))
                except (BenchError, StackError, OSError, RuntimeError) as exc:
                    ledger_runs.append({"error": str(exc)})
                self.progress.advance()
            if opts.profile:
                profile = self._profile()
                self.progress.advance()
        finally:
            self.progress.end()
            self.clients.close()
        failed = any(errors.values()) or any("error" in r for r in ledger_runs)
        if not failed and not os.environ.get("CY_BENCH_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.notes.append(f"logs and files kept in {self.root}")
        return self._report(started, runs, details, errors, ledger_runs, profile)

    def _one_repeat(self, rep: int):
        direct = Proc("direct", [sys.executable, "-P", "-m", "cy_sidecar.bench", "direct-server",
                                 "--port", "0"], env=_clean_env(),
                      log_path=os.path.join(self.root, f"direct-{rep}.log"))
        try:
            port = int(direct.wait_for(r"listening port=(\d+)", 30).group(1))
            for target in self.targets:
                if target.kind == "direct":
                    probe = _Probe(f"127.0.0.1:{port}", lambda: [("server", direct.pid)],
                                   lambda: [])
                    yield target, functools.partial(self._guarded, target, probe)
                elif target.kind == "nginx":
                    yield target, functools.partial(self._nginx_target, target, rep, port,
                                                    direct.pid)
        finally:
            direct.stop()
        for target in self.targets:
            if target.kind == "sidecar":
                yield target, functools.partial(self._sidecar_target, target, rep)

    def _quiet(self, target: Target, measure: Callable[[], dict]) -> dict:
        """Measure; while other programs kept the machine busy, measure again (bounded).

        Of the attempts, the one with the least foreign CPU is kept."""
        result = measure()
        attempts = 1
        for _ in range(self.opts.busy_retries):
            busy = result.get("foreign_cpu_pct")
            if "error" in result or busy is None or busy <= self.opts.busy_pct:
                break
            self.progress.show(target.label, f"other programs used {busy:.0f}% of a core; "
                                             "measuring again")
            again = measure()
            attempts += 1
            if "error" not in again and (again.get("foreign_cpu_pct") or 0.0) < busy:
                result = again
        result["attempts"] = attempts
        return result

    def _guarded(self, target: Target, probe: _Probe) -> dict:
        try:
            return self._measure(target, probe)
        except (BenchError, StackError) as exc:
            return {"error": f"{target.label}: {exc}"}

    def _nginx_target(self, target: Target, rep: int, upstream: int, direct_pid: int) -> dict:
        root = tempfile.mkdtemp(prefix=f"{target.name}-{rep}-", dir=self.root)
        port = free_port()
        conf = os.path.join(root, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as fh:
            fh.write(nginx_conf(root, port, upstream, target.procs))
        self.progress.show(target.label, "starting nginx")
        proc = Proc(target.name, [self.nginx, "-p", root, "-c", conf, "-e",
                                  os.path.join(root, "error.log"), "-g", "daemon off;"],
                    env=_clean_env(), log_path=os.path.join(root, "nginx.out"))
        try:
            _wait_tcp(port, proc, 20)

            def own() -> list[tuple[str, int]]:
                try:
                    kids = psutil.Process(proc.pid).children()
                except psutil.Error:
                    kids = []
                return [("master", proc.pid)] + [("worker", k.pid) for k in kids]

            return self._measure(target, _Probe(f"127.0.0.1:{port}", own,
                                                lambda: [("server", direct_pid)]))
        except (BenchError, StackError) as exc:
            return {"error": f"{target.label}: {exc}"}
        finally:
            proc.stop()

    def _sidecar_target(self, target: Target, rep: int) -> dict:
        root = tempfile.mkdtemp(prefix=f"{target.name}-{rep}-", dir=self.root)
        stack = Stack.create(root=root, log_path=os.path.join(root, "stack.log"))
        # The product's defaults, except what a benchmark must change: uploads off (measured
        # separately below), a short reconnect delay for the swap to the probe worker.
        overrides: dict[str, Any] = {
            "metering.upload_target": "",
            "metering.batch_interval_secs": 10.0,
            "health.check_interval_secs": 5.0,
            "health.reconnect_delay_secs": 0.1,
        }
        if not target.metering:
            overrides["metering.enabled"] = False
        if target.merge is not None:
            overrides["server.merge_chunks"] = target.merge
        stack.write_config(**overrides)
        probe: list[Proc] = []
        control = os.path.join(stack.state_dir, "control.sock")
        try:
            self.progress.show(target.label, "starting demo worker and sidecar")
            stack.start_worker("--fast", "--stamp")
            stack.start_sidecar(procs=target.procs, timeout=60)
            _wait_proxies(control, True, 20)
            roles = sidecar_roles(stack.sidecar.pid, control)

            def backend() -> list[tuple[str, int]]:
                worker = probe[0] if probe else stack.worker
                return [("worker", worker.pid)]

            def to_probe() -> None:
                stack.worker.stop()
                _wait_proxies(control, False, 15)
                proc = Proc("probe-worker", [sys.executable, "-P", "-m", "cy_sidecar.bench",
                                             "probe-worker", "--uds", stack.worker_path],
                            env=_clean_env(), log_path=os.path.join(root, "probe.log"))
                probe.append(proc)
                proc.wait_for(r"bench probe worker listening", 30)
                _wait_proxies(control, True, 20)

            return self._measure(target, _Probe(stack.target, lambda: roles, backend,
                                                to_probe))
        except (BenchError, StackError) as exc:
            return {"error": f"{target.label}: {exc}"}
        finally:
            stack.stop()
            for proc in probe:
                proc.stop()

    def _run_jobs(self, jobs: list[dict], timeout: float,
                  at_start: Callable[[float], None] | None = None) -> list[dict]:
        assert self.clients is not None
        return self.clients.run(jobs, timeout, at_start)

    def _measure(self, target: Target, probe: _Probe) -> dict:
        """Every phase against one running target; returns its metrics of this run."""
        opts = self.opts
        show = lambda phase: self.progress.show(target.label, phase)  # noqa: E731
        address = probe.address
        out: dict[str, Any] = {}
        problems: list[str] = []
        base = {"target": address, "channels": 1}
        many = {"target": address, "channels": opts.channels_per_client}
        phase_timeout = opts.duration + 120

        show("warm-up")
        warm = self._run_jobs([dict(base, kind="ttft", count=5, tokens=8, time_limit=30)],
                              phase_timeout)
        problems += _errors_of(warm)

        show(f"CPU when idle ({opts.idle_secs:g} s)")
        time.sleep(0.5)
        clients = [("client", pid) for pid in self.clients.pids] if self.clients else []
        idle: dict[str, Any] = {}
        self._cpu_window(probe.own() + probe.backend() + clients, idle)(time.monotonic())
        time.sleep(opts.idle_secs)
        _close_window(idle)
        out["cpu_idle_pct"] = sum(v for (role, pid), v in _cpu_by_role(idle).items()
                                  if pid in {p for _, p in probe.own()})
        foreign = [_foreign_pct(idle)]

        show("Health, 1 caller")
        res = self._run_jobs([dict(base, kind="health", callers=1, duration=opts.duration,
                                   max_calls=opts.max_calls_per_caller)], phase_timeout)
        problems += _errors_of(res)
        self._health_metrics(out, "health_c1", res)

        n = opts.health_concurrency
        show(f"Health, {n} callers")
        jobs = [dict(many, kind="health", callers=c, duration=opts.duration,
                     max_calls=opts.max_calls_per_caller) for c in _split(n, opts.clients)]
        res = self._run_jobs(jobs, phase_timeout)
        problems += _errors_of(res)
        self._health_metrics(out, f"health_c{n}", res)

        show(f"TTFT, {opts.ttft_streams} streams one at a time")
        res = self._run_jobs([dict(base, kind="ttft", count=opts.ttft_streams,
                                   tokens=opts.ttft_tokens, time_limit=opts.duration * 4)],
                             phase_timeout)
        problems += _errors_of(res)
        r = res[0]
        out["ttft_p50_ms"] = _ms(percentile(r.get("ttft", []), 0.5))
        out["ttft_p99_ms"] = _ms(percentile(r.get("ttft", []), 0.99))
        out["ttft_server_ms"] = _ms(percentile(r.get("server_ttft", []), 0.5))
        gap = percentile(r.get("gaps", []), 0.5)
        out["gap_us"] = None if gap is None else gap * 1e6

        show(f"{opts.streams} streams of {opts.stream_tokens} tokens")
        every = probe.own() + probe.backend()
        cpu: dict[str, Any] = {}
        jobs = [dict(many, kind="streams", callers=c, tokens=opts.stream_tokens,
                     duration=opts.duration, max_streams=100_000)
                for c in _split(opts.streams, opts.clients)]
        res = self._run_jobs(jobs, phase_timeout, self._cpu_window(every + clients, cpu))
        _close_window(cpu)
        foreign.append(_foreign_pct(cpu))
        problems += _errors_of(res)
        tokens = sum(x.get("tokens", 0) for x in res)
        out["stream_tps"] = tokens / opts.duration
        out["stream_streams"] = sum(x.get("streams", 0) for x in res)
        out["stream_ttft_p50_ms"] = _ms(percentile(
            [v for x in res for v in x.get("ttft", [])], 0.5))
        load = _cpu_by_role(cpu)
        own_roles = {pid for _, pid in probe.own()}
        out["cpu_load_pct"] = sum(v for (role, pid), v in load.items() if pid in own_roles)
        out["cpu_load_total_pct"] = sum(v for (role, pid), v in load.items()
                                        if role != "client")
        out["cpu_load_client_pct"] = sum(v for (role, pid), v in load.items()
                                         if role == "client")

        memory = _memory(probe.own())
        out["rss_mib"] = sum(m["rss_mib"] for m in memory)
        out["pss_mib"] = sum(m["pss_mib"] for m in memory)
        out["processes"] = len(memory)

        rate = opts.rate_tokens_per_sec
        show(f"CPU at {rate:g} tokens/s")
        per_sec = rate / opts.rate_stream_tokens
        count = max(1, round(per_sec * opts.duration))
        cpu_rate: dict[str, Any] = {}
        res = self._run_jobs([dict(many, kind="rate", count=count, interval=1 / per_sec,
                                   tokens=opts.rate_stream_tokens)], phase_timeout,
                             self._cpu_window(every + clients, cpu_rate))
        _close_window(cpu_rate)
        foreign.append(_foreign_pct(cpu_rate))
        problems += _errors_of(res)
        by_role = {k: v for k, v in _cpu_by_role(cpu_rate).items() if k[0] != "client"}
        own_pct = sum(v for (role, pid), v in by_role.items() if pid in own_roles)
        wall = cpu_rate["t_end"] - cpu_rate["t_start"]
        got = res[0].get("tokens", 0)
        out["rate_achieved_tps"] = got / wall if wall > 0 else None
        out["rate_late_max_ms"] = _ms(res[0].get("late_max"))
        out["cpu_rate_pct"] = own_pct
        out["cpu_rate_total_pct"] = sum(by_role.values())
        out["cpu_rate_us_per_token"] = (own_pct / 100 * wall / got * 1e6) if got else None
        out["foreign_cpu_pct"] = max((f for f in foreign if f is not None), default=None)

        if probe.to_probe is not None:
            show("swapping to the probe worker")
            probe.to_probe()
        show(f"token latency, {opts.probe_streams} paced streams")
        res = self._run_jobs([dict(base, kind="probe", count=opts.probe_streams,
                                   tokens=opts.probe_tokens, tps=opts.probe_tps)],
                             phase_timeout + opts.probe_streams * opts.probe_tokens
                             / opts.probe_tps)
        problems += _errors_of(res)
        lat = res[0].get("lat", [])
        out["token_latency_p50_ms"] = _ms(percentile(lat, 0.5))
        out["token_latency_p99_ms"] = _ms(percentile(lat, 0.99))
        out["token_latency_samples"] = len(lat)

        out["detail"] = {
            "memory": memory,
            "cpu_load_by_role": [{"role": role, "pid": pid, "pct": v}
                                 for (role, pid), v in load.items()],
            "cpu_rate_by_role": [{"role": role, "pid": pid, "pct": v}
                                 for (role, pid), v in by_role.items()],
        }
        out["phase_errors"] = [f"{target.label}: {p}" for p in problems]
        return out

    @staticmethod
    def _cpu_window(roles: list[tuple[str, int]], into: dict) -> Callable[[float], None]:
        def at_start(start_at: float) -> None:
            time.sleep(max(0.0, start_at - time.monotonic()))
            into["roles"] = roles
            into["start"] = _cpu_seconds([pid for _, pid in roles])
            into["sys_start"] = _system_busy()
            into["self_start"] = _self_cpu()
            into["t_start"] = time.monotonic()

        return at_start

    @staticmethod
    def _health_metrics(out: dict, key: str, res: list[dict]) -> None:
        calls = sum(r.get("calls", 0) for r in res)
        elapsed = max((r.get("elapsed", 0.0) for r in res), default=0.0)
        lat = [v for r in res for v in r.get("lat", [])]
        out[f"{key}_rps"] = calls / elapsed if elapsed > 0 else None
        out[f"{key}_p50_ms"] = _ms(percentile(lat, 0.5))
        out[f"{key}_p99_ms"] = _ms(percentile(lat, 0.99))

    # -- the ledger -----------------------------------------------------------------------

    def _ledger(self, rep: int) -> dict:
        """Records/s committed through the real Ledger API, and uploaded to a usage sink."""
        from cy_sidecar.meter_store.ledger import Ledger
        from cy_sidecar.meter_store.slots import CLOSED, SlotRecord
        from cy_sidecar.meter_store.uploader import Uploader

        opts = self.opts
        root = os.path.join(self.root, f"ledger-{rep}")
        os.makedirs(root)
        now_ms = time.time_ns() // 1_000_000

        def records(count: int, first: int) -> list:
            return [
                SlotRecord(
                    region=0, slot=(first + i) % 1024, state=CLOSED, status="finished",
                    record_id=uuid.uuid4().hex, seq=first + i + 1, prompt_tokens=12,
                    generated_tokens=128, delivered_tokens=128,
                    started_unix_ms=now_ms - 2_000 + first + i,
                    ended_unix_ms=now_ms + first + i, finish_reason="length", model=MODEL,
                    tenant=f"tenant-{(first + i) % 8}", trace_id=f"bench-{first + i}",
                )
                for i in range(count)
            ]

        out: dict[str, Any] = {"batch": opts.ledger_batch, "upload_batch": opts.upload_batch}
        ledger = Ledger(os.path.join(root, "ledger.db"))
        try:
            boot = uuid.uuid4().hex
            batch = records(opts.ledger_records, 0)
            t0 = time.perf_counter()
            for i in range(0, len(batch), opts.ledger_batch):
                ledger.commit(batch[i: i + opts.ledger_batch], boot)
            out["commit_batched_rps"] = len(batch) / (time.perf_counter() - t0)
            single = records(opts.ledger_single, len(batch))
            t0 = time.perf_counter()
            for rec in single:
                ledger.commit([rec], boot)
            out["commit_single_rps"] = len(single) / (time.perf_counter() - t0)
            total = len(batch) + len(single)
            out["records"] = total
            out.update(self._upload(ledger, Uploader, root, total))
        finally:
            ledger.close()
        return out

    def _upload(self, ledger, uploader_cls, root: str, total: int) -> dict:
        port = free_port()
        sink_out = os.path.join(root, "sink.out")
        with open(sink_out, "wb") as fh:
            sink = subprocess.Popen(
                cli("usage-sink", "--listen", f"127.0.0.1:{port}"), stdout=fh,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_clean_env(),
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 30
            while b'"listening"' not in _read(sink_out):
                if sink.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("usage-sink did not start: " + _read(sink_out)[-500:]
                                     .decode(errors="replace"))
                time.sleep(0.05)
            up = uploader_cls(f"127.0.0.1:{port}", ledger, sidecar_id="bench",
                              batch_size=self.opts.upload_batch)
            try:
                acked = 0
                t0 = time.perf_counter()
                limit = time.monotonic() + 120
                for _ in range(total // self.opts.upload_batch + 10):
                    result = up.upload_pass(deadline=limit)
                    acked += result.acked
                    if not result.ok or result.sent == 0 or time.monotonic() > limit:
                        break
                elapsed = time.perf_counter() - t0
            finally:
                up.close()
        finally:
            if sink.poll() is None:
                os.kill(sink.pid, signal.SIGTERM)
                try:
                    sink.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(sink.pid, signal.SIGKILL)
                    sink.wait(5)
        accepted = _read(sink_out).count(b'"event":"accepted"')
        out = {"upload_rps": acked / elapsed if elapsed > 0 else None,
               "uploaded": acked, "sink_accepted": accepted}
        if acked != total:
            out["error"] = f"uploaded {acked} of {total} records"
        return out

    # -- profiling ------------------------------------------------------------------------

    def _profile(self) -> dict:
        """py-spy samples of the one proxy of `cy p1 on` while streams run."""
        opts = self.opts
        self.progress.show("profile", "py-spy on a proxy under load")
        pyspy = shutil.which("py-spy")
        local = os.path.join(os.path.dirname(sys.executable), "py-spy")
        if pyspy is None and os.path.exists(local):
            pyspy = local
        if pyspy is None:
            return {"error": f"py-spy not found; install it with: {PYSPY_HINT}"}
        root = os.path.join(self.root, "profile")
        os.makedirs(root)
        stack = Stack.create(root=root, log_path=os.path.join(root, "stack.log"))
        stack.write_config(**{"metering.upload_target": "",
                              "metering.batch_interval_secs": 10.0,
                              "health.check_interval_secs": 5.0})
        spy: list[subprocess.Popen] = []
        try:
            stack.start_worker("--fast", "--stamp")
            stack.start_sidecar(procs=1, timeout=60)
            control = os.path.join(stack.state_dir, "control.sock")
            _wait_proxies(control, True, 20)
            proxy = [pid for role, pid in sidecar_roles(stack.sidecar.pid, control)
                     if role == "proxy"][0]

            failures = []
            for native in (True, False):
                summary = self._spy(pyspy, stack.target, proxy, native,
                                    os.path.join(root, f"proxy-{int(native)}.raw"), spy)
                if "error" not in summary:
                    summary.update(pid=proxy, seconds=opts.profile_secs, native=native,
                                   failures=failures)
                    return summary
                failures.append(summary["error"])
            return {"error": "; ".join(failures)}
        except (BenchError, StackError, OSError) as exc:
            return {"error": str(exc)}
        finally:
            for proc in spy:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
            stack.stop()

    def _spy(self, pyspy: str, target: str, pid: int, native: bool, raw: str,
             spy: list[subprocess.Popen]) -> dict:
        """One py-spy recording of `pid` while the streams load runs; its summary."""
        opts = self.opts
        count = len(spy)

        def at_start(start_at: float) -> None:
            time.sleep(max(0.0, start_at - time.monotonic() + 0.5))
            # --native shows time in C code (gRPC core, protobuf, syscalls) but makes py-spy
            # pause the process for each sample: fine for a profile, which feeds no figure
            # of the tables.
            spy.append(subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--duration", str(opts.profile_secs),
                 "--rate", "100", "--format", "raw", "--threads",
                 *(["--native"] if native else ["--nonblocking"]), "--output", raw],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

        jobs = [dict(target=target, channels=opts.channels_per_client, kind="streams",
                     callers=c, tokens=opts.stream_tokens,
                     duration=opts.profile_secs + 1.5, max_streams=100_000)
                for c in _split(opts.streams, opts.clients)]
        self._run_jobs(jobs, opts.profile_secs + 120, at_start)
        if len(spy) == count:
            return {"error": "py-spy was not started"}
        proc = spy[-1]
        try:
            text, _ = proc.communicate(timeout=opts.profile_secs + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
        if proc.returncode != 0 or not os.path.exists(raw):
            mode = "--native" if native else "--nonblocking"
            return {"error": f"py-spy {mode} failed (exit {proc.returncode}): "
                             f"{(text or '').strip()[-300:]}"}
        with open(raw, encoding="utf-8", errors="replace") as fh:
            return summarise_collapsed(fh.read())

    # -- the report -----------------------------------------------------------------------

    def _report(self, started: float, runs: dict, details: dict, errors: dict,
                ledger_runs: list[dict], profile: dict | None) -> dict:
        opts = self.opts
        keys = [row.key for row in rows_for(opts)]
        extra_keys = ("stream_streams", "rate_achieved_tps", "rate_late_max_ms",
                      "token_latency_samples")
        direct_runs = runs.get("direct", [])
        for name, target_runs in runs.items():
            for i, run in enumerate(target_runs):
                ref = direct_runs[i] if i < len(direct_runs) else {}
                for key, base in (("ttft_added_ms", "ttft_p50_ms"),
                                  ("token_latency_added_ms", "token_latency_p50_ms")):
                    a, b = run.get(base), ref.get(base)
                    run[key] = a - b if a is not None and b is not None else None
        targets = []
        for t in self.targets:
            median = {k: _median([r.get(k) for r in runs[t.name]])
                      for k in (*keys, *extra_keys)}
            targets.append({
                "name": t.name, "label": t.label, "kind": t.kind, "procs": t.procs,
                "metering": t.metering if t.kind == "sidecar" else None,
                "merge_chunks": t.merge,
                "median": median, "runs": runs[t.name], "detail": details.get(t.name, {}),
                "errors": errors[t.name],
            })
        again = sum(1 for t in targets for r in t["runs"] if r.get("attempts", 1) > 1)
        if again:
            self.notes.append(
                f"{again} target run(s) were measured again because other programs used more "
                f"than {opts.busy_pct:g}% of a core meanwhile (the quietest attempt is kept)")
        busy = [t["median"].get("foreign_cpu_pct") or 0.0 for t in targets]
        if busy and max(busy) > 10:
            self.notes.append(
                f"other programs used up to {max(busy):.0f}% of a core while targets were "
                f"measured (load average {os.getloadavg()[0]:.1f} at the end): the figures "
                "are disturbed; run again on a quiet machine")
        ledger = {
            "median": {k: _median([r.get(k) for r in ledger_runs])
                       for k in ("commit_batched_rps", "commit_single_rps", "upload_rps")},
            "runs": ledger_runs,
        }
        return {
            "version": 1,
            "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 1),
            "machine": {
                "cpus": os.cpu_count(), "platform": platform.platform(),
                "python": platform.python_version(), "grpcio": grpc.__version__,
                "nginx": nginx_version(self.nginx) if self.nginx else None,
                "shared_cores": True, "load_average_end": list(os.getloadavg()),
            },
            "options": dataclasses.asdict(opts),
            "rows": [dataclasses.asdict(r) for r in rows_for(opts)],
            "targets": targets,
            "ratios": ratios(targets, rows_for(opts)),
            "ledger": ledger,
            "profile": profile,
            "methods": METHODS,
            "notes": self.notes,
        }


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[pid] - before[pid] for pid in after if pid in before)


def _system_busy() -> float:
    """CPU seconds the whole machine spent busy (every core, every process) since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def _close_window(window: dict) -> None:
    window["end"] = _cpu_seconds([pid for _, pid in window.get("roles", [])])
    window["sys_end"] = _system_busy()
    window["self_end"] = _self_cpu()
    window["t_end"] = time.monotonic()


def _foreign_pct(window: dict) -> float | None:
    """% of a core used during the window by processes that are not this benchmark's."""
    wall = window.get("t_end", 0.0) - window.get("t_start", 0.0)
    if wall <= 0 or "sys_end" not in window:
        return None
    ours = _cpu_delta(window["start"], window["end"])
    ours += window["self_end"] - window["self_start"]
    return max(0.0, 100 * (window["sys_end"] - window["sys_start"] - ours) / wall)


def _cpu_by_role(window: dict) -> dict[tuple[str, int], float]:
    """% of one core per (role, pid) between the start and the end of a CPU window."""
    wall = window.get("t_end", 0.0) - window.get("t_start", 0.0)
    start, end = window.get("start", {}), window.get("end", {})
    out = {}
    for role, pid in window.get("roles", []):
        if pid in start and pid in end and wall > 0:
            out[(role, pid)] = 100 * (end[pid] - start[pid]) / wall
    return out


_WAITING = frozenset({"epoll_wait", "poll", "select", "EpollSelector.select"})


def _split_frame(frame: str) -> tuple[str, str, bool]:
    """'func (path/file.py:12)' -> ('func', 'file path', is_python); native frames too."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame.strip())
    if not match:
        return frame.strip(), "", False
    func, path = match.groups()
    python = path.endswith(".py") or path.startswith("<frozen")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if not python:
        path = re.sub(r"\.cpython-[^.]*\.so$", ".so", os.path.basename(path))
        if func.startswith("0x"):
            func = "[code]"
    return func, path, python


def summarise_collapsed(text: str, top: int = 15) -> dict:
    """py-spy raw output (``--threads``, with or without ``--native``) in a few lists.

    ``threads``: busy samples per thread. ``self``: where busy samples were (a native leaf
    is named with the nearest Python frame that led to it). ``inclusive``: Python frames
    below the event loop (what an asyncio callback or coroutine spent, callees included).
    Samples whose leaf is a wait in epoll/select are counted as ``waiting``, not busy.
    """
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    busy = waiting = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        raw = [f for f in stack.split(";") if f]
        thread = "?"
        if raw and raw[0].startswith("thread ("):
            thread = raw.pop(0).split(": ", 1)[-1]
            if "_poll_wrapper" in thread:
                thread = "grpc poller thread (C-core)"
        frames = [_split_frame(f) for f in raw]
        if not frames:
            continue
        if frames[-1][0] in _WAITING:
            waiting += n
            continue
        busy += n
        threads[thread] = threads.get(thread, 0) + n
        func, path, python = frames[-1]
        name = f"{func} ({path})"
        if not python:
            caller = next((f for f in reversed(frames) if f[2]), None)
            if caller is not None:
                name += f" <- {caller[0]} ({caller[1]})"
        own[name] = own.get(name, 0) + n
        names = [f"{f[0]} ({f[1]})" for f in frames if f[2]]
        cut = 0
        for marker in ("Handle._run (asyncio/events.py)", "Thread.run (threading.py)"):
            if marker in names:
                cut = len(names) - names[::-1].index(marker)
                break
        for name in set(names[cut:]):
            incl[name] = incl.get(name, 0) + n

    def ranked(table: dict[str, int]) -> list[dict]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"frame": k, "samples": v, "pct": 100 * v / busy if busy else 0.0}
                for k, v in best]

    return {"samples": busy, "waiting": waiting, "threads": ranked(threads),
            "self": ranked(own), "inclusive": ranked(incl)}


def ratios(targets: list[dict], rows: list[Row]) -> dict[str, dict[str, dict]]:
    """Per sidecar target and row: value / direct's and value / nginx's with as many workers
    (for the 'added' rows: the difference instead)."""
    by_name = {t["name"]: t for t in targets}
    direct = by_name.get("direct")
    out: dict[str, dict[str, dict]] = {}
    for t in targets:
        if t["kind"] != "sidecar":
            continue
        nginx = by_name.get(f"nginx_w{t['procs']}")
        cells = {}
        for row in rows:
            if row.kind in ("int", "info"):
                continue
            value = t["median"].get(row.key)
            cell = {}
            for ref_name, ref in (("direct", direct), ("nginx", nginx)):
                base = ref["median"].get(row.key) if ref else None
                if value is None or base is None:
                    cell[ref_name] = None
                elif row.kind == "delta":
                    cell[ref_name] = value - base
                else:
                    cell[ref_name] = value / base if base else None
            cells[row.key] = cell
        out[t["name"]] = cells
    return out


METHODS = {
    "health": "unary Health calls back to back per caller, for the phase's duration; "
              "calls/s = calls / wall time; latency per call on the client",
    "streams": "concurrent callers each opening StreamPredict calls back to back; tokens "
               "counted on the client until the end of the phase (then cancelled)",
    "ttft": "one stream at a time; client time from the call to its first chunk; 'inside "
            "server' is the server's own ttft_ms (proxy: admission to the worker's first "
            "chunk; direct: almost nothing)",
    "gap": "median over streams of (last message - first message) / tokens after the first "
           "message, one unpaced stream at a time: the per-token cost of the slowest stage "
           "(messages may carry several tokens), not a latency",
    "token_latency": "probe worker (sidecar) or direct server paces probe_tps tokens/s and "
                     "sends time.monotonic_ns() as each chunk's text; client receipt time "
                     "minus that stamp; added = this target's p50 - direct's p50 (the demo "
                     "worker's own ts stamp is not forwarded by the proxy)",
    "memory": "psutil memory_full_info of the target's own processes after the streams "
              "phase (sidecar: supervisor, proxies, meter; nginx: master and workers; "
              "direct: the server, which also generates the tokens)",
    "cpu": "user+system CPU seconds of the target's own processes over the window, as % of "
           "one core; 'with backend' adds the demo worker (sidecar) or the direct server "
           "(nginx); fixed rate = streams started on a schedule, read to their end",
    "ledger": "synthetic SlotRecords committed through Ledger.commit into a temporary "
              "ledger (WAL, synchronous=FULL); then Uploader.upload_pass to a real "
              "cy-sidecar usage-sink on loopback",
}


# -- text output ------------------------------------------------------------------------------


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind in ("ms", "delta"):
        sign = "+" if kind == "delta" else ""
        if abs(value) < 10:
            return f"{value:{sign}.3f}"
        return f"{value:{sign}.1f}"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.1f}"


def _ratio(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "delta":
        return f"{value:+.2f}" if abs(value) < 100 else f"{value:+.0f}"
    return f"{value:.2f}x"


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, 96, subsequent_indent=indent, break_on_hyphens=False)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *body]):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def render(report: dict) -> str:
    """The report as text: header, results, ratios, details, ledger, profile, methods."""
    opts = report["options"]
    rows = [Row(**r) for r in report["rows"]]
    targets = report["targets"]
    mach = report["machine"]
    out = []
    runs = f"{opts['repeat']} run{'s' if opts['repeat'] > 1 else ''}"
    out.append(f"cy-sidecar bench, {report['started']}, {'quick, ' if opts['quick'] else ''}"
               f"{runs} (medians), {report['seconds']:.0f} s")
    out += _wrap(f"machine: {mach['platform']}, {mach['cpus']} CPUs; Python "
                 f"{mach['python']}, grpcio {mach['grpcio']}, nginx "
                 f"{mach['nginx'] or 'not installed'}")
    out += _wrap(f"client: {opts['clients']} processes (grpc.aio, up to "
                 f"{opts['channels_per_client']} connections each) on the same "
                 f"{mach['cpus']} CPUs as every server: the client and the server share "
                 f"{mach['cpus']} cores, so figures compare targets on this machine; they "
                 "are not capacities.")
    out.append("targets: direct = gRPC server in bench.py that generates the tokens itself "
               "(no sidecar)")
    out.append("         nginx wN = nginx grpc_pass in front of direct, worker_processes N")
    out.append("         cy pN on/off = cy-sidecar --procs N + demo worker --fast --stamp, "
               "metering on/off")
    if any(t.get("merge_chunks") == 0 for t in targets):
        out.append("         cy pN 1msg = metering on, server.merge_chunks = 0: one message "
                   "per token, like direct")
    # One table per process count (direct in each, for reference), so lines stay short.
    for n in sorted({t["procs"] for t in targets if t["kind"] != "direct"}):
        group = [t for t in targets if t["kind"] == "direct" or t["procs"] == n]
        out.append("")
        out.append(f"results, {n} proxy/nginx worker process{'es' if n > 1 else ''}")
        header = ["", *[t["label"] for t in group]]
        body = [[row.label, *[_fmt(t["median"].get(row.key), row.kind) for t in group]]
                for row in rows]
        out += _table(header, body)
    sidecars = [t for t in targets if t["kind"] == "sidecar"]
    for n in sorted({t["procs"] for t in sidecars}):
        group = [t for t in sidecars if t["procs"] == n]
        out.append("")
        out.append(f"cy-sidecar --procs {n} relative to direct/nginx w{n} "
                   "(x: ratio; 'added' rows: difference in ms)")
        header = ["", *[t["label"] for t in group]]
        body = []
        for row in rows:
            if row.kind in ("int", "info"):
                continue
            cells = []
            for t in group:
                cell = report["ratios"][t["name"]][row.key]
                cells.append(f"{_ratio(cell['direct'], row.kind)}/"
                             f"{_ratio(cell['nginx'], row.kind)}")
            body.append([row.label, *cells])
        out += _table(header, body)
    out.append("")
    out.append(f"per process (last run): RSS/PSS MiB after load; CPU % of a core at "
               f"{opts['streams']} streams")
    for t in targets:
        detail = t.get("detail") or {}
        load = {d["pid"]: d["pct"] for d in detail.get("cpu_load_by_role", [])}
        parts = []
        for m in detail.get("memory", []):
            cpu = load.get(m["pid"])
            parts.append(f"{m['role']} {m['rss_mib']:.0f}/{m['pss_mib']:.0f}"
                         + (f" {cpu:.0f}%" if cpu is not None else ""))
        backend = [d for d in detail.get("cpu_load_by_role", [])
                   if d["pid"] not in {m["pid"] for m in detail.get("memory", [])}
                   and d["role"] != "client"]
        parts += [f"({d['role']} {d['pct']:.0f}%)" for d in backend]
        client = [d["pct"] for d in detail.get("cpu_load_by_role", []) if d["role"] == "client"]
        if client:
            parts.append(f"(clients {'+'.join(f'{c:.0f}' for c in client)}%)")
        if parts:
            out += _wrap(f"  {t['label']:<10} " + ", ".join(parts), " " * 13)
    led = report["ledger"]["median"]
    last = report["ledger"]["runs"][-1] if report["ledger"]["runs"] else {}
    out.append("")
    out.append("ledger (meter_store.ledger: temporary SQLite file, WAL, synchronous=FULL)")
    out.append(f"  commit, {opts['ledger_batch']} records per transaction: "
               f"{_fmt(led['commit_batched_rps'], 'rate')} records/s")
    out.append(f"  commit, 1 record per transaction:    "
               f"{_fmt(led['commit_single_rps'], 'rate')} records/s")
    out.append(f"  upload to a usage-sink, {opts['upload_batch']} per call:  "
               f"{_fmt(led['upload_rps'], 'rate')} records/s (sink accepted "
               f"{last.get('sink_accepted', 'n/a')} of {last.get('records', 'n/a')})")
    prof = report.get("profile")
    if prof:
        out.append("")
        if prof.get("error"):
            out.append(f"profile: {prof['error']}")
        else:
            mode = "--native, pausing the process per sample" if prof["native"] else \
                "Python frames only"
            out.append(f"profile: py-spy ({mode}) of the proxy (pid {prof['pid']}) of cy p1 on "
                       f"at {opts['streams']} streams, {prof['seconds']} s: "
                       f"{prof['samples']} busy samples, {prof['waiting']} waiting in epoll")
            out.append("  busy samples by thread: " + ", ".join(
                f"{f['frame']} {f['pct']:.0f}%" for f in prof["threads"]))
            out.append("  where the busy samples were (native code: <- the Python frame above):")
            out += [f"    {f['pct']:5.1f}%  {f['frame']}" for f in prof["self"][:15]]
            out.append("  Python frames below the event loop, callees included:")
            out += [f"    {f['pct']:5.1f}%  {f['frame']}" for f in prof["inclusive"][:12]]
    out.append("")
    out.append("methods:")
    for key, text in report["methods"].items():
        out += _wrap(f"  {key}: {text}", "    ")
    problems = [e for t in targets for e in t["errors"]]
    problems += [r["error"] for r in report["ledger"]["runs"] if r.get("error")]
    if report["notes"] or problems:
        out.append("")
        out.append("notes:")
        for note in report["notes"]:
            out += _wrap(f"  {note}", "    ")
        for problem in problems:
            out += _wrap(f"  error: {problem}", "    ")
    return "\n".join(out) + "\n"


def main(quick: bool = False, repeat: int = 1, json_path: str | None = None,
         profile: bool = False, options: BenchOptions | None = None,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the benchmark, print the report, write JSON; returns an exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    opts = options or (BenchOptions.quick_run() if quick else BenchOptions())
    opts.repeat = max(1, repeat if options is None else opts.repeat)
    opts.profile = opts.profile or profile
    report = Bench(opts, err).run()
    out.write(render(report))
    out.flush()
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
    failed = [t for t in report["targets"] if not t["runs"] or t["errors"]]
    return exitcodes.FAILURE if failed else exitcodes.OK


def _helper_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m cy_sidecar.bench")
    sub = parser.add_subparsers(dest="role", required=True)
    direct = sub.add_parser("direct-server", help="the direct gRPC server of the benchmark")
    direct.add_argument("--port", type=int, default=0)
    probe = sub.add_parser("probe-worker", help="the paced, stamping probe worker")
    probe.add_argument("--uds", required=True)
    args = parser.parse_args(argv)
    try:
        if args.role == "direct-server":
            return asyncio.run(_direct_main(args.port))
        return asyncio.run(_probe_main(args.uds))
    except KeyboardInterrupt:
        return exitcodes.OK


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
