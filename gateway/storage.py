"""Async batching writer to InfluxDB's v1-compatible `/write` endpoint.

`submit()` never blocks and never awaits: the safety path hands points over and moves on.
A background task batches by size and time and retries failed writes with exponential
backoff, keeping the batch. Points refused on purpose (queue full, unencodable) are counted
and logged, never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass

import httpx

from gateway.lineprotocol import Point, encode_batch
from gateway.settings import InfluxSettings

log = logging.getLogger(__name__)


@dataclass
class WriterStats:
    points_queued: int = 0
    points_written: int = 0
    points_dropped_queue_full: int = 0
    points_refused: int = 0
    batches_written: int = 0
    write_errors: int = 0
    last_write_ms: float = 0.0
    connected: bool = False


class InfluxWriter:
    def __init__(self, settings: InfluxSettings, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        headers = {}
        if settings.token is not None:
            headers["Authorization"] = f"Token {settings.token.get_secret_value()}"
        self._client = client or httpx.AsyncClient(
            base_url=settings.url, headers=headers, timeout=settings.timeout_s
        )
        self._queue: deque[Point] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.stats = WriterStats()
        self._params = {"db": settings.database, "precision": "ms"}
        if settings.retention_policy:
            self._params["rp"] = settings.retention_policy

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def spool_bytes(self) -> int:
        return 0

    def submit(self, point: Point) -> None:
        if len(self._queue) >= self.settings.queue_max_points:
            self.stats.points_dropped_queue_full += 1
            if self.stats.points_dropped_queue_full % 1000 == 1:
                log.error(
                    "storage queue full, point dropped",
                    extra={"dropped_total": self.stats.points_dropped_queue_full,
                           "queue_max": self.settings.queue_max_points},
                )
            return
        self._queue.append(point)
        self.stats.points_queued += 1
        self._idle.clear()
        if len(self._queue) >= self.settings.batch_size:
            self._wake.set()

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
        self._task = asyncio.create_task(self._run(), name="influx-writer")

    async def _run(self) -> None:
        backoff = 0.0
        while not self._stopping:
            if not self._queue:
                self._idle.set()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.flush_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            while self._queue:
                n = min(self.settings.batch_size, len(self._queue))
                batch = [self._queue[i] for i in range(n)]
                if await self._write(batch):
                    for _ in range(n):
                        self._queue.popleft()
                    backoff = 0.0
                else:
                    backoff = min(self.settings.retry_max_s, max(0.2, backoff * 2))
                    await asyncio.sleep(backoff * random.uniform(0.8, 1.2))

    async def _write(self, batch: list[Point]) -> bool:
        body, refused = encode_batch(batch)
        for point, reason in refused:
            self.stats.points_refused += 1
            log.error("point refused before write", extra={
                "measurement": point.measurement, "tags": dict(point.tags), "reason": reason})
        if not body:
            return True
        t0 = time.perf_counter()
        try:
            resp = await self._client.post("/write", params=self._params, content=body)
        except httpx.HTTPError as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return False
        self.stats.last_write_ms = (time.perf_counter() - t0) * 1000
        if resp.status_code == 204:
            self.stats.points_written += len(batch) - len(refused)
            self.stats.batches_written += 1
            if not self.stats.connected:
                log.info("influxdb writes succeed", extra={"url": self.settings.url})
            self.stats.connected = True
            return True
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            self._failed(f"HTTP {resp.status_code}: {resp.text[:200]}")
            return False
        # 4xx other than throttling: the data itself is refused; retrying cannot help.
        self.stats.points_refused += len(batch) - len(refused)
        log.error("influxdb refused a batch", extra={
            "status": resp.status_code, "body": resp.text[:500], "points": len(batch)})
        return True

    def _failed(self, reason: str) -> None:
        self.stats.write_errors += 1
        if self.stats.connected or self.stats.write_errors == 1:
            log.warning("influxdb write failed, will retry", extra={
                "reason": reason, "queue_depth": len(self._queue)})
        self.stats.connected = False

    async def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (bounded by timeout), then stop; what is left is reported."""
        if not await self.flush(timeout) and self._queue:
            log.error("storage closed with unwritten points", extra={"points": len(self._queue)})
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()
