"""Storage faults, from the outside: a really full (and read-only) disk under the spool, real
byte flips in real spool files, an unknown segment format; real influxd, real Mosquitto.

docs/storage.md §2-3 is the contract: a disk fault is logged (rate-limited), counted, raised
as the gateway's `storage_fault` alarm and shown in gateway_health and /health; the writer
never dies of it and resumes by itself; every point that cannot be kept anywhere is counted.
A damaged spool record costs that record only; a segment that is not ours is moved aside.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_sim.local_stack import LocalInflux, LocalMosquitto, count
from gateway.lineprotocol import Point
from gateway.schema import Measurement, make_point
from gateway.settings import InfluxSettings
from gateway.spool import DiskSpool
from gateway.storage import InfluxWriter
from tests.conformance_boot import Watcher
from tests.helpers import gateway_settings, running_gateway, wait_for

BASE_US = 1_700_000_000_000_000
ALARMS = "boots/v1/_gateway/alarm/#"


def point(i: int, measurement: str = "fill_test") -> Point:
    return Point(measurement, {"boot": f"b{i % 7}"}, {"v": float(i)}, BASE_US + i)


def safety_point(i: int) -> Point:
    """A safety record as the schema builds it: it carries its priority (gateway/schema.py)."""
    return make_point(Measurement.SAFETY_EVENT, {"boot": f"b{i % 7}"}, {"v": float(i)},
                      BASE_US + i)


def stored(influx: LocalInflux, db: str, measurement: str = "fill_test") -> int:
    return count(influx, db, f'SELECT count("v") FROM "{measurement}"')


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses more: a disk really full (ENOSPC)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    f.write(bytes(chunk))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    assert os.statvfs(directory).f_bavail == 0
    return filler


def remount(directory: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(directory)], check=True,
                   capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of the test's own: a filesystem that fills up and can go read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True)
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # a file still open


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == text]


# ---------------------------------------------------------------- a full disk, a whole gateway


@pytest.mark.integration
async def test_full_disk_is_survived_counted_alarmed_and_recovered_without_restart(
    mosquitto: LocalMosquitto, own_influx: LocalInflux, small_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    db = f"full_{secrets.token_hex(4)}"
    cap, batch = 100, 50
    influx = InfluxSettings(url=own_influx.url, database=db, flush_interval_s=0.05,
                            batch_size=batch, queue_max_points=cap, timeout_s=2.0,
                            retry_min_s=0.05, retry_max_s=0.3, spool_retry_s=0.2,
                            spool_dir=small_disk / "spool")
    settings = gateway_settings(mosquitto, own_influx, influx=influx, health_interval_s=3600)
    sent = 0
    async with Watcher("127.0.0.1", mosquitto.port, [ALARMS]) as alarms_seen, \
            running_gateway(settings, own_influx) as gw:
        w = gw.gw.writer
        await wait_for(lambda: w.stats.connected, 10, "influxdb connected")
        await gw.flush()
        assert w.queue_depth == 0
        filler = fill(small_disk)

        # 1. InfluxDB up, disk full, ingest faster than the writer: the overflow cannot go to
        # disk. It is dropped and counted; what memory holds still goes to InfluxDB.
        for _ in range(3 * cap):
            w.submit(point(sent))
            sent += 1
        assert w.task_alive
        await gw.flush()
        assert stored(own_influx, db) == sent - w.stats.points_dropped
        assert w.stats.points_dropped == 2 * cap  # the cap held, everything past it counted
        health = gw.gw.health_fields()
        assert health["spool_fault"] == 1 and health["spool_write_errors"] >= 1
        assert health["points_dropped"] == w.stats.points_dropped
        first = messages(caplog, "spool write failed")
        assert len(first) == 1 and first[0].errno == "ENOSPC"  # type: ignore[attr-defined]
        alarm = await alarms_seen.wait(lambda m: m.payload.get("rule") == "storage_fault", 5,
                                       "the storage_fault alarm on MQTT")
        assert alarm.topic == "boots/v1/_gateway/alarm/_gateway/gw-test"
        assert "ENOSPC" in alarm.payload["detail"] and alarm.payload["severity"] == "medium"
        listed = (await gw.api.get("/api/v1/alarms")).json()
        assert [(a["clinic"], a["device"], a["rule"]) for a in listed] == [
            ("_gateway", "gw-test", "storage_fault")]
        h = (await gw.api.get("/health")).json()
        assert h["status"] == "degraded" and h["storage_fault"] and h["influx_connected"]

        # 2. InfluxDB dies as well: points wait in memory (bounded), the rest is counted.
        own_influx.kill()
        for _ in range(6):
            for _ in range(cap // 2):
                w.submit(point(sent))
                sent += 1
            await wait_for(lambda: not w.stats.connected, 10, "the writer to see the outage")
        await wait_for(lambda: w.health_counters()["spool_write_errors"] >= 3, 10,
                       "the spool retried, and failing again")
        assert w.task_alive and w.queue_depth <= cap + batch
        assert w.spool_points == 0
        assert len(messages(caplog, "spool write failed")) == 1  # rate-limited: one per episode

        # 3. Space comes back: the spool works again without a restart; the fault ends.
        filler.unlink()
        await wait_for(lambda: w.storage_fault is None, 10, "the spool fault to end")
        await wait_for(lambda: w.spool_points > 0 and w.queue_depth == 0, 10,
                       "memory moved to the spool")
        await wait_for(lambda: any(m.payload.get("rule") == "storage_fault"
                                   and m.payload.get("resolved") for m in alarms_seen.messages),
                       5, "the alarm resolved")
        assert messages(caplog, "spool writes succeed again")

        # 4. InfluxDB back: the spool replays; nothing lost that was not counted.
        written_before = w.stats.points_written
        own_influx.start()
        await gw.flush()
        assert w.stats.points_written > written_before
        assert w.task_alive and w.stats.task_restarts == 0
        dropped = w.stats.points_dropped
        assert dropped == w.stats.points_dropped_spool_error > 2 * cap
        assert stored(own_influx, db) + dropped == sent
        # The alarm's own record made it to InfluxDB through all of it: raised and resolved.
        rows = own_influx.query(db, "SELECT \"resolved\" FROM \"alarm\" WHERE "
                                "\"rule\" = 'storage_fault'")
        assert sorted(r[1] for r in rows[0]["values"]) == [False, True]
        h = (await gw.api.get("/health")).json()
        assert h["status"] == "ok" and not h["storage_fault"]


@pytest.mark.integration
async def test_writer_task_outlives_a_full_disk_in_an_outage_and_resumes_by_itself(
    own_influx: LocalInflux, small_disk: Path,
) -> None:
    """The reported failure: ENOSPC on the spool while InfluxDB is down ended the writer
    task, so nothing was written any more once InfluxDB was back, until a restart."""
    db = f"task_{secrets.token_hex(4)}"
    writer = InfluxWriter(InfluxSettings(url=own_influx.url, database=db,
                                         flush_interval_s=0.05, batch_size=50, timeout_s=2.0,
                                         retry_min_s=0.05, retry_max_s=0.3, spool_retry_s=0.2,
                                         spool_dir=small_disk / "spool"))
    await writer.ensure_database()
    writer.start()
    try:
        filler = fill(small_disk)
        own_influx.kill()
        for i in range(120):  # below the memory cap: none of it needs to be dropped
            writer.submit(point(i))
        task = writer._task
        assert task is not None
        await wait_for(lambda: task.done() or writer.stats.write_errors >= 3, 10,
                       "writes failing, retried")
        assert not task.done(), task.exception()  # the bug: ENOSPC had ended the task
        await wait_for(lambda: writer.health_counters()["spool_write_errors"] >= 1, 10,
                       "a spill refused by the full disk")
        filler.unlink()
        own_influx.start()
        assert await writer.flush(15)
        assert not task.done()
    finally:
        await writer.close()
    assert stored(own_influx, db) == 120 and writer.stats.points_dropped == 0


@pytest.mark.integration
async def test_safety_records_keep_their_place_when_nothing_else_can_keep_points(
    influx: LocalInflux, small_disk: Path,
) -> None:
    """Memory full of telemetry, the spool's disk full: a safety record pushes out the oldest
    telemetry point (counted) and is never the one dropped."""
    db = f"prio_{secrets.token_hex(4)}"
    spool_dir = small_disk / "spool"
    DiskSpool(spool_dir, 1 << 20).close()
    fill(small_disk)
    writer = InfluxWriter(InfluxSettings(url=influx.url, database=db, flush_interval_s=0.05,
                                         batch_size=1000, queue_max_points=100,
                                         spool_retry_s=0.2, spool_dir=spool_dir))
    await writer.ensure_database()
    writer.start()  # its first batch is due only after flush_interval_s: submits come first
    try:
        for i in range(150):  # 100 kept, 50 dropped: the spool cannot take the overflow
            writer.submit(point(i))
        for i in range(20):
            writer.submit(safety_point(1000 + i))
        assert await writer.flush(10)
    finally:
        await writer.close()
    assert stored(influx, db, "safety_event") == 20
    assert stored(influx, db) == 80  # the 20 oldest telemetry points gave way
    assert writer.stats.points_dropped == 70
    got = {row[1] for row in influx.query(db, 'SELECT "v" FROM "fill_test"')[0]["values"]}
    assert got == {float(i) for i in range(20, 100)}


# ---------------------------------------------------------------- read-only, writer alone


@pytest.mark.integration
async def test_read_only_spool_disk_is_counted_and_healed_while_influxdb_takes_the_writes(
    influx: LocalInflux, small_disk: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    db = f"ro_{secrets.token_hex(4)}"
    settings = InfluxSettings(url=influx.url, database=db, flush_interval_s=0.05,
                              batch_size=50, queue_max_points=100, spool_retry_s=0.2,
                              spool_dir=small_disk / "spool")
    writer = InfluxWriter(settings)
    await writer.ensure_database()
    writer.start()
    sent = 0
    try:
        remount(small_disk, "ro")
        for _ in range(250):  # past the cap at once: a spill, refused by the disk
            writer.submit(point(sent))
            sent += 1
        assert await writer.flush(10)
        assert writer.storage_fault is not None and "EROFS" in writer.storage_fault
        assert writer.health_counters()["spool_write_errors"] >= 1
        assert stored(influx, db) + writer.stats.points_dropped == sent
        remount(small_disk, "rw")
        await wait_for(lambda: writer.storage_fault is None, 10, "the probe to see rw again")
        for _ in range(250):  # the spool takes the overflow again: nothing dropped now
            writer.submit(point(sent))
            sent += 1
        assert await writer.flush(10)
    finally:
        await writer.close()
    assert writer.stats.points_spooled > 0
    assert stored(influx, db) + writer.stats.points_dropped == sent
    assert writer.stats.points_dropped == 150  # all of it in the read-only phase


@pytest.mark.integration
async def test_a_spool_that_cannot_be_opened_does_not_stop_the_writer(
    influx: LocalInflux, small_disk: Path,
) -> None:
    """A read-only disk at startup: the gateway runs (the watchdog must), writes go to
    InfluxDB, the fault shows; once the disk is writable the spool is opened by itself."""
    spool_dir = small_disk / "spool"  # not there yet, and it cannot be made
    remount(small_disk, "ro")
    db = f"open_{secrets.token_hex(4)}"
    writer = InfluxWriter(InfluxSettings(url=influx.url, database=db, flush_interval_s=0.05,
                                         spool_retry_s=0.2, spool_dir=spool_dir))
    await writer.ensure_database()
    writer.start()
    try:
        assert writer.spool is None and writer.storage_fault is not None
        assert "EROFS" in writer.storage_fault or "Read-only" in writer.storage_fault
        for i in range(20):
            writer.submit(point(i))
        assert await writer.flush(10)
        assert stored(influx, db) == 20
        remount(small_disk, "rw")
        await wait_for(lambda: writer.spool is not None, 10, "the spool opened")
        assert writer.storage_fault is None
        assert writer.health_counters()["spool_write_errors"] >= 1
    finally:
        await writer.close()


# ---------------------------------------------------------------- damaged spool files


def spool_of_batches(directory: Path, batches: int = 10, per: int = 10,
                     segment_bytes: int = 8 << 20) -> list[int]:
    """Batches as the writer spools them; the byte offset where each record starts."""
    spool = DiskSpool(directory, 1 << 24, segment_bytes=segment_bytes)
    for b in range(batches):
        lines = [point(b * per + j).encode().encode() for j in range(per)]
        assert spool.append(b"\n".join(lines), per)
    offsets = [rec.offset for rec in spool._index]
    spool.close()
    return offsets


async def replay(influx: LocalInflux, directory: Path) -> tuple[str, InfluxWriter]:
    """A real writer started on the spool directory: what reaches influxd."""
    db = f"replay_{secrets.token_hex(4)}"
    writer = InfluxWriter(InfluxSettings(url=influx.url, database=db, flush_interval_s=0.05,
                                         spool_dir=directory))
    await writer.ensure_database()
    writer.start()
    try:
        assert await writer.flush(10)
    finally:
        await writer.close()
    return db, writer


# Where the flipped byte lands in record 4: magic, points, body length, body crc, the
# header's own crc (all header fields), the body.
FLIPS = {"magic": 0, "points": 6, "length": 9, "body_crc": 13, "header_crc": 18,
         "body": 40}


@pytest.mark.integration
@pytest.mark.parametrize("where", sorted(FLIPS))
async def test_one_flipped_byte_costs_that_batch_only(
    influx: LocalInflux, tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture,
) -> None:
    spool_dir = tmp_path / "spool"
    offsets = spool_of_batches(spool_dir)
    (seg,) = spool_dir.glob("*.seg")
    data = bytearray(seg.read_bytes())
    data[offsets[3] + FLIPS[where]] ^= 0x20  # batch 4 of 10
    seg.write_bytes(bytes(data))
    caplog.set_level(logging.ERROR, logger="gateway.spool")
    db, writer = await replay(influx, spool_dir)
    assert stored(influx, db) == 90  # batches 1-3 and 5-10
    got = {row[1] for row in influx.query(db, 'SELECT "v" FROM "fill_test"')[0]["values"]}
    assert got == {float(i) for i in range(100) if not 30 <= i < 40}
    assert writer.spool is not None and writer.spool.stats.records_corrupt == 1
    assert writer.health_counters()["spool_records_corrupt"] == 1
    assert messages(caplog, "corrupt spool records skipped; the intact records after them "
                    "are kept")


@pytest.mark.integration
@pytest.mark.parametrize("which", ["middle", "last"])
async def test_a_bad_header_never_costs_another_segment(
    influx: LocalInflux, tmp_path: Path, which: str,
) -> None:
    """Three segments of records; the first header of one of them is damaged (a length far
    past the end of the file): every other record of every segment is replayed."""
    spool_dir = tmp_path / "spool"
    spool_of_batches(spool_dir, batches=9, segment_bytes=1)  # one record per segment...
    segs = sorted(spool_dir.glob("*.seg"))
    # ...merged three by three, as a long-running spool holds them
    spool_dir.joinpath("cursor").unlink(missing_ok=True)
    groups = [segs[i:i + 3] for i in (0, 3, 6)]
    for group in groups:
        group[0].write_bytes(b"".join(p.read_bytes() for p in group))
        for p in group[1:]:
            p.unlink()
    victim = groups[1 if which == "middle" else 2][0]
    data = bytearray(victim.read_bytes())
    data[9:13] = struct.pack("<I", 0x7FFFFFF0)  # body length: far past the end
    victim.write_bytes(bytes(data))
    db, writer = await replay(influx, spool_dir)
    lost_batch = 3 if which == "middle" else 6
    got = {row[1] for row in influx.query(db, 'SELECT "v" FROM "fill_test"')[0]["values"]}
    assert got == {float(i) for i in range(90) if i // 10 != lost_batch}
    assert writer.spool is not None and writer.spool.stats.records_corrupt == 1
    assert writer.spool.stats.segments_quarantined == 0


def v1_record(body: bytes, points: int) -> bytes:
    """The record format gateways wrote before issue 12 (magic BSP1, no header crc)."""
    return struct.pack("<4sBIII", b"BSP1", 0, points, len(body), zlib.crc32(body)) + body


@pytest.mark.integration
async def test_unknown_segment_format_is_moved_aside_not_wiped(
    influx: LocalInflux, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    spool_dir = tmp_path / "spool"
    spool_of_batches(spool_dir, batches=2)
    future = spool_dir / f"{99:020d}.seg"  # the newest: what a torn tail would be cut from
    content = b"BSP9" + os.urandom(200)  # a format version this gateway does not know
    future.write_bytes(content)
    garbage = spool_dir / f"{98:020d}.seg"
    garbage_content = b"\x00" * 100 + b"not a spool segment"
    garbage.write_bytes(garbage_content)
    caplog.set_level(logging.ERROR, logger="gateway.spool")
    db, writer = await replay(influx, spool_dir)
    assert stored(influx, db) == 20  # the segment of our format is replayed
    moved = spool_dir / "quarantine"
    assert (moved / future.name).read_bytes() == content  # moved, byte for byte
    assert (moved / garbage.name).read_bytes() == garbage_content
    assert not future.exists() and not garbage.exists()
    assert writer.spool is not None and writer.spool.stats.segments_quarantined == 2
    assert writer.health_counters()["spool_segments_quarantined"] == 2
    assert len(messages(caplog, "spool segment moved to quarantine")) == 2
    # A restart leaves the quarantine alone.
    DiskSpool(spool_dir, 1 << 20).close()
    assert (moved / future.name).read_bytes() == content


@pytest.mark.integration
async def test_segments_of_the_previous_format_are_replayed(
    influx: LocalInflux, tmp_path: Path,
) -> None:
    """Backward compatible: a spool left by a gateway of the BSP1 format is read."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    records = []
    for b in range(3):
        lines = [point(b * 10 + j).encode().encode() for j in range(10)]
        records.append(v1_record(b"\n".join(lines), 10))
    spool_dir.joinpath(f"{1:020d}.seg").write_bytes(b"".join(records))
    db, _ = await replay(influx, spool_dir)
    assert stored(influx, db) == 30


