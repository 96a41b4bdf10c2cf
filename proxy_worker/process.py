"""Main of a proxy process, entered in a child right after the supervisor forks it.

Everything gRPC is created here, after the fork, never in the supervisor: gRPC's core keeps
threads and polling state that a fork would copy in a broken state. Each proxy process binds
``bind_addr`` itself with SO_REUSEPORT (the supervisor has checked at start that no foreign
process holds the port), keeps its own connection to the inference worker, and writes its
usage records into its own region of the shared-memory meter.

Signals: SIGTERM drains (GOAWAY, streams may finish within ``drain_grace_secs``, the rest end
with UNAVAILABLE and status ``shutdown``); SIGUSR1 does the same for a reload, except that the
process first leaves the port's listening group (see :mod:`.listener`), health stays SERVING,
and a stream still arriving on a connection it accepted is served, not refused. SIGINT is
ignored because Ctrl-C in a terminal reaches the whole process group and the supervisor
decides what happens. A proxy whose parent
disappears drains and exits by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from cy_sidecar import exitcodes, logs

log = logs.get("proxy")

HEARTBEAT_SECS = 0.5
LIVENESS_SERVICE = "liveness"
# On a reload, after leaving the listening group: how long no new call must have arrived
# before the server stops, and the most this wait takes.
QUIET_SECS = 0.15
SETTLE_MAX_SECS = 1.0


def _server_options(cfg) -> list[tuple[str, int]]:
    # Keepalive, stated explicitly (see the README's keepalive section): the server pings a
    # connection every keepalive_time_secs and drops it when a ping goes unanswered for
    # keepalive_timeout_secs, which catches a Gateway that vanished without FIN or RST. It
    # bears client pings at any rate, with or without calls in flight (no ping strikes), so
    # a Gateway pinging every 10 s is never sent GOAWAY "too_many_pings". No idle or age
    # limit closes a healthy connection.
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_time_secs * 1000)),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_secs * 1000)),
        ("grpc.http2.ping_timeout_ms", int(cfg.keepalive_timeout_secs * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.http2.max_pings_without_data", 0),
        # Larger than any valid request, so an oversized prompt reaches validation and gets
        # a clear INVALID_ARGUMENT instead of a transport-level error.
        ("grpc.max_receive_message_length", cfg.max_prompt_bytes * 2 + (1 << 20)),
    ]


async def _leave_listening_group(service, port: int) -> None:
    """Reload: stop receiving connections, then give those just accepted time to call.

    The replacement already listens. Once this process's listener is out of the port's
    group, a caller that connected in the instant before sends its first call within a round
    trip; waiting until no call has arrived for QUIET_SECS (at most SETTLE_MAX_SECS) lets
    that call start here before server.stop(), which would cancel it.
    """
    from .listener import close_listeners, migrate_req_enabled

    closed = close_listeners(port)
    migrate = migrate_req_enabled()
    log.info("proxy left the listening group port=%s sockets=%s queued_connections=%s "
             "next=serve what arrives, then GOAWAY", port, closed,
             {True: "migrated", False: "reset (net.ipv4.tcp_migrate_req=0)",
              None: "unknown"}[migrate])
    closed_at = time.monotonic()
    deadline = closed_at + SETTLE_MAX_SECS
    while time.monotonic() < deadline:
        if time.monotonic() - max(service.last_call_at, closed_at) >= QUIET_SECS:
            break
        await asyncio.sleep(0.02)


def run_proxy(cfg, index: int, region: int, meter_path: str, ready_fd: int) -> int:
    """Serve until drained. Returns an exit code from :mod:`cy_sidecar.exitcodes`."""
    try:
        return asyncio.run(_main(cfg, index, region, meter_path, ready_fd))
    except KeyboardInterrupt:
        return exitcodes.OK


async def _main(cfg, index: int, region: int, meter_path: str, ready_fd: int) -> int:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from cy_sidecar import metrics as m
    from cy_sidecar.meter_store.slots import MeterFile, MeterFileError
    from cy_sidecar.protos import cy_llm_pb2, cy_llm_pb2_grpc

    from .link import WorkerLink
    from .metering import RegionMeter
    from .service import SERVICE_NAME, ProxyService

    loop = asyncio.get_running_loop()
    try:
        meter_file = MeterFile.open(meter_path)
    except MeterFileError as exc:
        log.error("proxy cannot open meter file error=%r", str(exc))
        return exitcodes.CANT_CREATE
    meter = RegionMeter(meter_file, region)

    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    # "liveness": SERVING while this process serves at all, whatever the worker's state, so
    # a liveness probe restarts a stuck sidecar but not one waiting for its worker.
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    service: ProxyService | None = None

    def on_state(state: str, info: dict) -> None:
        if service is not None:
            service.on_link_state(state, info)

    worker_link = WorkerLink(
        cfg.worker_path,
        window=cfg.stream_window,
        max_frame_bytes=cfg.max_frame_bytes,
        check_interval=cfg.check_interval_secs,
        reconnect_delay=cfg.reconnect_delay_secs,
        max_attempts=cfg.max_reconnect_attempts,
        on_state=on_state,
        on_frame_error=m.FRAME_ERRORS.inc,
        on_connect_error=m.WORKER_CONNECTION_ERRORS.inc,
    )
    service = ProxyService(cfg, worker_link, meter, health_servicer)
    service.on_link_state(worker_link.state, {})

    server = grpc.aio.server(options=_server_options(cfg))
    cy_llm_pb2_grpc.add_AiInferenceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            cy_llm_pb2.DESCRIPTOR.services_by_name["AiInference"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        port = server.add_insecure_port(cfg.bind_addr)
    except RuntimeError as exc:
        port = 0
        log.debug("bind failed detail=%r", str(exc))
    if not port:
        log.error(
            "proxy cannot bind bind_addr=%s (in use by a process without SO_REUSEPORT?) "
            "next=exit", cfg.bind_addr,
        )
        return exitcodes.UNAVAILABLE
    await server.start()
    worker_link.start()
    log.info(
        "proxy listening index=%s region=%s bind_addr=%s worker_uds=%s",
        index, region, cfg.bind_addr, cfg.worker_path,
    )

    stop = asyncio.Event()
    retire = []  # SIGUSR1: replaced by a reload; streams that still arrive are served

    def on_retire() -> None:
        retire.append(True)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, on_retire)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    os.write(ready_fd, b"R")
    os.close(ready_fd)

    async def heartbeat() -> None:
        while not stop.is_set():
            meter_file.heartbeat(region)
            if os.getppid() != parent:
                log.error("proxy lost its supervisor parent=%s next=drain and exit", parent)
                stop.set()
                return
            try:
                await asyncio.wait_for(stop.wait(), HEARTBEAT_SECS)
            except asyncio.TimeoutError:
                pass

    beat = loop.create_task(heartbeat())
    await stop.wait()

    # Drain: refuse new streams, let open ones finish within the grace period, then cut.
    grace = cfg.drain_grace_secs
    log.info("proxy draining open_streams=%s grace_secs=%s reason=%s", service.open_streams,
             grace, "reload" if retire else "shutdown")
    # On shutdown new streams are refused at once. On a reload a stream that reaches this
    # process after its replacement listens (its connection was made just before) is
    # still served; GOAWAY moves the callers' next streams to the new process.
    service.draining = not retire
    if retire:
        await _leave_listening_group(service, port)
    else:
        await health_servicer.enter_graceful_shutdown()
    stopping = loop.create_task(server.stop(grace + 2.0))
    deadline = time.monotonic() + grace
    while service.open_streams and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if service.open_streams:
        log.warning(
            "proxy drain deadline open_streams=%s next=end them with UNAVAILABLE",
            service.open_streams,
        )
        await service.end_all_for_shutdown()
        cut_deadline = time.monotonic() + 2.0
        while service.open_streams and time.monotonic() < cut_deadline:
            await asyncio.sleep(0.02)
    if service.settling:
        await asyncio.wait(list(service.settling), timeout=2.0)
    await stopping
    await worker_link.close()
    beat.cancel()
    meter_file.heartbeat(region)
    log.info("proxy stopped requests=%s", service.requests_total)
    return exitcodes.OK
