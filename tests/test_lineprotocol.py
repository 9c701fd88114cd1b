"""Unit tests of the line-protocol encoding."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.lineprotocol import Point, PointError, encode_batch


def test_encodes_types_and_sorted_tags() -> None:
    p = Point("telemetry", {"device": "b1", "clinic": "c1"},
              {"p1": 60.5, "seq": 3, "ok": True, "session_id": "s-1"}, 1700000000123)
    assert p.encode() == (
        'telemetry,clinic=c1,device=b1 p1=60.5,seq=3i,ok=true,session_id="s-1" 1700000000123'
    )


def test_escapes_special_characters() -> None:
    p = Point("my meas,x", {"k ey": "v=1,2 3"}, {"f=x": 'say "hi" \\ now\nok'}, 1)
    assert p.encode() == (
        'my\\ meas\\,x,k\\ ey=v\\=1\\,2\\ 3 f\\=x="say \\"hi\\" \\\\ now\\nok" 1'
    )


def test_empty_tag_values_are_left_out() -> None:
    assert Point("m", {"a": "", "b": "x"}, {"v": 1.0}, 5).encode() == "m,b=x v=1.0 5"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(bad: float) -> None:
    with pytest.raises(PointError):
        Point("m", {}, {"v": bad}, 1).encode()


def test_batch_isolates_bad_points() -> None:
    good = Point("m", {"t": "a"}, {"v": 1.0}, 1)
    bad = Point("m", {"t": "b"}, {"v": math.nan}, 2)
    empty = Point("m", {"t": "c"}, {}, 3)
    body, refused = encode_batch([good, bad, good, empty])
    assert body == b"m,t=a v=1.0 1\nm,t=a v=1.0 1"
    assert [p for p, _ in refused] == [bad, empty]
    assert "non-finite" in refused[0][1]


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_fields_round_trip(value: float) -> None:
    line = Point("m", {}, {"v": value}, 1).encode()
    assert float(line.split(" ")[1].removeprefix("v=")) == value


@given(st.text(min_size=1, max_size=30))
def test_string_fields_never_break_the_line(text: str) -> None:
    line = Point("m", {}, {"s": text}, 1).encode()
    assert "\n" not in line
    assert line.endswith(" 1")


def test_telemetry_time_is_the_boots_ms_with_seq_below_it() -> None:
    """A redelivered sample overwrites itself; a clock stepped back does not overwrite."""
    from gateway.contract import Channel, Phase, Telemetry, TopicAddress
    from gateway.points import telemetry

    addr = TopicAddress("c1", "b1", Channel.TELEMETRY)
    first = Telemetry(seq=41, ts=1_700_000_000.123, phase=Phase.HOLD, pressures=[50.0])
    again = Telemetry(seq=41, ts=1_700_000_000.123, phase=Phase.HOLD, pressures=[50.0])
    after_step_back = Telemetry(seq=44, ts=1_700_000_000.123, phase=Phase.HOLD, pressures=[51.0])
    t1, t2, t3 = (telemetry(addr, s).time_us for s in (first, again, after_step_back))
    assert t1 == t2 == 1_700_000_000_123_041
    assert t3 != t1 and t3 // 1000 == t1 // 1000  # same millisecond, another point
