"""`cy-sidecar bench`: a smoke run with tiny counts. It checks that the benchmark starts every
target, fills every row of the table and writes complete JSON; it asserts nothing about speed.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

from cy_sidecar import bench


def _tiny() -> bench.BenchOptions:
    return bench.BenchOptions(
        duration=0.3, idle_secs=0.2, health_concurrency=8, streams=8, stream_tokens=16,
        ttft_streams=3, ttft_tokens=80, probe_streams=1, probe_tokens=8, probe_tps=400.0,
        rate_tokens_per_sec=400.0, rate_stream_tokens=20, clients=2, channels_per_client=2,
        procs=(1,), ledger_records=200, ledger_batch=50, ledger_single=10, upload_batch=50,
        busy_retries=0,
    )


def test_bench_smoke_run_fills_table_and_json(tmp_path):
    opts = _tiny()
    out, err = io.StringIO(), io.StringIO()
    json_path = tmp_path / "bench.json"
    code = bench.main(options=opts, json_path=str(json_path), out=out, err=err)
    text = out.getvalue()
    report = json.loads(json_path.read_text())
    names = [t["name"] for t in report["targets"]]
    problems = [e for t in report["targets"] for e in t["errors"]]
    assert code == 0, (problems, text[-3000:])

    expected = ["direct", "cy_p1_on"]
    if shutil.which("nginx"):
        expected.append("nginx_w1")
    assert set(expected) <= set(names)
    if "cy_p1_off" not in names:  # only when the config rejects metering.enabled = false
        assert "metering off was not measured" in text

    rows = bench.rows_for(opts)
    for target in report["targets"]:
        assert len(target["runs"]) == 1
        missing = [r.key for r in rows if target["median"].get(r.key) is None]
        assert not missing, (target["name"], missing)
        assert target["median"]["stream_tps"] > 0
        assert target["median"]["token_latency_samples"] == opts.probe_tokens
    for cells in report["ratios"].values():
        assert cells["stream_tps"]["direct"] > 0 and cells["health_c1_rps"]["direct"] > 0

    ledger = report["ledger"]["runs"][0]
    assert "error" not in ledger, ledger
    total = opts.ledger_records + opts.ledger_single
    assert ledger["uploaded"] == ledger["sink_accepted"] == total
    assert all(v > 0 for v in report["ledger"]["median"].values())

    # The table: a header with every target, one line per row with a value in each column.
    labels = [t["label"] for t in report["targets"]]
    headers = " ".join(ln for ln in text.splitlines() if ln.strip().startswith("direct "))
    for label in labels:
        assert label in headers
    for row in rows:
        line = next((ln for ln in text.splitlines() if ln.startswith(row.label)), None)
        assert line is not None, row.label
        assert "n/a" not in line[len(row.label):], line
    assert "client and the server share" in text
    assert "ledger" in text and "records/s" in text
    assert "bench " in err.getvalue()  # progress went to stderr


def test_summarise_collapsed_names_native_frames_and_threads():
    raw = "\n".join([
        "thread (1): MainThread;main (app.py:3);Handle._run (asyncio/events.py:80);"
        "ProxyService._run_stream (proxy_worker/service.py:300);sendmsg (libc.so.6) 6",
        "thread (1): MainThread;main (app.py:3);BaseEventLoop._run_once "
        "(asyncio/base_events.py:1900);EpollSelector.select (selectors.py:468);"
        "epoll_wait (libc.so.6) 5",
        "thread (2): Thread-1 (_poll_wrapper);Thread.run (threading.py:982) 4",
    ])
    summary = bench.summarise_collapsed(raw)
    assert summary["samples"] == 10 and summary["waiting"] == 5
    assert summary["self"][0]["frame"] == (
        "sendmsg (libc.so.6) <- ProxyService._run_stream (proxy_worker/service.py)")
    assert {t["frame"] for t in summary["threads"]} == {
        "MainThread", "grpc poller thread (C-core)"}
    inclusive = {f["frame"] for f in summary["inclusive"]}
    assert "ProxyService._run_stream (proxy_worker/service.py)" in inclusive
    assert "main (app.py)" not in inclusive  # frames above the event loop are left out


def test_cli_has_bench_command():
    result = subprocess.run([sys.executable, "-m", "cy_sidecar", "bench", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--repeat", "--json", "--profile"):
        assert option in result.stdout
