"""The reference usage receiver: what a Gateway implements for ``UsageService/Upload``.

Owner: ``cy-sidecar usage-sink`` (and the tests), one process. It deduplicates by record_id in
SQLite (a file when ``db_path`` is given, so a restarted sink still knows what it stored;
in memory otherwise) and prints one JSON line per record to stdout::

    {"event":"listening","addr":"127.0.0.1:50099"}          first line, with the real port
    {"event":"accepted","sidecar_id":...,"record_id":...,...} newly stored (all record fields)
    {"event":"duplicate","record_id":...}                     stored earlier; acknowledged again
    {"event":"rejected","call":N,"reason":"fail_first"}       nothing stored
    {"event":"ack_dropped","call":N,"records":K}              stored, but the caller gets an error

Calls are numbered from 1 in arrival order. The first ``fail_first`` calls are answered
UNAVAILABLE without storing anything; the next ``drop_acks`` calls store their records and
then answer UNAVAILABLE, so the sidecar never sees the acknowledgement (the "committed but ack
lost" case). ``delay_ms`` is slept before each call is handled.

Retried: nothing; the sender retries. Lost on a crash: nothing that was acknowledged (with a
db file, each call's records are committed before the answer); an in-memory sink forgets
everything, so a resent record is accepted again.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sqlite3
import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import orjson
from google.protobuf.descriptor import FieldDescriptor

from cy_sidecar import exitcodes
from cy_sidecar.protos import usage_pb2, usage_pb2_grpc

MAX_MESSAGE_BYTES = 64 << 20

_FIELDS = tuple(f.name for f in usage_pb2.UsageRecord.DESCRIPTOR.fields)


def _emit(lock: threading.Lock, obj: dict[str, Any]) -> None:
    line = orjson.dumps(obj).decode() + "\n"
    with lock:
        sys.stdout.write(line)
        sys.stdout.flush()


class _Store:
    """The set of stored records, keyed by record_id, in one SQLite connection."""

    def __init__(self, db_path: str | None):
        self.conn = sqlite3.connect(
            db_path or ":memory:", isolation_level=None, check_same_thread=False,
            timeout=10,
        )
        if db_path:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
        by_name = usage_pb2.UsageRecord.DESCRIPTOR.fields_by_name
        columns = ", ".join(
            f"{name} TEXT" if by_name[name].type == FieldDescriptor.TYPE_STRING
            else f"{name} INTEGER"
            for name in _FIELDS if name != "record_id"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS records (record_id TEXT PRIMARY KEY, "
            f"{columns}, sidecar_id TEXT, received_unix_ms INTEGER)"
        )
        self.lock = threading.Lock()

    def store(
        self, sidecar_id: str, records: list[usage_pb2.UsageRecord]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Insert new records in one transaction; returns (accepted rows, duplicate ids)."""
        accepted: list[dict[str, Any]] = []
        duplicates: list[str] = []
        now_ms = time.time_ns() // 1_000_000
        marks = ", ".join("?" * (len(_FIELDS) + 2))
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for rec in records:
                    row = {name: getattr(rec, name) for name in _FIELDS}
                    cur = self.conn.execute(
                        f"INSERT OR IGNORE INTO records ({', '.join(_FIELDS)}, sidecar_id, "
                        f"received_unix_ms) VALUES ({marks})",
                        (*row.values(), sidecar_id, now_ms),
                    )
                    if cur.rowcount == 1:
                        accepted.append(row)
                    else:
                        duplicates.append(rec.record_id)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return accepted, duplicates


class UsageSink(usage_pb2_grpc.UsageServiceServicer):
    def __init__(
        self, store: _Store, fail_first: int = 0, drop_acks: int = 0, delay_ms: int = 0
    ):
        self.store = store
        self.fail_first = fail_first
        self.drop_acks = drop_acks
        self.delay_ms = delay_ms
        self.calls = 0
        self._count_lock = threading.Lock()
        self._out_lock = threading.Lock()

    def Upload(self, request: usage_pb2.UsageBatch, context: grpc.ServicerContext):
        with self._count_lock:
            self.calls += 1
            call = self.calls
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        if call <= self.fail_first:
            _emit(self._out_lock, {"event": "rejected", "call": call, "reason": "fail_first"})
            context.abort(grpc.StatusCode.UNAVAILABLE, "usage sink: fail_first")
        accepted, duplicates = self.store.store(request.sidecar_id, list(request.records))
        for row in accepted:
            _emit(self._out_lock, {"event": "accepted", "sidecar_id": request.sidecar_id, **row})
        for record_id in duplicates:
            _emit(self._out_lock, {"event": "duplicate", "record_id": record_id})
        if call <= self.fail_first + self.drop_acks:
            _emit(self._out_lock, {
                "event": "ack_dropped", "call": call, "records": len(request.records),
            })
            context.abort(grpc.StatusCode.UNAVAILABLE, "usage sink: drop_acks")
        return usage_pb2.UsageAck(
            accepted_ids=[r["record_id"] for r in accepted], duplicate_ids=duplicates
        )


def _listen_problem(listen: str) -> str | None:
    """What is wrong with a --listen address, or None. No name is looked up but localhost."""
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        return "host:port with a port from 0 (any free one) to 65535, e.g. 127.0.0.1:50052"
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    if bare != "localhost":
        try:
            if (":" in bare) != bracketed:
                raise ValueError(bare)
            ipaddress.ip_address(bare)
        except ValueError:
            return ("host:port whose host is an IP address (IPv6 in brackets, e.g. [::1]) "
                    "or localhost, e.g. 127.0.0.1:50052")
    return None


def run_sink(
    listen: str,
    db_path: str | None = None,
    fail_first: int = 0,
    drop_acks: int = 0,
    delay_ms: int = 0,
) -> int:
    """Serve UsageService on `listen` (host:port, port may be 0) until SIGTERM or SIGINT."""
    problem = _listen_problem(listen)
    if problem:
        print(f"Error: --listen {listen!r} is not allowed: expected {problem}", file=sys.stderr)
        return exitcodes.CONFIG
    from cy_sidecar.supervisor.arbiter import StartupError, check_port_free

    try:
        # The sidecar's own probe: gRPC's bind error would be a line of its core instead.
        check_port_free(listen, "--listen")
    except StartupError as exc:
        print(f"Error: usage-sink cannot listen: {exc}", file=sys.stderr)
        return exc.code
    try:
        store = _Store(db_path)
    except sqlite3.Error as exc:
        print(f"Error: usage-sink cannot open --db {db_path}: {exc}", file=sys.stderr)
        return exitcodes.CANT_CREATE
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=(
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ),
    )
    sink = UsageSink(store, fail_first, drop_acks, delay_ms)
    usage_pb2_grpc.add_UsageServiceServicer_to_server(sink, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        port = 0
        reason = str(exc)
    else:
        reason = "address in use or not valid"
    if not port:
        print(f"Error: usage-sink cannot listen on {listen}: {reason}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    host = listen.rpartition(":")[0]
    _emit(sink._out_lock, {"event": "listening", "addr": f"{host}:{port}"})
    while not stop.wait(0.2):
        pass
    server.stop(grace=1.0).wait(2.0)
    _emit(sink._out_lock, {"event": "stopped", "calls": sink.calls})
    store.conn.close()
    return exitcodes.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cy_sidecar.usage_sink", description="reference usage receiver"
    )
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--db", default=None, help="SQLite file (default: in memory)")
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--drop-acks", type=int, default=0)
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args(argv)
    return run_sink(args.listen, args.db, args.fail_first, args.drop_acks, args.delay_ms)


if __name__ == "__main__":
    sys.exit(main())
