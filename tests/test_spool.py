"""DiskSpool: order, restart, cap policy, crash recovery; pure, on tmp_path, no servers."""

from __future__ import annotations

import logging
import struct
import tempfile
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.spool import HEADER_SIZE, DiskSpool, SpooledBatch, SpoolLocked


def release_lock_as_on_exit(spool: DiskSpool) -> None:
    """What the OS does for a killed process: its file descriptors, and so its lock, go."""
    spool._lockfile.close()

def lp(i: int, lines: int = 3) -> bytes:
    return b"\n".join(b"pressure,boot=b%03d mmhg=%di %d" % (i, j, 1000 + j) for j in range(lines))


REC = HEADER_SIZE + len(lp(0))  # every lp(i) for i < 1000 has the same size


def drain(spool: DiskSpool) -> list[SpooledBatch]:
    out = []
    while (batch := spool.peek()) is not None:
        spool.commit(batch)
        out.append(batch)
    return out


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_empty_spool_peek_is_none(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "spool", 10_000)
    assert spool.peek() is None
    assert (spool.pending_batches, spool.pending_points, spool.pending_bytes) == (0, 0, 0)
    assert spool.append(lp(1), 3)
    spool.commit(spool.peek())  # type: ignore[arg-type]
    assert spool.peek() is None


def test_order_and_content_across_segments(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000, segment_bytes=3 * REC)
    for i in range(20):
        assert spool.append(lp(i), 3, priority=i % 4 == 0)
    assert len(segments(tmp_path)) == 7  # 3 records per segment
    assert spool.pending_batches == 20
    assert spool.pending_points == 60
    assert spool.pending_bytes == 20 * REC
    first = spool.peek()
    assert first is not None and spool.peek() == first  # stable until committed
    out = drain(spool)
    assert [b.body for b in out] == [lp(i) for i in range(20)]
    assert [b.priority for b in out] == [i % 4 == 0 for i in range(20)]
    assert all(b.points == 3 for b in out)
    assert (spool.stats.batches_out, spool.stats.points_out) == (20, 60)
    assert (spool.stats.batches_in, spool.stats.points_in) == (20, 60)
    assert spool.pending_bytes == 0


def test_restart_resumes_after_last_commit(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000, segment_bytes=4 * REC)
    for i in range(10):
        spool.append(lp(i, 1 + i % 3), 1 + i % 3)
    for _ in range(4):
        spool.commit(spool.peek())  # type: ignore[arg-type]
    spool.close()

    spool = DiskSpool(tmp_path, 100_000, segment_bytes=4 * REC)
    assert spool.pending_batches == 6
    assert spool.pending_points == sum(1 + i % 3 for i in range(4, 10))
    assert spool.pending_bytes == sum(HEADER_SIZE + len(lp(i, 1 + i % 3)) for i in range(4, 10))
    assert spool.append(lp(10), 3)  # new data goes after what was spooled before
    assert [b.body for b in drain(spool)] == [lp(i, 1 + i % 3) for i in range(4, 10)] + [lp(10)]


def test_restart_after_kill_without_close(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000)
    for i in range(3):
        spool.append(lp(i), 3)
    spool.commit(spool.peek())  # type: ignore[arg-type]
    release_lock_as_on_exit(spool)
    again = DiskSpool(tmp_path, 100_000)  # the first one was never closed
    assert [b.body for b in drain(again)] == [lp(1), lp(2)]
    spool.close()


def test_second_process_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000)
    with pytest.raises(SpoolLocked):
        DiskSpool(tmp_path, 100_000)
    spool.close()
    DiskSpool(tmp_path, 100_000).close()  # free again once closed


def test_consumed_segments_are_deleted(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000, segment_bytes=2 * REC)
    for i in range(6):
        spool.append(lp(i), 3)
    first, *rest = segments(tmp_path)
    assert len(rest) == 2
    spool.commit(spool.peek())  # type: ignore[arg-type]
    assert first.exists()  # half consumed
    spool.commit(spool.peek())  # type: ignore[arg-type]
    assert not first.exists()
    assert segments(tmp_path) == rest
    drain(spool)
    assert segments(tmp_path) == []
    spool.close()

    spool = DiskSpool(tmp_path, 100_000, segment_bytes=2 * REC)
    assert spool.pending_batches == 0 and spool.peek() is None
    spool.append(lp(7), 3)
    assert segments(tmp_path)[0].name > rest[-1].name  # numbers never reused
    assert [b.body for b in drain(spool)] == [lp(7)]


