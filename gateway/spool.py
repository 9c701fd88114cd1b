"""Append-only, size-capped disk spool for line-protocol batches.

Why: when InfluxDB is unreachable or slower than ingest, the writer parks batches here and
replays them in order once it is back, while live data keeps flowing; a gateway stopped with
SIGTERM flushes its in-memory queue here and replays it on the next start.

Cap policy: `max_bytes` bounds the pending (not yet committed) bytes on disk, record headers
included. A normal (telemetry) batch that would go past it is refused: the newest data is
refused, so what is already spooled stays complete and in order. Priority batches (safety
events, alarms, commands, sessions) may use `priority_reserve_bytes` more (default 5 % of
`max_bytes`, at least 1 MiB) so the clinical safety record survives a spool full of telemetry;
beyond that they are refused too. Every refusal is counted in `stats` and logged (first and
every 1000th, separately for normal and priority): nothing is dropped silently.

On disk: segment files `<20-digit number>.seg`, each a run of records; a new segment starts
once the current one reaches `segment_bytes`, and each process appends to a new segment. Two
record formats, told apart by their magic, and both read:

* `BSP2` (written since issue 12): header `magic, flags, points, body length, crc32(body),
  crc32(the 17 header bytes before it)` + body. The header checks itself, so a flipped byte
  anywhere in a record is caught, and a scan can resynchronise cheaply after damage.
* `BSP1` (older gateways): header `magic, flags, points, body length, crc32(body)` + body.

The file `cursor` holds the (segment, offset) just past the last committed record and is
replaced atomically (temp file + `os.replace`) on every commit; segments entirely consumed are
deleted. A crash between a successful write to InfluxDB and the cursor save replays that one
batch, which is harmless: InfluxDB points are idempotent by measurement + tags + timestamp.

Damage is contained, never spread (`docs/storage.md` §2):
* Crash: a SIGKILL can at most tear the record being written (page-cache writes survive). On
  open, bad bytes at the tail of the last segment with no intact record after them are a torn
  write: the file is truncated there, a warning logged, `stats.torn_records_dropped` counted.
* Corruption (a flipped byte, a bad header): the scan skips forward to the next intact record
  header + checksum and keeps everything after it; each skipped span counts in
  `stats.records_corrupt` and is logged as an error. A record found damaged at `peek` (changed
  on disk since it was scanned) is skipped the same way.
* A segment that is not ours (an unknown magic or format version, no readable record at all)
  is moved aside into `quarantine/`, logged and counted (`stats.segments_quarantined`), never
  deleted. A damaged segment never affects another one.
* I/O errors (ENOSPC, EIO, EROFS, EACCES): `append` leaves no partial record behind and
  raises, so the caller knows the batch is not on disk; a failed cursor save or segment delete
  is retried later (at worst a crash replays a batch). Each counts in `stats.write_errors` /
  `stats.read_errors` and sets `fault` until a write succeeds again (`probe()` tests that when
  there is nothing to append). Bad data or a bad disk never makes open fail, except a
  directory the spool cannot create or lock.

`fsync=True` also survives power loss, at the cost of an fsync per append and per commit.
Memory: an index entry (~100 bytes) per pending batch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

_V1 = struct.Struct("<4sBIII")  # magic, flags, points, body length, crc32(body)
_V2 = struct.Struct("<4sBIIII")  # ... + crc32(the _V1.size bytes before it)
HEADER_SIZE = _V2.size  # of the records written now
_MAGIC_V1 = b"BSP1"
_MAGIC_V2 = b"BSP2"
_FAMILY = b"BSP"  # every version's magic starts so; the fourth byte is the version
_FLAG_PRIORITY = 0x01
_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")
_CURSOR = "cursor"
_CURSOR_TMP = "cursor.tmp"
_PROBE = "probe.tmp"
_LOCK = "lock"
QUARANTINE_DIR = "quarantine"
_LOG_EVERY = 1000
_IO_LOG_INTERVAL_S = 60.0  # an I/O fault that lasts is logged again at most this often
_PROBE_BYTES = 4096
_PROBE_MAX_BYTES = 16 * 2**20


class SpoolLocked(RuntimeError):
    pass


@dataclass(frozen=True)
class SpooledBatch:
    body: bytes  # line protocol exactly as appended
    points: int
    priority: bool
    position: tuple[int, int]  # (segment, offset): only meaningful to commit()


@dataclass
class SpoolStats:
    batches_in: int = 0
    points_in: int = 0
    bytes_in: int = 0  # body bytes, like bytes_refused
    batches_out: int = 0
    points_out: int = 0
    batches_refused: int = 0
    points_refused: int = 0
    bytes_refused: int = 0
    torn_records_dropped: int = 0  # crash tails of the last segment, truncated at open
    torn_bytes_dropped: int = 0
    records_corrupt: int = 0  # damaged spans skipped (scan at open, or found at peek)
    corrupt_bytes_skipped: int = 0
    segments_quarantined: int = 0  # moved into quarantine/, never deleted
    write_errors: int = 0  # failed appends, probes, cursor saves, segment deletes
    read_errors: int = 0  # failed segment reads


@dataclass
class SpoolFault:
    """The spool's disk is failing: what failed first in this episode, and how often since."""

    op: str  # append, cursor, delete, read, probe
    errno_name: str  # ENOSPC, EIO, EROFS, EACCES, ...
    message: str
    since: float  # time.time()
    errors: int = 1
    last_logged: float = field(default=0.0)  # time.monotonic()

    def describe(self) -> str:
        return f"spool {self.op} failed: {self.errno_name} ({self.message})"


