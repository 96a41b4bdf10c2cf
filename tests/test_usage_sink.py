"""The reference usage sink, as a real process on a loopback port."""

from __future__ import annotations

import json
import signal
import sys
import uuid

import grpc
import pytest

from cy_sidecar.localrun import Proc
from cy_sidecar.protos import usage_pb2, usage_pb2_grpc

from helpers import wait_until


def start_sink(*args: str) -> tuple[Proc, str]:
    proc = Proc("sink", [sys.executable, "-m", "cy_sidecar.usage_sink", *args])
    match = proc.wait_for(r'^\{"event":"listening","addr":"([^"]+)"\}$', timeout=20)
    return proc, match.group(1)


def records(n: int, tokens: int = 5) -> list[usage_pb2.UsageRecord]:
    return [
        usage_pb2.UsageRecord(
            record_id=uuid.uuid4().hex, kind="record", model="llama", tenant="t1",
            status="finished", prompt_tokens=3, generated_tokens=tokens,
            delivered_tokens=tokens, record_count=1, boot_id="b", seq=i + 1,
            cumulative_delivered=(i + 1) * tokens,
        )
        for i in range(n)
    ]


def lines(sink: Proc, event: str, count: int) -> list[dict]:
    """The sink's `event` lines once `count` of them were read (its stdout is a pipe)."""
    return wait_until(
        lambda: (found := sink.json_lines(event)) and len(found) >= count and found,
        timeout=10, what=f"{count} {event} lines",
    )


def upload(addr: str, recs: list[usage_pb2.UsageRecord]) -> usage_pb2.UsageAck:
    with grpc.insecure_channel(addr) as channel:
        stub = usage_pb2_grpc.UsageServiceStub(channel)
        return stub.Upload(usage_pb2.UsageBatch(sidecar_id="node-1", records=recs),
                           timeout=10)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop(10)


def test_it_listens_on_the_real_port_and_prints_each_accepted_record(procs):
    sink, addr = start_sink("--listen", "127.0.0.1:0")
    procs.append(sink)
    assert not addr.endswith(":0")
    batch = records(3)
    ack = upload(addr, batch)
    assert list(ack.accepted_ids) == [r.record_id for r in batch]
    assert list(ack.duplicate_ids) == []
    accepted = lines(sink, "accepted", 3)
    assert [a["record_id"] for a in accepted] == [r.record_id for r in batch]
    first = accepted[0]
    assert first["sidecar_id"] == "node-1"
    assert (first["model"], first["delivered_tokens"], first["seq"]) == ("llama", 5, 1)
    assert first["kind"] == "record" and first["record_count"] == 1
    sink.signal(signal.SIGINT)
    assert sink.popen.wait(10) == 0


def test_it_remembers_record_ids_across_a_restart_with_a_db_file(procs, tmp_path):
    db = str(tmp_path / "sink.db")
    sink, addr = start_sink("--listen", "127.0.0.1:0", "--db", db)
    batch = records(4)
    assert len(upload(addr, batch).accepted_ids) == 4
    assert sink.stop(10) == 0

    again, addr = start_sink("--listen", "127.0.0.1:0", "--db", db)
    procs.append(again)
    fresh = records(2)
    ack = upload(addr, batch[1:3] + fresh)
    assert sorted(ack.duplicate_ids) == sorted(r.record_id for r in batch[1:3])
    assert sorted(ack.accepted_ids) == sorted(r.record_id for r in fresh)
    assert [d["record_id"] for d in lines(again, "duplicate", 2)] == [
        r.record_id for r in batch[1:3]
    ]
    assert {a["record_id"] for a in lines(again, "accepted", 2)} == {
        r.record_id for r in fresh
    }


def test_without_a_db_file_a_record_sent_twice_is_one_duplicate(procs):
    sink, addr = start_sink("--listen", "127.0.0.1:0")
    procs.append(sink)
    batch = records(2)
    upload(addr, batch)
    ack = upload(addr, batch + batch[:1])
    assert list(ack.accepted_ids) == []
    assert len(ack.duplicate_ids) == 3
    lines(sink, "duplicate", 3)
    assert len(sink.json_lines("accepted")) == 2


def test_drop_acks_stores_the_records_but_fails_the_call(procs):
    sink, addr = start_sink("--listen", "127.0.0.1:0", "--drop-acks", "1")
    procs.append(sink)
    batch = records(3)
    with pytest.raises(grpc.RpcError) as info:
        upload(addr, batch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(lines(sink, "accepted", 3)) == 3
    assert lines(sink, "ack_dropped", 1)[0]["records"] == 3
    # The sender retries with the same ids: all are duplicates now, and acknowledged.
    ack = upload(addr, batch)
    assert sorted(ack.duplicate_ids) == sorted(r.record_id for r in batch)
    lines(sink, "duplicate", 3)
    assert len(sink.json_lines("accepted")) == 3


def test_fail_first_rejects_without_storing(procs):
    sink, addr = start_sink("--listen", "127.0.0.1:0", "--fail-first", "2", "--delay-ms", "20")
    procs.append(sink)
    batch = records(2)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            upload(addr, batch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(lines(sink, "rejected", 2)) == 2
    assert sink.json_lines("accepted") == []
    ack = upload(addr, batch)
    assert sorted(ack.accepted_ids) == sorted(r.record_id for r in batch)
    assert len(lines(sink, "accepted", 2)) == 2


def test_a_port_held_by_another_sink_is_exit_code_unavailable(procs):
    sink, addr = start_sink("--listen", "127.0.0.1:0")
    procs.append(sink)
    other = Proc("sink2", [sys.executable, "-m", "cy_sidecar.usage_sink", "--listen", addr])
    assert other.popen.wait(20) == 69
    other.stop(5)
    assert other.text().startswith(f"Error: usage-sink cannot listen: --listen {addr} is "
                                   "already in use")
    assert "\n" not in other.text()
    assert json.loads(sink.text().splitlines()[0])["event"] == "listening"


@pytest.mark.parametrize("listen", ["nohost:50052", "127.0.0.1:50052x", "127.0.0.1",
                                    "127.0.0.1:70000", "::1:50052"])
def test_a_listen_address_that_is_not_an_address_is_a_config_error(listen):
    other = Proc("sink", [sys.executable, "-m", "cy_sidecar.usage_sink", "--listen", listen])
    assert other.popen.wait(20) == 78
    other.stop(5)
    assert other.text().startswith(f"Error: --listen {listen!r} is not allowed: expected ")
    assert "\n" not in other.text()
