"""Exit codes: the contract between a child process and the supervisor.

A child that exits with a *restart* code is started again with backoff; one that exits with
a *fatal* code cannot boot (bad configuration, a port held by someone else, an unusable state
directory), so restarting it would only loop: the supervisor stops everything and exits with
the same code, after logging the child's reason.
"""

OK = 0
# Generic failure: restart with backoff.
FAILURE = 1
# Cannot boot; do not restart. Values follow sysexits.h where one fits.
CONFIG = 78        # EX_CONFIG: a configuration value is not usable
UNAVAILABLE = 69   # EX_UNAVAILABLE: a port or socket we need is held by another program
CANT_CREATE = 73   # EX_CANTCREAT: the state directory or meter file cannot be created

FATAL = frozenset({CONFIG, UNAVAILABLE, CANT_CREATE})

NAMES = {
    OK: "ok",
    FAILURE: "failure",
    CONFIG: "config",
    UNAVAILABLE: "unavailable",
    CANT_CREATE: "cant_create",
}


def describe(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code} ({NAMES.get(code, 'unknown')})"