def test_crash_between_cursor_save_and_segment_delete(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000, segment_bytes=2 * REC)
    for i in range(4):
        spool.append(lp(i), 3)
    first = segments(tmp_path)[0]
    saved = first.read_bytes()
    for _ in range(3):  # the cursor moves into the second segment
        spool.commit(spool.peek())  # type: ignore[arg-type]
    spool.close()
    first.write_bytes(saved)  # as if killed before the unlink
    spool = DiskSpool(tmp_path, 100_000, segment_bytes=2 * REC)
    assert not first.exists()
    assert spool.pending_batches == 1
    assert [b.body for b in drain(spool)] == [lp(3)]


def test_cap_refuses_newest_normal_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = DiskSpool(tmp_path, 5 * REC, priority_reserve_bytes=0)
    for i in range(5):
        assert spool.append(lp(i), 3)
    with caplog.at_level(logging.ERROR, logger="gateway.spool"):
        assert not spool.append(lp(5), 3)
        assert not spool.append(lp(6), 3)
    s = spool.stats
    assert (s.batches_refused, s.points_refused, s.bytes_refused) == (2, 6, 2 * len(lp(0)))
    assert spool.pending_batches == 5 and spool.pending_bytes == 5 * REC
    refusals = [r for r in caplog.records if r.getMessage() == "spool full, batch refused"]
    assert len(refusals) == 1  # rate-limited: first, then every 1000th
    assert refusals[0].batches_refused == 1  # type: ignore[attr-defined]
    spool.commit(spool.peek())  # type: ignore[arg-type]
    assert spool.append(lp(7), 3)  # room again
    assert [b.body for b in drain(spool)] == [lp(i) for i in (1, 2, 3, 4, 7)]


def test_priority_uses_reserve_then_is_refused(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 3 * REC, priority_reserve_bytes=2 * REC)
    for i in range(3):
        assert spool.append(lp(i), 3)
    assert not spool.append(lp(3), 3)
    assert spool.append(lp(4), 3, priority=True)
    assert spool.append(lp(5), 3, priority=True)
    assert not spool.append(lp(6), 3, priority=True)
    assert not spool.append(lp(7), 3)
    assert spool.stats.batches_refused == 3
    assert spool.stats.points_refused == 9
    assert spool.pending_bytes == 5 * REC
    assert [(b.body, b.priority) for b in drain(spool)] == [
        (lp(0), False), (lp(1), False), (lp(2), False), (lp(4), True), (lp(5), True)]


def test_default_priority_reserve(tmp_path: Path) -> None:
    assert DiskSpool(tmp_path / "a", 100 * 2**20).priority_reserve_bytes == 5 * 2**20
    assert DiskSpool(tmp_path / "b", 2**20).priority_reserve_bytes == 2**20


@pytest.mark.parametrize("damage", ["cut_body", "cut_header", "cut_to_header", "garbage",
                                    "zeros", "bad_crc_last"])
