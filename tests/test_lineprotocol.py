"""Unit tests of the line-protocol encoding."""

from __future__ import annotations

import math

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_sim.local_stack import LocalInflux, count
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


@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30),
       st.text(min_size=1, max_size=10))
def test_no_name_tag_or_field_breaks_the_line(tag: str, text: str, name: str) -> None:
    """Free text from outside (a program name, a detail) cannot start a second point."""
    line = Point(name, {"program": tag, name: tag}, {"s": text, name: 1.0}, 1).encode()
    assert "\n" not in line and "\r" not in line
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in line)
    assert line.endswith(" 1")


INJECTION = 'x\nsafety_event,clinic=c1,device=b1,rule=hard_ceiling action="vent" 1'


@pytest.mark.integration
def test_an_injected_newline_writes_no_second_row_into_influxdb(influx: LocalInflux) -> None:
    """The report's attack: a program name with a newline and a line of another measurement.
    Against the real influxd: one session row, with the name defused, and no safety event."""
    db = "lp_injection"
    influx.query(db, f'CREATE DATABASE "{db}"')
    point = Point("session", {"clinic": "c1", "device": "b1", "program": INJECTION,
                              "outcome": "started"},
                  {"session_id": "s-1", "note": INJECTION}, 1_767_261_600_000_000)
    body, refused = encode_batch([point])
    assert refused == []
    r = httpx.post(f"{influx.url}/write", params={"db": db, "precision": "u"}, content=body)
    assert r.status_code == 204, r.text
    assert count(influx, db, "SELECT count(*) FROM safety_event") == 0
    rows = influx.query(db, "SELECT session_id, note, program FROM session")[0]["values"]
    assert len(rows) == 1
    _, session_id, note, program = rows[0]
    assert session_id == "s-1" and program.startswith("x\ufffdsafety_event")
    assert "\n" not in note and note.startswith("x\\nsafety_event")
