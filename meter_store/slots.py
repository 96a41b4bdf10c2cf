"""The shared-memory meter: per-stream usage slots and per-model totals.

Why a file and not ``multiprocessing.shared_memory``
-----------------------------------------------------
The meter's state must outlive every process of the sidecar: when an OOM killer takes the
whole process group, the next start has to find the counts of the streams that were open.
A ``MAP_SHARED`` mapping of a regular file in the state directory does that (the kernel keeps
the pages after the last process is gone and writes them back), and it has no resource
tracker that could unlink a segment other processes still use.

Ownership: single writer per word, no locks
-------------------------------------------
The file is cut into *regions*, one per proxy process index. Only the proxy process that owns
a region writes its slots and its model totals, so no update ever races another process and
a process killed mid-update leaves nobody waiting on a lock. Two hand-offs cross processes:

* ``OPEN -> CLOSED`` is written by the owning proxy (or, for a dead proxy, by the supervisor,
  which converts its open slots into ``interrupted`` records before starting a replacement);
* ``CLOSED -> FREE`` is written by the meter process after the record is committed to SQLite.

A slot's fields are written before its state word, and each counter is one aligned 8-byte
store, so a reader that sees ``CLOSED`` sees the final counts.

Byte layout (little endian)
---------------------------
::

    0       file header, 4096 bytes
              0  magic  b"CYMETER1"
              8  u32 layout version      12 u32 regions
             16  u32 slots per region    20 u32 slot size (512)
             24  u32 models per region   28 u32 reserved
             32  16 bytes boot id (uuid of the sidecar run)
             48  u64 boot time, unix ms
    4096    region 0, then region 1, ... each REGION_HEADER + models + slots bytes:
              region header, 256 bytes: u64 owner pid, u64 heartbeat (CLOCK_MONOTONIC ns),
                u64 streams opened, u64 streams closed, u64 inference worker state code,
                u64 inference worker pid, u64 worker state since (unix ms), u64 reserved,
                64 u16 length + 190 bytes: the inference worker's models, comma-separated
              model totals, MODEL_ENTRY (128) bytes each:
                0 u16 name length, 2..64 name (UTF-8, at most 62 bytes)
               64 u64 prompt  72 u64 generated  80 u64 delivered  88 u64 records
              slots, SLOT_SIZE (512) bytes each:
                0 u32 state (0 free, 1 open, 2 closed)   4 u32 status code
                8 u64 open sequence of this slot
               16 16 bytes record id (uuid)
               32 u64 prompt   40 u64 generated   48 u64 delivered
               56 i64 started unix ms   64 i64 ended unix ms
               72 finish reason: u8 length + 15 bytes
               88 model, 216 tenant, 344 trace id: u16 length + 126 bytes each
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import time
import uuid

MAGIC = b"CYMETER1"
LAYOUT_VERSION = 1
FILE_HEADER = 4096
REGION_HEADER = 256
MODEL_ENTRY = 128
SLOT_SIZE = 512
MODEL_NAME_MAX = 62
FIELD_MAX = 126  # model, tenant and trace id, in UTF-8 bytes
REASON_MAX = 15

FREE, OPEN, CLOSED = 0, 1, 2
WORKER_STATES = ("connecting", "ready", "loading", "dead", "draining")

# Status of a closed record. The names are the ledger's and the upload's vocabulary.
STATUSES = (
    "finished",
    "cancelled",
    "gateway_disconnected",
    "deadline",
    "worker_error",
    "worker_crash",
    "worker_oom",
    "shed",
    "shutdown",
    "interrupted",
)
STATUS_CODE = {name: i + 1 for i, name in enumerate(STATUSES)}
STATUS_NAME = {code: name for name, code in STATUS_CODE.items()}

_HDR = struct.Struct("<8sIIIII4x16sQ")

# Offsets inside a slot, in 8-byte words (for the uint64 view) and in bytes.
_W_SEQ, _W_PROMPT, _W_GEN, _W_DELIV, _W_START, _W_END = 1, 4, 5, 6, 7, 8
_B_STATE, _B_STATUS, _B_ID, _B_REASON = 0, 4, 16, 72
_B_MODEL, _B_TENANT, _B_TRACE = 88, 216, 344
# Offsets inside a model entry, in words.
_M_PROMPT, _M_GEN, _M_DELIV, _M_RECORDS = 8, 9, 10, 11


class MeterFileError(RuntimeError):
    """The meter file is missing, unreadable or of another layout."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    regions: int
    slots_per_region: int
    models_per_region: int = 64

    @property
    def region_size(self) -> int:
        return (
            REGION_HEADER
            + self.models_per_region * MODEL_ENTRY
            + self.slots_per_region * SLOT_SIZE
        )

    @property
    def file_size(self) -> int:
        return FILE_HEADER + self.regions * self.region_size