def test_torn_tail_is_dropped_and_earlier_records_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    spool = DiskSpool(tmp_path, 100_000)
    for i in range(3):
        spool.append(lp(i), 3)
    spool.close()
    seg = segments(tmp_path)[-1]
    data = seg.read_bytes()
    assert len(data) == 3 * REC
    damaged = {
        "cut_body": data[:-5],
        "cut_header": data[: 2 * REC + 7],
        "cut_to_header": data[: 2 * REC + HEADER_SIZE],
        "garbage": data + b"\x00garbage\xff" * 3,
        "zeros": data + bytes(4096),
        "bad_crc_last": data[:-1] + bytes([data[-1] ^ 0xFF]),
    }[damage]
    seg.write_bytes(damaged)
    kept = 2 if damage in ("cut_body", "cut_header", "cut_to_header", "bad_crc_last") else 3

    with caplog.at_level(logging.WARNING, logger="gateway.spool"):
        spool = DiskSpool(tmp_path, 100_000)
    assert spool.stats.torn_records_dropped == 1
    assert spool.stats.torn_bytes_dropped == len(damaged) - kept * REC
    assert seg.stat().st_size == kept * REC  # truncated at the torn record
    assert any(r.levelno == logging.WARNING and r.segment == int(seg.stem)  # type: ignore[attr-defined]
               for r in caplog.records)
    assert spool.pending_batches == kept and spool.pending_bytes == kept * REC
    spool.append(lp(9), 3)
    spool.close()

    spool = DiskSpool(tmp_path, 100_000)  # the repair is clean: nothing torn any more
    assert spool.stats.torn_records_dropped == 0
    assert [b.body for b in drain(spool)] == [lp(i) for i in range(kept)] + [lp(9)]


def test_corrupt_record_in_older_segment_costs_that_record_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = DiskSpool(tmp_path, 100_000, segment_bytes=3 * REC)
    for i in range(9):
        spool.append(lp(i), 3)
    spool.close()
    first = segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[REC + HEADER_SIZE + 4] ^= 0x55  # body of record 1: crc mismatch
    first.write_bytes(bytes(data))

    with caplog.at_level(logging.ERROR, logger="gateway.spool"):
        spool = DiskSpool(tmp_path, 100_000, segment_bytes=3 * REC)
    assert spool.stats.records_corrupt == 1 and spool.stats.torn_records_dropped == 0
    assert spool.stats.corrupt_bytes_skipped == REC
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert spool.pending_batches == 8 and spool.pending_points == 24
    assert [b.body for b in drain(spool)] == [lp(i) for i in (0, 2, 3, 4, 5, 6, 7, 8)]


def test_corrupt_record_mid_last_segment_is_an_error_not_a_tear(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = DiskSpool(tmp_path, 100_000)
    for i in range(3):
        spool.append(lp(i), 3)
    spool.close()
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[REC + HEADER_SIZE] ^= 0x55  # record 1 of 3: valid data follows, not a torn tail
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="gateway.spool"):
        spool = DiskSpool(tmp_path, 100_000)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert spool.stats.torn_records_dropped == 0 and spool.stats.records_corrupt == 1
    assert spool.stats.corrupt_bytes_skipped == REC
    assert seg.stat().st_size == 3 * REC  # not truncated: the record after it is intact
    assert [b.body for b in drain(spool)] == [lp(0), lp(2)]


def test_corruption_after_open_is_dropped_at_peek(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000)
    for i in range(3):
        spool.append(lp(i), 3)
    seg = segments(tmp_path)[0]
    with seg.open("r+b") as f:
        f.seek(REC + HEADER_SIZE)
        f.write(b"X")
    assert [b.body for b in drain(spool)] == [lp(0), lp(2)]
    assert spool.stats.records_corrupt == 1
    assert spool.pending_batches == 0 and spool.pending_bytes == 0


def test_commit_out_of_order_raises(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000)
    with pytest.raises(ValueError):
        spool.commit(SpooledBatch(b"x", 1, False, (1, 0)))  # nothing pending
    spool.append(lp(0), 3)
    spool.append(lp(1), 3)
    b0 = spool.peek()
    assert b0 is not None
    second = SpooledBatch(lp(1), 3, False, (b0.position[0], REC))
    with pytest.raises(ValueError):
        spool.commit(second)  # skips the oldest
    spool.commit(b0)
    with pytest.raises(ValueError):
        spool.commit(b0)  # twice
    assert spool.pending_batches == 1
    assert spool.peek() == second


