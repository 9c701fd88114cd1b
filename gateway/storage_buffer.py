"""Where accepted points wait for InfluxDB: memory first, the disk spool behind it.

One job: hold encoded lines, safety records apart and first, and move them between memory
and the disk spool (gateway/spool.py). The writer (gateway/storage.py) decides when; this
module knows how, and what the spool's state is:

- memory: two queues, safety records (`priority`) and the rest; `take(n)` hands out safety
  records first, `requeue` puts lines taken but neither written nor spooled back in front.
- disk: `spill` appends lines to the spool (safety records first, so the spool's reserve
  keeps them); `peek` / `accept` give the oldest spooled batch for a replay and drop it once
  written. A spool that cannot be opened or whose disk fails is not used for `spool_retry_s`
  and tried again (`tend`); `fault` says what is wrong meanwhile.

No spool configured is a buffer whose disk side is always unusable: lines stay in memory.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING

from gateway.settings import InfluxSettings
from gateway.spool import DiskSpool, SpooledBatch, SpoolLocked

if TYPE_CHECKING:
    from gateway.storage import WriterStats

# The writer's logger: the log lines of the spool router stay what they were before the split.
log = logging.getLogger("gateway.storage")


class StorageBuffer:
    """Memory queues and the optional disk spool of one writer; counts into its stats."""

    def __init__(self, settings: InfluxSettings, stats: WriterStats,
                 spool: DiskSpool | None = None) -> None:
        self.settings = settings
        self.stats = stats
        self.spool = spool  # opened by open_spool() from the settings unless given
        self.spool_wanted = spool is not None or settings.spool_dir is not None
        self.open_error: str | None = None  # why the configured spool is not open
        # Points are encoded as they arrive, so no batch's encoding stalls the event loop;
        # safety records wait apart so a batch and the spool can put them first.
        self._queue: deque[bytes] = deque()
        self._pqueue: deque[bytes] = deque()
        self.retry_at = 0.0  # monotonic: a failing spool is not tried before this
        self.read_retry_at = 0.0  # monotonic: a failed spool read is not retried before this

    # ------------------------------------------------------------------ state

    @property
    def memory_depth(self) -> int:
        return len(self._queue) + len(self._pqueue)

    @property
    def has_telemetry(self) -> bool:
        """Whether memory holds a point that is not a safety record (one could make room)."""
        return bool(self._queue)

    @property
    def spool_bytes(self) -> int:
        return self.spool.pending_bytes if self.spool is not None else 0

    @property
    def spool_points(self) -> int:
        return self.spool.pending_points if self.spool is not None else 0

    @property
    def fault(self) -> str | None:
        """What is wrong with the spool's disk now (None: nothing), fit for a log or alarm."""
        if self.spool is not None:
            return self.spool.fault.describe() if self.spool.fault is not None else None
        return self.open_error if self.spool_wanted else None

    def spool_counters(self) -> dict[str, int]:
        """The spool's part of gateway_health's storage-fault fields."""
        sp = self.spool.stats if self.spool is not None else None
        return {
            "spool_fault": int(self.fault is not None),
            "spool_write_errors": (sp.write_errors if sp else 0) + self.stats.spool_open_errors,
            "spool_read_errors": sp.read_errors if sp else 0,
            "spool_records_corrupt": sp.records_corrupt if sp else 0,
            "spool_segments_quarantined": sp.segments_quarantined if sp else 0,
        }

    def spool_usable(self) -> bool:
        return self.spool is not None and time.monotonic() >= self.retry_at

    @property
    def spool_retry_at(self) -> float:
        """When the disk side may take lines again (monotonic; inf: no spool to wait for)."""
        return self.retry_at if self.spool is not None else math.inf

    # ------------------------------------------------------------------ memory

    def add(self, line: bytes, *, priority: bool) -> None:
        (self._pqueue if priority else self._queue).append(line)

    def evict_telemetry(self) -> None:
        """Drop the oldest telemetry line (the caller counts it) to make room."""
        self._queue.popleft()

    def take(self, n: int) -> tuple[list[bytes], list[bytes]]:
        """Up to n lines, safety records first: (priority, normal)."""
        priority = [self._pqueue.popleft() for _ in range(min(n, len(self._pqueue)))]
        n -= len(priority)
        normal = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        return priority, normal

    def requeue(self, priority: list[bytes], normal: list[bytes]) -> None:
        """Lines taken but neither written nor spooled go back to the front, in order."""
        self._pqueue.extendleft(reversed(priority))
        self._queue.extendleft(reversed(normal))

    def clear_memory(self) -> int:
        """Forget what memory holds (the caller counts it as dropped); how many lines."""
        lost = self.memory_depth
        self._queue.clear()
        self._pqueue.clear()
        return lost

    # ------------------------------------------------------------------ disk

    def spill(self, priority: list[bytes], normal: list[bytes]) -> bool:
        """Spool the lines; False if the spool could not (they are back in memory then)."""
        p_ok = self._spill_lines(priority, priority=True)
        n_ok = p_ok and self._spill_lines(normal, priority=False)
        if not n_ok:
            self.requeue([] if p_ok else priority, normal)
        return n_ok

    def _spill_lines(self, lines: list[bytes], *, priority: bool) -> bool:
        if not lines:
            return True
        if self.spool is None or not self.spool_usable():
            return False
        try:
            stored = self.spool.append(b"\n".join(lines), len(lines), priority=priority)
        except OSError:
            # Counted and logged by the spool (rate-limited); not tried again for a while.
            self.retry_at = time.monotonic() + self.settings.spool_retry_s
            return False
        if stored:
            self.stats.points_spooled += len(lines)
        else:
            self.stats.points_dropped_spool_full += len(lines)  # counted and logged by the spool
        return True

    def peek(self) -> SpooledBatch | None:
        """The oldest spooled batch, or None (none, or a read failed: retried later)."""
        assert self.spool is not None
        try:
            return self.spool.peek()
        except OSError:
            # Counted and logged by the spool; the batch stays there, read again later.
            self.read_retry_at = time.monotonic() + self.settings.spool_retry_s
            return None

    def accept(self, batch: SpooledBatch) -> None:
        """A replayed batch is in InfluxDB: the spool forgets it."""
        assert self.spool is not None
        self.spool.commit(batch)

    def open(self) -> None:
        """Open the configured spool at the writer's start and say what it holds from before."""
        if self.spool is None and self.settings.spool_dir is not None:
            self.open_spool()
        if self.spool is not None and self.spool.pending_points:
            log.info("spool holds points from before; replaying", extra={
                "points": self.spool.pending_points, "bytes": self.spool.pending_bytes})

    def close(self) -> int:
        """Spool what memory holds (one last try, whatever the backoff) and close the spool;
        how many lines are left in memory (the caller counts them as lost)."""
        if self.spool is not None:
            self.retry_at = 0.0
            self.spill(*self.take(self.memory_depth))
            if self.spool_points:
                log.warning("storage closed; points kept in the spool for the next start",
                            extra={"points": self.spool_points, "bytes": self.spool_bytes})
            self.spool.close()
        return self.memory_depth

    def open_spool(self, *, first: bool = True) -> None:
        """Open the configured spool. A spool in use by another process stops the start;
        a disk that fails (read-only, full, I/O error) does not: the writer runs without the
        spool and tries again every spool_retry_s."""
        s = self.settings
        assert s.spool_dir is not None
        try:
            self.spool = DiskSpool(s.spool_dir, s.spool_max_bytes, fsync=s.spool_fsync)
        except SpoolLocked:
            if first:
                raise
            self.open_error = f"spool {s.spool_dir} is in use by another process"
        except OSError as exc:
            self.stats.spool_open_errors += 1
            self.open_error = f"spool cannot be opened: {type(exc).__name__} " \
                              f"({exc.strerror or exc})"
        else:
            if self.open_error is not None:
                log.info("spool opened", extra={"spool_dir": str(s.spool_dir)})
            self.open_error = None
            return
        self.retry_at = time.monotonic() + s.spool_retry_s
        log.error("spool cannot be opened; running without it, retrying", extra={
            "spool_dir": str(s.spool_dir), "reason": self.open_error,
            "retry_in_s": s.spool_retry_s})

    def needs_tending(self) -> bool:
        """A configured spool that is not open, or whose writes fail (reads heal by reading)."""
        if self.spool is None:
            return self.spool_wanted and self.settings.spool_dir is not None
        return self.spool.fault is not None and self.spool.fault.op != "read"

    def tend(self, now: float) -> None:
        """Open a spool that could not be opened; probe a failing one, so that the fault ends
        when the disk has room again even if nothing needs spooling."""
        if now < self.retry_at or not self.needs_tending():
            return
        if self.spool is None:
            self.open_spool(first=False)
        elif not self.spool.probe():
            self.retry_at = now + self.settings.spool_retry_s
