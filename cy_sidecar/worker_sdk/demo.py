"""The demo inference worker: a fake engine on the worker SDK, for demos, tests, benchmarks.

It answers every prompt with readable English picked from a small built-in corpus by a
generator seeded from the prompt, so the same prompt always gives the same text. Tokens are
words: one chunk per word, ``tokens=1``; the prompt's token count is its word count.

Run it with ``run_demo_worker(DemoOptions(uds=PATH, ...))``: it blocks, prints
``demo worker listening uds=PATH pid=PID`` to stderr once the socket accepts connections,
and returns an exit code (0 after SIGTERM/SIGINT; 69 when a live process holds the socket;
73 when the socket cannot be created; 78 for a bad option).

Options (:class:`DemoOptions`): uds, models (default ["demo"]; "*" accepts any model id),
ttft_ms (150), tokens_per_sec (40), fast (no pacing at all), stamp (``ts`` in each chunk),
slow_start_secs (state "loading" with an ETA that long, then "ready"; the socket listens at
once), usage_at_end_only (never send ``p``: prompt tokens appear only in the final usage),
default_tokens (48, used when max_new_tokens is 0), name, max_frame_bytes, log_level.

Length of an answer: ``demo_tokens`` if given, else max_new_tokens if above 0, else
default_tokens; the stream ends with reason "length" when max_new_tokens was reached.

Per-request fault injection through ``meta.extra`` (all values are strings):

    demo_tokens              exact number of tokens to generate
    demo_tps, demo_ttft_ms   pacing for this request (tokens per second, first-token delay)
    demo_usage_at_end_only   "1": this request behaves as if usage_at_end_only were set
    demo_fault               what goes wrong, after ``demo_fault_after`` chunks (default 0;
                             a value at or above the length means after the last chunk):
        crash      the process SIGKILLs itself (chunks already produced are flushed first)
        oom        the stream fails: err code oom "CUDA out of memory ..."
        oom_exit   an err oom frame for the stream, one for every connection (announce_exit),
                   then the process SIGKILLs itself
        error      the stream fails: err code internal
        stall      no more output and no end, until the proxy cancels the stream
        malformed  bytes that break the protocol, chosen by ``demo_malformed``, then stall:
            badlen          a length prefix of 0xFFFFFFFF (above any maximum) + 16 bytes
            oversize        an honest header and a complete chunk frame for this stream whose
                            body is one byte over the max_frame the proxy announced
            badjson         a correct length around a body that is not valid JSON
            unknown_stream  a valid chunk frame for stream id 2**53-1, never opened
            unknown_kind    a frame {"t": "bogus", "s": ID}
            not_object      a JSON array ["chunk", ID, "text"] instead of an object

Control commands (``ctl``):

    reload  payload secs (default 2): state "loading" with eta_ms = secs*1000, then "ready";
            the reply is sent at once
    fault   payload kind: "crash" SIGKILLs the process now (no reply); "stall_all" freezes
            every open and future stream (pings are still answered)
    state   reply payload: state, pid, models (comma-separated), open_streams, connections
    drain   state "draining": new requests get err overloaded
    anything else: ok=false, naming the command

Ownership: the demo owns its WorkerServer and the socket file; nothing is retried. On
SIGTERM/SIGINT it closes the server (open streams get err "cancelled") and exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import logging
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson

from cy_sidecar import exitcodes, logs, wire
from cy_sidecar.worker_sdk.server import Chunk, Request, WorkerError, WorkerServer

log = logging.getLogger("cy_sidecar.worker_sdk.demo")

# Written for this demo. Loosely about a harbour town, a guild and a long road, so that
# the output reads like the narration of a game.
CORPUS = (
    "The harbour bells rang twice before the fog lifted from the water.",
    "A fisherman mended his nets and hummed a song older than the town itself.",
    "Nobody in the guild hall remembered who had carved the map into the long table.",
    "The road north climbs through pine forest for three days before it reaches the pass.",
    "Travellers are told to carry dry bread, a warm cloak and a little patience.",
    "At the crossroads an old woman sells lanterns that never seem to run out of oil.",
    "The captain studied the sky and decided the storm would wait until morning.",
    "Every spring the river floods the lower market and the merchants move uphill.",
    "Your companion checks the straps on her pack and nods that she is ready.",
    "The blacksmith says a good blade needs more patience than fire.",
    "Somewhere below the old tower a door has been locked for a hundred years.",
    "The innkeeper keeps a ledger of every guest, written in a careful hand.",
    "Children chase gulls along the pier while their parents unload the boats.",
    "A quiet wind moves through the wheat fields east of the village.",
    "The lighthouse keeper writes letters to someone who never answers.",
    "If you follow the stream uphill you will find the ruins of a mill.",
    "The guards at the gate ask for a name, a purpose and a small coin.",
    "Rain drums on the slate roofs and the streets empty within minutes.",
    "A merchant from the south offers spices, silk and rumours in equal measure.",
    "The library closes at sunset, but the archivist often forgets to lock it.",
    "Your map shows a bridge here, yet only the stone pillars remain.",
    "Smoke rises from the chimneys as the evening meal is cooked across town.",
    "The scholar believes the comet returns every seventy years.",
    "A stray dog follows you from the market and refuses to leave.",
    "The mountain pass is safe in summer, though snow can fall without warning.",
    "Two sailors argue about the best way to tie a knot that will not slip.",
    "The mayor promises a new well, as every mayor before him has done.",
    "Lantern light flickers on the walls of the narrow stairway.",
    "At dawn the baker opens his shutters and the smell of bread fills the square.",
    "The old bridge creaks under the cart but holds, as it always has.",
    "An owl watches from the rafters of the abandoned barn.",
    "The herbalist sorts her jars by colour rather than by name.",
    "You hear the distant sound of a horn from the direction of the coast.",
    "The festival begins when the first boat returns with a full catch.",
    "A sealed letter waits for you at the post office, addressed in unfamiliar ink.",
    "The ferry crosses the bay four times a day, weather permitting.",
    "Moss covers the statue in the square, and no one recalls whose face it shows.",
    "The cartographer asks you to describe the valley you crossed last week.",
    "Far out at sea a single light blinks, then disappears.",
    "The path ahead splits in two, and both ways look equally well travelled.",
)
_SENTENCE_WORDS = tuple(tuple(s.split()) for s in CORPUS)

_FAULTS = ("crash", "oom", "oom_exit", "error", "stall", "malformed")
_MALFORMED = ("badlen", "oversize", "badjson", "unknown_stream", "unknown_kind",
              "not_object")
_MAX_TOKENS = 1_000_000


@dataclasses.dataclass
class DemoOptions:
    """Options of the demo inference worker; see the module docstring."""

    uds: str = "/tmp/cy_worker.sock"
    models: list[str] = dataclasses.field(default_factory=lambda: ["demo"])
    ttft_ms: float = 150.0
    tokens_per_sec: float = 40.0
    fast: bool = False
    stamp: bool = False
    slow_start_secs: float = 0.0
    usage_at_end_only: bool = False
    default_tokens: int = 48
    name: str = "demo"
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
    log_level: str = "info"

    def problem(self) -> str:
        """What is wrong with these options, or "" when they are usable."""
        if not self.socket_path():
            return "uds must be a socket path"
        if not self.models:
            return "models must name at least one model (or '*')"
        if self.ttft_ms < 0:
            return f"ttft_ms must be >= 0, got {self.ttft_ms}"
        if self.tokens_per_sec <= 0:
            return f"tokens_per_sec must be > 0, got {self.tokens_per_sec}"
        if self.slow_start_secs < 0:
            return f"slow_start_secs must be >= 0, got {self.slow_start_secs}"
        if not 0 <= self.default_tokens <= _MAX_TOKENS:
            return f"default_tokens must be 0..{_MAX_TOKENS}, got {self.default_tokens}"
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            return f"log_level must be debug, info, warning or error, got {self.log_level!r}"
        return ""

    def socket_path(self) -> str:
        return self.uds[len("unix://"):] if self.uds.startswith("unix://") else self.uds


def words_for(prompt: str, count: int) -> list[str]:
    """``count`` words of corpus text, the same for the same prompt (sentences in a row)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        out.extend(rng.choice(_SENTENCE_WORDS))
    del out[count:]
    return out


