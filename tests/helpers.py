"""Helpers for the tests: requests, clients, polling with a deadline."""

from __future__ import annotations

import re
import socket
import time
import urllib.request

import grpc

from cy_sidecar import wire

from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc


def request(prompt="Tell me a story.", model="demo", tokens=10, tenant="t1", trace_id="",
            **extra) -> pb.StreamPredictRequest:
    return pb.StreamPredictRequest(
        model_id=model, prompt=prompt,
        generation=pb.GenerationParameters(max_new_tokens=tokens),
        metadata=pb.StreamMetadata(tenant=tenant, trace_id=trace_id,
                                   extra={k: str(v) for k, v in extra.items()}),
    )


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def sink_records(stack) -> list[dict]:
    return stack.sink.json_lines("accepted")


def new_channel(target: str) -> grpc.Channel:
    """A channel with its own TCP connection (no subchannel sharing inside this process)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def collect(call) -> dict:
    """Read a StreamPredict call to its end: text, token count, indexes, final usage."""
    out = {"text": "", "tokens": 0, "indexes": [], "usage": None, "system": []}
    for msg in call:
        out["indexes"].append(msg.index)
        if msg.is_system:
            out["system"].append(msg.chunk)
        elif msg.end_of_stream:
            out["usage"] = msg.usage
        else:
            out["text"] += msg.chunk
            out["tokens"] += msg.token_count
    return out


def health_status(target: str, service: str = "") -> str:
    """grpc.health.v1 Check of `service` on a fresh connection: SERVING, NOT_SERVING, ..."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with new_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def record_for(stack, trace_id: str, timeout: float = 15.0) -> dict:
    """The sink's accepted record of the stream with `trace_id` (waits for it)."""

    def find():
        for rec in stack.sink.json_lines("accepted"):
            if rec.get("trace_id") == trace_id:
                return rec
        return None

    return wait_until(find, timeout=timeout, what=f"the record of trace_id={trace_id}")


def worker_state(path: str) -> dict:
    """Ask the inference worker directly (as a proxy would) for its state payload."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(path)
    sock.sendall(wire.encode({"t": "hello", "v": 1, "role": "proxy", "pid": 1}))
    sock.sendall(wire.encode({"t": "ctl", "id": 1, "cmd": "state", "payload": {}}))
    decoder = wire.FrameDecoder(wire.FROM_WORKER)
    try:
        while True:
            for frame in decoder.feed(sock.recv(65536)):
                if frame["t"] == "ctl_reply":
                    return frame["payload"]
    finally:
        sock.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(stack) -> dict[str, float]:
    """The sidecar's /metrics as {'name{labels}': value}."""
    url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def proxy_pid_of(channel) -> int:
    """The pid of the proxy process that serves `channel`'s connection."""
    stub = pb_grpc.AiInferenceStub(channel)
    return int(stub.Health(pb.WorkerHealthRequest(), timeout=5).metrics["proxy_pid"])


def channel_per_proxy(target: str, procs: int, tries: int = 64) -> list[grpc.Channel]:
    """One connection to each of `procs` proxy processes (the kernel picks the process of
    each new connection, so new ones are made until every process has one)."""
    chosen: dict[int, grpc.Channel] = {}
    for _ in range(tries):
        channel = new_channel(target)
        pid = proxy_pid_of(channel)
        if pid in chosen:
            channel.close()
        else:
            chosen[pid] = channel
        if len(chosen) == procs:
            return list(chosen.values())
    raise AssertionError(f"{tries} connections reached only {len(chosen)} of {procs} proxies")
