"""Async batching writer to InfluxDB's v1-compatible `/write` endpoint, with a disk spool.

This module is the writer loop: batch scheduling, the outage/backoff state machine, the
counters and the storage fault the gateway raises an alarm on. The HTTP client (one batch
written, the 400-bisection, retry vs refused) is gateway/influx_client.py; where points wait
(memory queues, then the disk spool) is gateway/storage_buffer.py. A point's priority comes
with the point (`Point.priority`, set by gateway/schema.py's `make_point`): storage never
reads a measurement name.

`submit()` never awaits and never raises: the safety path hands points over and moves on. A
background task writes batches by size (`batch_size`) and time (`flush_interval_s`).

When a write fails for a reason that may pass (network, TLS, timeout, 5xx, 429, auth or a
missing database that an operator can fix), the batch goes to the disk spool and the writer
enters an outage: every due batch then goes straight to the spool, and the spool's oldest
batch is retried with exponential backoff and jitter (at least what `Retry-After` asks). When
one goes through, the spool is replayed in order, one spooled batch after each live one, so
live data keeps flowing while the backlog drains. Replays are idempotent: a point is its
measurement, tags and timestamp, so a batch written twice is stored once.

A 400 means some points are bad: InfluxDB has written the others (a partial write), and the
batch is split in halves until each bad line is alone; it is logged with InfluxDB's reason
and counted, and everything else is written.

Memory is bounded by `spill_after_points`: past it, the oldest points are spooled at once. On
close (SIGTERM) what is still in memory is written if InfluxDB answers within the close
timeout, and spooled otherwise; the next start replays it. A SIGKILL loses what was in memory:
at most the points of the last `flush_interval_s` plus one batch being written.

When the spool cannot be used (none configured, its disk full, read-only or failing, or it
could not be opened), batches wait in memory and are retried against InfluxDB with the same
backoff; live writes go on whenever InfluxDB is up. Past `queue_max_points` the newest
telemetry point is dropped, or, for a safety record, the oldest telemetry point makes room:
every point dropped is counted (`points_dropped_*`) and logged. A failing spool is tried again
every `spool_retry_s` and used again as soon as it works; `storage_fault` says what is wrong
meanwhile (the gateway raises an alarm on it). The writer task never ends by an error: an
unexpected one is logged and counted, and the task carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass

import httpx

from gateway.influx_client import InfluxClient, Retry, influx_client
from gateway.lineprotocol import Point, PointError
from gateway.redact import redact
from gateway.settings import InfluxSettings
from gateway.spool import DiskSpool
from gateway.storage_buffer import StorageBuffer

log = logging.getLogger(__name__)

__all__ = ["InfluxWriter", "WriterStats", "influx_client"]  # influx_client: gateway/provision.py
_LOG_EVERY = 1000
_AUTH_LOG_INTERVAL_S = 60.0
_RESTART_DELAY_S = 1.0


@dataclass
class WriterStats:
    points_queued: int = 0
    queue_peak: int = 0  # most points ever held in memory at once (see spill_after_points)
    points_written: int = 0
    points_dropped_queue_full: int = 0  # memory full and no spool configured
    points_dropped_spool_full: int = 0  # refused by the spool's cap
    points_dropped_spool_error: int = 0  # memory full while the spool's disk failed
    points_refused: int = 0  # bad points: unencodable, or refused by InfluxDB (400)
    points_spooled: int = 0
    points_replayed: int = 0
    batches_written: int = 0
    write_errors: int = 0
    auth_errors: int = 0  # InfluxDB answered 401/403: wrong or missing credentials
    tls_errors: int = 0  # the TLS handshake failed: unknown CA, wrong host name, no TLS
    task_restarts: int = 0  # the writer task hit an unexpected error and carried on
    spool_open_errors: int = 0  # the configured spool could not be opened (start, retries)
    last_write_ms: float = 0.0
    max_write_ms: float = 0.0
    connected: bool = False

    @property
    def points_dropped(self) -> int:
        """Every point lost on purpose, whatever the cause (gateway_health.points_dropped)."""
        return (self.points_dropped_queue_full + self.points_dropped_spool_full
                + self.points_dropped_spool_error)


class InfluxWriter:
    """The writer loop: batch scheduling, the outage/backoff state machine, the counters.

    Writes go through `InfluxClient` (gateway/influx_client.py); points wait in a
    `StorageBuffer` (gateway/storage_buffer.py: memory, then the disk spool)."""

    def __init__(
        self,
        settings: InfluxSettings,
        client: httpx.AsyncClient | None = None,
        spool: DiskSpool | None = None,
    ) -> None:
        self.settings = settings
        self.stats = WriterStats()
        self._influx = InfluxClient(settings, client or influx_client(settings), self.stats)
        self._buf = StorageBuffer(settings, self.stats, spool)  # spool opened by start()
        # Past this depth a point first tries to make room: spill while the spool can take
        # lines, and past queue_max_points drop (counted) while it cannot.
        self._room_at = min(max(settings.spill_after_points, 2 * settings.batch_size),
                            settings.queue_max_points)
        self._in_flight: list[bytes] = []  # lines taken from the queues, not yet written
        self._in_flight_priority = 0  # how many of them, at the front, are safety records
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._memory_empty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outage = False
        self._backoff = 0.0
        self._next_try = 0.0
        self._last_flush = time.monotonic()
        self._auth_logged = -math.inf
        self._dropped_logged = 0

    # ------------------------------------------------------------------ state

    @property
    def spool(self) -> DiskSpool | None:
        """The disk spool, None while none is configured or it could not be opened."""
        return self._buf.spool

    @property
    def queue_depth(self) -> int:
        return self._buf.memory_depth

    @property
    def spool_bytes(self) -> int:
        return self._buf.spool_bytes

    @property
    def spool_points(self) -> int:
        return self._buf.spool_points

    @property
    def backlog(self) -> int:
        """Points accepted and not yet in InfluxDB: in memory, being written, or spooled."""
        return self.queue_depth + len(self._in_flight) + self.spool_points

    @property
    def in_outage(self) -> bool:
        return self._outage

    @property
    def storage_fault(self) -> str | None:
        """What is wrong with the spool's disk now (None: nothing), fit for a log or alarm."""
        return self._buf.fault

    def health_counters(self) -> dict[str, int]:
        """The storage-fault fields of gateway_health (docs/schema.md §2.10)."""
        return {
            **self._buf.spool_counters(),
            "influx_auth_errors": self.stats.auth_errors,
            "influx_tls_errors": self.stats.tls_errors,
            "storage_task_restarts": self.stats.task_restarts,
        }

    @property
    def task_alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _pending(self) -> bool:
        return bool(self.queue_depth or self._in_flight or self.spool_points)

    def _spool_usable(self) -> bool:
        return self._buf.spool_usable()

    # ------------------------------------------------------------------ ingress

    def submit(self, point: Point) -> None:
        try:
            line = point.encode().encode()
        except PointError as exc:
            self.stats.points_refused += 1
            log.error("point refused before write", extra={
                "measurement": point.measurement, "tags": dict(point.tags), "reason": str(exc)})
            return
        self.submit_line(line, priority=point.priority)  # set by the schema (gateway/schema.py)

    def submit_line(self, line: bytes, *, priority: bool) -> None:
        """Queue one encoded point (the telemetry path builds its line without a Point).

        Every sample of every boot comes through here: the common case (room in memory) is
        kept to a few operations."""
        buf = self._buf
        if buf.memory_depth >= self._room_at and not self._make_room(priority):
            return
        buf.add(line, priority=priority)
        stats = self.stats
        stats.points_queued += 1
        depth = buf.memory_depth
        if depth > stats.queue_peak:
            stats.queue_peak = depth
        self._idle.clear()
        if depth >= self.settings.batch_size and (not self._outage or self._spool_usable()):
            self._wake.set()

    def _make_room(self, priority: bool) -> bool:
        """Memory holds spill_after_points or more: whether the point may still be queued."""
        if self._spool_usable():
            # InfluxDB is slower than ingest: the oldest points move to disk, so memory (and
            # the process's RSS, which Python does not give back) stays bounded.
            self._spill(*self._buf.take(self.settings.batch_size))
        if self.queue_depth >= self.settings.queue_max_points:
            # Nowhere to keep more: a safety record takes the place of the oldest telemetry
            # point; otherwise the newest point is dropped. Either way counted.
            if not (priority and self._buf.has_telemetry):
                self._drop(1)
                return False
            self._buf.evict_telemetry()
            self._drop(1)
        return True

    def _drop(self, n: int) -> None:
        s = self.stats
        if self._buf.spool_wanted:
            s.points_dropped_spool_error += n
        else:
            s.points_dropped_queue_full += n
        before = self._dropped_logged
        self._dropped_logged += n
        if before == 0 or before // _LOG_EVERY != self._dropped_logged // _LOG_EVERY:
            log.error("storage queue full, point dropped", extra={
                "dropped_total": s.points_dropped, "queue_max": self.settings.queue_max_points,
                "spool_fault": self.storage_fault,
                "reason": "spool failing" if self._buf.spool_wanted else "no spool configured"})

    def _requeue(self, priority: list[bytes], normal: list[bytes]) -> None:
        """Lines taken but neither written nor spooled go back to the front, in order."""
        self._buf.requeue(priority, normal)
        if priority or normal:
            self._idle.clear()

    def _spill(self, priority: list[bytes], normal: list[bytes]) -> bool:
        """Spool the lines; False if the spool could not (they are back in memory then)."""
        if self._buf.spill(priority, normal):
            return True
        if priority or normal:
            self._idle.clear()
        return False

    # ------------------------------------------------------------------ the writer task

    async def ensure_database(self) -> None:
        """Check InfluxDB answers; CREATE DATABASE on 1.x (2.x needs a DBRP mapping instead)."""
        await self._influx.ensure_database()

    def start(self) -> None:
        self._buf.open()
        self._task = asyncio.create_task(self._run(), name="influx-writer")

    async def _run(self) -> None:
        """The writer loop, kept alive: an unexpected error is logged, counted, survived."""
        while True:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.task_restarts += 1
                log.exception("storage writer failed; carrying on", extra={
                    "task_restarts": self.stats.task_restarts,
                    "in_flight": len(self._in_flight)})
                k = self._in_flight_priority
                self._requeue(self._in_flight[:k], self._in_flight[k:])
                self._in_flight = []
                await asyncio.sleep(_RESTART_DELAY_S)

    async def _loop(self) -> None:
        while True:
            if not (self.queue_depth or self._in_flight):
                self._memory_empty.set()
            if not self._pending():
                self._idle.set()
            await self._wait_due()
            self._wake.clear()
            now = time.monotonic()
            self._buf.tend(now)
            if self._live_due(now):
                self._last_flush = now
                await self._write_live(*self._buf.take(self.settings.batch_size))
            if self._replay_due(time.monotonic()):
                await self._replay_one()

    def _live_due(self, now: float) -> bool:
        depth = self.queue_depth
        if not depth or (depth < self.settings.batch_size
                         and now - self._last_flush < self.settings.flush_interval_s):
            return False
        # In an outage a batch is spooled, or, while the spool cannot be used, retried
        # against InfluxDB when the backoff allows.
        return not self._outage or self._spool_usable() or now >= self._next_try

    def _replay_due(self, now: float) -> bool:
        return bool(self.spool_points) and now >= max(self._next_try, self._buf.read_retry_at)

    def _next_due(self, now: float) -> float:
        """When the loop has something to do next (monotonic)."""
        due = []
        if self.queue_depth:
            t = (now if self.queue_depth >= self.settings.batch_size
                 else self._last_flush + self.settings.flush_interval_s)
            if self._outage and not self._spool_usable():
                t = max(t, min(self._next_try, self._buf.spool_retry_at))
            due.append(t)
        if self.spool_points:
            due.append(max(self._next_try, self._buf.read_retry_at))
        if self._buf.needs_tending():
            due.append(self._buf.retry_at)
        return min(due, default=now + self.settings.flush_interval_s)

    async def _wait_due(self) -> None:
        now = time.monotonic()
        timeout = self._next_due(now) - now
        if timeout <= 0:
            return
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _write_live(self, priority: list[bytes], normal: list[bytes]) -> None:
        if not (priority or normal):
            return
        if self._outage and self._spool_usable():
            self._spill(priority, normal)  # on failure the lines are back in memory
            return
        lines = priority + normal
        self._in_flight, self._in_flight_priority = lines, len(priority)
        try:
            await self._influx.write(lines)
        except Retry as exc:
            self._failed(exc)
            left = set(exc.remainder)
            self._in_flight = []
            # To the spool; if it cannot take them, back to memory for the next retry.
            self._spill([ln for ln in priority if ln in left],
                        [ln for ln in normal if ln in left])
            return
        self._in_flight = []
        self._recovered()

    async def _replay_one(self) -> None:
        batch = self._buf.peek()  # None also when the read failed: retried later
        if batch is None:
            return
        try:
            await self._influx.write(batch.body.split(b"\n"))
        except Retry as exc:
            self._failed(exc)
            return
        self._buf.accept(batch)
        self.stats.points_replayed += batch.points
        self._recovered()

    # ------------------------------------------------------------------ outage

    def _failed(self, exc: Retry) -> None:
        self.stats.write_errors += 1
        self._backoff = min(self.settings.retry_max_s,
                            max(self.settings.retry_min_s, self._backoff * 2))
        delay = max(exc.retry_after_s, self._backoff * random.uniform(0.8, 1.2))
        self._next_try = time.monotonic() + delay
        if exc.kind in ("auth", "tls"):
            # A configuration fault, not an outage that passes: an error, once a minute.
            if exc.kind == "auth":
                self.stats.auth_errors += 1
            else:
                self.stats.tls_errors += 1
            now = time.monotonic()
            if now - self._auth_logged >= _AUTH_LOG_INTERVAL_S:
                self._auth_logged = now
                log.error("influxdb refused the credentials; spooling and retrying"
                          if exc.kind == "auth" else
                          "influxdb TLS handshake failed; spooling and retrying", extra={
                              "reason": exc.reason, "url": redact(self.settings.url),
                              "auth_errors": self.stats.auth_errors,
                              "tls_errors": self.stats.tls_errors,
                              "retry_in_s": round(delay, 2)})
        elif self.stats.connected or self.stats.write_errors == 1:
            log.warning("influxdb write failed; spooling and retrying", extra={
                "reason": exc.reason, "retry_in_s": round(delay, 2),
                "queue_depth": self.queue_depth, "spool_bytes": self.spool_bytes})
        self.stats.connected = False
        self._outage = True

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
        k = self._in_flight_priority
        self._requeue(self._in_flight[:k], self._in_flight[k:])
        self._in_flight = []
        if self._buf.close():
            lost = self._buf.clear_memory()
            self._drop(lost)
            log.error("storage closed with unwritten points", extra={
                "points": lost, "spool_fault": self.storage_fault})
        await self._influx.aclose()
