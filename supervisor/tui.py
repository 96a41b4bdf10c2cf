"""`cy-sidecar status`: a live view of a running sidecar, drawn with rich.

The data comes from the supervisor's control socket (see :mod:`supervisor.status`); this
module only renders it. Rates (requests and tokens per second) are the difference between
two consecutive frames. ``--once`` prints one frame, ``--json`` the raw data.
"""

from __future__ import annotations

import json
import os
import select
import sys
import termios
import time
import tty

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .control import request


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MB"


def _age(secs) -> str:
    if secs is None:
        return "-"
    secs = float(secs)
    if secs < 120:
        return f"{secs:.0f}s"
    if secs < 7200:
        return f"{secs / 60:.0f}m"
    return f"{secs / 3600:.1f}h"


def render(data: dict, previous: dict | None = None) -> Group:
    dt = max(1e-6, data["time_unix"] - previous["time_unix"]) if previous else 0.0
    prev_children = {c["pid"]: c for c in (previous or {}).get("children", [])}
    prev_models = (previous or {}).get("models", {})

    sup = data["supervisor"]
    worker = data.get("worker") or {}
    head = Text()
    head.append("cy-sidecar ", style="bold")
    head.append(f"supervisor pid {sup['pid']}  up {_age(sup['uptime_secs'])}  ")
    head.append(f"gRPC {data['bind_addr']}  metrics :{data['metrics_port']}\n")
    state = worker.get("state", "unknown")
    colour = {"ready": "green", "loading": "yellow", "dead": "red"}.get(state, "yellow")
    head.append("inference worker ")
    head.append(state, style=f"bold {colour}")
    head.append(f" for {_age(worker.get('for_secs'))}  pid {worker.get('pid', '-')}  "
                f"models {worker.get('models') or '-'}  ({data['worker_uds']})")
    if data.get("stopping"):
        head.append("\nSTOPPING: draining streams", style="bold red")

    procs = Table(title="processes", expand=True)
    for col in ("role", "pid", "up", "cpu %", "memory", "streams", "req/s", "restarts",
                "state"):
        procs.add_column(col, justify="right" if col not in ("role", "state") else "left")
    procs.add_row("supervisor", str(sup["pid"]), _age(sup["uptime_secs"]),
                  f"{sup['cpu_percent']:.1f}", _mb(sup["rss_bytes"]), "-", "-", "-",
                  sup["status"])
    for child in data["children"]:
        rate = "-"
        before = prev_children.get(child["pid"])
        if before and dt and "requests_total" in child:
            rate = f"{(child['requests_total'] - before['requests_total']) / dt:.1f}"
        name = child["role"] + (f"-{child['index']}" if child["role"] == "proxy" else "")
        label = child.get("worker_state", "") if child["role"] == "proxy" else "ledger"
        if child.get("retiring"):
            label = "retiring"
        procs.add_row(
            name, str(child["pid"]), _age(child["uptime_secs"]),
            f"{child['cpu_percent']:.1f}", _mb(child["rss_bytes"]),
            str(child.get("open_streams", "-")), rate, str(child["restarts"]),
            label if child["ready"] else "starting",
        )

    models = Table(title="tokens by model", expand=True)
    for col in ("model", "delivered", "generated", "prompt", "records", "tokens/s"):
        models.add_column(col, justify="left" if col == "model" else "right")
    for name, t in sorted(data.get("models", {}).items()):
        rate = "-"
        if name in prev_models and dt:
            rate = f"{(t['delivered'] - prev_models[name]['delivered']) / dt:.1f}"
        models.add_row(name, str(t["delivered"]), str(t["generated"]), str(t["prompt"]),
                       str(t["records"]), rate)

    ledger = data.get("ledger") or {}
    last_ok = ledger.get("last_upload_ok_unix")
    ledger_text = Text(
        f"pending {ledger.get('pending', '?')}   oldest pending "
        f"{_age(ledger.get('oldest_pending_age_s'))}   committed "
        f"{ledger.get('committed_total', '?')}   last seq {ledger.get('last_seq', '?')}   "
        f"last upload {_age(time.time() - last_ok) + ' ago' if last_ok else 'never'}   "
        f"upload errors {ledger.get('upload_errors', 0)}   rollups "
        f"{ledger.get('rollups_total', 0)}"
    )
    for key in ("ledger_error", "last_upload_error"):
        if ledger.get(key):
            ledger_text.append(f"\n{key.replace('_', ' ')}: {ledger[key]}", style="red")

    events = Text()
    for event in data.get("events", [])[-5:]:
        stamp = time.strftime("%H:%M:%S", time.localtime(event["time_unix"]))
        events.append(f"{stamp} {event['level']}: {event['text']}\n",
                      style="red" if event["level"] == "error" else "yellow")
    parts = [Panel(head), procs, models, Panel(ledger_text, title="ledger")]
    parts.append(Panel(events or Text("none", style="dim"), title="last warnings"))
    return Group(*parts)


def _fetch(path: str) -> dict:
    reply = request(path, "status")
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "status refused"))
    return reply["status"]


def run_status(path: str, once: bool = False, as_json: bool = False,
               interval: float = 1.0) -> int:
    data = _fetch(path)
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    console = Console()
    if once or not sys.stdin.isatty():
        console.print(render(data))
        return 0
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    previous = None
    try:
        tty.setcbreak(fd)
        with Live(render(data), console=console, screen=False, auto_refresh=False) as live:
            while True:
                ready, _, _ = select.select([fd], [], [], interval)
                # os.read, not sys.stdin.read: keys typed together arrive in one read, and
                # none may stay in Python's buffer where select() cannot see it.
                if ready:
                    keys = os.read(fd, 64)
                    if not keys or b"q" in keys.lower():  # q, or the terminal is gone
                        return 0
                previous, data = data, _fetch(path)
                live.update(render(data, previous), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
