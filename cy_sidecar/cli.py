"""The `cy-sidecar` command.

Only this module exits the process; everything below it raises or returns. Errors are printed
as one ``Error: ...`` line on stderr with a non-zero exit code. Heavy imports (gRPC, the
supervisor) happen inside the commands that need them.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional

# A service manager may stop `cy-sidecar start` a moment after starting it. Until the
# supervisor takes over (after the imports below and the config), stop and reload signals
# are recorded here instead of their default action killing a half-started process; the
# supervisor then acts on them.
EARLY_SIGNALS: list[int] = []
if sys.argv[1:2] == ["start"]:
    for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(_sig, lambda signum, frame: EARLY_SIGNALS.append(signum))

import typer  # noqa: E402

from cy_sidecar import config as config_mod  # noqa: E402
from cy_sidecar import exitcodes  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="gRPC sidecar for GPU inference workers: protocol offload, token metering, "
    "circuit breaking.",
)
config_app = typer.Typer(no_args_is_help=True, help="Validate and show the configuration.")
usage_app = typer.Typer(no_args_is_help=True, help="Inspect the local usage ledger.")
app.add_typer(config_app, name="config")
app.add_typer(usage_app, name="usage")

ConfigOpt = typer.Option(None, "--config", "-c", help="sidecar.toml (default: $SIDECAR_CONFIG)")


def fail(message: str, code: int = exitcodes.CONFIG) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def load_config(path: Optional[str], **overrides) -> config_mod.Config:
    try:
        cfg = config_mod.load(path)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return cfg.with_overrides(**overrides) if overrides else cfg
    except config_mod.ConfigError as exc:
        fail(str(exc))


@app.command()
def start(
    procs: Optional[int] = typer.Option(None, "--procs", "-n", help="proxy processes"),
    config: Optional[str] = ConfigOpt,
) -> None:
    """Run the sidecar in the foreground: N proxy processes and one meter process."""
    cfg = load_config(config, procs=procs)
    from cy_sidecar.supervisor.main import exec_supervisor

    # The supervisor runs without this command's libraries (see supervisor/main.py).
    try:
        exec_supervisor(cfg, EARLY_SIGNALS)
    except OSError as exc:
        fail(f"cannot start the supervisor with {sys.executable}: {exc.strerror or exc}",
             exitcodes.FAILURE)


@app.command()
def demo(
    procs: int = typer.Option(2, "--procs", "-n", help="proxy processes"),
    prompt: str = typer.Option(
        "Tell me about the lighthouse keeper and the storm.", "--prompt", "-p"
    ),
    tokens: int = typer.Option(60, "--tokens", help="tokens to generate"),
) -> None:
    """Run everything on loopback: demo worker, sidecar, usage sink; stream one prompt."""
    from cy_sidecar.demo import DemoError, run_demo

    try:
        raise typer.Exit(run_demo(procs=procs, prompt=prompt, tokens=tokens))
    except DemoError as exc:
        fail(str(exc), exitcodes.FAILURE)


@app.command("demo-worker")
def demo_worker(
    uds: str = typer.Option(..., "--uds", help="Unix socket path to listen on"),
    models: str = typer.Option("demo", help="comma-separated model ids; * accepts any"),
    ttft_ms: float = typer.Option(150.0, help="time to first token, ms"),
    tokens_per_sec: float = typer.Option(40.0, help="pacing after the first token"),
    fast: bool = typer.Option(False, help="no pacing at all (benchmarks)"),
    stamp: bool = typer.Option(False, help="put a monotonic timestamp in every chunk"),
    slow_start_secs: float = typer.Option(0.0, help="report 'loading' this long at start"),
    usage_at_end_only: bool = typer.Option(False, help="report usage only in the end frame"),
    default_tokens: int = typer.Option(48, help="tokens when max_new_tokens is 0"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
) -> None:
    """The built-in demo inference worker: readable text, realistic pacing, fault injection."""
    from cy_sidecar.worker_sdk.demo import DemoOptions, run_demo_worker

    if uds.startswith("unix://"):
        uds = config_mod.socket_path(uds)
    opts = DemoOptions(
        uds=uds,
        models=[m.strip() for m in models.split(",") if m.strip()],
        ttft_ms=ttft_ms,
        tokens_per_sec=tokens_per_sec,
        fast=fast,
        stamp=stamp,
        slow_start_secs=slow_start_secs,
        usage_at_end_only=usage_at_end_only,
        default_tokens=default_tokens,
        log_level=log_level,
    )
    raise typer.Exit(run_demo_worker(opts))


@app.command("usage-sink")
def usage_sink(
    listen: str = typer.Option("127.0.0.1:50052", help="host:port to serve UsageService on"),
    db: Optional[str] = typer.Option(None, help="SQLite file remembering accepted ids"),
    fail_first: int = typer.Option(0, help="answer UNAVAILABLE to the first N calls"),
    drop_acks: int = typer.Option(0, help="store the first N batches, then fail the call"),
    delay_ms: int = typer.Option(0, help="delay before each answer"),
) -> None:
    """A reference usage receiver: deduplicates by record id, prints what it accepts."""
    from cy_sidecar.usage_sink import run_sink

    raise typer.Exit(run_sink(listen, db_path=db, fail_first=fail_first,
                              drop_acks=drop_acks, delay_ms=delay_ms))


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="short phases (about a minute in all)"),
    repeat: int = typer.Option(1, "--repeat", min=1, max=20, help="runs; medians reported"),
    json_path: Optional[str] = typer.Option(None, "--json", help="also write results here"),
    profile: bool = typer.Option(False, "--profile", help="py-spy a proxy under load"),
) -> None:
    """Measure the sidecar against a direct gRPC server and nginx, all on loopback."""
    from cy_sidecar.bench import main as bench_main

    raise typer.Exit(bench_main(quick=quick, repeat=repeat, json_path=json_path,
                                profile=profile))


def _control(config: Optional[str], cmd: str) -> dict:
    cfg = load_config(config)
    from cy_sidecar.supervisor.control import ControlError, request

    try:
        reply = request(cfg.control_path, cmd)
    except ControlError as exc:
        fail(str(exc), exitcodes.UNAVAILABLE)
    if not reply.get("ok"):
        # The supervisor names why it refused (e.g. "config" for a reload with a bad config);
        # an older supervisor without the field gets the generic code.
        code = {"config": exitcodes.CONFIG}.get(reply.get("reason"), exitcodes.FAILURE)
        fail(reply.get("error", "the sidecar refused the command"), code)
    return reply


@app.command()
def status(
    config: Optional[str] = ConfigOpt,
    once: bool = typer.Option(False, "--once", help="print one frame and exit"),
    as_json: bool = typer.Option(False, "--json", help="print the data as one JSON object"),
    interval: float = typer.Option(1.0, help="refresh interval, seconds"),
) -> None:
    """Live view of a running sidecar (q or Ctrl-C quits)."""
    cfg = load_config(config)
    from cy_sidecar.supervisor.control import ControlError
    from cy_sidecar.supervisor.tui import run_status

    try:
        raise typer.Exit(run_status(cfg.control_path, once=once, as_json=as_json,
                                    interval=interval))
    except ControlError as exc:
        fail(str(exc), exitcodes.UNAVAILABLE)


@app.command()
def stop(config: Optional[str] = ConfigOpt) -> None:
    """Drain and stop a running sidecar (like SIGTERM to the supervisor)."""
    _control(config, "stop")
    typer.echo("stopping: open streams may finish within server.drain_grace_secs")


@app.command()
def reload(config: Optional[str] = ConfigOpt) -> None:
    """Re-read the configuration and replace the proxy processes one by one."""
    reply = _control(config, "reload")
    if reply.get("queued"):
        typer.echo("reload queued: it starts when the reload already running finishes")
    else:
        typer.echo(f"reloading: replacing {reply.get('replacing', 0)} proxy processes")


@config_app.command("check")
def config_check(path: Optional[str] = typer.Argument(None, help="sidecar.toml")) -> None:
    """Validate a configuration file (and the environment overrides)."""
    cfg = load_config(path)
    typer.echo(f"ok: {cfg.path or 'built-in defaults'} is valid")


@config_app.command("show")
def config_show(
    path: Optional[str] = typer.Argument(None, help="sidecar.toml"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print the effective configuration and where each value came from."""
    cfg = load_config(path)
    if as_json:
        import json

        typer.echo(json.dumps({"values": cfg.as_dict(), "sources": cfg.sources}, indent=2))
        return
    for section in config_mod.SECTIONS:
        typer.echo(f"[{section}]")
        for key, value in cfg.values[section].items():
            line = f"{key} = {config_mod.toml_value(value)}"
            typer.echo(f"{line:<48} # {cfg.sources[f'{section}.{key}']}")
        typer.echo("")


