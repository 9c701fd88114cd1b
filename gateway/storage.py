"""Async batching writer to InfluxDB's v1-compatible `/write` endpoint, with a disk spool.

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

Memory is bounded by `queue_max_points`: past it, the oldest points are spooled at once. On
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
import email.utils
import logging
import math
import random
import ssl
import time
from collections import deque
from dataclasses import dataclass

import httpx

from gateway.lineprotocol import Point, PointError
from gateway.redact import redact
from gateway.schema import SAFETY_RECORD
from gateway.settings import InfluxSettings, is_loopback_host
from gateway.spool import DiskSpool, SpoolLocked

log = logging.getLogger(__name__)

# Measurements that make the clinical safety record (gateway/schema.py): spooled with
# priority (see spool.py). Plain strings: a point's measurement may be any str.
PRIORITY_MEASUREMENTS: frozenset[str] = frozenset(m.value for m in SAFETY_RECORD)
_LOG_EVERY = 1000
_AUTH_LOG_INTERVAL_S = 60.0
_RESTART_DELAY_S = 1.0


@dataclass
class WriterStats:
    points_queued: int = 0
    queue_peak: int = 0  # most points ever held in memory at once (bounded by queue_max_points)
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


class _Retry(Exception):
    """A write that may succeed later; `remainder` is what is still unwritten."""

    def __init__(self, reason: str, remainder: list[bytes], retry_after_s: float = 0.0,
                 kind: str = "unavailable") -> None:
        super().__init__(reason)
        self.reason = reason
        self.remainder = remainder
        self.retry_after_s = retry_after_s
        self.kind = kind  # unavailable, tls, auth


def _retry_after(resp: httpx.Response) -> float:
    value = resp.headers.get("Retry-After")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else 0.0


def _tls_failure(exc: BaseException) -> bool:
    """Whether an httpx error was caused by TLS (certificate, handshake), through its chain."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def influx_client(settings: InfluxSettings) -> httpx.AsyncClient:
    """The HTTP client of the settings: credentials in headers (never in the URL), TLS as set."""
    headers = {}
    auth: httpx.BasicAuth | None = None
    if settings.token is not None:
        headers["Authorization"] = f"Token {settings.token.get_secret_value()}"
    if settings.username is not None and settings.password is not None:
        auth = httpx.BasicAuth(settings.username, settings.password.get_secret_value())
    verify: ssl.SSLContext | bool = True
    if not settings.verify_tls:
        verify = False
    elif settings.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.ca_file))
    url = httpx.URL(settings.url)
    if url.scheme == "https" and not settings.verify_tls:
        log.warning("influxdb TLS certificate verification is off (influx.verify_tls=false): "
                    "anyone on the path can read the data and the credentials",
                    extra={"url": redact(settings.url)})
    if url.scheme == "http" and not is_loopback_host(url.host):
        log.warning("influxdb over plain http to a host that is not loopback "
                    "(influx.allow_plaintext): data and credentials are not encrypted",
                    extra={"url": redact(settings.url)})
    return httpx.AsyncClient(base_url=settings.url, headers=headers, auth=auth, verify=verify,
                             timeout=settings.timeout_s)