class Record(NamedTuple):
    """One intact record found in a segment's bytes."""

    offset: int
    size: int  # header + body
    points: int
    priority: bool
    body_offset: int


@dataclass
class Scan:
    """What a segment's bytes hold: intact records, damaged spans between them, a bad tail."""

    records: list[Record]
    corrupt: list[tuple[int, int]]  # (offset, bytes) skipped to reach the next intact record
    tail: tuple[int, int] | None  # (offset, bytes) at the end with no intact record after it


class _Rec(NamedTuple):
    seg: int
    offset: int
    size: int  # header + body
    points: int
    priority: bool


def parse_record(data: bytes | memoryview, off: int) -> Record | None:
    """The intact record that starts at `off`, or None. Never raises on any input."""
    view = memoryview(data)
    n = len(view)
    if off < 0 or n - off < _V1.size:
        return None
    magic = bytes(view[off : off + 4])
    if magic == _MAGIC_V2:
        if n - off < _V2.size:
            return None
        _, flags, points, length, body_crc, header_crc = _V2.unpack_from(view, off)
        if zlib.crc32(view[off : off + _V1.size]) != header_crc:
            return None
        start = off + _V2.size
    elif magic == _MAGIC_V1:
        _, flags, points, length, body_crc = _V1.unpack_from(view, off)
        start = off + _V1.size
    else:
        return None
    end = start + length
    if length == 0 or end > n or zlib.crc32(view[start:end]) != body_crc:
        return None  # append never writes an empty body
    return Record(off, end - off, points, bool(flags & _FLAG_PRIORITY), start)


def scan_records(data: bytes, start: int = 0) -> Scan:
    """Every intact record from `start` on, resynchronising past damage. Never raises.

    After a bad record the scan looks for the next offset where an intact record starts (a
    known magic, a header that checks, a body whose crc matches), so one flipped byte costs
    that record only. Line protocol cannot hold the header's binary bytes (control characters
    are escaped, `gateway/lineprotocol.py`), so a body never passes for a record of its own.
    """
    records: list[Record] = []
    corrupt: list[tuple[int, int]] = []
    tail = None
    n = len(data)
    off = max(0, start)
    while off < n:
        rec = parse_record(data, off)
        if rec is not None:
            records.append(rec)
            off += rec.size
            continue
        nxt = _resync(data, off + 1)
        if nxt is None:
            tail = (off, n - off)
            break
        corrupt.append((off, nxt - off))
        off = nxt
    return Scan(records, corrupt, tail)


def _resync(data: bytes, off: int) -> int | None:
    while True:
        off = data.find(_FAMILY, off)
        if off < 0:
            return None
        if parse_record(data, off) is not None:
            return off
        off += 1