def _ledger_call(func, *args):
    from cy_sidecar.meter_store.ledger import LedgerError

    try:
        return func(*args)
    except LedgerError as exc:
        fail(str(exc), exitcodes.CANT_CREATE)


@usage_app.command("totals")
def usage_totals(
    config: Optional[str] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Token totals by model and tenant, and the state of the upload queue."""
    cfg = load_config(config)
    from cy_sidecar.meter_store.process import ledger_report

    report = _ledger_call(ledger_report, cfg.state_dir)
    if as_json:
        import json

        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"usage in {report['ledger']}")
    for col in ("model", "tenant", "records", "prompt", "generated", "delivered"):
        table.add_column(col, justify="left" if col in ("model", "tenant") else "right")
    for row in report["totals"]:
        table.add_row(row["model"], row["tenant"] or "-", str(row["records"]),
                      str(row["prompt_tokens"]), str(row["generated_tokens"]),
                      str(row["delivered_tokens"]))
    console = Console()
    console.print(table)
    _print_queue(report)


def _print_queue(report: dict) -> None:
    import time

    age = report.get("oldest_pending_age_s")
    last = report.get("last_upload_ok_unix")
    typer.echo(
        f"pending {report['pending']} (oldest {age:.0f} s)" if age is not None
        else f"pending {report['pending']}"
    )
    typer.echo(f"last successful upload: {time.ctime(last) if last else 'never'}")
    error, when = report.get("last_upload_error"), report.get("last_upload_error_unix")
    if error and last and when and when < last:
        typer.echo(f"earlier upload error (uploads work again since): {error} "
                   f"at {time.ctime(when)}")
    elif error:
        typer.echo(f"last upload error: {error}" + (f" at {time.ctime(when)}" if when else ""))


@usage_app.command("pending")
def usage_pending(config: Optional[str] = ConfigOpt) -> None:
    """How many records wait for the Gateway's acknowledgement, and since when."""
    cfg = load_config(config)
    from cy_sidecar.meter_store.process import ledger_report

    _print_queue(_ledger_call(ledger_report, cfg.state_dir))


@usage_app.command("export")
def usage_export(
    config: Optional[str] = ConfigOpt,
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or csv"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="file (default: stdout)"),
) -> None:
    """Every ledger row (records and rollups) as JSON lines or CSV."""
    cfg = load_config(config)
    if fmt not in ("jsonl", "csv"):
        fail(f"--format {fmt!r} is not allowed: expected jsonl or csv")
    from cy_sidecar.meter_store.process import export_records

    if out:
        try:
            fh = open(out, "w", encoding="utf-8", newline="")
        except OSError as exc:
            fail(f"--out {out} cannot be written: {_why_not_writable(out, exc)}",
                 exitcodes.CANT_CREATE)
    try:
        if out:
            with fh:
                count = _ledger_call(export_records, cfg.state_dir, fmt, fh)
        else:
            _ledger_call(export_records, cfg.state_dir, fmt, sys.stdout)
            sys.stdout.flush()
    except OSError as exc:
        import errno
        import os

        if not out:
            # Nothing more can be written there, not even at exit.
            sys.stdout = open(os.devnull, "w")
            if exc.errno == errno.EPIPE:  # the reader stopped reading (`| head`)
                raise typer.Exit(exitcodes.OK)
        fail(f"writing the export to {out or 'standard output'} failed: "
             f"{exc.strerror or exc}; what was written is incomplete", exitcodes.CANT_CREATE)
    if out:
        typer.echo(f"wrote {count} rows to {out}", err=True)


def _why_not_writable(path: str, exc: OSError) -> str:
    import os

    if os.path.isdir(path):
        return "it is a directory (expected a file name)"
    parent = os.path.dirname(path) or "."
    if not os.path.exists(parent):
        return f"the directory {parent} does not exist"
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    return exc.strerror or str(exc)


@usage_app.command("flush")
def usage_flush(config: Optional[str] = ConfigOpt) -> None:
    """Upload pending records now instead of at the next batch interval."""
    cfg = load_config(config)
    if not cfg.upload_target:
        fail(f"metering.upload_target is empty ({cfg.sources['metering.upload_target']}): "
             "there is no usage service to upload to; set it in the config file or with "
             "SIDECAR_UPLOAD_TARGET")
    from cy_sidecar.meter_store.process import force_flush

    result = _ledger_call(force_flush, cfg)
    import json

    typer.echo(json.dumps(result, indent=2, sort_keys=True))
    if not result.get("ok"):
        fail(f"upload to {cfg.upload_target} failed: {result.get('error')}; "
             f"{result.get('pending_after')} records are still pending and will be sent "
             "again", exitcodes.UNAVAILABLE)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