def test_unrelated_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("not ours")
    (tmp_path / "1.seg").write_bytes(b"short name, not a spool segment")
    (tmp_path / "00000000000000000099.seg.bak").write_bytes(b"junk")
    (tmp_path / "sub").mkdir()
    spool = DiskSpool(tmp_path, 100_000)
    assert spool.peek() is None and spool.stats.torn_records_dropped == 0
    spool.append(lp(0), 3)
    assert [b.body for b in drain(spool)] == [lp(0)]
    spool.close()
    assert (tmp_path / "README").read_text() == "not ours"
    assert (tmp_path / "1.seg").exists() and (tmp_path / "00000000000000000099.seg.bak").exists()


def test_unreadable_cursor_replays_everything(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000)
    for i in range(3):
        spool.append(lp(i), 3)
    spool.commit(spool.peek())  # type: ignore[arg-type]
    spool.close()
    (tmp_path / "cursor").write_text("{not json")
    spool = DiskSpool(tmp_path, 100_000)
    assert [b.body for b in drain(spool)] == [lp(0), lp(1), lp(2)]  # duplicates, no loss


def test_fsync_mode_round_trip(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000, segment_bytes=REC, fsync=True)
    for i in range(3):
        spool.append(lp(i), 3)
    spool.commit(spool.peek())  # type: ignore[arg-type]
    spool.close()
    spool = DiskSpool(tmp_path, 100_000, fsync=True)
    assert [b.body for b in drain(spool)] == [lp(1), lp(2)]


def test_closed_spool_and_bad_input_raise(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, 100_000)
    with pytest.raises(ValueError):
        spool.append(b"", 0)
    spool.close()
    with pytest.raises(ValueError):
        spool.append(lp(0), 3)
    with pytest.raises(ValueError):
        spool.peek()


# -- property: the spool behaves like an in-memory queue with the same cap ------------------

MAX, RESERVE, SEGMENT = 700, 200, 160
TORN_RECORD = struct.pack("<4sBIII", b"BSP1", 0, 1, 30, 12345) + b"x" * 30  # cut before its end

op = st.one_of(
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=120), st.booleans()),
    st.tuples(st.just("commit")),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("kill")),
    st.tuples(st.just("tear"), st.integers(min_value=1, max_value=HEADER_SIZE + 20)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=60))
def test_spool_matches_in_memory_model(ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)

        def open_spool() -> DiskSpool:
            return DiskSpool(d, MAX, segment_bytes=SEGMENT, priority_reserve_bytes=RESERVE)

        spool = open_spool()
        model: deque[tuple[bytes, int, bool]] = deque()
        refused = 0
        for o in ops:
            if o[0] == "append":
                body, prio = o[1], o[2]
                points = body.count(b"\n") + 1
                pending = sum(HEADER_SIZE + len(b) for b, _, _ in model)
                fits = pending + HEADER_SIZE + len(body) <= MAX + (RESERVE if prio else 0)
                assert spool.append(body, points, priority=prio) == fits
                if fits:
                    model.append((body, points, prio))
                else:
                    refused += 1
                assert spool.stats.batches_refused == refused
            elif o[0] == "commit":
                batch = spool.peek()
                assert (batch is None) == (not model)
                if batch is not None:
                    spool.commit(batch)
                    model.popleft()
            elif o[0] in ("reopen", "kill"):
                if o[0] == "reopen":
                    spool.close()
                else:
                    release_lock_as_on_exit(spool)
                old, spool = spool, open_spool()
                old.close()  # after a "kill" this only releases descriptors
                refused = 0
                assert spool.stats.torn_records_dropped == 0
            else:  # a SIGKILL in the middle of an append: a prefix of a record at the tail
                spool.close()
                segs = segments(d)
                if segs:
                    with segs[-1].open("ab") as f:
                        f.write(TORN_RECORD[: o[1]])
                spool = open_spool()
                refused = 0
                assert spool.stats.torn_records_dropped == (1 if segs else 0)
            head = spool.peek()
            assert (head.body, head.points, head.priority) == model[0] if head else not model
            assert spool.pending_batches == len(model)
            assert spool.pending_points == sum(p for _, p, _ in model)
            assert spool.pending_bytes == sum(HEADER_SIZE + len(b) for b, _, _ in model)
        out = [(b.body, b.points, b.priority) for b in drain(spool)]
        assert out == list(model)
        assert segments(d) == []
        spool.close()
