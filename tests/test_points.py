"""The telemetry line built directly (gateway/points.py `telemetry_line`) is byte for byte the
encoded `telemetry` point of docs/schema.md §2.1, for every sample the contract admits."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import points
from gateway.contract import Channel, Phase, Telemetry, TopicAddress
from gateway.lineprotocol import PointError
from gateway.schema import Measurement, make_point

ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
reading = st.one_of(st.floats(min_value=-20, max_value=300),
                    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0]),
                    st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def samples(draw: st.DrawFn) -> Telemetry:
    in_session = draw(st.booleans())
    return Telemetry(
        seq=draw(st.integers(0, 2**63 - 1)),
        ts=draw(st.floats(min_value=0, max_value=9.2e9)),
        phase=draw(st.sampled_from(list(Phase))),
        pressures=draw(st.lists(reading, min_size=1, max_size=12)),
        session_id=draw(ids) if in_session else None,
        session_elapsed_s=draw(st.one_of(st.none(), st.floats(min_value=0, max_value=1e7))),
    )


targets = st.one_of(st.none(), st.lists(st.one_of(
    st.floats(min_value=0, max_value=300), st.sampled_from([math.nan, math.inf])), max_size=12))


@settings(max_examples=800, deadline=None)
@given(ids, ids, samples(), targets)
@example("c1", "b1", Telemetry(seq=1, ts=1.0, phase=Phase.IDLE, pressures=[math.nan]), None)
@example("c1", "b1", Telemetry(seq=1, ts=1.0, phase=Phase.IDLE, pressures=[-0.0, 0.0]), None)
@example("c1", "b1", Telemetry(seq=1, ts=1.0, phase=Phase.IDLE, pressures=[0.0, -0.0]), [1.0])
@example("c1", "b1", Telemetry(seq=1, ts=1.0, phase=Phase.IDLE, pressures=[1e308, 1e308]), None)
@example("c1", "b1", Telemetry(seq=1, ts=1.0, phase=Phase.IDLE, pressures=[1, 2]), None)
def test_the_direct_line_is_the_points_line(clinic: str, device: str, sample: Telemetry,
                                            target_list: list[float] | None) -> None:
    addr = TopicAddress(clinic, device, Channel.TELEMETRY)
    point = points.telemetry(addr, sample, target_list)
    line = points.telemetry_line(addr, sample, target_list)
    try:
        expected = point.encode().encode()
    except PointError:
        assert line is None
        return
    assert line == expected


def test_a_non_finite_target_is_left_to_the_point_which_is_refused() -> None:
    addr = TopicAddress("c1", "b1", Channel.TELEMETRY)
    sample = Telemetry(seq=1, ts=1.0, phase=Phase.HOLD, pressures=[10.0])
    assert points.telemetry_line(addr, sample, [math.inf]) is None
    with pytest.raises(PointError):
        points.telemetry(addr, sample, [math.inf]).encode()


def test_telemetry_is_not_part_of_the_safety_record() -> None:
    assert points.TELEMETRY_PRIORITY is False
    assert make_point(Measurement.TELEMETRY, {}, {"v": 1}, 0).priority is False