def _is_ours(data: bytes) -> bool:
    """The segment starts like one of our records (or a prefix of one: a torn first write)."""
    head = data[:4]
    return any(m.startswith(head) if len(head) < 4 else head == m
               for m in (_MAGIC_V1, _MAGIC_V2))


class DiskSpool:
    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        segment_bytes: int = 8 * 2**20,
        priority_reserve_bytes: int | None = None,
        fsync: bool = False,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.priority_reserve_bytes = (
            max(max_bytes // 20, 2**20) if priority_reserve_bytes is None
            else priority_reserve_bytes
        )
        self.fsync = fsync
        self.stats = SpoolStats()
        self.fault: SpoolFault | None = None
        self._lock = threading.Lock()
        self._index: deque[_Rec] = deque()  # pending records, oldest first
        self._segs: list[int] = []  # segment files holding pending records or being written
        self._wfile: io.FileIO | None = None  # appends go to segment _wseg, ending at _wend
        self._rfile: io.FileIO | None = None  # reads come from segment _rseg
        self._wseg = self._wend = self._rseg = 0
        self._next_seg = 1
        self._head: SpooledBatch | None = None
        self._pending_bytes = self._pending_points = 0
        self._refused_logged = {False: 0, True: 0}
        self._cursor_unsaved: tuple[int, int] | None = None  # a commit whose save failed
        self._undeleted: list[int] = []  # consumed segments whose unlink failed
        self._probe_bytes = _PROBE_BYTES
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        # One process per spool: a second gateway on the same directory would interleave.
        # Read-only: a lock needs no write access, and holds no filesystem busy.
        self._lockfile = os.fdopen(os.open(self.directory / _LOCK, os.O_RDONLY | os.O_CREAT,
                                           0o644), "rb")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lockfile.close()
            raise SpoolLocked(f"spool {self.directory} is in use by another process") from None
        self._recover()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_batches(self) -> int:
        return len(self._index)

    @property
    def pending_points(self) -> int:
        return self._pending_points

    def append(self, body: bytes, points: int, *, priority: bool = False) -> bool:
        """Spool one batch; False if the cap refuses it (counted and logged, never silent).

        Raises OSError when the disk fails (full, read-only, I/O error): the batch is then not
        in the spool, no partial record is left behind, and the error is counted in `stats`
        and held in `fault`.
        """
        if not body or points < 0:
            raise ValueError("a batch needs a non-empty body and points >= 0")
        size = HEADER_SIZE + len(body)
        with self._lock:
            self._check_open()
            limit = self.max_bytes + (self.priority_reserve_bytes if priority else 0)
            if self._pending_bytes + size > limit:
                self._refuse(len(body), points, priority)
                return False
            flags = _FLAG_PRIORITY if priority else 0
            head = _V1.pack(_MAGIC_V2, flags, points, len(body), zlib.crc32(body))
            record = head + struct.pack("<I", zlib.crc32(head)) + body
            try:
                if self._wfile is None or self._wend >= self.segment_bytes:
                    self._roll()
                assert self._wfile is not None
                view = memoryview(record)
                while view:
                    view = view[self._wfile.write(view) :]
                if self.fsync:
                    os.fsync(self._wfile.fileno())
            except OSError as exc:
                self._undo_partial_write()
                # A probe must show room for a record like this one, or the fault would
                # flap on a disk with room for a small file only.
                self._probe_bytes = min(max(_PROBE_BYTES, len(record)), _PROBE_MAX_BYTES)
                self._io_error("append", exc)
                raise
            self._index.append(_Rec(self._wseg, self._wend, size, points, priority))
            self._wend += size
            self._pending_bytes += size
            self._pending_points += points
            self.stats.batches_in += 1
            self.stats.points_in += points
            self.stats.bytes_in += len(body)
            self._io_ok("append")
            return True

    def peek(self) -> SpooledBatch | None:
        """Oldest batch not yet committed (the same one until it is committed), or None.

        Raises OSError when the segment cannot be read (counted, held in `fault`); the batch
        stays pending, to be read again later.
        """
        with self._lock:
            self._check_open()
            while self._head is None and self._index:
                rec = self._index[0]
                try:
                    if self._rfile is None or self._rseg != rec.seg:
                        self._close_reader()
                        self._rfile = io.FileIO(self._path(rec.seg), "rb")
                        self._rseg = rec.seg
                    data = os.pread(self._rfile.fileno(), rec.size, rec.offset)
                except OSError as exc:
                    self._close_reader()
                    self.stats.read_errors += 1
                    self._io_error("read", exc)
                    raise
                self._io_ok("read")
                found = parse_record(data, 0)
                if found is None or found.size != rec.size:  # changed on disk since scanned
                    self._index.popleft()
                    self._forget(rec)
                    self._corrupt(rec.seg, [(rec.offset, rec.size)],
                                  "spool record corrupted on disk, skipped")
                    continue
                body = data[found.body_offset :]
                self._head = SpooledBatch(bytes(body), found.points, found.priority,
                                          (rec.seg, rec.offset))
            return self._head

    def commit(self, batch: SpooledBatch) -> None:
        """Mark the oldest batch written: persist the cursor, delete consumed segments.

        Never raises for the disk: a cursor that cannot be saved now is saved at the next
        commit or probe (a crash before that replays, harmlessly, what it would have skipped).
        """
        with self._lock:
            self._check_open()
            head = self._index[0] if self._index else None
            if head is None or batch.position != (head.seg, head.offset):
                raise ValueError("commit out of order: not the oldest pending batch")
            self._index.popleft()
            self._head = None
            self._forget(head)
            self.stats.batches_out += 1
            self.stats.points_out += head.points
            self._persist_cursor(head.seg, head.offset + head.size)
            keep = self._index[0].seg if self._index else None
            while self._segs and (keep is None or self._segs[0] < keep):
                seg = self._segs.pop(0)
                if self._wfile is not None and seg == self._wseg:
                    self._wfile.close()
                    self._wfile = None
                if seg == self._rseg:
                    self._close_reader()
                self._undeleted.append(seg)
            self._delete_consumed()

    def probe(self) -> bool:
        """Can the spool write again? Tries what failed: an unsaved cursor, or a file the size
        of the append that failed.

        For a writer with nothing to append while `fault` is set: a success clears the fault.
        """
        with self._lock:
            self._check_open()
            if self._cursor_unsaved is not None:
                self._persist_cursor(*self._cursor_unsaved)
                if self._cursor_unsaved is not None:
                    return False
            path = self.directory / _PROBE
            try:
                with open(path, "wb") as f:
                    f.write(bytes(self._probe_bytes))
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
            except OSError as exc:
                with contextlib.suppress(OSError):
                    path.unlink()
                self._io_error("probe", exc)
                return False
            with contextlib.suppress(OSError):
                path.unlink()
            self._delete_consumed()
            self._io_ok("probe")
            return True

    def close(self) -> None:
        """Release file handles; everything appended is already on disk."""
        with self._lock:
            if self._closed:
                return
            if self._cursor_unsaved is not None:
                self._persist_cursor(*self._cursor_unsaved)
            if self._wfile is not None:
                self._wfile.close()
                self._wfile = None
            self._close_reader()
            if not self._lockfile.closed:
                self._lockfile.close()  # releases the flock
            self._closed = True

    # -- internals ------------------------------------------------------------------------

    def _recover(self) -> None:
        cseg, coff = self._load_cursor()
        found = sorted(
            int(m.group(1)) for p in self.directory.iterdir()
            if (m := _SEGMENT_RE.match(p.name)) and p.is_file()
        )
        # Never reuse a number: the cursor may point into a segment already deleted.
        self._next_seg = max([cseg, *found]) + 1
        consumed = [seg for seg in found if seg < cseg]
        for seg in found:
            if seg >= cseg and not self._scan(seg, coff if seg == cseg else 0,
                                              last=seg == found[-1]):
                consumed.append(seg)
        self._segs = sorted({r.seg for r in self._index})
        for seg in consumed:
            if seg not in self._segs:
                self._undeleted.append(seg)
        self._delete_consumed()
        self._pending_bytes = sum(r.size for r in self._index)
        self._pending_points = sum(r.points for r in self._index)
        for name in (_CURSOR_TMP, _PROBE):
            with contextlib.suppress(OSError):
                (self.directory / name).unlink(missing_ok=True)

    def _scan(self, seg: int, start: int, *, last: bool) -> bool:
        """Index the intact records of a segment from `start`; False if nothing is left in it
        to read (it may be deleted). A segment that is unreadable or not ours is quarantined."""
        path = self._path(seg)
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.stats.read_errors += 1
            self._io_error("read", exc)
            self._quarantine(seg, f"unreadable: {errno.errorcode.get(exc.errno or 0, exc)}")
            return True  # not consumed: never delete what could not be read
        if start == 0 and data[:3] == _FAMILY and len(data) >= 4 and not _is_ours(data):
            self._quarantine(seg, f"unknown spool format version {data[3:4]!r}")
            return True
        scan = scan_records(data, start)
        if start == 0 and data and not scan.records and not _is_ours(data):
            self._quarantine(seg, "not a spool segment of a known format")
            return True
        for r in scan.records:
            self._index.append(_Rec(seg, r.offset, r.size, r.points, r.priority))
        spans = list(scan.corrupt)
        if scan.tail is not None:
            off, nbytes = scan.tail
            if last:
                try:
                    os.truncate(path, off)
                except OSError as exc:  # the bad tail stays; the next open meets it again
                    self._io_error("truncate", exc)
                self.stats.torn_records_dropped += 1
                self.stats.torn_bytes_dropped += nbytes
                log.warning("torn spool record dropped (crash)", extra={
                    "segment": seg, "offset": off, "bytes_dropped": nbytes,
                    "spool_dir": str(self.directory)})
            elif not scan.records:
                # Nothing readable after the cursor: keep the bytes for a human to look at.
                self._quarantine(seg, f"no intact record from offset {off}")
                return True
            else:
                spans.append(scan.tail)
        if spans:
            self._corrupt(seg, spans, "corrupt spool records skipped; the intact records "
                          "after them are kept")
        return bool(scan.records)

    def _quarantine(self, seg: int, reason: str) -> None:
        """Move a segment aside, never delete it: an operator decides what it is."""
        src = self._path(seg)
        qdir = self.directory / QUARANTINE_DIR
        dest = qdir / src.name
        try:
            qdir.mkdir(exist_ok=True)
            n = 0
            while dest.exists():
                n += 1
                dest = qdir / f"{src.name}.{n}"
            os.replace(src, dest)
        except OSError as exc:
            self._io_error("quarantine", exc)
            log.error("spool segment not readable and not movable; left in place", extra={
                "segment": seg, "reason": reason, "path": str(src),
                "error": f"{errno.errorcode.get(exc.errno or 0, '?')}: {exc.strerror}"})
            return
        self.stats.segments_quarantined += 1
        log.error("spool segment moved to quarantine", extra={
            "segment": seg, "reason": reason, "path": str(dest),
            "bytes": dest.stat().st_size if dest.exists() else None,
            "segments_quarantined": self.stats.segments_quarantined})

    def _roll(self) -> None:
        if self._wfile is not None:
            self._wfile.close()
            self._wfile = None
        seg = self._next_seg
        while self._path(seg).exists():  # never append to a file this process did not make
            seg += 1
        wfile = io.FileIO(self._path(seg), "xb")  # raises on a full or read-only disk
        self._next_seg = seg + 1
        self._wseg, self._wfile, self._wend = seg, wfile, 0
        self._segs.append(seg)
        if self.fsync:
            self._fsync_dir()

    def _undo_partial_write(self) -> None:
        """After a failed append: cut what it wrote, so the next record follows a whole one."""
        if self._wfile is None:
            return
        fd = self._wfile.fileno()
        try:
            os.ftruncate(fd, self._wend)
            os.lseek(fd, self._wend, os.SEEK_SET)
        except OSError:
            # Cannot cut: leave this segment (its tail is a torn record that the next open
            # skips) and start a new one at the next append.
            self._wfile.close()
            self._wfile = None

    def _persist_cursor(self, seg: int, offset: int) -> None:
        try:
            self._save_cursor(seg, offset)
        except OSError as exc:
            self._cursor_unsaved = (seg, offset)
            self.stats.write_errors += 1
            self._io_error("cursor", exc)
            with contextlib.suppress(OSError):
                (self.directory / _CURSOR_TMP).unlink(missing_ok=True)
            return
        self._cursor_unsaved = None
        self._io_ok("cursor")

    def _delete_consumed(self) -> None:
        left = []
        for seg in self._undeleted:
            try:
                self._path(seg).unlink(missing_ok=True)
            except OSError as exc:
                left.append(seg)
                self.stats.write_errors += 1
                self._io_error("delete", exc)
        self._undeleted = left

    def _io_error(self, op: str, exc: OSError) -> None:
        """Count and log a disk failure: the first of an episode, then once a minute."""
        if op in ("append", "probe"):  # a lasting fault counts once per retry
            self.stats.write_errors += 1
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        now = time.monotonic()
        fault = self.fault
        if fault is None:
            fault = self.fault = SpoolFault(op, name, exc.strerror or str(exc), time.time())
        else:
            fault.errors += 1
        if now - fault.last_logged >= _IO_LOG_INTERVAL_S or fault.errors == 1:
            fault.last_logged = now
            log.error("spool write failed" if op != "read" else "spool read failed", extra={
                "op": op, "errno": name, "error": exc.strerror or str(exc),
                "spool_dir": str(self.directory), "errors_in_episode": fault.errors,
                "write_errors": self.stats.write_errors, "read_errors": self.stats.read_errors})

    def _io_ok(self, op: str) -> None:
        """An operation went through: the fault it proves over, if any, ends.

        A read fault ends with a read, a write fault with an append or a probe; a cursor save
        (a few bytes) ends only a cursor fault, so a nearly full disk does not flap the state.
        """
        fault = self.fault
        if fault is None or (fault.op == "read") != (op == "read") or (
                op == "cursor" and fault.op != "cursor"):
            return
        self.fault = None
        log.info("spool writes succeed again", extra={
            "op": op, "failed_op": fault.op, "errno": fault.errno_name,
            "errors_in_episode": fault.errors, "fault_s": round(time.time() - fault.since, 1),
            "spool_dir": str(self.directory)})

    def _forget(self, rec: _Rec) -> None:
        self._pending_bytes -= rec.size
        self._pending_points -= rec.points

    def _refuse(self, nbytes: int, points: int, priority: bool) -> None:
        s = self.stats
        s.batches_refused += 1
        s.points_refused += points
        s.bytes_refused += nbytes
        self._refused_logged[priority] += 1
        if self._refused_logged[priority] % _LOG_EVERY == 1:
            log.error("spool full, batch refused", extra={
                "priority": priority, "points": points, "pending_bytes": self._pending_bytes,
                "max_bytes": self.max_bytes, "reserve_bytes": self.priority_reserve_bytes,
                "batches_refused": s.batches_refused, "points_refused": s.points_refused})

    def _corrupt(self, seg: int, spans: list[tuple[int, int]], msg: str) -> None:
        nbytes = sum(n for _, n in spans)
        self.stats.records_corrupt += len(spans)
        self.stats.corrupt_bytes_skipped += nbytes
        log.error(msg, extra={"segment": seg, "offset": spans[0][0], "spans": len(spans),
                              "bytes_skipped": nbytes, "spool_dir": str(self.directory),
                              "records_corrupt": self.stats.records_corrupt})

    def _load_cursor(self) -> tuple[int, int]:
        path = self.directory / _CURSOR
        try:
            doc = json.loads(path.read_text())
            seg, off = int(doc["segment"]), int(doc["offset"])
        except FileNotFoundError:
            return 0, 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Replaying from the oldest segment duplicates points, which InfluxDB absorbs.
            log.error("spool cursor unreadable, replaying all segments",
                      extra={"path": str(path), "reason": repr(exc)})
            return 0, 0
        return seg, off

    def _save_cursor(self, seg: int, offset: int) -> None:
        tmp = self.directory / _CURSOR_TMP
        with open(tmp, "w", encoding="ascii") as f:
            json.dump({"segment": seg, "offset": offset}, f)
            f.flush()  # a full disk fails here, before the replace, not at close
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self.directory / _CURSOR)
        if self.fsync:
            self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _close_reader(self) -> None:
        if self._rfile is not None:
            self._rfile.close()
            self._rfile = None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("spool is closed")

    def _path(self, seg: int) -> Path:
        return self.directory / f"{seg:020d}.seg"
