"""Unit tests of the pure boot model (device_sim.physics): no broker, no clock, no asyncio."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.physics import EMPTY_MMHG, MEASURED_FLOOR_MMHG, BootModel
from gateway.contract import Phase, ProgramTiming, SessionProgram

T0 = 1_700_000_000.0  # unix-time magnitudes, as the boots use


def make_program(
    targets: list[float] | None = None,
    *,
    inflate: float = 4.0,
    hold: float = 6.0,
    deflate: float = 6.0,
    pause: float = 6.0,
    duration: float = 600.0,
) -> SessionProgram:
    return SessionProgram(
        name="test",
        targets_mmhg=targets or [60.0, 58.0, 55.0, 51.0],
        duration_s=duration,
        timing=ProgramTiming(inflate_s=inflate, hold_s=hold, deflate_s=deflate, pause_s=pause),
    )


def make_model(chambers: int = 4, *, seed: int = 1, noise: float = 0.3, **kw: float) -> BootModel:
    return BootModel(chambers, 120.0, noise_mmhg=noise, rng=random.Random(seed), **kw)


def test_idle_boot_reports_idle_and_zero_pressure() -> None:
    m = make_model(noise=0.0)
    phase, p = m.step(T0)
    assert phase is Phase.IDLE
    assert p == [0.0, 0.0, 0.0, 0.0]
    assert not m.in_session
    assert m.session_elapsed(T0) is None


def test_first_chamber_reaches_63_percent_after_one_tau() -> None:
    m = make_model(noise=0.0, tau_inflate_s=1.5)
    m.step(T0)
    m.start(make_program(inflate=4.0), T0)
    m.step(T0 + 1.5)
    assert m.pressures[0] == pytest.approx(60.0 * (1 - math.exp(-1)), rel=1e-6)
    # Exact integration: one big step equals many small ones.
    m2 = make_model(noise=0.0, tau_inflate_s=1.5)
    m2.step(T0)
    m2.start(make_program(inflate=4.0), T0)
    for k in range(1, 151):
        m2.step(T0 + k * 0.01)
    assert m2.pressures[0] == pytest.approx(m.pressures[0], rel=1e-9)


def test_pressure_converges_to_target_during_hold() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    prog = make_program()
    m.start(prog, T0)
    # End of hold: chamber 3 has had inflate_s + hold_s = 10 s (> 6 tau) of inflation.
    m.step(T0 + 4 * 4.0 + 6.0 - 1e-3)
    for p, target in zip(m.pressures, prog.targets_mmhg, strict=True):
        assert p == pytest.approx(target, abs=0.2)
        assert p <= target


def test_chambers_inflate_in_order_foot_first() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.start(make_program(inflate=4.0), T0)
    rise_times: list[float | None] = [None] * 4
    for k in range(1, 200):
        t = T0 + k * 0.1
        phase, _ = m.step(t)
        for i, p in enumerate(m.pressures):
            if rise_times[i] is None and p > 5.0:
                rise_times[i] = t - T0
        if k * 0.1 < 16.0 - 1e-9:
            assert phase is Phase.INFLATE
    assert all(r is not None for r in rise_times)
    assert rise_times == sorted(rise_times)  # type: ignore[type-var]
    for i, r in enumerate(rise_times):
        assert r is not None and i * 4.0 < r < i * 4.0 + 1.0


def test_phase_sequence_over_one_cycle() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.start(make_program(inflate=4.0, hold=6.0, deflate=6.0, pause=6.0), T0)
    expected = {1.0: Phase.INFLATE, 15.9: Phase.INFLATE, 17.0: Phase.HOLD, 23.0: Phase.DEFLATE,
                29.0: Phase.PAUSE, 34.5: Phase.INFLATE}
    for dt, phase in expected.items():
        got, _ = m.step(T0 + dt)
        assert got is phase, dt


def test_all_chambers_deflate_in_deflate_and_pause() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.start(make_program(inflate=4.0, hold=6.0, deflate=6.0, pause=6.0), T0)
    m.step(T0 + 22.0)
    assert min(m.pressures) > 40.0
    phase, _ = m.step(T0 + 33.9)  # end of pause
    assert phase is Phase.PAUSE
    assert max(m.pressures) < 1.0


def test_never_above_relief_even_with_target_above_max() -> None:
    m = make_model(noise=0.0, relief_margin_mmhg=5.0)
    m.step(T0)
    m.start(make_program([200.0, 200.0, 200.0, 200.0], hold=60.0), T0)
    peak = 0.0
    for k in range(1, 800):
        m.step(T0 + k * 0.1)
        peak = max(peak, *m.pressures)
    assert peak <= 125.0
    assert peak > 120.0  # the relief valve, not something else, is what limited it


def test_vent_empties_all_chambers_within_five_tau_vent() -> None:
    m = make_model(noise=0.0, tau_vent_s=0.4)
    m.step(T0)
    m.start(make_program([100.0, 95.0, 90.0, 85.0], hold=20.0), T0)
    m.step(T0 + 20.0)
    assert min(m.pressures) > 80.0
    m.vent(T0 + 20.0)
    assert not m.in_session
    assert m.session_done_reason == "vented"
    phase, _ = m.step(T0 + 20.1)
    assert phase is Phase.VENT
    phase, _ = m.step(T0 + 20.0 + 5 * 0.4)
    assert max(m.pressures) < EMPTY_MMHG
    assert phase is Phase.IDLE


def test_vent_is_faster_than_stop() -> None:
    def after(action: str) -> float:
        m = make_model(noise=0.0)
        m.step(T0)
        m.start(make_program([100.0] * 4, hold=20.0), T0)
        m.step(T0 + 25.0)
        getattr(m, action)(T0 + 25.0)
        m.step(T0 + 25.5)
        return max(m.pressures)

    assert after("vent") < after("stop") < 100.0


def test_stuck_valve_exceeds_target_plus_15_within_seconds() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.stuck_valve(2)
    prog = make_program([60.0, 58.0, 55.0, 51.0])
    m.start(prog, T0)
    crossed_at = None
    for k in range(1, 100):
        t = T0 + k * 0.05
        m.step(t)
        if m.pressures[2] > prog.targets_mmhg[2] + 15.0:
            crossed_at = t - T0
            break
    assert crossed_at is not None and crossed_at < 3.0
    # It keeps pushing through deflate and pause, up to (never past) the relief limit.
    phase, _ = m.step(T0 + 33.0)
    assert phase is Phase.PAUSE
    assert 120.0 < m.pressures[2] <= 125.0
    assert m.pressures[0] < 1.0


def test_vent_beats_stuck_valve() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.stuck_valve(0)
    m.start(make_program(), T0)
    m.step(T0 + 10.0)
    assert m.pressures[0] > 110.0
    m.vent(T0 + 10.0)
    m.step(T0 + 12.0)
    assert max(m.pressures) < EMPTY_MMHG
    assert m.stuck_chambers == frozenset()


def test_stuck_valve_chamber_out_of_range() -> None:
    with pytest.raises(ValueError):
        make_model().stuck_valve(4)


def test_hold_valve_keeps_chamber_at_target_for_the_whole_session() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.hold_valve(0)
    prog = make_program([60.0, 58.0, 55.0, 51.0], duration=300.0)
    m.start(prog, T0)
    assert m.held_chambers == frozenset({0})
    # Deflate and pause of several cycles: the others empty, the held chamber never does.
    for cycle in range(3):
        phase, _ = m.step(T0 + cycle * 34.0 + 33.9)
        assert phase is Phase.PAUSE
        assert m.pressures[0] == pytest.approx(60.0, abs=0.01)
        assert max(m.pressures[1:]) < 1.0
    peak = 0.0
    for k in range(1, 1000):
        m.step(T0 + 102.0 + k * 0.1)
        peak = max(peak, m.pressures[0])
    assert peak <= 60.0  # never above target: only a "held too long" rule catches this


def test_hold_valve_released_by_stop_and_cleared_by_vent() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.hold_valve(1)
    m.start(make_program(), T0)
    m.step(T0 + 30.0)
    assert m.pressures[1] > 50.0
    m.stop(T0 + 30.0)
    m.step(T0 + 40.0)
    assert max(m.pressures) < 0.1  # outside a session the held valve no longer matters
    assert m.held_chambers == frozenset({1})
    m.start(make_program(), T0 + 40.0)
    m.step(T0 + 70.0)
    assert m.pressures[1] > 50.0
    m.vent(T0 + 70.0)
    m.step(T0 + 73.0)
    assert max(m.pressures) < EMPTY_MMHG
    assert m.held_chambers == frozenset()


def test_hold_valve_chamber_out_of_range() -> None:
    with pytest.raises(ValueError):
        make_model().hold_valve(-1)


def test_overrun_keeps_cycling_past_duration_until_stopped() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.overrun()
    m.start(make_program(duration=60.0), T0)
    m.step(T0 + 600.0)
    assert m.in_session
    assert not m.poll_completed()
    assert m.session_elapsed(T0 + 600.0) == pytest.approx(600.0)
    # Still the normal cycle: 17 s into the 18th cycle of 34 s is the hold phase.
    phase, _ = m.step(T0 + 17 * 34.0 + 17.0)
    assert phase is Phase.HOLD
    assert min(m.pressures) > 40.0
    m.stop(T0 + 700.0)
    assert not m.in_session
    assert m.session_done_reason == "stopped"
    assert not m.poll_completed()
    assert m.overrun_fault  # a fault stays until cleared


def test_overrun_ended_by_vent_and_clearing_it_completes_the_session() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.overrun()
    m.start(make_program(duration=60.0), T0)
    m.step(T0 + 100.0)
    m.vent(T0 + 100.0)
    assert not m.in_session and m.session_done_reason == "vented"
    m.step(T0 + 110.0)
    m.start(make_program(duration=60.0), T0 + 110.0)
    m.step(T0 + 200.0)
    assert m.in_session
    m.clear_faults()
    assert not m.overrun_fault
    m.step(T0 + 200.5)  # overdue: completes at the next step
    assert not m.in_session
    assert m.poll_completed()


def test_broken_vent_valve_ends_session_but_pressures_stay() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.start(make_program([100.0, 95.0, 90.0, 85.0], hold=20.0), T0)
    m.step(T0 + 20.0)
    before = m.pressures
    assert min(before) > 80.0
    m.vent_valve_broken()
    m.vent(T0 + 20.0)
    assert not m.in_session
    assert m.session_done_reason == "vented"
    phase, _ = m.step(T0 + 60.0)
    assert phase is Phase.VENT
    assert m.pressures == pytest.approx(before, abs=1e-9)
    # A repair lets the pending vent happen.
    m.clear_faults()
    phase, _ = m.step(T0 + 60.0 + 5 * 0.4)
    assert max(m.pressures) < EMPTY_MMHG
    assert phase is Phase.IDLE


def test_broken_vent_valve_does_not_stop_a_stuck_inlet() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.stuck_valve(2)
    m.vent_valve_broken()
    m.start(make_program(), T0)
    m.step(T0 + 1.0)
    assert m.pressures[2] < 80.0
    m.vent(T0 + 1.0)
    phase, _ = m.step(T0 + 20.0)
    assert phase is Phase.VENT
    assert 120.0 < m.pressures[2] <= m.relief_limit_mmhg
    assert m.stuck_chambers == frozenset({2})
    # The deflate valves still work: a stop empties it (the stuck inlet only acts in session).
    m.stop(T0 + 20.0)
    phase, _ = m.step(T0 + 30.0)
    assert phase is Phase.IDLE
    assert max(m.pressures) < 0.1


def test_broken_vent_valve_on_an_empty_boot_returns_to_idle() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.vent_valve_broken()
    m.vent(T0 + 1.0)
    phase, _ = m.step(T0 + 2.0)
    assert phase is Phase.IDLE
    assert m.vent_valve_fault


def test_session_completes_after_duration_exactly_once() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.start(make_program(duration=600.0), T0)
    m.step(T0 + 599.0)
    assert m.in_session
    assert m.session_elapsed(T0 + 599.0) == pytest.approx(599.0)
    assert not m.poll_completed()
    phase, _ = m.step(T0 + 600.0)
    assert not m.in_session
    assert phase is Phase.IDLE
    assert m.session_done_reason == "completed"
    assert m.poll_completed()
    assert not m.poll_completed()


def test_completion_detected_within_one_large_step_and_then_deflates() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.start(make_program(duration=600.0), T0)
    m.step(T0 + 3600.0)  # one step far past the end
    assert m.poll_completed()
    assert max(m.pressures) < 1e-6


def test_stop_ends_session_and_deflates() -> None:
    m = make_model(noise=0.0, tau_deflate_s=0.8)
    m.step(T0)
    m.start(make_program(hold=20.0), T0)
    m.step(T0 + 20.0)
    assert max(m.pressures) > 40.0
    m.stop(T0 + 20.0)
    assert not m.in_session
    assert m.session_done_reason == "stopped"
    assert not m.poll_completed()
    phase, _ = m.step(T0 + 20.0 + 6 * 0.8)
    assert phase is Phase.IDLE
    assert max(m.pressures) < 0.2


def test_start_refuses_wrong_chamber_count_and_busy() -> None:
    m = make_model()
    with pytest.raises(ValueError):
        m.start(make_program([50.0, 50.0]), T0)
    m.start(make_program(), T0)
    with pytest.raises(RuntimeError):
        m.start(make_program(), T0 + 1)


def test_noise_bounded_and_seeded() -> None:
    def trace(seed: int) -> list[list[float]]:
        m = make_model(seed=seed, noise=0.3)
        m.step(T0)
        m.start(make_program(), T0)
        return [m.step(T0 + k * 0.5)[1] for k in range(1, 120)]

    a, b, c = trace(7), trace(7), trace(8)
    assert a == b
    assert a != c
    m = make_model(seed=3, noise=0.3)
    m.step(T0)
    m.start(make_program(), T0)
    for k in range(1, 200):
        _, measured = m.step(T0 + k * 0.25)
        for meas, true in zip(measured, m.pressures, strict=True):
            assert abs(meas - true) <= m.noise_bound_mmhg + 1e-9 or meas == MEASURED_FLOOR_MMHG
            assert meas >= MEASURED_FLOOR_MMHG
    # Idle noise around 0 reads slightly negative at times, never below the floor.
    idle = make_model(seed=5, noise=2.0)
    readings = [p for k in range(200) for p in idle.step(T0 + k)[1]]
    assert min(readings) == MEASURED_FLOOR_MMHG
    assert max(readings) <= 6.0


_targets = st.lists(st.floats(0.0, 200.0), min_size=1, max_size=6)
_timing = st.builds(
    ProgramTiming,
    inflate_s=st.floats(0.1, 10.0),
    hold_s=st.floats(0.0, 10.0),
    deflate_s=st.floats(0.1, 10.0),
    pause_s=st.floats(0.0, 10.0),
)
_actions = st.lists(
    st.tuples(
        st.floats(0.0, 30.0),
        st.sampled_from(["step", "step", "step", "stop", "vent", "stuck", "start", "hold",
                         "overrun", "vent_broken", "clear", "leak"]),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    targets=_targets,
    timing=_timing,
    duration=st.floats(1.0, 200.0),
    actions=_actions,
    max_p=st.floats(30.0, 150.0),
    seed=st.integers(0, 2**16),
)
def test_pressures_always_within_physical_bounds(
    targets: list[float],
    timing: ProgramTiming,
    duration: float,
    actions: list[tuple[float, str]],
    max_p: float,
    seed: int,
) -> None:
    n = len(targets)
    m = BootModel(n, max_p, rng=random.Random(seed))
    prog = SessionProgram(name="p", targets_mmhg=targets, duration_s=duration, timing=timing)
    t = T0
    m.start(prog, t)
    upper = m.relief_limit_mmhg + m.noise_bound_mmhg
    for dt, action in actions:
        t += dt
        if action == "stop":
            m.stop(t)
        elif action == "vent":
            m.vent(t)
        elif action == "stuck":
            m.stuck_valve(seed % n)
        elif action == "hold":
            m.hold_valve((seed + 1) % n)
        elif action == "overrun":
            m.overrun()
        elif action == "vent_broken":
            m.vent_valve_broken()
        elif action == "clear":
            m.clear_faults()
        elif action == "leak":
            m.leak(seed % n, 5.0)
        elif action == "start" and not m.in_session:
            m.start(prog, t)
        phase, measured = m.step(t)
        assert len(measured) == n
        assert all(MEASURED_FLOOR_MMHG <= p <= upper for p in measured)
        assert all(0.0 <= p <= m.relief_limit_mmhg for p in m.pressures)
        assert (phase in (Phase.IDLE, Phase.VENT)) == (not m.in_session)
        if m.in_session:
            elapsed = m.session_elapsed(t)
            assert elapsed is not None
            # Completion is never late, unless the session timer is faulty.
            assert elapsed < duration or m.overrun_fault


# ------------------------------------------------------------------ dynamics, checked exactly


def test_deflate_and_vent_are_exponential_with_their_own_time_constants() -> None:
    for action, tau in (("stop", 0.8), ("vent", 0.4)):
        m = make_model(noise=0.0, tau_deflate_s=0.8, tau_vent_s=0.4)
        m.step(T0)
        m.start(make_program([100.0, 95.0, 90.0, 85.0], hold=30.0), T0)
        m.step(T0 + 30.0)
        before = m.pressures
        getattr(m, action)(T0 + 30.0)
        m.step(T0 + 30.0 + tau)
        for p, p0 in zip(m.pressures, before, strict=True):
            assert p == pytest.approx(p0 * math.exp(-1), rel=1e-6), action


def test_noise_has_the_configured_spread() -> None:
    m = make_model(seed=11, noise=0.5)
    m.step(T0)
    m.start(make_program([60.0, 60.0, 60.0, 60.0], hold=120.0), T0)
    m.step(T0 + 30.0)  # every chamber settled at 60 (hold lasts to 136 s)
    errors = [meas - true for k in range(1, 500)
              for meas, true in zip(m.step(T0 + 30.0 + k * 0.2)[1], m.pressures, strict=True)]
    mean = sum(errors) / len(errors)
    std = math.sqrt(sum((e - mean) ** 2 for e in errors) / len(errors))
    assert abs(mean) < 0.05
    assert 0.4 < std < 0.55  # 3-sigma clipping trims a little off the configured 0.5


# ------------------------------------------------------------------ slow leak


def test_leaking_chamber_settles_leak_times_tau_below_its_target() -> None:
    m = make_model(noise=0.0, tau_inflate_s=1.5)
    m.step(T0)
    m.leak(0, 4.0)
    prog = make_program([60.0, 58.0, 55.0, 51.0], hold=40.0)
    m.start(prog, T0)
    m.step(T0 + 50.0)  # deep in the hold: settled
    assert m.pressures[0] == pytest.approx(60.0 - 4.0 * 1.5, abs=1e-3)
    assert m.pressures[1:] == pytest.approx(prog.targets_mmhg[1:], abs=1e-3)
    assert m.leaks == {0: 4.0}


@pytest.mark.parametrize("stuck", [False, True])
def test_leak_integration_is_exact_for_any_step_size(stuck: bool) -> None:
    """Stuck then released, a chamber starts above its setpoint: the leak carries it past
    the setpoint mid-step, where the pump takes over; big steps must not miss that."""
    def trace(dt: float) -> list[list[float]]:
        m = make_model(noise=0.0)
        m.step(T0)
        m.leak(2, 3.0)
        m.leak(0, 1.0)
        if stuck:
            m.stuck_valve(0)
        m.start(make_program(hold=20.0), T0)
        seen = []
        checks = {round(t / dt) for t in (4.0, 12.0, 20.0, 32.0, 40.0)}
        for k in range(1, round(40.0 / dt) + 1):
            m.step(T0 + k * dt)
            if stuck and k == round(4.0 / dt):
                m.clear_stuck(0)
            if k in checks:
                seen.append(m.pressures)
        return seen

    fine, coarse = trace(0.01), trace(4.0)
    assert len(fine) == len(coarse) == 5
    for a, b in zip(fine, coarse, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    if stuck:  # released at 4 s from above 100 mmHg, it settles just below its 60 target
        assert coarse[0][0] > 100.0
        assert 60.0 - 1.0 * 1.5 < coarse[1][0] < 60.0 - 1.0 * 1.5 + 0.1


def test_leak_never_pulls_a_chamber_below_atmospheric() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.leak(1, 50.0)  # far more than the pump can make up for
    m.start(make_program(), T0)
    for k in range(1, 400):
        m.step(T0 + k * 0.1)
        assert min(m.pressures) >= 0.0
    assert max(m.pressures[1:2]) < 1e-9  # the pump cannot win: that chamber stays empty


def test_leak_with_all_valves_shut_loses_exactly_its_rate() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.start(make_program([100.0, 95.0, 90.0, 85.0], hold=30.0), T0)
    m.step(T0 + 30.0)
    m.vent_valve_broken()
    m.vent(T0 + 30.0)  # nothing opens: the pressure is held...
    before = m.pressures
    m.leak(3, 2.0)  # ...except where the sleeve leaks
    m.step(T0 + 31.0)
    m.step(T0 + 40.0)
    assert m.pressures[:3] == pytest.approx(before[:3], abs=1e-9)
    assert m.pressures[3] == pytest.approx(before[3] - 2.0 * 10.0, abs=1e-9)


def test_leak_repair_and_bad_arguments() -> None:
    m = make_model(noise=0.0)
    m.leak(0, 1.0)
    m.leak(1, 2.0)
    m.leak(0, 0.0)
    assert m.leaks == {1: 2.0}
    m.clear_faults()
    assert m.leaks == {}
    for chamber, rate in ((4, 1.0), (-1, 1.0), (0, -1.0), (0, math.nan), (0, math.inf)):
        with pytest.raises(ValueError):
            m.leak(chamber, rate)


def test_clear_stuck_repairs_one_valve_only() -> None:
    m = make_model(noise=0.0)
    m.step(T0)
    m.stuck_valve(0)
    m.stuck_valve(2)
    m.clear_stuck(0)
    assert m.stuck_chambers == frozenset({2})
    m.start(make_program(), T0)
    m.step(T0 + 33.0)  # the pause: only the still stuck chamber is pressurised
    assert m.pressures[0] < 1.0 and m.pressures[2] > 120.0
    with pytest.raises(ValueError):
        m.clear_stuck(9)
