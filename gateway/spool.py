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

On disk: segment files `<20-digit number>.seg`, each a run of records
`header(magic, flags, points, body length, crc32(body)) + body`; a new segment starts once the
current one reaches `segment_bytes`, and each process appends to a new segment. The file
`cursor` holds the (segment, offset) just past the last committed record and is replaced
atomically (temp file + `os.replace`) on every commit; segments entirely consumed are deleted.
A crash between a successful write to InfluxDB and the cursor save replays that one batch,
which is harmless: InfluxDB points are idempotent by measurement + tags + timestamp.

Crash safety: a SIGKILL can at most tear the record being written (page-cache writes survive).
On open, a short or bad record at the tail of the last segment is a torn write: the file is
truncated there and a warning logged. A bad record elsewhere (disk corruption) is logged as an
error and the rest of that segment is skipped. Both count in `stats.torn_records_dropped`;
bad data never makes open fail. `fsync=True` also survives power loss, at the cost of an fsync
per append and per commit. Memory: an index entry (~100 bytes) per pending batch.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<4sBIII")  # magic, flags, points, body length, crc32(body)
HEADER_SIZE = _HEADER.size
_MAGIC = b"BSP1"
_FLAG_PRIORITY = 0x01
_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")
_CURSOR = "cursor"
_CURSOR_TMP = "cursor.tmp"
_LOCK = "lock"
_LOG_EVERY = 1000


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
    torn_records_dropped: int = 0
    torn_bytes_dropped: int = 0


class _Rec(NamedTuple):
    seg: int
    offset: int
    size: int  # header + body
    points: int
    priority: bool


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
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)
        # One process per spool: a second gateway on the same directory would interleave.
        self._lockfile = (self.directory / _LOCK).open("a")
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
        """Spool one batch; False if the cap refuses it (counted and logged, never silent)."""
        if not body or points < 0:
            raise ValueError("a batch needs a non-empty body and points >= 0")
        size = HEADER_SIZE + len(body)
        with self._lock:
            self._check_open()
            limit = self.max_bytes + (self.priority_reserve_bytes if priority else 0)
            if self._pending_bytes + size > limit:
                self._refuse(len(body), points, priority)
                return False
            if self._wfile is None or self._wend >= self.segment_bytes:
                self._roll()
            assert self._wfile is not None
            flags = _FLAG_PRIORITY if priority else 0
            record = _HEADER.pack(_MAGIC, flags, points, len(body), zlib.crc32(body)) + body
            try:
                view = memoryview(record)
                while view:
                    view = view[self._wfile.write(view) :]
                if self.fsync:
                    os.fsync(self._wfile.fileno())
            except OSError:
                # Never leave a partial record where the next append would follow it.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._wfile.fileno(), self._wend)
                self._wfile.close()
                self._wfile = None
                raise
            self._index.append(_Rec(self._wseg, self._wend, size, points, priority))
            self._wend += size
            self._pending_bytes += size
            self._pending_points += points
            self.stats.batches_in += 1
            self.stats.points_in += points
            self.stats.bytes_in += len(body)
            return True

    def peek(self) -> SpooledBatch | None:
        """Oldest batch not yet committed (the same one until it is committed), or None."""
        with self._lock:
            self._check_open()
            while self._head is None and self._index:
                rec = self._index[0]
                if self._rfile is None or self._rseg != rec.seg:
                    self._close_reader()
                    self._rfile = io.FileIO(self._path(rec.seg), "rb")
                    self._rseg = rec.seg
                data = os.pread(self._rfile.fileno(), rec.size, rec.offset)
                body = _valid_body(data, 0, len(data))
                if body is None:  # changed on disk since it was written or scanned
                    self._index.popleft()
                    self._forget(rec)
                    self._torn(rec.seg, rec.offset, rec.size, "spool record corrupted, dropped",
                               logging.ERROR)
                    continue
                self._head = SpooledBatch(bytes(body), rec.points, rec.priority,
                                          (rec.seg, rec.offset))
            return self._head

    def commit(self, batch: SpooledBatch) -> None:
        """Mark the oldest batch written: persist the cursor, delete consumed segments."""
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
            self._save_cursor(head.seg, head.offset + head.size)
            keep = self._index[0].seg if self._index else None
            while self._segs and (keep is None or self._segs[0] < keep):
                seg = self._segs.pop(0)
                if self._wfile is not None and seg == self._wseg:
                    self._wfile.close()
                    self._wfile = None
                if seg == self._rseg:
                    self._close_reader()
                self._path(seg).unlink(missing_ok=True)

    def close(self) -> None:
        """Release file handles; everything appended is already on disk."""
        with self._lock:
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
        for seg in found:
            if seg >= cseg:
                self._scan(seg, coff if seg == cseg else 0, last=seg == found[-1])
        self._segs = sorted({r.seg for r in self._index})
        for seg in set(found) - set(self._segs):  # consumed, or nothing valid left
            self._path(seg).unlink()
        self._pending_bytes = sum(r.size for r in self._index)
        self._pending_points = sum(r.points for r in self._index)
        (self.directory / _CURSOR_TMP).unlink(missing_ok=True)

    def _scan(self, seg: int, start: int, *, last: bool) -> None:
        path = self._path(seg)
        data = memoryview(path.read_bytes())
        off = min(start, len(data))
        while off < len(data):
            if len(data) - off >= HEADER_SIZE:
                magic, flags, points, length, _ = _HEADER.unpack_from(data, off)
                end = off + HEADER_SIZE + length
            else:
                magic, flags, points, end = b"", 0, 0, len(data) + 1
            if _valid_body(data, off, end) is not None:
                self._index.append(
                    _Rec(seg, off, end - off, points, bool(flags & _FLAG_PRIORITY)))
                off = end
                continue
            if last and (magic != _MAGIC or end >= len(data)):
                os.truncate(path, off)
                self._torn(seg, off, len(data) - off, "torn spool record dropped (crash)",
                           logging.WARNING)
            else:
                self._torn(seg, off, len(data) - off, "corrupt spool record, rest of segment "
                           "skipped", logging.ERROR)
            return

    def _roll(self) -> None:
        if self._wfile is not None:
            self._wfile.close()
        self._wseg, self._next_seg = self._next_seg, self._next_seg + 1
        self._wfile = io.FileIO(self._path(self._wseg), "xb")
        self._wend = 0
        self._segs.append(self._wseg)
        if self.fsync:
            self._fsync_dir()

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

    def _torn(self, seg: int, offset: int, nbytes: int, msg: str, level: int) -> None:
        self.stats.torn_records_dropped += 1
        self.stats.torn_bytes_dropped += nbytes
        log.log(level, msg, extra={"segment": seg, "offset": offset, "bytes_dropped": nbytes,
                                   "spool_dir": str(self.directory)})

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
            if self.fsync:
                f.flush()
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



def _valid_body(data: bytes | memoryview, off: int, end: int) -> memoryview | None:
    """The record's body if data[off:end] is exactly one intact record, else None."""
    if end > len(data) or end - off < HEADER_SIZE:
        return None
    magic, _, _, length, crc = _HEADER.unpack_from(data, off)
    body = memoryview(data)[off + HEADER_SIZE : end]
    if magic != _MAGIC or len(body) != length or zlib.crc32(body) != crc:
        return None
    return body
