"""Operating a running sidecar: status (JSON, one frame, the TUI in a real terminal), stop,
reload, the control socket, metrics that stay right across crashes, JSON logs, config."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time

import grpc
import pytest

from cy_sidecar.localrun import cli
from cy_sidecar.supervisor import control
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from helpers import collect, new_channel, proxy_pid_of, request, scrape, wait_until


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout,
                          env=env or _clean_env(), stdin=subprocess.DEVNULL)


def status_json(stack) -> dict:
    proc = run_cli("status", "--json", "--config", stack.config_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- status, stop, reload, the control socket ------------------------------------------


def test_status_json_describes_every_process_the_worker_and_the_ledger(running):
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        out = collect(stub.StreamPredict(iter([request(tokens=9, trace_id="st-1")]), timeout=10))
        assert out["tokens"] == 9
        # One stream left open while the status is taken.
        call = stub.StreamPredict(iter([request(tokens=0, demo_tokens=5000, demo_tps=50,
                                                trace_id="st-open")]), timeout=30)
        next(call)
        busy = proxy_pid_of(channel)
        data = wait_until(
            lambda: (lambda d: d if d["ledger"].get("last_upload_ok_unix") else None)(
                status_json(running)),
            what="a status with the first upload done")
        call.cancel()

    sup = data["supervisor"]
    assert sup["pid"] == running.sidecar.pid and sup["role"] == "supervisor"
    proxies = [c for c in data["children"] if c["role"] == "proxy"]
    meters = [c for c in data["children"] if c["role"] == "meter"]
    assert sorted(p["index"] for p in proxies) == [0, 1] and len(meters) == 1
    pids = {sup["pid"]} | {c["pid"] for c in data["children"]}
    assert len(pids) == 4
    for proc in [sup, *data["children"]]:
        assert proc["rss_bytes"] > 1 << 20 and proc["cpu_percent"] >= 0.0
        assert proc["status"] in ("running", "sleeping", "disk-sleep")
    for proxy in proxies:
        assert proxy["ready"] and proxy["worker_state"] == "ready"
        assert proxy["heartbeat_age_secs"] < 3.0
        assert proxy["open_streams"] == (1 if proxy["pid"] == busy else 0)
    assert sum(p["requests_total"] for p in proxies) == 2

    worker = data["worker"]
    assert worker["state"] == "ready" and worker["models"] == "demo"
    assert worker["pid"] == running.worker.pid
    assert data["models"]["demo"]["delivered"] >= 10  # 9 finished + the open one's
    assert data["models"]["demo"]["records"] >= 1
    ledger = data["ledger"]
    assert ledger["pid"] == meters[0]["pid"]
    assert ledger["pending"] == 0 and ledger["committed_total"] >= 1
    assert time.time() - ledger["last_upload_ok_unix"] < 30
    assert data["status_line"] == "2/2 proxies, worker ready, 0 pending"


def test_status_once_prints_one_frame_and_without_a_sidecar_fails_clearly(stack):
    proc = run_cli("status", "--config", stack.config_path)
    assert proc.returncode != 0
    assert "no sidecar is running" in proc.stderr and stack.state_dir in proc.stderr
    assert proc.stdout == ""

    stack.start_sidecar(procs=2)
    proc = run_cli("status", "--once", "--config", stack.config_path,
                   env=_clean_env(COLUMNS="120"))
    assert proc.returncode == 0, proc.stderr
    frame = proc.stdout
    for text in ("proxy-0", "proxy-1", "meter", "supervisor", f"pid {stack.sidecar.pid}",
                 "inference worker ready", "tokens by model", "ledger", "pending 0"):
        assert text in frame, f"{text!r} not in\n{frame}"


def test_stop_and_reload_through_the_control_socket(running):
    sock = os.path.join(running.state_dir, "control.sock")
    mode = os.stat(sock).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

    before = {c["pid"] for c in status_json(running)["children"] if c["role"] == "proxy"}
    mark = len(running.sidecar.lines)
    proc = run_cli("reload", "--config", running.config_path)
    assert proc.returncode == 0, proc.stderr
    assert "replacing 2 proxy processes" in proc.stdout
    running.sidecar.wait_for(r"sidecar ready again after reload", timeout=30, start=mark)

    def replaced():
        data = status_json(running)
        now = {c["pid"] for c in data["children"] if c["role"] == "proxy"}
        ready = all(c["ready"] and not c["retiring"] for c in data["children"])
        return len(now) == 2 and not now & before and ready
    wait_until(replaced, timeout=20, what="both proxies replaced by the reload")
    with new_channel(running.target) as channel:
        out = collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
            iter([request(tokens=3)]), timeout=10))
        assert out["tokens"] == 3

    # Two reloads back to back: the second waits for the first. A file that does not load
    # is refused at once, even while a reload runs.
    mark = len(running.sidecar.lines)
    first = control.request(sock, "reload")
    second = control.request(sock, "reload")
    assert first == {"ok": True, "replacing": 2} and second == {"ok": True, "queued": True}
    with open(running.config_path, "a", encoding="utf-8") as fh:
        fh.write("\n[server]\nprocs = 'many'\n")
    refused = control.request(sock, "reload")
    assert not refused["ok"] and refused["reason"] == "config"
    running.write_config()
    first_done = running.sidecar.wait_for(r"reload finished", timeout=30, start=mark)
    after = running.sidecar.lines.index(("err", first_done.string)) + 1
    running.sidecar.wait_for(r"reload starting reason=control socket", timeout=10,
                             start=after)
    running.sidecar.wait_for(r"reload finished", timeout=30, start=after)

    proc = run_cli("stop", "--config", running.config_path)
    assert proc.returncode == 0, proc.stderr
    assert "stopping" in proc.stdout
    assert running.sidecar.popen.wait(30) == 0
    assert not os.path.exists(sock)
    proc = run_cli("stop", "--config", running.config_path)
    assert proc.returncode != 0 and "no sidecar is running" in proc.stderr


# -- the TUI in a real terminal -----------------------------------------------------------


def _tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing; .ci/run installs it")
        pytest.skip("tmux is not installed (.ci/run installs it with apt-get)")
    return path


def test_the_status_tui_draws_in_a_terminal_and_quits_on_q(running, tmp_path):
    tmux = _tmux()
    # A tmux server of this test only, on a socket of its own (short path: sun_path).
    home = tempfile.mkdtemp(prefix="cy-tmux-")
    sock = os.path.join(home, "s")
    conf = os.path.join(home, "tmux.conf")
    with open(conf, "w") as fh:
        fh.write("set -g remain-on-exit on\nset -g status off\n")

    def tm(*args: str) -> str:
        return subprocess.run([tmux, "-S", sock, "-f", conf, *args], capture_output=True,
                              text=True, timeout=20, env=_clean_env(TERM="xterm-256color"),
                              check=True).stdout

    # The shell around the TUI reports its exit code and the terminal's modes after it
    # (the TUI puts the terminal in cbreak mode and must restore it).
    result = os.path.join(home, "result")
    status = " ".join(shlex.quote(a) for a in cli("status", "--config", running.config_path,
                                                   "--interval", "0.3"))
    script = (f"{status}; echo exit=$? > {result}.tmp; stty -a >> {result}.tmp; "
              f"mv {result}.tmp {result}")
    try:
        tm("new-session", "-d", "-s", "tui", "-x", "110", "-y", "45",
           f"sh -c {shlex.quote(script)}")

        def frame():
            text = tm("capture-pane", "-p", "-t", "tui")
            return text if "proxy-0" in text and "ready" in text else None
        text = wait_until(frame, timeout=20, interval=0.1, what="the TUI's first frame")
        (tmp_path / "tui-frame.txt").write_text(text)
        assert "proxy-1" in text and "tokens by model" in text
        assert not os.path.exists(result)

        # Another key and q in one write: q must not wait in a buffer for a third key.
        tm("send-keys", "-t", "tui", "xq")
        wait_until(lambda: os.path.exists(result), timeout=10, interval=0.05,
                   what="the TUI to quit on q")
        with open(result) as fh:
            report = fh.read()
        assert report.startswith("exit=0\n"), report
        modes = report.split()
        assert "icanon" in modes and "echo" in modes, report
    finally:
        subprocess.run([tmux, "-S", sock, "kill-server"], capture_output=True, timeout=20)
        shutil.rmtree(home, ignore_errors=True)


# -- metrics ------------------------------------------------------------------------------


COUNTERS = ("sidecar_requests_total", "sidecar_tokens_processed_total",
            "sidecar_process_restarts_total", "sidecar_requests_success_total",
            "sidecar_ledger_records_committed_total")


class Scrapes:
    """Every scrape of a test, to check that no counter ever went down."""

    def __init__(self, stack):
        self.stack = stack
        self.taken: list[dict[str, float]] = []

    def __call__(self) -> dict[str, float]:
        sample = scrape(self.stack)
        self.taken.append(sample)
        return sample

    def assert_counters_never_went_down(self) -> None:
        seen: dict[str, float] = {}
        for sample in self.taken:
            for name, value in sample.items():
                if name.split("{")[0] not in COUNTERS:
                    continue
                assert value >= seen.get(name, 0.0), f"{name} went from {seen[name]} to {value}"
                seen[name] = value
            for name in seen:
                assert name in sample, f"{name} disappeared from the scrape"


def _read_until_error(call, received: list[int]) -> None:
    try:
        for msg in call:
            received.append(msg.token_count)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                              grpc.StatusCode.UNKNOWN), exc
        return
    raise AssertionError("a stream of the killed proxy ended normally")


def test_metrics_stay_right_when_a_proxy_is_killed_and_when_the_sidecar_restarts(running):
    scrapes = Scrapes(running)
    delivered = 0
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        delivered += collect(stub.StreamPredict(iter([request(tokens=11)]), timeout=10))["tokens"]
        victim = proxy_pid_of(channel)
        # Two long streams on this one connection: both on the victim proxy. Slow pacing,
        # read in step, so no chunk is in flight when the kill comes right after a read.
        calls = [stub.StreamPredict(iter([request(tokens=0, demo_tokens=5000, demo_tps=20,
                                                  trace_id=f"victim-{i}")]), timeout=60)
                 for i in range(2)]
        received: list[list[int]] = [[], []]
        for _ in range(4):
            for i, call in enumerate(calls):
                received[i].append(next(call).token_count)
        sample = wait_until(lambda: (lambda s: s if s.get("sidecar_active_connections") == 2
                                     else None)(scrapes()), timeout=5,
                            what="two active connections in the scrape")
        assert sample["sidecar_requests_total"] == 3
        for i, call in enumerate(calls):
            received[i].append(next(call).token_count)
        mark = len(running.sidecar.lines)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        for i, call in enumerate(calls):
            _read_until_error(call, received[i])
        delivered += sum(map(sum, received))

    sample = wait_until(lambda: (lambda s: s if s.get("sidecar_active_connections") == 0
                                 else None)(scrapes()), timeout=5, interval=0.05,
                        what="the dead proxy's streams gone from active connections")
    assert time.monotonic() - killed_at < 2.0
    running.sidecar.wait_for(rf"proxy killed index=\d pid={victim} ", start=mark)
    running.sidecar.wait_for(r"proxy ready index=\d pid=\d+", start=mark)
    wait_until(lambda: scrapes().get('sidecar_process_restarts_total{role="proxy"}') == 1,
               timeout=10, what="the restart counted")

    # The survivor and the replacement serve; the counters kept the dead proxy's share.
    for i in range(6):
        with new_channel(running.target) as channel:
            out = collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
                iter([request(tokens=4 + i)]), timeout=10))
            delivered += out["tokens"]
    sample = wait_until(lambda: (lambda s: s if s.get("sidecar_requests_total") == 9
                                 else None)(scrapes()), timeout=5, what="9 requests counted")
    assert sample['sidecar_tokens_processed_total{model="demo"}'] == delivered
    assert sample["sidecar_active_connections"] == 0
    assert sample['sidecar_process_restarts_total{role="proxy"}'] == 1
    scrapes.assert_counters_never_went_down()

    # A whole restart on the same state directory starts every counter from zero.
    assert running.sidecar.stop() == 0
    running.start_sidecar(procs=2)
    fresh = scrape(running)
    assert fresh.get("sidecar_requests_total", 0.0) == 0.0
    assert fresh.get('sidecar_tokens_processed_total{model="demo"}', 0.0) == 0.0
    assert fresh.get('sidecar_process_restarts_total{role="proxy"}', 0.0) == 0.0
    with new_channel(running.target) as channel:
        collect(pb_grpc.AiInferenceStub(channel).StreamPredict(iter([request(tokens=5)]),
                                                               timeout=10))
    after = wait_until(lambda: (lambda s: s if s.get("sidecar_requests_total") == 1
                                else None)(scrape(running)), timeout=5, what="1 request")
    assert after['sidecar_tokens_processed_total{model="demo"}'] == 5


def test_tokens_by_status_counts_each_delivered_token_once(running):
    with new_channel(running.target) as channel:
        collect(pb_grpc.AiInferenceStub(channel).StreamPredict(iter([request(tokens=7)]),
                                                               timeout=10))
    name = 'sidecar_ledger_records_committed_total{status="finished"}'
    sample = wait_until(lambda: (lambda s: s if s.get(name) == 1 else None)(scrape(running)),
                        timeout=5, what="the record committed")
    assert sample['sidecar_tokens_by_status_total{model="demo",status="finished"}'] == 7


# -- logs ---------------------------------------------------------------------------------


def test_json_logs_are_one_object_a_line_and_a_request_logs_its_end(stack):
    stack.write_config(**{"observability.log_format": "json"})
    sidecar = stack.start_sidecar(procs=2)
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        out = collect(stub.StreamPredict(iter([request(tokens=8, trace_id="json-1")]),
                                         timeout=10))
        # More than the happy path: a refused model, a killed proxy, a reload.
        with pytest.raises(grpc.RpcError):
            collect(stub.StreamPredict(iter([request(model="no-such-model",
                                                     trace_id="json-bad")]), timeout=10))
        victim = proxy_pid_of(channel)
    mark = len(sidecar.lines)
    os.kill(victim, signal.SIGKILL)
    sidecar.wait_for(r"proxy ready index", start=mark)
    mark = len(sidecar.lines)
    sidecar.signal(signal.SIGHUP)
    sidecar.wait_for(r"sidecar ready again after reload", timeout=30, start=mark)
    assert sidecar.stop() == 0

    lines = [line for src, line in sidecar.lines if src == "err"]
    assert len(lines) > 20
    objects = []
    for line in lines:
        obj = json.loads(line)  # every line, or this raises
        assert isinstance(obj, dict), line
        for key in ("role", "pid", "level", "msg"):
            assert key in obj, f"{key} missing in {line}"
        objects.append(obj)
    assert {"supervisor", "meter", "proxy-0", "proxy-1"} <= {o["role"] for o in objects}
    assert {o["level"] for o in objects} == {"info", "error"}
    killed = [o for o in objects if o["event"] == "proxy killed"]
    assert len(killed) == 1 and killed[0]["arg_pid"] == victim
    assert killed[0]["role"] == "supervisor" and killed[0]["pid"] == sidecar.pid
    # The reload retired the meter: its exit is one event with its pid and how it ended.
    exited = [o for o in objects if o["event"] == "meter exited"]
    assert exited and all(type(o["arg_pid"]) is int and o["how"] == "exit 0 (ok)"
                          for o in exited), exited

    def request_done(trace_id):
        return [o for o in objects if o["event"] == "request done"
                and o.get("trace_id") == trace_id]
    done = request_done("json-1")
    assert len(done) == 1, done
    assert done[0]["status"] == "finished" and done[0]["role"].startswith("proxy-")
    assert done[0]["delivered"] == out["tokens"] == 8 and done[0]["generated"] == 8
    assert len(done[0]["record_id"]) == 32
    bad = request_done("json-bad")
    assert len(bad) == 1 and bad[0]["status"] == "worker_error" and bad[0]["delivered"] == 0


def test_a_cancelled_request_is_logged_and_counted_too(running):
    with new_channel(running.target) as channel:
        call = pb_grpc.AiInferenceStub(channel).StreamPredict(
            iter([request(tokens=0, demo_tokens=500, demo_tps=50, trace_id="log-cancel")]),
            timeout=10)
        next(call)
        call.cancel()
    running.sidecar.wait_for(r"request done trace_id=log-cancel .*status=cancelled",
                             timeout=2.5)  # settling waits 1 s at most
    sample = scrape(running)
    assert sample['sidecar_requests_failed_total{status="cancelled"}'] == 1
    assert sample['sidecar_tokens_by_status_total{model="demo",status="cancelled"}'] >= 1


# -- config -------------------------------------------------------------------------------


def test_config_check_and_show_say_where_each_value_came_from(tmp_path):
    path = tmp_path / "sidecar.toml"
    path.write_text('[server]\nbind_addr = "127.0.0.1:6000"\nprocs = 3\n')
    env = _clean_env(SIDECAR_LOG_LEVEL="debug")

    proc = run_cli("config", "check", str(path), env=env)
    assert proc.returncode == 0 and f"ok: {path} is valid" in proc.stdout, proc.stderr

    proc = run_cli("config", "show", str(path), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("=")[0].strip(): line for line in proc.stdout.splitlines() if "=" in line}
    assert re.search(rf'"127\.0\.0\.1:6000"\s+# file {re.escape(str(path))}$',
                     lines["bind_addr"])
    assert re.search(rf"= 3\s+# file {re.escape(str(path))}$", lines["procs"])
    assert re.search(r'= "debug"\s+# env SIDECAR_LOG_LEVEL$', lines["log_level"])
    assert re.search(r"= 256\s+# default$", lines["max_concurrent_streams"])

    proc = run_cli("config", "show", str(path), "--json", env=env)
    data = json.loads(proc.stdout)
    assert data["values"]["server"]["procs"] == 3
    assert data["sources"]["observability.log_level"] == "env SIDECAR_LOG_LEVEL"
    assert data["sources"]["metering.state_dir"] == "default"

    proc = run_cli("config", "check", str(path), env=_clean_env(SIDECAR_PROCS="lots"))
    assert proc.returncode == 78
    assert proc.stderr.strip() == ("Error: server.procs = 'lots' (env SIDECAR_PROCS) is not "
                                   "allowed: expected an integer from 1 to 64")
    proc = run_cli("config", "check", str(tmp_path / "missing.toml"), env=env)
    assert proc.returncode == 78 and "does not exist" in proc.stderr


# -- Kubernetes ---------------------------------------------------------------------------


def test_the_kubernetes_example_fits_the_sidecar(tmp_path):
    from cy_sidecar import config as config_mod
    from cy_sidecar.supervisor import arbiter

    yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extras (pip install .[test])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "deploy", "kubernetes", "cy-sidecar.yaml")) as fh:
        docs = {doc["kind"]: doc for doc in yaml.safe_load_all(fh)}
    assert set(docs) == {"ConfigMap", "Deployment", "Service"}

    conf = tmp_path / "sidecar.toml"
    conf.write_text(docs["ConfigMap"]["data"]["sidecar.toml"])
    cfg = config_mod.load(str(conf), env={})
    assert cfg.procs == 4

    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > (cfg.drain_grace_secs
                                                   + arbiter.SHUTDOWN_EXTRA_SECS)
    containers = {c["name"]: c for c in pod["containers"]}
    sidecar, worker = containers["cy-sidecar"], containers["worker"]
    volumes = {v["name"]: v for v in pod["volumes"]}

    # The worker socket is on an emptyDir that both containers mount at the same place.
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    socket_volume = [name for name, path in mounts.items()
                     if os.path.dirname(cfg.worker_path) == path]
    assert len(socket_volume) == 1 and "emptyDir" in volumes[socket_volume[0]]
    assert {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}[socket_volume[0]] \
        == mounts[socket_volume[0]]
    assert mounts[[n for n, v in volumes.items() if "configMap" in v][0]] == "/etc/cy-sidecar"
    assert cfg.state_dir in mounts.values()

    argv = sidecar["command"] + sidecar["args"]
    assert argv[1:] == ["start", "--config", "/etc/cy-sidecar/sidecar.toml"]
    ports = {p["containerPort"] for p in sidecar["ports"]}
    grpc_port = int(cfg.bind_addr.rsplit(":", 1)[1])
    assert ports == {grpc_port, cfg.metrics_port} == {50051, 9090}
    assert sidecar["readinessProbe"]["grpc"] == {"port": 50051}
    assert sidecar["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}

    def mebibytes(quantity: str) -> float:
        number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
        return int(number) * (1024 if unit == "Gi" else 1)
    resources = sidecar["resources"]
    # The design's footprint for --procs 4 is 128 MiB total PSS; the cgroup also holds
    # the ledger's page cache.
    assert 128 <= mebibytes(resources["requests"]["memory"]) \
        <= mebibytes(resources["limits"]["memory"]) <= 512
