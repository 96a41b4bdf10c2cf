"""The data behind `cy-sidecar status`, collected in the supervisor on request.

It reads only what is cheap and never blocks: the children table, psutil figures of each
process, the shared-memory meter (open streams, inference worker state, per-model totals)
and the meter process's status file (ledger depth, uploads). No SQLite, no gRPC.
"""

from __future__ import annotations

import os
import time

import psutil


def _proc_figures(pid: int) -> dict:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            mem = proc.memory_info()
            return {
                "cpu_percent": proc.cpu_percent(interval=None),
                "rss_bytes": mem.rss,
                "threads": proc.num_threads(),
                "status": proc.status(),
            }
    except psutil.Error:
        return {"cpu_percent": 0.0, "rss_bytes": 0, "threads": 0, "status": "gone"}


def collect(sup) -> dict:
    now_mono = time.monotonic()
    meter = sup.meter
    children = []
    worker = None
    for child in sorted(sup.children.values(), key=lambda c: (c.role, c.index, c.pid)):
        entry = {
            "role": child.role,
            "index": child.index,
            "pid": child.pid,
            "uptime_secs": round(now_mono - child.started, 1),
            "ready": child.ready or child.role == "meter",
            "retiring": child.retiring,
            "restarts": sup.restarts.get(child.role, 0),
        }
        entry.update(_proc_figures(child.pid))
        if child.role == "proxy" and meter is not None:
            opened, closed = meter.region_counts(child.region)
            pid, beat = meter.region_owner(child.region)
            entry["requests_total"] = opened
            entry["open_streams"] = max(0, opened - closed) if pid == child.pid else 0
            entry["heartbeat_age_secs"] = (
                round((time.monotonic_ns() - beat) / 1e9, 2) if beat else None
            )
            info = meter.worker_info(child.region)
            entry["worker_state"] = info["state"]
            if worker is None and pid == child.pid:
                worker = info
        children.append(entry)
    if worker is not None and worker.get("since_unix_ms"):
        worker["for_secs"] = round(time.time() - worker["since_unix_ms"] / 1000, 1)
    supervisor = {"role": "supervisor", "pid": os.getpid(),
                  "uptime_secs": round(time.time() - sup.started, 1)}
    supervisor.update(_proc_figures(os.getpid()))
    return {
        "time_unix": time.time(),
        "supervisor": supervisor,
        "procs": sup.procs,
        "stopping": sup.stopping,
        "bind_addr": sup.cfg.bind_addr,
        "worker_uds": sup.cfg.worker_uds,
        "metrics_port": sup.cfg.metrics_port,
        "children": children,
        "worker": worker or {"state": "unknown"},
        "models": meter.model_totals() if meter is not None else {},
        "ledger": sup.meter_status(),
        "events": [
            {"time_unix": t, "level": level, "text": text} for t, level, text in sup.events
        ],
        "status_line": sup.status_line(),
    }
