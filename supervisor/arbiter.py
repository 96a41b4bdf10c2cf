"""The supervisor: forks the proxy processes and the meter process and keeps them alive.

Why plain fork, and a single-threaded supervisor
------------------------------------------------
A forked child inherits the supervisor's memory but only the thread that called fork, so a
lock held by any other thread would stay locked in the child for ever. The supervisor
therefore never starts a thread, never creates a gRPC object (gRPC's core starts threads the
moment a channel or server exists) and never opens the SQLite ledger; it runs one select()
loop over a signal wakeup pipe, the children's readiness pipes and the control socket. Every
child builds its own gRPC server or channel after the fork.

Signal handlers only record the signal; the loop dispatches to ``handle_<signal>``.

Children and their exit codes
-----------------------------
``proxy`` processes (``--procs`` of them) each own one region of the shared-memory meter; the
``meter`` process owns the ledger. A child that exits is started again with backoff, unless
its exit code is one of :data:`cy_sidecar.exitcodes.FATAL` (it cannot boot): then the
supervisor stops everything and exits with that code. Before a dead proxy is replaced, its
open usage slots are closed as ``interrupted`` records, so its streams' tokens are kept.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import time

from cy_sidecar import config as config_mod
from cy_sidecar import exitcodes, logs
from cy_sidecar.meter_store import slots

from .notify import Notifier

log = logs.get("supervisor")

RESTART_BACKOFF_MIN = 0.1
RESTART_BACKOFF_MAX = 10.0
STABLE_AFTER_SECS = 30.0
HEARTBEAT_STALE_SECS = 5.0
TICK_SECS = 0.1
SHUTDOWN_EXTRA_SECS = 10.0
# A proxy restart that finds both of its meter regions held retries this often.
REGION_WAIT_SECS = 0.5


class StartupError(RuntimeError):
    """The sidecar cannot start; str() is the message for the operator."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Child:
    role: str  # "proxy" or "meter"
    index: int
    pid: int
    region: int
    started: float
    ready_fd: int | None
    ready: bool = False
    retiring: bool = False  # replaced by a reload; do not restart when it exits
    stopping_sent: bool = False
    unresponsive: bool = False  # the supervisor SIGKILLed it for a stale heartbeat


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _port_holder(port: int) -> str:
    """Describe who listens on a TCP port, when this user may see it."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid:
                    try:
                        name = psutil.Process(conn.pid).name()
                    except psutil.Error:
                        name = "?"
                    return f" by pid {conn.pid} ({name})"
    except Exception:  # noqa: BLE001 - best effort only; the refusal stands either way
        pass
    return ""


def check_port_free(addr: str, what: str) -> None:
    """Refuse to start when another program holds `addr`.

    gRPC binds with SO_REUSEPORT, so a stale sidecar or a foreign server that also set it
    would silently share the port and take a share of the connections. A probe bound without
    SO_REUSEPORT fails on any listener, which is exactly the check wanted.
    """
    host, port = _split_addr(addr)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"{what} {addr}: cannot resolve host: {exc}", exitcodes.CONFIG)
    for family, kind, proto, _, sockaddr in infos[:1]:
        probe = socket.socket(family, kind, proto)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"{what} {addr} is already in use{_port_holder(port)}; cy-sidecar will "
                    "not share it (stop the other program or choose another port)",
                    exitcodes.UNAVAILABLE,
                ) from None
            raise StartupError(f"{what} {addr} cannot be bound: {exc.strerror}",
                               exitcodes.UNAVAILABLE) from None
        finally:
            probe.close()


def _preload_child_modules() -> None:
    """Import what the children run, once, so that forked children share those pages.

    Importing creates no gRPC server, channel or thread (gRPC's core starts only when the
    first such object exists); the one-thread check in the tests holds us to that.
    """
    import gc

    import grpc.aio  # noqa: F401

    from cy_sidecar.proxy_worker import process, service  # noqa: F401

    # Objects that exist now are never collected in a child: keep the garbage collector
    # from writing to their headers there, which would copy the shared pages.
    gc.freeze()


class Supervisor:
    def __init__(self, cfg: config_mod.Config, config_path: str | None = None,
                 early_signals: list[int] | None = None):
        self.cfg = cfg
        # Signals the command recorded before this supervisor existed (see cy_sidecar.cli).
        self._early_signals = early_signals if early_signals is not None else []
        self.config_path = config_path
        self.procs = cfg.procs
        self.state_dir = cfg.state_dir
        self.meter_path = os.path.join(self.state_dir, "meter.shm")
        self.children: dict[int, Child] = {}
        self.restart_at: dict[tuple[str, int], float] = {}
        self.backoff: dict[tuple[str, int], float] = {}
        self.restarts: dict[str, int] = {"proxy": 0, "meter": 0}
        self.signals: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = exitcodes.OK
        self.ready_sent = False
        self.reload_ready_due = False  # RELOADING=1 was sent; READY=1 once it is done
        self.reload_queue: list[int] = []
        self.reload_active = False  # a reload runs until "reload finished" is logged
        self.reload_current: tuple[int, int] | None = None  # (index, old pid)
        self.reload_pending: str | None = None  # asked for while a reload ran: runs next
        self.reload_waiting: int | None = None  # index whose regions are both still held
        self.events: list[tuple[float, str, str]] = []  # recent warnings for status
        self.started = time.time()
        self.notifier = Notifier()
        self.last_watchdog = 0.0
        self.watchdog_withheld = ""  # why WATCHDOG=1 is not being sent, while it is not
        self.meter: slots.MeterFile | None = None
        self.old_meter_files: list[str] = []
        self.sel = selectors.DefaultSelector()
        self.control: socket.socket | None = None
        self._wake_r = self._wake_w = -1

    # -- start -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail before a child exists; raises StartupError."""
        # Signals first: from here on a SIGTERM or SIGINT is recorded and run() stops
        # cleanly on it, instead of the default action killing a half-started sidecar.
        self._install_signal_handlers()
        if os.path.exists(self.state_dir) and not os.path.isdir(self.state_dir):
            raise StartupError(
                f"metering.state_dir {self.state_dir!r} is not a directory (a file of that "
                "name exists)", exitcodes.CANT_CREATE,
            )
        try:
            os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"metering.state_dir {self.state_dir!r} cannot be created: {exc.strerror}",
                exitcodes.CANT_CREATE,
            ) from None
        try:
            probe = os.path.join(self.state_dir, ".write-test")
            with open(probe, "w") as fh:
                fh.write("ok")
            os.unlink(probe)
        except OSError as exc:
            raise StartupError(
                f"metering.state_dir {self.state_dir!r} is not writable: {exc.strerror}",
                exitcodes.CANT_CREATE,
            ) from None

        check_port_free(self.cfg.bind_addr, "server.bind_addr")
        if self.cfg.metrics_port:
            check_port_free(f"{self.cfg.metrics_host}:{self.cfg.metrics_port}",
                            "observability.metrics_host/metrics_port")
        self._check_not_running()

        # Multiprocess metrics: wipe what an earlier run left, before anyone imports
        # prometheus_client, so a restart does not add the previous run's values again.
        metrics_dir = os.path.join(self.state_dir, "metrics")
        shutil.rmtree(metrics_dir, ignore_errors=True)
        try:
            os.makedirs(metrics_dir, mode=0o750)
        except OSError as exc:
            raise StartupError(f"metrics directory {metrics_dir} cannot be created: "
                               f"{exc.strerror}", exitcodes.CANT_CREATE) from None
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

        geometry = slots.Geometry(
            regions=2 * self.procs,
            slots_per_region=max(1024, 4 * self.cfg.max_concurrent_streams),
        )
        try:
            self.meter, self.old_meter_files = slots.open_or_create(self.meter_path, geometry)
        except OSError as exc:
            raise StartupError(
                f"meter file {self.meter_path} cannot be created: {exc.strerror}",
                exitcodes.CANT_CREATE,
            ) from None
        pending = len(self.meter.slots_in_state(slots.CLOSED))
        if pending:
            log.info("meter file has records from an earlier run closed=%s", pending)

        self._open_control_socket()

    def _install_signal_handlers(self) -> None:
        """Record SIGTERM, SIGINT, SIGHUP, SIGCHLD and SIGQUIT; run() dispatches them."""
        if self._wake_r >= 0:
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                    signal.SIGQUIT):
            signal.signal(sig, self._record_signal)
        # `cy-sidecar start` blocked these before handing its process over (main.py):
        # what is pending now reaches the handlers above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT,
                                                    signal.SIGHUP, signal.SIGQUIT))
        # Taken over only now that this supervisor's handlers record anything newer; what
        # the unblocking just delivered counts as arrived while starting too.
        early = list(self._early_signals) + self.signals
        self._early_signals[:] = []
        self.signals = []
        for sig in early:
            if sig == signal.SIGHUP:
                log.info("supervisor reload signal=SIGHUP while starting next=use the "
                         "configuration just read")
            else:
                self.signals.append(sig)

    def _check_not_running(self) -> None:
        """Refuse a live control socket; remove a stale one; never touch anything else."""
        import stat

        path = self.cfg.control_path
        key = "server.control_socket" if self.cfg.control_socket else "<state_dir>/control.sock"
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StartupError(f"control socket {path} cannot be checked: {exc.strerror}",
                               exitcodes.CANT_CREATE) from None
        if not stat.S_ISSOCK(mode):
            kind = ("a directory" if stat.S_ISDIR(mode)
                    else "a symbolic link" if stat.S_ISLNK(mode)
                    else "a regular file" if stat.S_ISREG(mode) else "another kind of file")
            raise StartupError(
                f"control socket path {path} ({key}) exists and is not a socket (it is "
                f"{kind}); cy-sidecar will not remove it: move it away or set "
                "server.control_socket to another path",
                exitcodes.CANT_CREATE,
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            # Nobody listens: the stale socket of a sidecar that is gone.
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StartupError(f"stale control socket {path} cannot be removed: "
                                   f"{exc.strerror}", exitcodes.CANT_CREATE) from None
            return
        except (TimeoutError, BlockingIOError):
            pass  # a listener too busy to accept: a sidecar is running
        except OSError as exc:
            raise StartupError(
                f"control socket {path} ({key}) exists and cannot be probed: {exc.strerror}; "
                "cy-sidecar will not remove it (another program's socket?)",
                exitcodes.UNAVAILABLE,
            ) from None
        finally:
            probe.close()
        raise StartupError(
            f"a sidecar is already running with control socket {path} (state_dir "
            f"{self.state_dir}); stop it first with `cy-sidecar stop`",
            exitcodes.UNAVAILABLE,
        )

    def _open_control_socket(self) -> None:
        path = self.cfg.control_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise StartupError(f"control socket {path} cannot be created: "
                               f"{exc.strerror or exc}", exitcodes.CANT_CREATE) from None
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self.control = sock

    def run(self) -> int:
        """Start every child, supervise until stopped. Returns the process exit code."""
        self._install_signal_handlers()  # normally done by prepare()
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.sel.register(self.control, selectors.EVENT_READ, "control")

        log.info(
            "supervisor starting procs=%s bind_addr=%s worker_uds=%s state_dir=%s "
            "metrics_port=%s", self.procs, self.cfg.bind_addr, self.cfg.worker_uds,
            self.state_dir, self.cfg.metrics_port,
        )
        stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
        early = [sig for sig in self.signals if sig in stop_signals]
        if early:
            # Asked to stop while starting: start no child; the loop below ends at once.
            self.signals.remove(early[0])
            log.info("supervisor stopping signal=%s before starting any child",
                     signal.Signals(early[0]).name)
            self.begin_stop()
        else:
            _preload_child_modules()
            self.spawn("meter", 0)
            for index in range(self.procs):
                self.spawn("proxy", index)

        while True:
            timeout = TICK_SECS
            for key, _ in self.sel.select(timeout):
                self._on_ready(key)
            self._dispatch_signals()
            if self.stopping and not self.children:
                break
            self._tick()
        self._cleanup()
        log.info("supervisor stopped exit_code=%s", self.exit_code)
        return self.exit_code

    def _record_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    # -- children ----------------------------------------------------------------------

    def _free_region(self, index: int) -> int | None:
        """A meter region for a new proxy of `index`: each index has two, so a replacement
        can start while its predecessor drains. None while both are held (a proxy of an
        earlier reload still draining); the caller then waits for one to be reaped."""
        used = {c.region for c in self.children.values() if c.role == "proxy"}
        for region in (index, index + self.procs):
            if region not in used:
                return region
        return None

    def spawn(self, role: str, index: int) -> Child | None:
        """Fork a child; None when a proxy of `index` has no free meter region yet."""
        region = self._free_region(index) if role == "proxy" else -1
        if region is None:
            return None
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            code = exitcodes.FAILURE
            try:
                code = self._child_main(role, index, region, ready_w)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else exitcodes.FAILURE
            except BaseException:  # noqa: BLE001 - the child must never return into the loop
                logs.get(role).exception("%s crashed", role)
            finally:
                os._exit(code)
        os.close(ready_w)
        child = Child(role, index, pid, region, time.monotonic(), ready_r)
        self.children[pid] = child
        self.sel.register(ready_r, selectors.EVENT_READ, ("ready", pid))
        log.info("%s started index=%s pid=%s region=%s", role, index, pid, region)
        return child

    def _child_main(self, role: str, index: int, region: int, ready_fd: int) -> int:
        """Runs in the forked child: shed the supervisor's state, then become `role`."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.sel.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.control.close()
        for child in self.children.values():
            if child.ready_fd is not None:
                os.close(child.ready_fd)
        os.environ.pop("NOTIFY_SOCKET", None)
        os.environ.pop("WATCHDOG_USEC", None)
        os.environ.pop("WATCHDOG_PID", None)
        if self.meter is not None:
            self.meter.close()
        logs.setup(f"{role}-{index}" if role == "proxy" else role,
                   self.cfg.log_level, self.cfg.log_format)
        logs.capture_native_stderr()  # gRPC's core logs in this child's format too
        if role == "proxy":
            from cy_sidecar.proxy_worker.process import run_proxy

            return run_proxy(self.cfg, index, region, self.meter_path, ready_fd)
        from cy_sidecar.meter_store.process import run_meter

        os.write(ready_fd, b"S")
        os.close(ready_fd)
        return run_meter(self.cfg, self.meter_path, self.old_meter_files)

    def _on_ready(self, key) -> None:
        data = key.data
        if data == "wake":
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass
            return
        if data == "control":
            self._accept_control()
            return
        if isinstance(data, tuple) and data[0] == "ready":
            pid = data[1]
            fd = key.fd
            try:
                msg = os.read(fd, 16)
            except OSError:
                msg = b""
            child = self.children.get(pid)
            if msg and child is not None:
                if child.role == "proxy":
                    child.ready = True
                    log.info("proxy ready index=%s pid=%s", child.index, pid)
                    self._on_proxy_ready(child)
                return
            self.sel.unregister(fd)
            os.close(fd)
            if child is not None:
                child.ready_fd = None
            return
        if isinstance(data, tuple) and data[0] == "client":
            self._read_control(key)

    def _on_proxy_ready(self, child: Child) -> None:
        if self.reload_current and self.reload_current[0] == child.index:
            old_pid = self.reload_current[1]
            old = self.children.get(old_pid)
            if old is not None:
                old.retiring = True
                log.info("reload replaced proxy index=%s old_pid=%s new_pid=%s next=drain old",
                         child.index, old_pid, child.pid)
                self._kill(old, signal.SIGUSR1)
            self.reload_current = None

    def _meter_ready(self) -> bool:
        status = self.meter_status()
        meter = [c for c in self.children.values() if c.role == "meter" and not c.retiring]
        return bool(meter) and status.get("pid") == meter[0].pid

    def meter_status(self) -> dict:
        try:
            with open(os.path.join(self.state_dir, "meter-status.json"), "rb") as fh:
                return json.loads(fh.read())
        except (OSError, ValueError):
            return {}

    def _kill(self, child: Child, sig: int) -> None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def handle_chld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self._reaped(child, code)

    def _reaped(self, child: Child, code: int) -> None:
        if child.ready_fd is not None:
            try:
                self.sel.unregister(child.ready_fd)
            except (KeyError, ValueError):
                pass
            os.close(child.ready_fd)
            child.ready_fd = None
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.pid)
        except Exception:  # noqa: BLE001 - metrics housekeeping must not stop supervision
            pass
        interrupted = 0
        if child.role == "proxy" and self.meter is not None:
            interrupted = self.meter.interrupt_open_slots(child.region)
        expected = (self.stopping or child.retiring) and code == exitcodes.OK
        what = exitcodes.describe(code)
        if expected:
            log.info("%s exited index=%s pid=%s how=%s", child.role, child.index, child.pid,
                     what)
        elif code == -signal.SIGKILL and child.unresponsive:
            log.error("%s killed index=%s pid=%s signal=SIGKILL (by the supervisor: no "
                      "heartbeat) interrupted_records=%s next=restart", child.role,
                      child.index, child.pid, interrupted)
        elif code == -signal.SIGKILL:
            self._event("error", f"{child.role} pid={child.pid} killed by SIGKILL")
            log.error(
                "%s killed index=%s pid=%s signal=SIGKILL (out of memory?) "
                "interrupted_records=%s next=restart", child.role, child.index, child.pid,
                interrupted,
            )
        else:
            self._event("error", f"{child.role} pid={child.pid} {what}")
            log.error(
                "%s died index=%s pid=%s how=%s interrupted_records=%s next=%s",
                child.role, child.index, child.pid, what, interrupted,
                "stop" if code in exitcodes.FATAL else "restart",
            )
        if code in exitcodes.FATAL:
            if not self.stopping:
                log.error("%s cannot boot (%s); stopping the sidecar", child.role, what)
                self.exit_code = code
                self.begin_stop()
            return
        if self.stopping or child.retiring:
            return
        key = (child.role, child.index)
        lived = time.monotonic() - child.started
        backoff = self.backoff.get(key, RESTART_BACKOFF_MIN)
        # Backoff is for children that die while booting (a crash loop); one that was
        # serving (a ready proxy, or up for a while) is replaced at once.
        serving = child.ready or lived > STABLE_AFTER_SECS
        if serving:
            backoff = RESTART_BACKOFF_MIN
        self.restart_at[key] = time.monotonic() + backoff
        self.backoff[key] = (
            RESTART_BACKOFF_MIN if serving else min(backoff * 2, RESTART_BACKOFF_MAX)
        )

    def _event(self, level: str, text: str) -> None:
        self.events.append((time.time(), level, text))
        del self.events[:-20]

    # -- signals -----------------------------------------------------------------------

    def _dispatch_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGCHLD:
                self.handle_chld()
            elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self.handle_term(sig)
            elif sig == signal.SIGHUP:
                self.handle_hup()

    def handle_term(self, sig: int) -> None:
        if self.stopping:
            log.info("supervisor already stopping signal=%s", signal.Signals(sig).name)
            return
        log.info("supervisor stopping signal=%s grace_secs=%s", signal.Signals(sig).name,
                 self.cfg.drain_grace_secs)
        self.begin_stop()

    def begin_stop(self) -> None:
        self.stopping = True
        self.restart_at.clear()
        self.reload_queue.clear()
        self.reload_active = False
        self.reload_pending = None
        self.notifier.stopping()
        self.stop_deadline = time.monotonic() + self.cfg.drain_grace_secs + SHUTDOWN_EXTRA_SECS
        # Proxies first; the meter stops once they are gone, so it commits their last
        # records before it exits.
        for child in self.children.values():
            if child.role == "proxy":
                self._kill(child, signal.SIGTERM)
                child.stopping_sent = True

    def handle_hup(self) -> None:
        self.reload("SIGHUP")

    def reload(self, why: str) -> dict:
        if self.stopping:
            return {"ok": False, "error": "the sidecar is stopping"}
        try:
            cfg = config_mod.load(self.config_path).with_overrides(procs=self.procs)
        except Exception as exc:  # noqa: BLE001 - whatever the file holds, a reload must
            # never end the sidecar; a ConfigError is the expected, one-line kind.
            if not isinstance(exc, config_mod.ConfigError):
                log.exception("reload config load failed unexpectedly path=%s",
                              self.config_path)
            log.error("reload refused reason=%s error=%r next=keep running the old config",
                      why, str(exc))
            self._event("error", f"reload refused: {exc}")
            return {"ok": False, "reason": "config",
                    "error": f"reload refused, the sidecar keeps its current configuration: "
                             f"{exc}"}
        if self.reload_active:
            # One reload at a time: replacing the proxies a reload has just started (and
            # the meter it has just replaced) would only cut them short. The file is read
            # again when the next one starts, so it sees the latest edit.
            self.reload_pending = why
            log.info("reload queued reason=%s next=start when the running reload finishes",
                     why)
            return {"ok": True, "queued": True}
        self.notifier.reloading()
        self.reload_ready_due = True
        log.info("reload starting reason=%s procs=%s", why, self.procs)
        self.cfg = cfg
        meter = [c for c in self.children.values() if c.role == "meter"]
        for child in meter:
            child.retiring = True
            self._kill(child, signal.SIGTERM)
        self.reload_queue = sorted(
            c.index for c in self.children.values() if c.role == "proxy" and not c.retiring
        )
        self.reload_active = True
        return {"ok": True, "replacing": len(self.reload_queue)}

    # -- periodic work ---------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        if self.stopping:
            proxies = [c for c in self.children.values() if c.role == "proxy"]
            if not proxies:
                for child in self.children.values():
                    if not child.stopping_sent:
                        self._kill(child, signal.SIGTERM)
                        child.stopping_sent = True
            if now > self.stop_deadline:
                for child in self.children.values():
                    log.error("%s did not stop pid=%s next=SIGKILL", child.role, child.pid)
                    self._kill(child, signal.SIGKILL)
                self.stop_deadline = now + 5.0
            return

        for key, when in list(self.restart_at.items()):
            if now >= when:
                if self.spawn(*key) is None:
                    self.restart_at[key] = now + REGION_WAIT_SECS
                    continue
                del self.restart_at[key]
                self.restarts[key[0]] += 1
                try:
                    from cy_sidecar import metrics as m

                    m.RESTARTS.labels(key[0]).inc()
                except Exception:  # noqa: BLE001
                    pass

        has_meter = any(c.role == "meter" and not c.retiring for c in self.children.values())
        if not has_meter and ("meter", 0) not in self.restart_at:
            if not any(c.role == "meter" for c in self.children.values()):
                self.spawn("meter", 0)

        if self.reload_queue and self.reload_current is None and has_meter:
            index = self.reload_queue[0]
            olds = [c for c in self.children.values()
                    if c.role == "proxy" and c.index == index and not c.retiring]
            if not olds:
                self.reload_queue.pop(0)
            elif self.spawn("proxy", index) is not None:
                self.reload_queue.pop(0)
                self.reload_current = (index, olds[0].pid)
                self.reload_waiting = None
            elif self.reload_waiting != index:
                self.reload_waiting = index
                log.info("reload waiting index=%s reason=a proxy of an earlier reload is "
                         "still draining next=replace it once that one exits", index)
        if self.reload_active and not self.reload_queue and self.reload_current is None:
            # Every replacement listens and every old proxy was told to retire.
            self.reload_active = False
            log.info("reload finished procs=%s", self.procs)
            if self.reload_pending:
                why, self.reload_pending = self.reload_pending, None
                self.reload(why)
        self._watch_heartbeats(now)
        self._notify(now)

    def _watch_heartbeats(self, now: float) -> None:
        if self.meter is None:
            return
        mono_ns = time.monotonic_ns()
        for child in list(self.children.values()):
            if child.role != "proxy" or not child.ready or child.retiring:
                continue
            pid, beat = self.meter.region_owner(child.region)
            if pid != child.pid or not beat:
                continue
            silent = (mono_ns - beat) / 1e9
            if silent > HEARTBEAT_STALE_SECS:
                self._event("error", f"proxy pid={child.pid} unresponsive {silent:.0f}s")
                log.error(
                    "proxy unresponsive index=%s pid=%s silent_secs=%.1f (stopped or hung) "
                    "next=SIGKILL and restart", child.index, child.pid, silent,
                )
                self._kill(child, signal.SIGKILL)
                child.ready = False
                child.unresponsive = True

    def healthy_children(self) -> bool:
        """True while every proxy heartbeats and the meter updates its status file."""
        return self.unhealthy_reason() is None

    def unhealthy_reason(self) -> str | None:
        """Why the watchdog is withheld now, or None when every child is healthy."""
        if self.meter is None:
            return "no meter file"
        mono_ns = time.monotonic_ns()
        proxies = [c for c in self.children.values() if c.role == "proxy" and not c.retiring]
        if len(proxies) < self.procs:
            return f"{len(proxies)}/{self.procs} proxies running"
        for child in proxies:
            pid, beat = self.meter.region_owner(child.region)
            if not child.ready or pid != child.pid:
                return f"proxy index={child.index} pid={child.pid} not ready"
            if (mono_ns - beat) / 1e9 > 3.0:
                return (f"proxy index={child.index} pid={child.pid} silent "
                        f"{(mono_ns - beat) / 1e9:.1f}s")
        status = self.meter_status()
        if time.time() - status.get("updated_unix", 0) >= 5.0:
            return "meter status file not updated for 5s"
        return None

    def status_line(self) -> str:
        ready = sum(1 for c in self.children.values()
                    if c.role == "proxy" and c.ready and not c.retiring)
        states = {}
        for child in self.children.values():
            if child.role == "proxy" and child.ready and self.meter is not None:
                info = self.meter.worker_info(child.region)
                states[info["state"]] = states.get(info["state"], 0) + 1
        worker = "/".join(sorted(states)) or "unknown"
        pending = self.meter_status().get("pending", "?")
        return f"{ready}/{self.procs} proxies, worker {worker}, {pending} pending"

    def _notify(self, now: float) -> None:
        all_ready = (
            sum(1 for c in self.children.values() if c.role == "proxy" and c.ready
                and not c.retiring) >= self.procs
        )
        if not self.ready_sent and all_ready and self._meter_ready():
            ledger_error = self.meter_status().get("ledger_error")
            if ledger_error:
                # READY=1 means the ledger is open too; until then systemd shows why not.
                self.notifier.status(f"waiting for the ledger: {ledger_error}")
                return
            self.ready_sent = True
            self.notifier.ready(self.status_line())
            log.info("sidecar ready procs=%s bind_addr=%s metrics_port=%s control=%s",
                     self.procs, self.cfg.bind_addr, self.cfg.metrics_port,
                     self.cfg.control_path)
            return
        if not self.ready_sent:
            return
        if (self.reload_ready_due and all_ready and not self.reload_queue
                and self.reload_current is None and self._meter_ready()):
            # systemd keeps the unit "reloading" until READY=1 comes again.
            self.reload_ready_due = False
            self.notifier.reloaded(self.status_line())
            log.info("sidecar ready again after reload procs=%s", self.procs)
        if self.notifier.watchdog_interval and now - self.last_watchdog >= (
            self.notifier.watchdog_interval
        ):
            reason = self.unhealthy_reason()
            if reason is None:
                self.notifier.watchdog()
                self.last_watchdog = now
                self.watchdog_withheld = ""
            elif not self.watchdog_withheld:
                self.watchdog_withheld = reason
                log.warning("watchdog withheld reason=%r", reason)
        if int(now * 10) % 10 == 0:
            self.notifier.status(self.status_line())

    # -- control socket -------------------------------------------------------------------

    def _accept_control(self) -> None:
        try:
            conn, _ = self.control.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, ("client", bytearray(), time.monotonic()))

    def _read_control(self, key) -> None:
        conn = key.fileobj
        buf = key.data[1]
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        if data and b"\n" not in buf and len(buf) < 65536:
            return
        self.sel.unregister(conn)
        try:
            request = json.loads(bytes(buf).split(b"\n", 1)[0] or b"{}")
            reply = self.handle_control(request)
        except ValueError:
            reply = {"ok": False, "error": "request is not one JSON object on one line"}
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    def handle_control(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "status":
            from .status import collect

            return {"ok": True, "status": collect(self)}
        if cmd == "stop":
            if not self.stopping:
                log.info("supervisor stopping reason=control socket")
                self.begin_stop()
            return {"ok": True}
        if cmd == "reload":
            return self.reload("control socket")
        return {"ok": False, "error": f"unknown command {cmd!r}: expected status, stop, reload"}

    def _cleanup(self) -> None:
        self.notifier.close()
        if self.control is not None:
            self.control.close()
            try:
                os.unlink(self.cfg.control_path)
            except OSError:
                pass
        if self.meter is not None:
            self.meter.close()
        signal.set_wakeup_fd(-1)