def _int_extra(extra: dict[str, str], key: str, default: int, lo: int, hi: int) -> int:
    raw = extra.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise WorkerError("invalid", f"meta.extra {key}={raw!r:.30} is not an integer")
    if not lo <= value <= hi:
        raise WorkerError("invalid", f"meta.extra {key}={value} outside {lo}..{hi}")
    return value


def _float_extra(extra: dict[str, str], key: str, default: float, lo: float) -> float:
    raw = extra.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise WorkerError("invalid", f"meta.extra {key}={raw!r:.30} is not a number")
    if not value >= lo or value == float("inf"):
        raise WorkerError("invalid", f"meta.extra {key}={value} must be finite and >= {lo}")
    return value


def malformed_bytes(kind: str, sid: int, max_frame: int) -> bytes:
    """The bytes of one ``demo_malformed`` kind for stream ``sid``."""
    if kind == "badlen":
        return wire.HEADER.pack(0xFFFFFFFF) + b"\0" * 16
    if kind == "oversize":
        base = orjson.dumps({"t": "chunk", "s": sid, "text": "", "n": 1})
        pad = max(max_frame + 1 - len(base), 0)
        body = orjson.dumps({"t": "chunk", "s": sid, "text": "x" * pad, "n": 1})
        return wire.HEADER.pack(len(body)) + body
    if kind == "badjson":
        body = b'{"t":"chunk","s":%d,"text":"this string never ends' % sid
        return wire.HEADER.pack(len(body)) + body
    if kind == "unknown_stream":
        ghost = wire.MAX_STREAM_ID if sid != wire.MAX_STREAM_ID else wire.MAX_STREAM_ID - 1
        return wire.encode({"t": "chunk", "s": ghost, "text": " ghost", "n": 1})
    if kind == "unknown_kind":
        return wire.encode({"t": "bogus", "s": sid})
    if kind == "not_object":
        body = orjson.dumps(["chunk", sid, "text"])
        return wire.HEADER.pack(len(body)) + body
    raise WorkerError("invalid", f"unknown demo_malformed {kind!r}; "
                      f"one of {', '.join(_MALFORMED)}")


