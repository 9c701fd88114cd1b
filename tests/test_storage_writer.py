"""The storage writer's policies: bad points isolated (real influxd), retries honour Retry-After."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import httpx
import pytest

from device_sim.local_stack import LocalInflux, count
from gateway.lineprotocol import Point
from gateway.schema import Measurement, make_point
from gateway.settings import InfluxSettings
from gateway.storage import InfluxWriter


@pytest.mark.integration
async def test_one_bad_point_is_isolated_and_the_rest_written(
    influx: LocalInflux, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = f"bad_{secrets.token_hex(4)}"
    writer = InfluxWriter(InfluxSettings(url=influx.url, database=db, flush_interval_s=0.05,
                                         spool_dir=tmp_path / "spool"))
    await writer.ensure_database()
    writer.start()
    try:
        writer.submit(Point("m", {"boot": "a"}, {"v": 1.0}, 1_000))
        assert await writer.flush(10)
        # "v" is a float field now: InfluxDB refuses a string for it (a type conflict).
        for i in range(20):
            writer.submit(Point("m", {"boot": "a"}, {"v": float(i)}, 2_000 + i))
        writer.submit(Point("m", {"boot": "b"}, {"v": "not a number"}, 3_000))
        for i in range(20):
            writer.submit(Point("m", {"boot": "c"}, {"v": float(i)}, 4_000 + i))
        with caplog.at_level(logging.ERROR, logger="gateway.storage"):
            assert await writer.flush(10)
    finally:
        await writer.close()
    assert count(influx, db, "SELECT count(v) FROM m") == 41
    assert writer.stats.points_refused == 1
    assert writer.stats.points_written == 41
    assert writer.spool_points == 0
    refused = [r for r in caplog.records if r.getMessage() == "influxdb refused a point"]
    assert len(refused) == 1
    assert "boot=b" in refused[0].line and "conflict" in refused[0].reason


@pytest.mark.integration
async def test_the_writer_takes_priority_from_the_point_not_its_measurement_name(
    influx: LocalInflux
) -> None:
    """Memory full and no spool: a point marked priority makes room by dropping the oldest
    telemetry, whatever it is called; a bare point named like a safety record is dropped as the
    newest telemetry would be; the schema's own safety-record point is kept."""
    db = f"prio_{secrets.token_hex(4)}"
    writer = InfluxWriter(InfluxSettings(url=influx.url, database=db, flush_interval_s=60,
                                         batch_size=1000, queue_max_points=100, spool_dir=None))
    await writer.ensure_database()
    writer.start()
    try:
        for i in range(100):
            writer.submit(Point("m", {"boot": "a"}, {"v": float(i)}, 1_000 + i))
        writer.submit(Point("flagged", {"boot": "a"}, {"v": 1.0}, 2_000, priority=True))
        writer.submit(Point(Measurement.SAFETY_EVENT, {"boot": "a"}, {"v": 1.0}, 3_000))
        writer.submit(make_point(Measurement.SAFETY_EVENT, {"boot": "b"}, {"v": 1.0}, 4_000))
        assert writer.queue_depth == 100
        assert await writer.flush(10)
    finally:
        await writer.close()
    assert count(influx, db, "SELECT count(v) FROM m") == 98  # the two oldest made room
    assert count(influx, db, "SELECT count(v) FROM flagged") == 1
    assert count(influx, db, "SELECT count(v) FROM safety_event WHERE boot = 'b'") == 1
    assert count(influx, db, "SELECT count(v) FROM safety_event WHERE boot = 'a'") == 0
    assert writer.stats.points_dropped_queue_full == 3
    assert writer.stats.points_written == 100


def answering(status: int, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers or {}, text="busy")
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://influx")


@pytest.mark.parametrize(("status", "headers", "at_least_s"), [
    (503, {"Retry-After": "7"}, 7.0),
    (429, {"Retry-After": "12"}, 12.0),
    (500, {}, 0.1),
])
async def test_retryable_answers_spool_the_batch_and_back_off(
    tmp_path: Path, status: int, headers: dict[str, str], at_least_s: float
) -> None:
    """An HTTP policy test: no database involved, the answer is the point."""
    settings = InfluxSettings(url="http://influx", allow_plaintext=True, flush_interval_s=0.05,
                              retry_min_s=0.1, spool_dir=tmp_path / "spool")
    writer = InfluxWriter(settings, client=answering(status, headers))
    writer.start()
    try:
        writer.submit(Point("m", {"boot": "a"}, {"v": 1.0}, 1_000))
        assert not await writer.flush(0.5)
        assert writer.in_outage and writer.spool_points == 1
        assert writer._next_try - time.monotonic() >= at_least_s - 0.6
        assert writer.stats.write_errors >= 1 and writer.stats.points_written == 0
    finally:
        await writer.close()
    # Closed in an outage: the point stays on disk for the next start.
    again = InfluxWriter(settings, client=answering(204))
    again.start()
    try:
        assert await again.flush(5)
        assert again.stats.points_replayed == 1 and again.spool_points == 0
    finally:
        await again.close()


@pytest.mark.integration
async def test_past_spill_after_points_the_oldest_go_to_disk_and_nothing_is_lost(
    influx: LocalInflux, tmp_path: Path
) -> None:
    """InfluxDB slower than ingest (here: not yet asked) costs disk, not memory: memory holds
    spill_after_points, far below queue_max_points, and every point still arrives."""
    db = f"spill_{secrets.token_hex(4)}"
    writer = InfluxWriter(InfluxSettings(
        url=influx.url, database=db, flush_interval_s=60, batch_size=50,
        spill_after_points=100, queue_max_points=100_000, spool_dir=tmp_path / "spool"))
    await writer.ensure_database()
    writer.start()
    try:
        for i in range(1000):  # no await between them: the writer cannot write any yet
            writer.submit(Point("m", {"boot": "a"}, {"v": float(i)}, 1_000 + i))
        assert writer.stats.queue_peak == 100
        assert writer.queue_depth <= 100
        assert writer.spool_points == 1000 - writer.queue_depth
        assert await writer.flush(20)
    finally:
        await writer.close()
    assert count(influx, db, "SELECT count(v) FROM m") == 1000
    assert writer.stats.points_dropped == 0
    assert writer.stats.points_replayed == writer.stats.points_spooled >= 900


@pytest.mark.integration
async def test_without_a_spool_memory_holds_up_to_queue_max_points(influx: LocalInflux) -> None:
    """spill_after_points is the bound only while there is a disk to spill to: without one,
    memory keeps everything up to queue_max_points rather than dropping at the lower bound."""
    db = f"nospill_{secrets.token_hex(4)}"
    writer = InfluxWriter(InfluxSettings(
        url=influx.url, database=db, flush_interval_s=60, batch_size=5000,
        spill_after_points=100, queue_max_points=1000, spool_dir=None))
    await writer.ensure_database()
    writer.start()
    try:
        for i in range(1200):
            writer.submit(Point("m", {"boot": "a"}, {"v": float(i)}, 1_000 + i))
        assert writer.queue_depth == 1000
        assert writer.stats.points_dropped_queue_full == 200
        assert await writer.flush(20)
    finally:
        await writer.close()
    assert count(influx, db, "SELECT count(v) FROM m") == 1000