# ---------------------------------------------------------------- the decoder, fuzzed

BODIES = st.lists(st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"BSP", b"bsp")),
                  min_size=1, max_size=8)


def segment(bodies: list[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    """A valid segment of these bodies, written by the spool; (offset, size) of each record."""
    out, spans = b"", []
    for body in bodies:
        head = struct.pack("<4sBIII", b"BSP2", 0, 1, len(body), zlib.crc32(body))
        record = head + struct.pack("<I", zlib.crc32(head)) + body
        spans.append((len(out), len(record)))
        out += record
    return out, spans


def checks_out(data: bytes, offset: int, size: int) -> bool:
    """The record at offset, verified from the format's description, not the spool's code."""
    chunk = data[offset:offset + size]
    if chunk[:4] == b"BSP2":
        _, _, _, length, body_crc, header_crc = struct.unpack_from("<4sBIIII", chunk)
        return (size == 21 + length and zlib.crc32(chunk[:17]) == header_crc
                and zlib.crc32(chunk[21:]) == body_crc)
    if chunk[:4] == b"BSP1":
        _, _, _, length, body_crc = struct.unpack_from("<4sBIII", chunk)
        return size == 17 + length and zlib.crc32(chunk[17:]) == body_crc
    return False


def _decoder_property(data: bytes, untouched: list[tuple[int, int]]) -> None:
    from gateway.spool import scan_records  # the decoder of this version

    scan = scan_records(data)
    end = 0
    for rec in scan.records:
        assert rec.offset >= end and rec.offset + rec.size <= len(data)  # in order, inside
        assert checks_out(data, rec.offset, rec.size)
        end = rec.offset + rec.size
    found = {(r.offset, r.size) for r in scan.records}
    assert set(untouched) <= found  # every intact record is kept


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES, st.data())
def test_decoder_keeps_every_intact_record_and_returns_no_bad_one(
    bodies: list[bytes], data: st.DataObject,
) -> None:
    seg, spans = segment(bodies)
    damage = data.draw(st.sampled_from(["flip", "truncate", "insert", "random", "none"]))
    if damage == "random":
        _decoder_property(data.draw(st.binary(max_size=400)), [])
        return
    if damage == "none":
        _decoder_property(seg, spans)
        return
    at = data.draw(st.integers(0, len(seg) - 1))
    if damage == "flip":
        bit = data.draw(st.integers(0, 7))
        damaged = seg[:at] + bytes([seg[at] ^ (1 << bit)]) + seg[at + 1:]
        kept = [(o, n) for o, n in spans if not o <= at < o + n]
    elif damage == "truncate":
        damaged = seg[:at]
        kept = [(o, n) for o, n in spans if o + n <= at]
    else:
        junk = data.draw(st.binary(min_size=1, max_size=40))
        damaged = seg[:at] + junk + seg[at:]
        kept = [(o if o + n <= at else o + len(junk), n) for o, n in spans
                if o + n <= at or o >= at]
    _decoder_property(damaged, kept)
