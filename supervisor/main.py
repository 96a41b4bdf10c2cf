"""The supervisor's own entry point, which `cy-sidecar start` executes in its place.

The command line tool (typer, click, rich and what they pull in) costs each process about
10 MB, and every child forked from the supervisor would carry those pages too. So `start`
checks the configuration, then replaces its process image with this module: the same pid
(systemd's main pid stays valid), a lean interpreter, and the configuration already
resolved, handed over in the environment as JSON (the file is not read twice: it may be a
pipe, and it may have changed meanwhile).

Signals: `start` blocks SIGTERM, SIGINT, SIGHUP and SIGQUIT before it executes this module;
a blocked signal stays pending across the exec. The supervisor unblocks them once its own
handlers are installed, so a stop signal in between is acted on, never lost and never
fatal. Signals the command had already recorded travel in the hand-over too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

HANDOVER_ENV = "CY_SIDECAR_START"
# Blocked from the hand-over until the supervisor's handlers exist.
HANDED_OVER_SIGNALS = frozenset(
    {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
)
PROCESS_NAME = b"cy-sidecar"


def exec_supervisor(cfg, early_signals: list[int]) -> None:
    """Replace this process with the supervisor entry point; returns only on failure."""
    import orjson

    signal.pthread_sigmask(signal.SIG_BLOCK, HANDED_OVER_SIGNALS)
    # From here on a signal stays pending; what arrived before, the command's handlers
    # recorded in `early_signals`.
    payload = {"values": cfg.values, "sources": cfg.sources, "path": cfg.path,
               "early_signals": list(early_signals)}
    os.environ[HANDOVER_ENV] = orjson.dumps(payload).decode()
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: the current directory is not put first on the import path, so a checkout's
    # cy_sidecar/ folder cannot shadow the installed package (which maps supervisor/ into it).
    try:
        os.execv(sys.executable, [sys.executable, "-P", "-m", "cy_sidecar.supervisor.main"])
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDED_OVER_SIGNALS)
        raise


def _set_process_name() -> None:
    # What `ps -o comm`, psutil and the port-in-use message show: not "python3".
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, PROCESS_NAME, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def main() -> int:
    import orjson

    from cy_sidecar import config as config_mod
    from cy_sidecar import exitcodes, logs

    raw = os.environ.pop(HANDOVER_ENV, None)
    if raw is None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDED_OVER_SIGNALS)
        print("Error: this module is started by `cy-sidecar start`, not by hand",
              file=sys.stderr)
        return exitcodes.FAILURE
    data = orjson.loads(raw)
    cfg = config_mod.Config(data["values"], data["sources"], data["path"])
    _set_process_name()
    logs.setup("supervisor", cfg.log_level, cfg.log_format)

    from cy_sidecar.supervisor.arbiter import StartupError, Supervisor

    sup = Supervisor(cfg, config_path=cfg.path, early_signals=data["early_signals"])
    try:
        sup.prepare()  # installs the handlers, then unblocks the handed-over signals
    except StartupError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.code
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
