"""The proxy's worker link, driven in-process against a real demo worker process."""

from __future__ import annotations

import asyncio

import pytest

from cy_sidecar.localrun import Proc, cli
from cy_sidecar.proxy_worker import link as wl


@pytest.fixture
def worker(tmp_path):
    path = str(tmp_path / "w.sock")
    proc = Proc("worker", cli("demo-worker", "--uds", path, "--tokens-per-sec", "200",
                              "--ttft-ms", "1"))
    proc.wait_for("demo worker listening")
    yield path
    proc.stop()


def _req(tokens: int) -> dict:
    return {"t": "req", "model": "demo", "prompt": "hello", "params": {},
            "meta": {"extra": {"demo_tokens": str(tokens)}}}


async def _ready_link(path: str) -> wl.WorkerLink:
    link = wl.WorkerLink(path, window=8, check_interval=0.5, reconnect_delay=0.05)
    link.start()
    async with asyncio.timeout(5):
        while link.state != wl.READY:
            await link.wait_state_change(0.1)
    return link


def test_a_cancelled_link_task_ends_every_open_stream_at_once(worker):
    async def scenario():
        link = await _ready_link(worker)
        stream = link.open_stream(_req(5000))
        first = await asyncio.wait_for(stream.get(), 2)
        assert first["t"] == "chunk"
        link._task.cancel()
        async with asyncio.timeout(1.0):
            while True:
                event = await stream.get()
                if isinstance(event, wl.Lost):
                    return event

    lost = asyncio.run(scenario())
    assert "link stopped" in lost.reason


def test_credit_bounds_what_the_link_buffers_for_a_stream_nobody_reads(worker):
    async def scenario():
        link = await _ready_link(worker)
        stream = link.open_stream(_req(1000))
        await asyncio.sleep(0.3)  # 60 chunks' worth of time at 200 tokens/s
        buffered = len(stream.queue)
        stream.consumed(buffered)  # returns credit: the worker may send again
        await asyncio.sleep(0.2)
        more = len(stream.queue)
        await link.close()
        return buffered, more

    buffered, more = asyncio.run(scenario())
    assert buffered == 8, "exactly one window is buffered, then the worker waits"
    assert more > buffered