def _sigkill_self() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class DemoEngine:
    """The generator and control handler behind the demo's WorkerServer."""

    def __init__(self, opts: DemoOptions):
        self.opts = opts
        self.server = WorkerServer(
            self.generate,
            opts.socket_path(),
            opts.models,
            name=opts.name,
            max_frame_bytes=opts.max_frame_bytes,
            control=self.control,
            stamp=opts.stamp,
        )
        self._stall_all = False
        self._never: asyncio.Future | None = None
        self._ready_timer: asyncio.TimerHandle | None = None

    async def _stall(self) -> None:
        """Wait until cancelled (a stalled engine)."""
        if self._never is None:
            self._never = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._never)

    def become_ready_in(self, secs: float, msg: str) -> None:
        """State loading with an ETA of ``secs``, then ready."""
        if self._ready_timer is not None:
            self._ready_timer.cancel()
        self.server.set_state("loading", eta_ms=int(secs * 1000), msg=msg)
        self._ready_timer = asyncio.get_running_loop().call_later(
            secs, self.server.set_state, "ready", 0, "model loaded"
        )

    async def generate(self, req: Request) -> AsyncIterator[Chunk]:
        opts = self.opts
        extra = req.extra
        limit = req.max_new_tokens
        default = limit if limit > 0 else opts.default_tokens
        count = _int_extra(extra, "demo_tokens", default, 0, _MAX_TOKENS)
        tps = _float_extra(extra, "demo_tps", opts.tokens_per_sec, 1e-3)
        ttft = _float_extra(extra, "demo_ttft_ms", opts.ttft_ms, 0.0) / 1000.0
        fault = extra.get("demo_fault", "")
        if fault and fault not in _FAULTS:
            raise WorkerError("invalid", f"unknown demo_fault {fault!r}; "
                              f"one of {', '.join(_FAULTS)}")
        fault_at = min(_int_extra(extra, "demo_fault_after", 0, 0, _MAX_TOKENS), count)
        if fault == "malformed":
            malformed = extra.get("demo_malformed", "")
            malformed_bytes(malformed, req.stream_id, 1)  # reject an unknown kind up front
        end_only = opts.usage_at_end_only or extra.get("demo_usage_at_end_only") == "1"
        prompt_tokens = max(len(req.prompt.split()), 1)
        if not end_only:
            req.prompt_tokens = prompt_tokens
        words = words_for(req.prompt, count)
        paced = not opts.fast
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            for i in range(count + 1):
                if fault and i == fault_at:
                    await self._fault(req, fault, extra)
                if i == count:
                    break
                if self._stall_all:
                    await self._stall()
                if paced:
                    delay = start + ttft + i / tps - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                yield Chunk(words[i] if i == 0 else " " + words[i], 1)
        finally:
            # An engine that learns the prompt size late reports it here, which is also
            # reached when the stream is cancelled, so the final usage still has it.
            req.prompt_tokens = prompt_tokens

    async def _fault(self, req: Request, fault: str, extra: dict[str, str]) -> None:
        sid = req.stream_id
        log.info("demo_fault stream=%s kind=%s", sid, fault)
        if fault == "crash":
            req.flush()
            _sigkill_self()
        elif fault == "oom":
            raise WorkerError("oom", "CUDA out of memory. Tried to allocate 2.00 GiB "
                              "(demo fault injection)")
        elif fault == "oom_exit":
            msg = "CUDA out of memory; inference worker exiting (demo fault injection)"
            req.inject_raw(wire.encode({"t": "err", "s": sid, "code": "oom", "msg": msg}))
            self.server.announce_exit("oom", msg)
            _sigkill_self()
        elif fault == "error":
            raise WorkerError("internal", "engine failure (demo fault injection)")
        elif fault == "malformed":
            req.inject_raw(malformed_bytes(extra.get("demo_malformed", ""), sid,
                                           req.max_frame))
            await self._stall()
        elif fault == "stall":
            await self._stall()

    async def control(self, cmd: str, payload: dict[str, Any]) -> dict[str, Any]:
        if cmd == "reload":
            try:
                secs = float(payload.get("secs", 2))
            except (TypeError, ValueError):
                raise WorkerError("invalid", f"reload secs={payload.get('secs')!r} "
                                  "is not a number")
            if not 0 <= secs <= 3600:
                raise WorkerError("invalid", f"reload secs={secs} outside 0..3600")
            self.become_ready_in(secs, "reloading model")
            return {"state": "loading", "eta_ms": int(secs * 1000)}
        if cmd == "fault":
            kind = payload.get("kind", "")
            if kind == "crash":
                _sigkill_self()
            if kind == "stall_all":
                self._stall_all = True
                return {"stalled": "all"}
            raise WorkerError("invalid", f"unknown fault kind {kind!r}; crash or stall_all")
        if cmd == "state":
            return self.server.info()
        if cmd == "drain":
            self.server.set_state("draining", msg="drain requested")
            return {"state": "draining"}
        raise WorkerError("invalid", f"unknown control command {cmd!r}; "
                          "known: reload, fault, state, drain")


async def _serve(opts: DemoOptions) -> int:
    engine = DemoEngine(opts)
    path = opts.socket_path()
    if opts.slow_start_secs > 0:
        engine.become_ready_in(opts.slow_start_secs, "loading model weights")
    try:
        await engine.server.start()
    except OSError as exc:
        log.error("listen_failed path=%s error=%r", path, str(exc))
        if exc.errno == errno.EADDRINUSE:
            return exitcodes.UNAVAILABLE
        return exitcodes.CANT_CREATE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"demo worker listening uds={path} pid={os.getpid()}", file=sys.stderr, flush=True)
    await stop.wait()
    log.info("demo_stopping")
    await engine.server.close()
    return exitcodes.OK


def run_demo_worker(opts: DemoOptions) -> int:
    """Run the demo inference worker until SIGTERM/SIGINT; returns the exit code."""
    level = (opts.log_level or "").lower()
    logs.setup("demo_worker", level if level in ("debug", "info", "warning", "error")
               else "info")
    problem = opts.problem()
    if problem:
        log.error("bad_option %s", problem)
        return exitcodes.CONFIG
    return asyncio.run(_serve(opts))