class InfluxWriter:
    def __init__(
        self,
        settings: InfluxSettings,
        client: httpx.AsyncClient | None = None,
        spool: DiskSpool | None = None,
    ) -> None:
        self.settings = settings
        self._client = client or influx_client(settings)
        self.spool = spool  # opened by start() from the settings unless given
        self._spool_wanted = spool is not None or settings.spool_dir is not None
        self._spool_open_error: str | None = None  # why the configured spool is not open
        # Points are encoded as they arrive, so no batch's encoding stalls the event loop;
        # safety records wait apart so a batch and the spool can put them first.
        self._queue: deque[bytes] = deque()
        self._pqueue: deque[bytes] = deque()
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
        self._spool_retry_at = 0.0  # monotonic: a failing spool is not tried before this
        self._read_retry_at = 0.0  # monotonic: a failed spool read is not retried before this
        self._last_flush = time.monotonic()
        self._auth_logged = -math.inf
        self._dropped_logged = 0
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

    @property
    def storage_fault(self) -> str | None:
        """What is wrong with the spool's disk now (None: nothing), fit for a log or alarm."""
        if self.spool is not None:
            return self.spool.fault.describe() if self.spool.fault is not None else None
        return self._spool_open_error if self._spool_wanted else None

    def health_counters(self) -> dict[str, int]:
        """The storage-fault fields of gateway_health (docs/schema.md §2.10)."""
        sp = self.spool.stats if self.spool is not None else None
        return {
            "spool_fault": int(self.storage_fault is not None),
            "spool_write_errors": (sp.write_errors if sp else 0) + self.stats.spool_open_errors,
            "spool_read_errors": sp.read_errors if sp else 0,
            "spool_records_corrupt": sp.records_corrupt if sp else 0,
            "spool_segments_quarantined": sp.segments_quarantined if sp else 0,
            "influx_auth_errors": self.stats.auth_errors,
            "influx_tls_errors": self.stats.tls_errors,
            "storage_task_restarts": self.stats.task_restarts,
        }

    @property
    def task_alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _pending(self) -> bool:
        return bool(self._queue or self._pqueue or self._in_flight or self.spool_points)

    def _spool_usable(self) -> bool:
        return self.spool is not None and time.monotonic() >= self._spool_retry_at

    # ------------------------------------------------------------------ ingress

    def submit(self, point: Point) -> None:
        try:
            line = point.encode().encode()
        except PointError as exc:
            self.stats.points_refused += 1
            log.error("point refused before write", extra={
                "measurement": point.measurement, "tags": dict(point.tags), "reason": str(exc)})
            return
        priority = point.measurement in PRIORITY_MEASUREMENTS
        cap = self.settings.queue_max_points
        if self.queue_depth >= cap and self._spool_usable():
            # InfluxDB is slower than ingest: the oldest points move to disk.
            self._spill(*self._take(self.settings.batch_size))
        if self.queue_depth >= cap:
            # Nowhere to keep more: a safety record takes the place of the oldest telemetry
            # point; otherwise the newest point is dropped. Either way counted.
            if not (priority and self._queue):
                self._drop(1)
                return
            self._queue.popleft()
            self._drop(1)
        (self._pqueue if priority else self._queue).append(line)
        self.stats.points_queued += 1
        depth = self.queue_depth
        if depth > self.stats.queue_peak:
            self.stats.queue_peak = depth
        self._idle.clear()
        if depth >= self.settings.batch_size and (not self._outage or self._spool_usable()):
            self._wake.set()

    def _drop(self, n: int) -> None:
        s = self.stats
        if self._spool_wanted:
            s.points_dropped_spool_error += n
        else:
            s.points_dropped_queue_full += n
        before = self._dropped_logged
        self._dropped_logged += n
        if before == 0 or before // _LOG_EVERY != self._dropped_logged // _LOG_EVERY:
            log.error("storage queue full, point dropped", extra={
                "dropped_total": s.points_dropped, "queue_max": self.settings.queue_max_points,
                "spool_fault": self.storage_fault,
                "reason": "spool failing" if self._spool_wanted else "no spool configured"})

    def _take(self, n: int) -> tuple[list[bytes], list[bytes]]:
        """Up to n lines, safety records first: (priority, normal)."""
        priority = [self._pqueue.popleft() for _ in range(min(n, len(self._pqueue)))]
        n -= len(priority)
        normal = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        return priority, normal

    def _requeue(self, priority: list[bytes], normal: list[bytes]) -> None:
        """Lines taken but neither written nor spooled go back to the front, in order."""
        self._pqueue.extendleft(reversed(priority))
        self._queue.extendleft(reversed(normal))
        if priority or normal:
            self._idle.clear()

    def _spill(self, priority: list[bytes], normal: list[bytes]) -> bool:
        """Spool the lines; False if the spool could not (they are back in memory then)."""
        p_ok = self._spill_lines(priority, priority=True)
        n_ok = p_ok and self._spill_lines(normal, priority=False)
        if not n_ok:
            self._requeue([] if p_ok else priority, normal)
        return n_ok

    def _spill_lines(self, lines: list[bytes], *, priority: bool) -> bool:
        if not lines:
            return True
        if self.spool is None or not self._spool_usable():
            return False
        try:
            stored = self.spool.append(b"\n".join(lines), len(lines), priority=priority)
        except OSError:
            # Counted and logged by the spool (rate-limited); not tried again for a while.
            self._spool_retry_at = time.monotonic() + self.settings.spool_retry_s
            return False
        if stored:
            self.stats.points_spooled += len(lines)
        else:
            self.stats.points_dropped_spool_full += len(lines)  # counted and logged by the spool
        return True

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
        if self.spool is None and self.settings.spool_dir is not None:
            self._open_spool()
        if self.spool is not None and self.spool.pending_points:
            log.info("spool holds points from before; replaying", extra={
                "points": self.spool.pending_points, "bytes": self.spool.pending_bytes})
        self._task = asyncio.create_task(self._run(), name="influx-writer")

    def _open_spool(self, *, first: bool = True) -> None:
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
            self._spool_open_error = f"spool {s.spool_dir} is in use by another process"
        except OSError as exc:
            self.stats.spool_open_errors += 1
            self._spool_open_error = f"spool cannot be opened: {type(exc).__name__} " \
                                     f"({exc.strerror or exc})"
        else:
            if self._spool_open_error is not None:
                log.info("spool opened", extra={"spool_dir": str(s.spool_dir)})
            self._spool_open_error = None
            return
        self._spool_retry_at = time.monotonic() + s.spool_retry_s
        log.error("spool cannot be opened; running without it, retrying", extra={
            "spool_dir": str(s.spool_dir), "reason": self._spool_open_error,
            "retry_in_s": s.spool_retry_s})

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
            self._tend_spool(now)
            if self._live_due(now):
                self._last_flush = now
                await self._write_live(*self._take(self.settings.batch_size))
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
        return bool(self.spool_points) and now >= max(self._next_try, self._read_retry_at)

    def _spool_needs_tending(self) -> bool:
        """A configured spool that is not open, or whose writes fail (reads heal by reading)."""
        if self.spool is None:
            return self._spool_wanted and self.settings.spool_dir is not None
        return self.spool.fault is not None and self.spool.fault.op != "read"

    def _tend_spool(self, now: float) -> None:
        """Open a spool that could not be opened; probe a failing one, so that the fault ends
        when the disk has room again even if nothing needs spooling."""
        if now < self._spool_retry_at or not self._spool_needs_tending():
            return
        if self.spool is None:
            self._open_spool(first=False)
        elif not self.spool.probe():
            self._spool_retry_at = now + self.settings.spool_retry_s

    def _next_due(self, now: float) -> float:
        """When the loop has something to do next (monotonic)."""
        due = []
        if self.queue_depth:
            t = (now if self.queue_depth >= self.settings.batch_size
                 else self._last_flush + self.settings.flush_interval_s)
            if self._outage and not self._spool_usable():
                retry_spool = self._spool_retry_at if self.spool is not None else math.inf
                t = max(t, min(self._next_try, retry_spool))
            due.append(t)
        if self.spool_points:
            due.append(max(self._next_try, self._read_retry_at))
        if self._spool_needs_tending():
            due.append(self._spool_retry_at)
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
            await self._deliver(lines)
        except _Retry as exc:
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
        assert self.spool is not None
        try:
            batch = self.spool.peek()
        except OSError:
            # Counted and logged by the spool; the batch stays there, read again later.
            self._read_retry_at = time.monotonic() + self.settings.spool_retry_s
            return
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
            kind = "tls" if _tls_failure(exc) else "unavailable"
            raise _Retry(f"{type(exc).__name__}: {redact(str(exc))}", lines,
                         kind=kind) from None
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
                    raise _Retry(exc.reason, lines[done:], exc.retry_after_s,
                                 exc.kind) from None
                done += len(part)
            return
        kind = "auth" if code in (401, 403) else "unavailable"
        raise _Retry(f"HTTP {code}: {redact(resp.text[:200])}", lines, _retry_after(resp),
                     kind)

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
        if self.spool is not None:
            self._spool_retry_at = 0.0  # one last try, whatever the backoff
            self._spill(*self._take(self.queue_depth))
            if self.spool_points:
                log.warning("storage closed; points kept in the spool for the next start",
                            extra={"points": self.spool_points, "bytes": self.spool_bytes})
            self.spool.close()
        if self.queue_depth:
            lost = self.queue_depth
            self._queue.clear()
            self._pqueue.clear()
            self._drop(lost)
            log.error("storage closed with unwritten points", extra={
                "points": lost, "spool_fault": self.storage_fault})
        await self._client.aclose()
