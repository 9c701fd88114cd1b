"""Where points wait (gateway/storage_buffer.py): memory first and safety records first, the
disk spool behind; with no spool, a memory-only buffer that keeps every line it is given."""

from __future__ import annotations

from pathlib import Path

from gateway.settings import InfluxSettings
from gateway.spool import DiskSpool
from gateway.storage import WriterStats
from gateway.storage_buffer import StorageBuffer


def settings(spool_dir: Path | None) -> InfluxSettings:
    return InfluxSettings(url="http://influx", allow_plaintext=True, spool_dir=spool_dir)


def test_memory_hands_out_safety_records_first_and_takes_back_in_order() -> None:
    buf = StorageBuffer(settings(None), WriterStats())
    for i in range(4):
        buf.add(b"t%d" % i, priority=False)
        buf.add(b"s%d" % i, priority=True)
    priority, normal = buf.take(6)
    assert priority == [b"s0", b"s1", b"s2", b"s3"] and normal == [b"t0", b"t1"]
    buf.requeue(priority[2:], normal[1:])
    assert buf.take(10) == ([b"s2", b"s3"], [b"t1", b"t2", b"t3"])


def test_without_a_spool_nothing_leaves_memory_and_nothing_is_a_fault() -> None:
    stats = WriterStats()
    buf = StorageBuffer(settings(None), stats)
    buf.add(b"t0", priority=False)
    buf.add(b"s0", priority=True)
    assert not buf.spill(*buf.take(2))
    assert buf.take(2) == ([b"s0"], [b"t0"])  # back in memory, in order
    assert buf.fault is None and buf.spool_points == 0 and not buf.needs_tending()
    assert stats.points_spooled == 0


def test_spilled_lines_come_back_from_disk_safety_records_first(tmp_path: Path) -> None:
    stats = WriterStats()
    buf = StorageBuffer(settings(tmp_path), stats, DiskSpool(tmp_path, 1 << 20))
    assert buf.spill([b"s0"], [b"t0", b"t1"])
    assert stats.points_spooled == 3 and buf.spool_points == 3 and buf.memory_depth == 0
    first = buf.peek()
    assert first is not None and first.priority and first.body == b"s0"
    buf.accept(first)
    second = buf.peek()
    assert second is not None and second.body == b"t0\nt1"
    buf.accept(second)
    assert buf.peek() is None and buf.spool_points == 0
    assert buf.spool is not None
    buf.spool.close()
