"""`cy-sidecar usage`: totals, pending, export and flush against a real ledger."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess

from cy_sidecar.localrun import cli
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from helpers import collect, new_channel, request, wait_until


def run(stack, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli("usage", *args, "--config", stack.config_path),
                          capture_output=True, text=True, timeout=60, check=check,
                          env={**os.environ, **env})


def test_usage_commands_report_export_and_flush_the_ledger(stack):
    stack.write_config(**{"metering.batch_interval_secs": 3600.0})
    stack.start_sidecar(procs=1)
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        for i, tenant in enumerate(["acme", "acme", "globex"]):
            collect(stub.StreamPredict(iter([request(tokens=4 + i, tenant=tenant)]),
                                       timeout=10))

    def committed():
        report = json.loads(run(stack, "totals", "--json").stdout)
        return report if report["committed_total"] >= 3 else None

    report = wait_until(committed, what="three committed records")
    totals = {(t["model"], t["tenant"]): t for t in report["totals"]}
    assert totals[("demo", "acme")]["delivered_tokens"] == 4 + 5
    assert totals[("demo", "globex")]["records"] == 1
    assert report["pending"] == 3  # the upload interval is an hour

    assert "pending 3" in run(stack, "pending").stdout
    rows = list(csv.DictReader(io.StringIO(run(stack, "export", "--format", "csv").stdout)))
    assert sorted(int(r["delivered_tokens"]) for r in rows) == [4, 5, 6]
    lines = run(stack, "export").stdout.splitlines()
    assert len(lines) == 3 and all(json.loads(line)["record_id"] for line in lines)

    flushed = json.loads(run(stack, "flush").stdout)
    assert flushed["pending_after"] == 0
    wait_until(lambda: len(stack.sink.json_lines("accepted")) == 3, what="flushed records")


def test_usage_pending_tells_a_past_upload_error_from_a_current_one(stack):
    stack.write_config(**{"metering.batch_interval_secs": 0.2})
    stack.sink.stop()
    stack.start_sidecar(procs=1)
    with new_channel(stack.target) as channel:
        collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
            iter([request(tokens=3, trace_id="while-down")]), timeout=10))
    wait_until(lambda: "last upload error: " in run(stack, "pending").stdout,
               what="the upload error while the receiver is down")
    flush = run(stack, "flush", check=False)
    assert flush.returncode == 69
    assert flush.stderr.startswith(f"Error: upload to 127.0.0.1:{stack.sink_port} failed: "
                                   "cannot connect")
    assert "1 records are still pending" in flush.stderr
    flush = run(stack, "flush", check=False, SIDECAR_UPLOAD_TARGET="")
    assert flush.returncode == 78 and flush.stdout == ""
    assert flush.stderr == ("Error: metering.upload_target is empty (env "
                            "SIDECAR_UPLOAD_TARGET): there is no usage service to upload to; "
                            "set it in the config file or with SIDECAR_UPLOAD_TARGET\n")
    stack.start_sink()
    wait_until(lambda: stack.sink.json_lines("accepted"), timeout=30,
               what="the upload once the receiver is back")

    def nothing_pending():
        out = run(stack, "pending").stdout
        return out if "pending 0" in out else None

    out = wait_until(nothing_pending, what="nothing pending")
    assert "earlier upload error (uploads work again since): " in out
    assert "last upload error: " not in out


def test_usage_without_a_ledger_says_where_it_looked(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text(f'[metering]\nstate_dir = "{tmp_path / "nothing"}"\n')
    proc = subprocess.run(cli("usage", "totals", "--config", str(config)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.startswith("Error: ") and str(tmp_path / "nothing") in proc.stderr
