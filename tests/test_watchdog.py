"""Unit tests of the watchdog rules with an injected clock (no servers)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.contract import BootEvent, EventKind, Phase, Telemetry
from gateway.settings import WatchdogSettings
from gateway.watchdog import BootWatch, Rule, Severity, Watchdog

LIMITS = WatchdogSettings(
    hard_ceiling_mmhg=120, over_target_tolerance_mmhg=15, over_target_samples=3,
    telemetry_loss_periods=6, telemetry_loss_floor_s=3, safe_level_mmhg=10,
)
TARGETS = [60.0, 58.0, 56.0, 54.0]


def watch(device_max: float = 120, clinic: float = 100, period: float = 0.5) -> BootWatch:
    return BootWatch(chambers=4, device_max_mmhg=device_max, clinic_ceiling_mmhg=clinic,
                     telemetry_period_s=period)


def sample(pressures: list[float], seq: int = 0) -> Telemetry:
    return Telemetry(seq=seq, ts=1000.0 + seq, session_id="s1", phase=Phase.HOLD,
                     pressures=pressures)


def in_session(w: BootWatch, now: float = 0.0) -> BootWatch:
    w.start_session("s1", TARGETS, now)
    return w


def test_hard_ceiling_vents_at_once_on_the_lowest_ceiling() -> None:
    dog = Watchdog(LIMITS)
    w = watch(device_max=110, clinic=95)
    assert dog.on_telemetry(w, sample([90, 20, 20, 20]), 0.0) == []
    actions = dog.on_telemetry(w, sample([96, 20, 20, 20]), 0.1)
    assert len(actions) == 1
    a = actions[0]
    assert (a.rule, a.vent, a.chamber, a.value, a.limit) == (Rule.HARD_CEILING, True, 1, 96, 95)
    assert a.severity is Severity.HIGH


def test_hard_ceiling_applies_outside_a_session() -> None:
    actions = Watchdog(LIMITS).on_telemetry(watch(), sample([10, 10, 101, 10]), 0.0)
    assert [(a.rule, a.chamber) for a in actions] == [(Rule.HARD_CEILING, 3)]


def test_over_target_needs_consecutive_samples() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(watch())
    high = [60, 58 + 16, 56, 54]
    assert dog.on_telemetry(w, sample(high), 0.0) == []
    assert dog.on_telemetry(w, sample(high), 0.1) == []
    assert dog.on_telemetry(w, sample([60, 58, 56, 54]), 0.2) == []  # the run is broken
    assert dog.on_telemetry(w, sample(high), 0.3) == []
    assert dog.on_telemetry(w, sample(high), 0.4) == []
    actions = dog.on_telemetry(w, sample(high), 0.5)
    assert [(a.rule, a.chamber, a.limit) for a in actions] == [(Rule.OVER_TARGET, 2, 73.0)]


def test_no_over_target_rule_outside_a_session() -> None:
    dog = Watchdog(LIMITS)
    w = watch()
    for i in range(10):
        assert dog.on_telemetry(w, sample([90, 90, 90, 90]), i * 0.1) == []


def test_one_vent_per_episode_then_rearmed_when_safe() -> None:
    dog = Watchdog(LIMITS)
    w = watch()
    assert len(dog.on_telemetry(w, sample([130, 0, 0, 0]), 0.0)) == 1
    for i in range(5):  # still high while the vent acts: no second vent
        assert dog.on_telemetry(w, sample([125 - i, 0, 0, 0]), 0.1 * i) == []
    assert dog.on_telemetry(w, sample([5, 0, 0, 0]), 1.0) == []
    assert not w.venting
    assert len(dog.on_telemetry(w, sample([130, 0, 0, 0]), 2.0)) == 1


def test_telemetry_loss_in_session_vents_once_with_alarm() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(watch(period=0.5), now=0.0)
    dog.on_telemetry(w, sample(TARGETS), 1.0)
    assert dog.silence_limit(w) == 3.0  # 6 x 0.5 s = 3 s, equal to the floor
    assert dog.on_tick(w, 3.9) == []
    actions = dog.on_tick(w, 4.1)
    assert len(actions) == 1 and actions[0].rule is Rule.TELEMETRY_LOSS
    assert actions[0].vent and actions[0].alarm and actions[0].limit == 3.0
    assert dog.on_tick(w, 10.0) == []


def test_telemetry_loss_limit_scales_with_period_and_has_a_floor() -> None:
    dog = Watchdog(LIMITS)
    assert dog.silence_limit(watch(period=0.1)) == 3.0
    assert dog.silence_limit(watch(period=2.0)) == 12.0


def test_no_telemetry_loss_when_idle() -> None:
    dog = Watchdog(LIMITS)
    w = watch()
    dog.on_telemetry(w, sample([0, 0, 0, 0]), 0.0)
    assert dog.on_tick(w, 1000.0) == []


def test_session_without_any_sample_is_caught_by_silence() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(watch(), now=5.0)
    assert dog.on_tick(w, 7.0) == []
    assert [a.rule for a in dog.on_tick(w, 8.5)] == [Rule.TELEMETRY_LOSS]


def test_user_stop_is_a_safety_event_without_vent() -> None:
    dog = Watchdog(LIMITS)
    ev = BootEvent(kind=EventKind.USER_STOP, ts=1.0, session_id="s1", detail="tingling")
    actions = dog.on_event(in_session(watch()), ev, 1.0)
    assert len(actions) == 1
    assert actions[0].rule is Rule.USER_STOP and not actions[0].vent and actions[0].alarm
    assert "tingling" in actions[0].detail
    done = BootEvent(kind=EventKind.SESSION_COMPLETED, ts=1.0, session_id="s1")
    assert dog.on_event(watch(), done, 1.0) == []


pressure = st.floats(min_value=-5, max_value=200, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(pressure, min_size=4, max_size=4), min_size=1, max_size=60))
def test_vents_iff_a_limit_is_crossed(trace: list[list[float]]) -> None:
    """Property: within limits never vents; over the ceiling vents on that very sample."""
    dog = Watchdog(LIMITS)
    w = in_session(watch())
    runs = [0] * 4
    for i, ps in enumerate(trace):
        actions = dog.on_telemetry(w, sample(ps, seq=i), i * 0.1)
        over_ceiling = max(ps) > 100
        runs = [r + 1 if p > t + 15 else 0 for r, p, t in zip(runs, ps, TARGETS, strict=True)]
        over_target = max(runs) >= 3
        if over_ceiling or over_target:
            assert len(actions) == 1 and actions[0].vent
            rule = Rule.HARD_CEILING if over_ceiling else Rule.OVER_TARGET
            assert actions[0].rule is rule
            return  # the episode's single vent happened
        assert actions == []