@dataclasses.dataclass
class SlotRecord:
    """A usage record as read from a slot."""

    region: int
    slot: int
    state: int
    status: str
    record_id: str
    seq: int
    prompt_tokens: int
    generated_tokens: int
    delivered_tokens: int
    started_unix_ms: int
    ended_unix_ms: int
    finish_reason: str
    model: str
    tenant: str
    trace_id: str


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def fit(text: str, limit: int) -> bytes:
    """UTF-8 encode text, cut at `limit` bytes without splitting a character."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


class MeterFile:
    """A mapping of the meter file. Each process opens its own; all share the pages."""

    def __init__(self, path: str, mm: mmap.mmap, geometry: Geometry, boot_id: str):
        self.path = path
        self.geometry = geometry
        self.boot_id = boot_id
        self._mm = mm
        self._buf = memoryview(mm)
        self._words = self._buf.cast("Q")

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, geometry: Geometry) -> "MeterFile":
        """Create a fresh meter file (a new boot). The caller must have recovered the old one."""
        tmp = f"{path}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, geometry.file_size)
            mm = mmap.mmap(fd, geometry.file_size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        boot_id = uuid.uuid4()
        _HDR.pack_into(
            mm, 0, MAGIC, LAYOUT_VERSION, geometry.regions, geometry.slots_per_region,
            SLOT_SIZE, geometry.models_per_region, boot_id.bytes, _now_ms(),
        )
        mm.flush()
        os.replace(tmp, path)
        return cls(path, mm, geometry, boot_id.hex)

    @classmethod
    def open(cls, path: str) -> "MeterFile":
        """Map an existing meter file, reading its geometry from the header."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise MeterFileError(f"cannot open meter file {path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if size < FILE_HEADER:
                raise MeterFileError(f"meter file {path} is {size} bytes, too short")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        magic, version, regions, slots, slot_size, models, boot, _ = _HDR.unpack_from(mm, 0)
        if magic != MAGIC or version != LAYOUT_VERSION or slot_size != SLOT_SIZE:
            mm.close()
            raise MeterFileError(
                f"meter file {path} has magic {magic!r} version {version}, "
                f"expected {MAGIC!r} version {LAYOUT_VERSION}"
            )
        geometry = Geometry(regions, slots, models)
        if size < geometry.file_size:
            mm.close()
            raise MeterFileError(f"meter file {path} is truncated ({size} bytes)")
        return cls(path, mm, geometry, uuid.UUID(bytes=boot).hex)

    def close(self) -> None:
        self._words.release()
        self._buf.release()
        self._mm.close()

    def new_boot(self) -> None:
        """Give a reused file a new boot id and zero the per-boot totals and region headers."""
        boot_id = uuid.uuid4()
        self._buf[32:48] = boot_id.bytes
        struct.pack_into("<Q", self._buf, 48, _now_ms())
        self.boot_id = boot_id.hex
        g = self.geometry
        for r in range(g.regions):
            off = self._region_off(r)
            end = off + REGION_HEADER + g.models_per_region * MODEL_ENTRY
            self._buf[off:end] = bytes(end - off)
        self._mm.flush()

    # -- addressing ------------------------------------------------------------------

    def _region_off(self, region: int) -> int:
        return FILE_HEADER + region * self.geometry.region_size

    def slot_offset(self, region: int, slot: int) -> int:
        g = self.geometry
        return (
            self._region_off(region)
            + REGION_HEADER
            + g.models_per_region * MODEL_ENTRY
            + slot * SLOT_SIZE
        )

    def _model_off(self, region: int, index: int) -> int:
        return self._region_off(region) + REGION_HEADER + index * MODEL_ENTRY

    # -- region header -----------------------------------------------------------------

    def claim_region(self, region: int, pid: int) -> None:
        base = self._region_off(region) // 8
        self._words[base] = pid
        self._words[base + 1] = time.monotonic_ns()

    def heartbeat(self, region: int) -> None:
        self._words[self._region_off(region) // 8 + 1] = time.monotonic_ns()

    def region_owner(self, region: int) -> tuple[int, int]:
        """(pid, last heartbeat in CLOCK_MONOTONIC ns) of a region."""
        base = self._region_off(region) // 8
        return self._words[base], self._words[base + 1]

    def region_counts(self, region: int) -> tuple[int, int]:
        """(streams opened, streams closed) by the region's owner since this boot."""
        base = self._region_off(region) // 8
        return self._words[base + 2], self._words[base + 3]

    def set_worker_info(self, region: int, state: str, pid: int, models: str) -> None:
        """The owning proxy's view of the inference worker, for `cy-sidecar status`."""
        base = self._region_off(region)
        w = base // 8
        self._words[w + 4] = WORKER_STATES.index(state) if state in WORKER_STATES else 0
        self._words[w + 5] = pid
        self._words[w + 6] = _now_ms()
        self._put_str(base + 64, models, 190, 2)

    def worker_info(self, region: int) -> dict:
        base = self._region_off(region)
        w = base // 8
        code = self._words[w + 4]
        return {
            "state": WORKER_STATES[code] if code < len(WORKER_STATES) else "unknown",
            "pid": self._words[w + 5],
            "since_unix_ms": self._words[w + 6],
            "models": self._get_str(base + 64, 2, 190),
        }

    def closed_counts(self) -> list[int]:
        """Per region, how many slots were ever closed: a cheap "anything new?" check."""
        words = self._words
        return [words[self._region_off(r) // 8 + 3] for r in range(self.geometry.regions)]

    # -- slots -----------------------------------------------------------------------

    def slot_state(self, region: int, slot: int) -> int:
        off = self.slot_offset(region, slot)
        return self._buf[off] | self._buf[off + 1] << 8

    def _put_str(self, off: int, text: str, limit: int, width: int) -> None:
        raw = fit(text, limit)
        if width == 1:
            self._buf[off] = len(raw)
            self._buf[off + 1 : off + 1 + len(raw)] = raw
        else:
            struct.pack_into("<H", self._buf, off, len(raw))
            self._buf[off + 2 : off + 2 + len(raw)] = raw

    def _get_str(self, off: int, width: int, limit: int = FIELD_MAX) -> str:
        if width == 1:
            n = self._buf[off]
        else:
            (n,) = struct.unpack_from("<H", self._buf, off)
        n = min(n, limit)
        return bytes(self._buf[off + width : off + width + n]).decode("utf-8", "replace")

    def open_slot(
        self, region: int, slot: int, record_id: bytes, model: str, tenant: str,
        trace_id: str, started_unix_ms: int,
    ) -> int:
        """Fill a FREE slot and mark it OPEN. Returns the slot's word base for counters."""
        off = self.slot_offset(region, slot)
        w = off // 8
        words = self._words
        words[w + _W_SEQ] += 1
        self._buf[off + _B_ID : off + _B_ID + 16] = record_id
        for i in (_W_PROMPT, _W_GEN, _W_DELIV, _W_END):
            words[w + i] = 0
        words[w + _W_START] = started_unix_ms
        self._buf[off + _B_REASON] = 0
        self._put_str(off + _B_MODEL, model, FIELD_MAX, 2)
        self._put_str(off + _B_TENANT, tenant, FIELD_MAX, 2)
        self._put_str(off + _B_TRACE, trace_id, FIELD_MAX, 2)
        struct.pack_into("<II", self._buf, off, OPEN, 0)
        words[self._region_off(region) // 8 + 2] += 1
        return w

    def set_counts(self, word_base: int, prompt: int, generated: int, delivered: int) -> None:
        words = self._words
        words[word_base + _W_PROMPT] = prompt
        words[word_base + _W_GEN] = generated
        words[word_base + _W_DELIV] = delivered

    def close_slot(
        self, region: int, slot: int, status: str, finish_reason: str = "",
        ended_unix_ms: int | None = None,
    ) -> None:
        """Mark an OPEN slot CLOSED with its final status; counts must already be written."""
        off = self.slot_offset(region, slot)
        self._words[off // 8 + _W_END] = ended_unix_ms or _now_ms()
        self._put_str(off + _B_REASON, finish_reason, REASON_MAX, 1)
        struct.pack_into("<II", self._buf, off, CLOSED, STATUS_CODE[status])
        self._words[self._region_off(region) // 8 + 3] += 1

    def free_slot(self, region: int, slot: int) -> None:
        """CLOSED -> FREE, written by the meter process once the record is committed."""
        struct.pack_into("<I", self._buf, self.slot_offset(region, slot), FREE)

    def read_slot(self, region: int, slot: int) -> SlotRecord:
        off = self.slot_offset(region, slot)
        w = off // 8
        words = self._words
        state, status = struct.unpack_from("<II", self._buf, off)
        return SlotRecord(
            region=region,
            slot=slot,
            state=state,
            status=STATUS_NAME.get(status, ""),
            record_id=bytes(self._buf[off + _B_ID : off + _B_ID + 16]).hex(),
            seq=words[w + _W_SEQ],
            prompt_tokens=words[w + _W_PROMPT],
            generated_tokens=words[w + _W_GEN],
            delivered_tokens=words[w + _W_DELIV],
            started_unix_ms=words[w + _W_START],
            ended_unix_ms=words[w + _W_END],
            finish_reason=self._get_str(off + _B_REASON, 1),
            model=self._get_str(off + _B_MODEL, 2),
            tenant=self._get_str(off + _B_TENANT, 2),
            trace_id=self._get_str(off + _B_TRACE, 2),
        )

    def slots_in_state(self, state: int, region: int | None = None) -> list[tuple[int, int]]:
        """(region, slot) pairs whose state word equals `state`."""
        regions = range(self.geometry.regions) if region is None else (region,)
        found = []
        buf = self._buf
        for r in regions:
            base = self.slot_offset(r, 0)
            for s in range(self.geometry.slots_per_region):
                if buf[base + s * SLOT_SIZE] == state:
                    found.append((r, s))
        return found

    def interrupt_open_slots(self, region: int | None = None) -> int:
        """Close every OPEN slot (of one region, or all) as `interrupted`.

        Called by the supervisor for a proxy process that died, and at start for a previous
        run that died whole. Only safe while no live process owns the region.
        """
        pairs = self.slots_in_state(OPEN, region)
        for r, s in pairs:
            self.close_slot(r, s, "interrupted")
        return len(pairs)

    # -- model totals --------------------------------------------------------------------

    def model_index(self, region: int, model: str) -> int:
        """Index of a model's totals entry in a region, adding it when new (owner only).

        Models beyond the table's size share the last entry, named "*other*".
        """
        raw = fit(model, MODEL_NAME_MAX)
        last = self.geometry.models_per_region - 1
        for i in range(last + 1):
            off = self._model_off(region, i)
            (n,) = struct.unpack_from("<H", self._buf, off)
            if n == 0:
                if i == last:
                    raw = b"*other*"
                raw = raw or b"-"
                self._buf[off + 2 : off + 2 + len(raw)] = raw
                struct.pack_into("<H", self._buf, off, len(raw))
                return i
            if bytes(self._buf[off + 2 : off + 2 + n]) == raw or i == last:
                return i
        return last

    def model_word_base(self, region: int, index: int) -> int:
        return self._model_off(region, index) // 8

    def add_delivered(self, model_base: int, generated: int, delivered: int) -> None:
        words = self._words
        words[model_base + _M_GEN] += generated
        words[model_base + _M_DELIV] += delivered

    def add_model_record(self, model_base: int, prompt: int) -> None:
        """A record of the model closed: count it and its prompt tokens."""
        words = self._words
        words[model_base + _M_PROMPT] += prompt
        words[model_base + _M_RECORDS] += 1

    def model_totals(self) -> dict[str, dict[str, int]]:
        """Totals per model name, summed over all regions."""
        totals: dict[str, dict[str, int]] = {}
        for r in range(self.geometry.regions):
            for i in range(self.geometry.models_per_region):
                off = self._model_off(r, i)
                (n,) = struct.unpack_from("<H", self._buf, off)
                if n == 0:
                    break
                name = bytes(self._buf[off + 2 : off + 2 + n]).decode("utf-8", "replace")
                w = off // 8
                t = totals.setdefault(
                    name, {"prompt": 0, "generated": 0, "delivered": 0, "records": 0}
                )
                t["prompt"] += self._words[w + _M_PROMPT]
                t["generated"] += self._words[w + _M_GEN]
                t["delivered"] += self._words[w + _M_DELIV]
                t["records"] += self._words[w + _M_RECORDS]
        return totals


def open_or_create(path: str, geometry: Geometry) -> tuple[MeterFile, list[str]]:
    """Start a new boot of the meter file at `path`.

    A file left by an earlier run keeps its records: its OPEN slots become `interrupted`
    records. When its geometry equals the wanted one it is reused in place (only the boot id
    and the model totals are reset); otherwise it is renamed to ``<path>.<ms>.old`` for the
    meter process to drain, and a fresh file is created. Returns the file and the old files
    waiting to be drained.
    """
    directory = os.path.dirname(path) or "."
    old_files = sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.startswith(os.path.basename(path) + ".") and name.endswith(".old")
    )
    if not os.path.exists(path):
        return MeterFile.create(path, geometry), old_files
    try:
        previous = MeterFile.open(path)
    except MeterFileError:
        # An unreadable file cannot be drained; keep it for a human, start fresh.
        os.replace(path, f"{path}.{_now_ms()}.corrupt")
        return MeterFile.create(path, geometry), old_files
    previous.interrupt_open_slots()
    if previous.geometry != geometry:
        previous._mm.flush()
        previous.close()
        old = f"{path}.{_now_ms()}.old"
        os.replace(path, old)
        return MeterFile.create(path, geometry), old_files + [old]
    previous.new_boot()
    return previous, old_files
