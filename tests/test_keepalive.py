"""Keepalive: a pinging Gateway is never sent away; a vanished one is detected."""

from __future__ import annotations

import socket
import threading
import time

import grpc

from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from helpers import collect, new_channel, record_for, request, wait_until, worker_state


def test_a_gateway_pinging_often_without_calls_keeps_its_connection(running):
    states = []
    channel = grpc.insecure_channel(running.target, options=[
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.keepalive_time_ms", 1000),          # far more often than every 10 s
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ])
    channel.subscribe(states.append, try_to_connect=True)
    stub = pb_grpc.AiInferenceStub(channel)
    pid = stub.Health(pb.WorkerHealthRequest(), timeout=5).metrics["proxy_pid"]
    idle_until = time.monotonic() + 6
    while time.monotonic() < idle_until:  # idle, but pinging; watch the channel meanwhile
        assert grpc.ChannelConnectivity.TRANSIENT_FAILURE not in states
        time.sleep(0.5)
    out = collect(stub.StreamPredict(iter([request(tokens=0, demo_tokens=3, demo_tps=0.5,
                                                   demo_ttft_ms=1500)]), timeout=30))
    assert out["tokens"] == 3
    assert stub.Health(pb.WorkerHealthRequest(), timeout=5).metrics["proxy_pid"] == pid
    ready_at = states.index(grpc.ChannelConnectivity.READY)
    assert states[ready_at:] == [grpc.ChannelConnectivity.READY], states
    channel.close()


class Blackhole:
    """A TCP relay to the sidecar that can stop forwarding without closing anything."""

    def __init__(self, target_port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.silent = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        self.sockets += [client, upstream]
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    return
                if not self.silent.is_set():
                    dst.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            sock.close()


def test_a_gateway_that_goes_silent_is_detected_and_its_stream_metered(stack):
    stack.write_config(**{"server.keepalive_time_secs": 1.0,
                          "server.keepalive_timeout_secs": 1.0})
    stack.start_sidecar(procs=1)
    relay = Blackhole(stack.grpc_port)
    channel = new_channel(f"127.0.0.1:{relay.port}")
    stub = pb_grpc.AiInferenceStub(channel)
    call = stub.StreamPredict(iter([request(tokens=0, demo_tokens=100000, demo_tps=20,
                                            trace_id="silent")]), timeout=60)
    got = sum(next(call).token_count for _ in range(5))
    relay.silent.set()  # no FIN, no RST: the peer simply stops answering
    silent_at = time.monotonic()
    wait_until(lambda: int(worker_state(stack.worker_path)["open_streams"]) == 0,
               timeout=10, what="the sidecar to cancel the stream upstream")
    assert time.monotonic() - silent_at < 6
    rec = record_for(stack, "silent")
    assert rec["status"] in ("cancelled", "gateway_disconnected")
    assert rec["delivered_tokens"] >= got
    call.cancel()
    channel.close()
    relay.close()
