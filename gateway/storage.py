"""Async batching writer to InfluxDB's v1-compatible `/write` endpoint, with a disk spool.

`submit()` never awaits: the safety path hands points over and moves on. A background task
writes batches by size (`batch_size`) and time (`flush_interval_s`).

When a write fails for a reason that may pass (network, timeout, 5xx, 429, auth or a missing
database that an operator can fix), the batch goes to the disk spool and the writer enters an
outage: every due batch then goes straight to the spool, and the spool's oldest batch is
retried with exponential backoff and jitter (at least what `Retry-After` asks). When one
goes through, the spool is replayed in order, one spooled batch after each live one, so live
data keeps flowing while the backlog drains. Replays are idempotent: a point is its
measurement, tags and timestamp, so a batch written twice is stored once.

A 400 means some points are bad: InfluxDB has written the others (a partial write), and the
batch is split in halves until each bad line is alone; it is logged with InfluxDB's reason
and counted, and everything else is written.

Memory is bounded by `queue_max_points`: past it, the oldest points are spooled at once. On
close (SIGTERM) what is still in memory is written if InfluxDB answers within the close
timeout, and spooled otherwise; the next start replays it. A SIGKILL loses what was in memory:
at most the points of the last `flush_interval_s` plus one batch being written.
Without a spool (`spool_dir` unset) failed batches wait in memory and the queue's bound drops
the newest points, counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections import deque
from dataclasses import dataclass

import httpx

from gateway.lineprotocol import Point, PointError
from gateway.redact import redact
from gateway.settings import InfluxSettings
from gateway.spool import DiskSpool

log = logging.getLogger(__name__)

# Measurements that make the clinical safety record: spooled with priority (see spool.py).
PRIORITY_MEASUREMENTS = frozenset(
    {"safety_event", "alarm", "command", "session", "vent_confirmed", "device_fault"}
)


@dataclass
class WriterStats:
    points_queued: int = 0
    queue_peak: int = 0  # most points ever held in memory at once (bounded by queue_max_points)
    points_written: int = 0
    points_dropped_queue_full: int = 0  # only without a spool
    points_dropped_spool_full: int = 0
    points_refused: int = 0  # bad points: unencodable, or refused by InfluxDB (400)
    points_spooled: int = 0
    points_replayed: int = 0
    batches_written: int = 0
    write_errors: int = 0
    last_write_ms: float = 0.0
    max_write_ms: float = 0.0
    connected: bool = False


class _Retry(Exception):
    """A write that may succeed later; `remainder` is what is still unwritten."""

    def __init__(self, reason: str, remainder: list[bytes], retry_after_s: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.remainder = remainder
        self.retry_after_s = retry_after_s


def _retry_after(resp: httpx.Response) -> float:
    value = resp.headers.get("Retry-After")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else 0.0


class InfluxWriter:
    def __init__(
        self,
        settings: InfluxSettings,
        client: httpx.AsyncClient | None = None,
        spool: DiskSpool | None = None,
    ) -> None:
        self.settings = settings
        headers = {}
        if settings.token is not None:
            headers["Authorization"] = f"Token {settings.token.get_secret_value()}"
        self._client = client or httpx.AsyncClient(
            base_url=settings.url, headers=headers, timeout=settings.timeout_s
        )
        self.spool = spool  # opened by start() from the settings unless given
        # Points are encoded as they arrive, so no batch's encoding stalls the event loop;
        # safety records wait apart so a batch and the spool can put them first.
        self._queue: deque[bytes] = deque()
        self._pqueue: deque[bytes] = deque()
        self._in_flight: list[bytes] = []  # lines taken from the queues, not yet written
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._memory_empty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outage = False
        self._backoff = 0.0
        self._next_try = 0.0
        self._last_flush = time.monotonic()
        self.stats = WriterStats()
        self._params = {"db": settings.database, "precision": "u"}
        if settings.retention_policy:
            self._params["rp"] = settings.retention_policy

    # ------------------------------------------------------------------ state

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + len(self._pqueue)

    @property
    def spool_bytes(self) -> int:
        return self.spool.pending_bytes if self.spool is not None else 0

    @property
    def spool_points(self) -> int:
        return self.spool.pending_points if self.spool is not None else 0

    @property
    def backlog(self) -> int:
        """Points accepted and not yet in InfluxDB: in memory, being written, or spooled."""
        return self.queue_depth + len(self._in_flight) + self.spool_points

    @property
    def in_outage(self) -> bool:
        return self._outage

    def _pending(self) -> bool:
        return bool(self._queue or self._pqueue or self._in_flight or self.spool_points)

    # ------------------------------------------------------------------ ingress

    def submit(self, point: Point) -> None:
        try:
            line = point.encode().encode()
        except PointError as exc:
            self.stats.points_refused += 1
            log.error("point refused before write", extra={
                "measurement": point.measurement, "tags": dict(point.tags), "reason": str(exc)})
            return
        if self.queue_depth >= self.settings.queue_max_points:
            if self.spool is None:
                self.stats.points_dropped_queue_full += 1
                if self.stats.points_dropped_queue_full % 1000 == 1:
                    log.error("storage queue full, point dropped", extra={
                        "dropped_total": self.stats.points_dropped_queue_full,
                        "queue_max": self.settings.queue_max_points})
                return
            # InfluxDB is slower than ingest: the oldest points move to disk.
            self._spill(*self._take(self.settings.batch_size))
        (self._pqueue if point.measurement in PRIORITY_MEASUREMENTS else self._queue).append(line)
        self.stats.points_queued += 1
        depth = self.queue_depth
        if depth > self.stats.queue_peak:
            self.stats.queue_peak = depth
        self._idle.clear()
        if depth >= self.settings.batch_size:
            self._wake.set()

    def _take(self, n: int) -> tuple[list[bytes], list[bytes]]:
        """Up to n lines, safety records first: (priority, normal)."""
        priority = [self._pqueue.popleft() for _ in range(min(n, len(self._pqueue)))]
        n -= len(priority)
        normal = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        return priority, normal

    def _spill(self, priority: list[bytes], normal: list[bytes]) -> None:
        self._spill_lines(priority, priority=True)
        self._spill_lines(normal, priority=False)

    def _spill_lines(self, lines: list[bytes], *, priority: bool) -> None:
        if not lines:
            return
        if self.spool is None:
            raise RuntimeError("no spool")
        if self.spool.append(b"\n".join(lines), len(lines), priority=priority):
            self.stats.points_spooled += len(lines)
        else:
            self.stats.points_dropped_spool_full += len(lines)  # counted and logged by the spool

    # ------------------------------------------------------------------ the writer task

    async def ensure_database(self) -> None:
        """Check InfluxDB answers; CREATE DATABASE on 1.x (2.x needs a DBRP mapping instead)."""
        resp = await self._client.get("/ping")
        resp.raise_for_status()
        self.stats.connected = True
        if not self.settings.create_database:
            return
        q = f'CREATE DATABASE "{self.settings.database}"'
        resp = await self._client.post("/query", params={"q": q})
        resp.raise_for_status()

    def start(self) -> None:
        s = self.settings
        if self.spool is None and s.spool_dir is not None:
            self.spool = DiskSpool(s.spool_dir, s.spool_max_bytes, fsync=s.spool_fsync)
        if self.spool is not None and self.spool.pending_points:
            log.info("spool holds points from before; replaying", extra={
                "points": self.spool.pending_points, "bytes": self.spool.pending_bytes})
        self._task = asyncio.create_task(self._run(), name="influx-writer")

    async def _run(self) -> None:
        while True:
            if not (self.queue_depth or self._in_flight):
                self._memory_empty.set()
            if not self._pending():
                self._idle.set()
            await self._wait_due()
            self._wake.clear()
            now = time.monotonic()
            due_live = self.queue_depth and (
                self.queue_depth >= self.settings.batch_size
                or now - self._last_flush >= self.settings.flush_interval_s
            )
            if due_live:
                self._last_flush = now
                await self._write_live(*self._take(self.settings.batch_size))
            if self.spool_points and now >= self._next_try:
                await self._replay_one()

    async def _wait_due(self) -> None:
        now = time.monotonic()
        if self.queue_depth >= self.settings.batch_size:
            return
        timeout = self.settings.flush_interval_s - (now - self._last_flush)
        if not self.queue_depth:
            timeout = self.settings.flush_interval_s
        if self.spool_points:
            timeout = min(timeout, max(0.0, self._next_try - now))
        if timeout <= 0:
            return
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _write_live(self, priority: list[bytes], normal: list[bytes]) -> None:
        lines = priority + normal
        if not lines:
            return
        if self._outage and self.spool is not None:
            self._spill(priority, normal)
            return
        self._in_flight = lines
        try:
            await self._deliver(lines)
        except _Retry as exc:
            self._failed(exc)
            if self.spool is not None:
                left = set(exc.remainder)
                self._spill_lines([ln for ln in priority if ln in left], priority=True)
                self._spill_lines([ln for ln in normal if ln in left], priority=False)
            else:
                await self._hold_in_memory(exc.remainder)
        finally:
            self._in_flight = []

    async def _hold_in_memory(self, lines: list[bytes]) -> None:
        """No spool: keep retrying the batch in place, with backoff."""
        self._in_flight = lines
        while self._in_flight:
            await asyncio.sleep(max(0.0, self._next_try - time.monotonic()))
            try:
                await self._deliver(self._in_flight)
                self._recovered()
                self._in_flight = []
            except _Retry as exc:
                self._in_flight = exc.remainder
                self._failed(exc)

    async def _replay_one(self) -> None:
        assert self.spool is not None
        batch = self.spool.peek()
        if batch is None:
            return
        try:
            await self._deliver(batch.body.split(b"\n"))
        except _Retry as exc:
            self._failed(exc)
            return
        self.spool.commit(batch)
        self.stats.points_replayed += batch.points
        self._recovered()

    # ------------------------------------------------------------------ HTTP

    async def _deliver(self, lines: list[bytes]) -> None:
        """Write `lines`; isolate bad ones on 400. Raises _Retry with what is left unwritten."""
        t0 = time.perf_counter()
        try:
            resp = await self._client.post("/write", params=self._params,
                                           content=b"\n".join(lines))
        except httpx.HTTPError as exc:
            raise _Retry(f"{type(exc).__name__}: {redact(str(exc))}", lines) from None
        ms = (time.perf_counter() - t0) * 1000
        self.stats.last_write_ms = ms
        self.stats.max_write_ms = max(self.stats.max_write_ms, ms)
        code = resp.status_code
        if code == 204:
            self.stats.points_written += len(lines)
            self.stats.batches_written += 1
            if not self.stats.connected:
                log.info("influxdb writes succeed", extra={"url": redact(self.settings.url)})
            self.stats.connected = True
            return
        if code in (400, 413):
            # Some lines are bad (or the body too large): halve until each bad line is alone.
            if len(lines) == 1:
                self._bad_line(lines[0], code, resp.text)
                return
            mid = len(lines) // 2
            done = 0
            for part in (lines[:mid], lines[mid:]):
                try:
                    await self._deliver(part)
                except _Retry as exc:
                    raise _Retry(exc.reason, lines[done:], exc.retry_after_s) from None
                done += len(part)
            return
        raise _Retry(f"HTTP {code}: {resp.text[:200]}", lines, _retry_after(resp))

    def _bad_line(self, line: bytes, code: int, reason: str) -> None:
        self.stats.points_refused += 1
        log.error("influxdb refused a point", extra={
            "status": code, "reason": reason[:500], "line": line[:500].decode(errors="replace")})

    def _failed(self, exc: _Retry) -> None:
        self.stats.write_errors += 1
        self._backoff = min(self.settings.retry_max_s,
                            max(self.settings.retry_min_s, self._backoff * 2))
        delay = max(exc.retry_after_s, self._backoff * random.uniform(0.8, 1.2))
        self._next_try = time.monotonic() + delay
        if self.stats.connected or self.stats.write_errors == 1:
            log.warning("influxdb write failed; spooling and retrying", extra={
                "reason": exc.reason, "retry_in_s": round(delay, 2),
                "queue_depth": self.queue_depth, "spool_bytes": self.spool_bytes})
        self.stats.connected = False
        self._outage = self.spool is not None

    def _recovered(self) -> None:
        if self._outage:
            log.info("influxdb back; replaying the spool", extra={
                "spool_points": self.spool_points, "spool_bytes": self.spool_bytes})
        self._outage = False
        self._backoff = 0.0
        self._next_try = 0.0

    # ------------------------------------------------------------------ shutdown

    async def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is in InfluxDB; False on timeout."""
        self._last_flush = 0.0
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                while self._pending():
                    self._idle.clear()
                    self._wake.set()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Write what memory holds if InfluxDB answers in time; spool the rest; stop."""
        if not self._outage:
            self._last_flush = 0.0
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while self.queue_depth or self._in_flight:
                        self._memory_empty.clear()
                        self._wake.set()
                        await self._memory_empty.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        left = self._in_flight
        self._in_flight = []
        if self.spool is not None:
            self._spill_lines(left, priority=True)
            self._spill(*self._take(self.queue_depth))
            if self.spool_points:
                log.warning("storage closed; points kept in the spool for the next start",
                            extra={"points": self.spool_points, "bytes": self.spool_bytes})
            self.spool.close()
        elif self.queue_depth or left:
            log.error("storage closed with unwritten points",
                      extra={"points": self.queue_depth + len(left)})
        await self._client.aclose()
