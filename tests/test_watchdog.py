"""Unit tests of the ten watchdog rules with an injected clock (no servers)."""

from __future__ import annotations

import math
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from gateway.contract import (
    BootEvent,
    EventKind,
    Phase,
    ProgramTiming,
    SessionProgram,
    Severity,
    Telemetry,
)
from gateway.settings import WatchdogSettings
from gateway.watchdog import (
    CLOCK_CREDIT_CAP_S,
    SEQ_RESET_WINDOW,
    BootWatch,
    Rule,
    SafetyAction,
    VentConfirmed,
    Watchdog,
)

LIMITS = WatchdogSettings(
    hard_ceiling_mmhg=120, over_target_tolerance_mmhg=15, over_target_samples=3,
    telemetry_loss_periods=6, telemetry_loss_floor_s=3, safe_level_mmhg=10,
    inflated_level_mmhg=20, sustained_inflation_grace_s=5, max_inflation_s=120,
    overrun_grace_s=30, plausible_min_mmhg=-10, plausible_max_mmhg=250,
    vent_confirm_deadline_s=5, vent_resend_max=3,
)
TARGETS = [60.0, 58.0, 56.0, 54.0]
PROGRAM = SessionProgram(
    name="p", targets_mmhg=TARGETS, duration_s=600,
    timing=ProgramTiming(inflate_s=4, hold_s=6, deflate_s=6, pause_s=6),
)  # longest inflation 4 x 4 + 6 + 6 = 28 s; with 5 s grace the rule-3 limit is 33 s
SAFE = [0.0, 0.0, 0.0, 0.0]


def watch(device_max: float = 120, clinic: float = 100, period: float = 0.5) -> BootWatch:
    return BootWatch(chambers=4, device_max_mmhg=device_max, clinic_ceiling_mmhg=clinic,
                     telemetry_period_s=period)


def sample(pressures: list[float], seq: int = 0, ts: float | None = None,
           phase: Phase = Phase.HOLD, session_id: str | None = "s1") -> Telemetry:
    return Telemetry(seq=seq, ts=1000.0 + seq if ts is None else ts, session_id=session_id,
                     phase=phase, pressures=pressures)


def vented(pressures: list[float], seq: int = 0, ts: float | None = None) -> Telemetry:
    """A sample of a boot that obeyed a vent: phase vent, no session any more."""
    return sample(pressures, seq, ts, phase=Phase.VENT, session_id=None)


def told(seq: int, now: float, elapsed: float, session_id: str = "s1") -> Telemetry:
    """A safe sample with the boot's own account of its session's elapsed time."""
    return Telemetry(seq=seq, ts=1000.0 + now, session_id=session_id, session_elapsed_s=elapsed,
                     phase=Phase.HOLD, pressures=SAFE)


def in_session(dog: Watchdog, w: BootWatch, now: float = 0.0) -> BootWatch:
    dog.start_session(w, "s1", PROGRAM, now)
    return w


def vents(actions: list) -> list[SafetyAction]:
    return [a for a in actions if isinstance(a, SafetyAction) and a.vent]


class Feed:
    """Delivers samples with increasing seq and a clock, like a boot at 10 Hz."""

    def __init__(self, dog: Watchdog, w: BootWatch, t: float = 0.0) -> None:
        self.dog, self.w, self.t, self.seq = dog, w, t, 0

    def __call__(self, pressures: list[float], dt: float = 0.1, vent: bool = False) -> list:
        """vent: the sample of a boot that has vented (phase vent, no session)."""
        self.t += dt
        self.seq += 1
        # the boot's clock runs with the gateway's, offset by a skew of 5000 s
        make = vented if vent else sample
        return self.dog.on_telemetry(self.w, make(pressures, self.seq, 5000 + self.t), self.t)


# ---------------------------------------------------------------- rule 1


def test_hard_ceiling_vents_at_once_on_the_lowest_ceiling() -> None:
    dog = Watchdog(LIMITS)
    w = watch(device_max=110, clinic=95)
    feed = Feed(dog, w)
    assert feed([90, 20, 20, 20]) == []
    actions = feed([96, 20, 20, 20])
    assert len(actions) == 1
    a = actions[0]
    assert (a.rule, a.vent, a.chamber, a.value, a.limit) == (Rule.HARD_CEILING, True, 1, 96, 95)
    assert a.severity is Severity.HIGH and a.alarm


def test_hard_ceiling_applies_outside_a_session() -> None:
    actions = Feed(Watchdog(LIMITS), watch())([10, 10, 101, 10])
    assert [(a.rule, a.chamber) for a in actions] == [(Rule.HARD_CEILING, 3)]


def test_a_reading_exactly_at_the_ceiling_is_not_a_vent() -> None:
    """Rule 1 vents a chamber strictly above the lowest ceiling (100 mmHg here)."""
    feed = Feed(Watchdog(LIMITS), watch())
    assert feed([0, 0, 100.0, 0]) == []
    assert [(a.rule, a.chamber, a.value, a.limit) for a in feed([0, 0, 100.1, 0])] == [
        (Rule.HARD_CEILING, 3, 100.1, 100.0)]


# ---------------------------------------------------------------- rule 2


def test_over_target_needs_consecutive_samples() -> None:
    dog = Watchdog(LIMITS)
    feed = Feed(dog, in_session(dog, watch()))
    high = [60, 58 + 16, 56, 54]
    assert feed(high) == [] and feed(high) == []
    assert feed([60, 58, 56, 54]) == []  # the run is broken
    assert feed(high) == [] and feed(high) == []
    actions = feed(high)
    assert [(a.rule, a.chamber, a.limit) for a in actions] == [(Rule.OVER_TARGET, 2, 73.0)]


def test_no_over_target_rule_outside_a_session() -> None:
    feed = Feed(Watchdog(LIMITS), watch())
    for _ in range(10):
        assert feed([90, 90, 90, 90], dt=0.01) == []


def test_duplicates_and_late_samples_do_not_count_twice() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    high = [80, 58, 56, 54]
    assert dog.on_telemetry(w, sample(high, 5), 0.1) == []
    assert dog.on_telemetry(w, sample(high, 5), 0.2) == []  # duplicate
    assert dog.on_telemetry(w, sample(high, 4), 0.3) == []  # late
    assert dog.on_telemetry(w, sample(high, 6), 0.4) == []
    assert vents(dog.on_telemetry(w, sample(high, 7), 0.5))[0].rule is Rule.OVER_TARGET


def test_a_restarted_boot_with_seq_from_zero_is_watched() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    dog.on_telemetry(w, sample(SAFE, 50_000), 0.1)
    high = [80, 58, 56, 54]
    for i in range(2):
        assert dog.on_telemetry(w, sample(high, i), 0.2 + i / 10) == []
    assert vents(dog.on_telemetry(w, sample(high, 2), 0.5))


def test_exactly_target_plus_tolerance_is_not_over_target() -> None:
    """Rule 2 counts a sample strictly above target + tolerance (60 + 15 = 75 mmHg here)."""
    dog = Watchdog(LIMITS)
    feed = Feed(dog, in_session(dog, watch()))
    for _ in range(10):
        assert feed([75.0, 58, 56, 54]) == []
    over = [75.1, 58, 56, 54]
    assert feed(over) == [] and feed(over) == []
    assert [(a.rule, a.chamber, a.limit) for a in feed(over)] == [(Rule.OVER_TARGET, 1, 75.0)]


@pytest.mark.parametrize(("high", "chamber"), [
    ([80, 85, 56, 54], 2),  # +20 and +27 over their targets
    ([87, 78, 56, 54], 1),  # +27 and +20
    ([80, 58, 56, 79], 4),  # +20 at 80 mmHg, +25 at 79 mmHg: the excess counts, not the pressure
    ([80, 78, 56, 54], 1),  # +20 and +20: a tie names the more distal chamber
])
def test_over_target_names_the_chamber_furthest_above_its_target(high: list[float],
                                                                 chamber: int) -> None:
    dog = Watchdog(LIMITS)
    feed = Feed(dog, in_session(dog, watch()))
    assert feed(high) == [] and feed(high) == []
    actions = feed(high)
    assert [(a.rule, a.chamber, a.value, a.limit) for a in actions] == [
        (Rule.OVER_TARGET, chamber, high[chamber - 1], TARGETS[chamber - 1] + 15)]


# ---------------------------------------------------------------- rule 3


def test_sustained_inflation_uses_the_program_limit() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    # 4 x 4 s inflate + 6 s hold + 6 s deflate, + 5 s grace
    assert dog.inflation_limit(PROGRAM) == 33.0
    held = [60, 40, 15, 15]
    feed = Feed(dog, w)
    for _ in range(330):
        assert feed(held) == []
    actions = feed(held, dt=0.2)
    assert [(a.rule, a.chamber, a.limit) for a in actions] == [
        (Rule.SUSTAINED_INFLATION, 1, 33.0)]


def test_normal_cycles_never_trip_sustained_inflation() -> None:
    dog = Watchdog(LIMITS)
    feed = Feed(dog, in_session(dog, watch()))
    for _cycle in range(20):  # 20 s inflated, 6 s deflated, for 20 cycles
        for _ in range(200):
            assert feed(TARGETS) == []
        for _ in range(60):
            assert feed(SAFE) == []


def test_sustained_inflation_is_timed_on_the_boot_clock() -> None:
    """A gateway that falls behind and then catches up must not see a longer inflation."""
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    for i in range(230):  # 23 s inflated by the boot's clock ...
        late = 10.0 if i > 100 else 0.0  # ... received up to 10 s late by the gateway
        assert dog.on_telemetry(w, sample(TARGETS, i + 1, 1000 + i / 10), i / 10 + late) == []


def test_absolute_inflation_cap_outside_a_session() -> None:
    dog = Watchdog(LIMITS)
    feed = Feed(dog, watch())
    assert feed([30, 0, 0, 0]) == []
    assert feed([30, 0, 0, 0], dt=119) == []
    assert [a.rule for a in feed([30, 0, 0, 0], dt=2)] == [Rule.SUSTAINED_INFLATION]


def test_a_chamber_exactly_at_the_inflated_level_is_not_inflated() -> None:
    """Rule 3: a chamber counts as inflated strictly above INFLATED_LEVEL_MMHG (20)."""
    feed = Feed(Watchdog(LIMITS), watch())  # idle: the absolute cap, 120 s
    assert feed([20.0, 0, 0, 0]) == []
    assert feed([20.0, 0, 0, 0], dt=200) == []
    assert feed([20.1, 0, 0, 0]) == []
    assert [a.rule for a in feed([20.1, 0, 0, 0], dt=121)] == [Rule.SUSTAINED_INFLATION]


def test_an_inflation_exactly_as_long_as_the_limit_does_not_vent() -> None:
    """Rule 3 vents an inflation strictly longer than its limit (33 s for PROGRAM)."""
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    held = [60.0, 0, 0, 0]
    assert dog.on_telemetry(w, sample(SAFE, 1, ts=1001.0), 1.0) == []
    assert dog.on_telemetry(w, sample(held, 2, ts=1002.0), 2.0) == []  # inflated from here
    assert dog.on_telemetry(w, sample(held, 3, ts=1035.0), 35.0) == []  # 33 s: the limit
    actions = dog.on_telemetry(w, sample(held, 4, ts=1035.25), 35.25)
    assert [(a.rule, a.chamber, a.value, a.limit) for a in actions] == [
        (Rule.SUSTAINED_INFLATION, 1, 33.25, 33.0)]


@pytest.mark.parametrize("first", [0, 3])
def test_sustained_inflation_names_the_chamber_inflated_longest(first: int) -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    other = 3 - first
    one, both = list(SAFE), list(SAFE)
    one[first] = both[first] = both[other] = 30.0
    assert dog.on_telemetry(w, sample(one, 1, ts=1001.0), 1.0) == []
    assert dog.on_telemetry(w, sample(both, 2, ts=1002.0), 2.0) == []
    actions = dog.on_telemetry(w, sample(both, 3, ts=1041.0), 41.0)  # 40 s and 39 s, limit 33
    assert [(a.rule, a.chamber, a.value) for a in actions] == [
        (Rule.SUSTAINED_INFLATION, first + 1, 40.0)]


@pytest.mark.parametrize("step_s", [60.0, -60.0])
def test_a_step_of_the_boots_clock_does_not_change_rule_3(step_s: float) -> None:
    """NTP may step a boot's clock either way mid-inflation: rule 3 still times the inflation
    by the gateway's clock across the step, so it neither vents early nor never."""
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    held = [60.0, 40.0, 15.0, 15.0]
    results = []
    for i in range(1, 341):  # 10 Hz, 34 s inflated; the boot's clock steps after 10 s
        ts = 1000.0 + i / 10 + (step_s if i > 100 else 0.0)
        results.append(vents(dog.on_telemetry(w, sample(held, i, ts), i / 10)))
    assert not any(results[:330])  # up to 32.9 s inflated
    assert [a.rule for r in results[330:] for a in r] == [Rule.SUSTAINED_INFLATION]


def advance(w: BootWatch, ts: float, now: float) -> float:
    return Watchdog._advance_clock(w, ts, now)


def test_rule_3_clock_takes_the_boots_interval_up_to_the_step_tolerance() -> None:
    """CLOCK_STEP_TOLERANCE_S (0.5 s): an interval of the boot's up to 0.5 s longer than the
    gateway saw is jitter and counts whole; a longer one is a step, cut to the gateway's."""
    w = watch()
    assert advance(w, 1000.0, 0.0) == 0.0  # the first sample starts the clock
    assert advance(w, 1000.75, 0.25) == 0.75  # 0.25 s + 0.5 s tolerance: taken whole
    assert w.clock_credit_s == 0.0
    assert advance(w, 1001.625, 0.5) == 1.0  # 0.875 s > 0.25 + 0.5: only the gateway's 0.25 s
    assert advance(w, 1001.625, 0.75) == 1.0  # the boot's clock stood still: nothing
    assert w.clock_credit_s == 0.25  # the gateway's 0.25 s kept as credit
    assert advance(w, 1000.0, 1.0) == 1.0  # backwards: counts as none
    assert w.clock_credit_s == 0.5
    assert advance(w, 1001.0, 1.0) == 2.0  # 1 s on the boot = credit 0.5 + tolerance 0.5
    assert w.clock_credit_s == 0.0


def test_rule_3_clock_keeps_at_most_the_credit_cap() -> None:
    """After a 30 s stall of the gateway, a 30 s forward step of the boot's clock counts only
    the CLOCK_CREDIT_CAP_S (10 s) of gateway time kept as credit."""
    w = watch()
    advance(w, 1000.0, 0.0)
    assert advance(w, 1000.5, 30.0) == 0.5
    assert w.clock_credit_s == CLOCK_CREDIT_CAP_S
    assert advance(w, 1030.5, 30.0) == 0.5 + CLOCK_CREDIT_CAP_S
    assert w.clock_credit_s == 0.0


# ---------------------------------------------------------------- rule 4


def test_session_overrun_stops_and_vents_once() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch(), now=100.0)
    dog.on_telemetry(w, sample(SAFE, 1), 100.0)
    for t in (200.0, 600.0, 736.0):  # 600 s + 6 s final deflate + 30 s grace
        w.last_sample_at = t  # the boot keeps talking
        assert dog.on_tick(w, t) == []
    w.last_sample_at = 736.01
    actions = dog.on_tick(w, 736.01)
    assert len(actions) == 1
    a = actions[0]
    assert (a.rule, a.stop, a.vent, a.limit) == (Rule.SESSION_OVERRUN, True, True, 636.0)
    assert a.action == "stop+vent"


def test_resumed_session_counts_elapsed_time() -> None:
    dog = Watchdog(LIMITS)
    w = watch()
    dog.start_session(w, "s1", PROGRAM, now=1000.0, elapsed_s=620.0)
    w.last_sample_at = 1016.0
    assert dog.on_tick(w, 1016.0) == []
    w.last_sample_at = 1017.0
    assert [a.rule for a in dog.on_tick(w, 1017.0)] == [Rule.SESSION_OVERRUN]


def test_session_overrun_fires_once_per_session_even_after_its_vent_is_confirmed() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch(), now=0.0)  # limit 636 s
    w.last_sample_at = 636.0
    assert dog.on_tick(w, 636.0) == []  # exactly the limit
    assert [a.rule for a in dog.on_tick(w, 636.5)] == [Rule.SESSION_OVERRUN]
    assert isinstance(dog.on_telemetry(w, sample(SAFE, 1, phase=Phase.VENT), 637.0)[0],
                      VentConfirmed)
    for t in (637.5, 700.0, 5000.0):  # the session not ended (the service would end it)
        w.last_sample_at = t
        assert dog.on_tick(w, t) == []


def test_no_session_overrun_when_the_program_is_unknown() -> None:
    dog = Watchdog(LIMITS)
    w = watch()
    dog.start_session(w, "s1", None, now=0.0, elapsed_s=5000.0)  # resumed from telemetry
    w.last_sample_at = 100_000.0
    assert dog.on_tick(w, 100_000.0) == []


def test_the_boots_own_elapsed_time_counts_when_it_is_longer() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch(), now=100.0)  # by the gateway: overrun after 736 s
    dog.on_telemetry(w, told(1, 110.0, 500.0, session_id="s0"), 110.0)  # another session's
    w.last_sample_at = 300.0
    assert dog.on_tick(w, 300.0) == []
    dog.on_telemetry(w, told(2, 120.0, 50.0), 120.0)  # the boot: started at 70
    dog.on_telemetry(w, told(3, 130.0, 5.0), 130.0)  # a shorter account does not count
    w.last_sample_at = 706.0
    assert dog.on_tick(w, 706.0) == []  # 636 s since 70: the limit
    assert [a.rule for a in dog.on_tick(w, 706.5)] == [Rule.SESSION_OVERRUN]


def test_a_resumed_sessions_guess_waits_for_the_boots_own_elapsed_time() -> None:
    dog = Watchdog(LIMITS)
    w = watch()
    dog.start_session(w, "s1", PROGRAM, now=1000.0, elapsed_s=5000.0, provisional=True)
    assert dog.on_tick(w, 1000.5) == []  # the guess alone would be an overrun
    dog.on_telemetry(w, told(1, 1001.0, 0.0, session_id="s0"), 1001.0)  # not this session
    assert dog.on_tick(w, 1001.5) == []
    dog.on_telemetry(w, told(2, 1002.0, 100.0), 1002.0)  # replaces the guess: started at 902
    w.last_sample_at = 1538.0
    assert dog.on_tick(w, 1538.0) == []
    assert [a.rule for a in dog.on_tick(w, 1538.5)] == [Rule.SESSION_OVERRUN]


# ---------------------------------------------------------------- rule 5


def test_telemetry_loss_in_session_vents_once_with_alarm() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch(period=0.5), now=0.0)
    dog.on_telemetry(w, sample(TARGETS), 1.0)
    assert dog.silence_limit(w) == 3.0
    assert dog.on_tick(w, 3.9) == []
    actions = dog.on_tick(w, 4.1)
    assert len(actions) == 1 and actions[0].rule is Rule.TELEMETRY_LOSS
    assert actions[0].vent and actions[0].alarm and actions[0].limit == 3.0
    assert all(a.rule is not Rule.TELEMETRY_LOSS for a in dog.on_tick(w, 10.0))


def test_silence_exactly_at_the_limit_does_not_vent() -> None:
    """Rule 5 vents a silence strictly longer than its limit (3 s here)."""
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch(period=0.5), now=0.0)
    dog.on_telemetry(w, sample(TARGETS), 1.0)
    assert dog.on_tick(w, 4.0) == []
    assert [(a.rule, a.value) for a in dog.on_tick(w, 4.125)] == [(Rule.TELEMETRY_LOSS, 3.125)]


# Rule 5 with input unread in the gateway's socket. Ticks of 1/8 s and binary fractions, so
# "exactly the grace" is exact in floating point.
BACKLOG_LIMITS = LIMITS.model_copy(update={"tick_interval_s": 0.125,
                                           "receive_backlog_grace_s": 1.0})


def silent_since_1s(limits: WatchdogSettings = BACKLOG_LIMITS) -> tuple[Watchdog, BootWatch]:
    """A boot in session whose last sample arrived at 1 s: silence limit 3 s, due at 4 s."""
    dog = Watchdog(limits)
    w = in_session(dog, watch(period=0.5), now=0.0)
    dog.on_telemetry(w, sample(TARGETS), 1.0)
    return dog, w


def test_past_the_limit_with_nothing_unread_the_vent_is_immediate() -> None:
    """Nothing waits in the socket: the boot's samples are not there, it is silent."""
    dog, w = silent_since_1s()
    [a] = dog.on_tick(w, 4.0625, backlog=False)
    assert (a.rule, a.vent, a.value, a.limit) == (Rule.TELEMETRY_LOSS, True, 3.062, 3.0)
    assert a.detail == "no telemetry for 3.1 s in session (limit 3 s)"


def test_unread_input_defers_the_vent_by_the_grace_and_no_longer() -> None:
    """Input waiting in the socket may hold the boot's samples: rule 5 waits for it, but the
    grace runs from the end of the limit (4 s here), however long the input keeps coming."""
    dog, w = silent_since_1s()
    for t in (4.0625, 4.5, 4.9375, 5.0):  # 5.0: exactly the grace past the limit
        assert dog.on_tick(w, t, backlog=True) == [], t
    [a] = dog.on_tick(w, 5.0625, backlog=True)
    assert (a.rule, a.vent, a.value, a.limit) == (Rule.TELEMETRY_LOSS, True, 4.062, 3.0)
    assert a.detail == ("no telemetry for 4.1 s in session (limit 3 s, input still unread "
                        "after the 1 s grace)")
    assert dog.on_tick(w, 6.0, backlog=True) == []  # one vent per silence (then rule 8)


def test_a_vent_deferred_for_a_backlog_goes_out_once_the_socket_is_read() -> None:
    """The backlog was read and held no sample of this boot: vent at that tick, within the
    grace."""
    dog, w = silent_since_1s()
    assert dog.on_tick(w, 4.0625, backlog=True) == []
    assert [a.rule for a in dog.on_tick(w, 4.1875, backlog=False)] == [Rule.TELEMETRY_LOSS]


def test_after_a_stall_of_the_gateway_the_grace_starts_when_it_ticks_again() -> None:
    """The gateway's own loop stood still from 1 s to 10 s: its first tick finds the boot far
    past its limit, with everything sent meanwhile still unread. The grace is counted from
    one tick before that tick (9.875 s), so the backlog has the time to drain; and the stall
    itself switches nothing off: with nothing unread the vent is immediate."""
    dog, w = silent_since_1s()
    for t in (10.0, 10.5, 10.875):  # 10.875: exactly the grace from 9.875
        assert dog.on_tick(w, t, backlog=True) == [], t
    assert [a.rule for a in dog.on_tick(w, 10.9375, backlog=True)] == [Rule.TELEMETRY_LOSS]

    dog, w = silent_since_1s()
    assert [a.rule for a in dog.on_tick(w, 10.0, backlog=False)] == [Rule.TELEMETRY_LOSS]


def test_a_sample_read_from_the_backlog_ends_the_silence_and_its_grace() -> None:
    """The next silence gets a grace of its own, counted from its own limit; the grace of the
    last one is not carried over, whether or not a tick ran in between."""
    dog, w = silent_since_1s()
    assert dog.on_tick(w, 4.0625, backlog=True) == []  # due since 4 s
    dog.on_telemetry(w, sample(TARGETS, seq=1), 4.5)  # it was in the backlog
    # no tick ran since that sample; the new silence is due at 7.5 s
    assert dog.on_tick(w, 7.5625, backlog=True) == []
    assert dog.on_tick(w, 8.5, backlog=True) == []
    assert [a.rule for a in dog.on_tick(w, 8.5625, backlog=True)] == [Rule.TELEMETRY_LOSS]


def test_a_new_session_gets_a_fresh_grace() -> None:
    dog, w = silent_since_1s()
    assert dog.on_tick(w, 4.0625, backlog=True) == []  # due since 4 s
    dog.start_session(w, "s2", PROGRAM, 4.5)  # the silence clock restarts with the session
    assert dog.on_tick(w, 7.5625, backlog=True) == []  # due since 7.5 s, not 4 s
    assert [a.rule for a in dog.on_tick(w, 8.5625, backlog=True)] == [Rule.TELEMETRY_LOSS]


def test_a_boot_back_within_its_limit_is_not_overdue_any_more() -> None:
    """A tick that finds the boot inside its limit forgets an earlier overdue moment."""
    dog, w = silent_since_1s()
    assert dog.on_tick(w, 4.0625, backlog=True) == []  # due since 4 s
    dog.start_session(w, "s2", PROGRAM, 4.5)
    assert dog.on_tick(w, 5.0, backlog=True) == []  # inside the new limit
    assert w.silence_due_since is None


def test_a_deferred_rule_5_does_not_hold_rule_4() -> None:
    dog = Watchdog(BACKLOG_LIMITS)
    w = in_session(dog, watch(period=0.5), now=0.0)
    dog.on_telemetry(w, sample(TARGETS), 635.0)
    assert dog.on_tick(w, 636.0, backlog=True) == []
    assert [a.rule for a in dog.on_tick(w, 638.5, backlog=True)] == [Rule.SESSION_OVERRUN]


def test_with_no_grace_unread_input_defers_nothing() -> None:
    dog, w = silent_since_1s(BACKLOG_LIMITS.model_copy(update={"receive_backlog_grace_s": 0.0}))
    assert [a.rule for a in dog.on_tick(w, 4.0625, backlog=True)] == [Rule.TELEMETRY_LOSS]


def test_the_backlog_grace_is_a_bounded_setting_with_a_safe_default() -> None:
    assert WatchdogSettings().receive_backlog_grace_s == 1.0
    for bad in (-0.1, 5.1):
        with pytest.raises(ValueError):
            WatchdogSettings(receive_backlog_grace_s=bad)
    assert WatchdogSettings.model_fields["receive_backlog_grace_s"].description


def test_telemetry_loss_limit_scales_with_period_and_has_a_floor() -> None:
    dog = Watchdog(LIMITS)
    assert dog.silence_limit(watch(period=0.1)) == 3.0
    assert dog.silence_limit(watch(period=2.0)) == 12.0


def test_no_telemetry_loss_when_idle() -> None:
    dog = Watchdog(LIMITS)
    w = watch()
    dog.on_telemetry(w, sample(SAFE), 0.0)
    assert dog.on_tick(w, 1000.0) == []


def test_session_without_any_sample_is_caught_by_silence() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch(), now=5.0)
    assert dog.on_tick(w, 7.0) == []
    assert [a.rule for a in dog.on_tick(w, 8.5)] == [Rule.TELEMETRY_LOSS]


# ---------------------------------------------------------------- rule 6


@pytest.mark.parametrize(("pressures", "chamber"), [
    ([math.nan, 0, 0, 0], 1),
    ([0, math.inf, 0, 0], 2),
    ([0, 0, -15, 0], 3),
    ([0, 0, 0, 260], 4),
    ([0, 0, 0], None),
    ([0, 0, 0, 0, 0], None),
])
def test_implausible_data_vents_and_is_a_fault(pressures: list[float], chamber: int | None
                                               ) -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    actions = dog.on_telemetry(w, sample(pressures), 0.1)
    assert len(actions) == 1
    a = actions[0]
    assert (a.rule, a.vent, a.fault, a.chamber) == (Rule.IMPLAUSIBLE_DATA, True, True, chamber)
    # Inside the same episode, more bad data is a fault to record, not another vent.
    again = dog.on_telemetry(w, sample(pressures, 1), 0.2)
    assert [(x.vent, x.fault, x.record) for x in again] == [(False, True, False)]


def test_slightly_negative_readings_are_plausible() -> None:
    assert Feed(Watchdog(LIMITS), watch())([-1.5, 0, 0, 0]) == []


def test_readings_exactly_at_the_plausible_bounds_are_plausible() -> None:
    """Rule 6: implausible is strictly below PLAUSIBLE_MIN (-10) or above PLAUSIBLE_MAX (250)."""
    assert Feed(Watchdog(LIMITS), watch())([-10.0, 0, 0, 0]) == []
    actions = Feed(Watchdog(LIMITS), watch())([0, 0, 0, 250.0])  # plausible, but over the ceiling
    assert [(a.rule, a.fault) for a in actions] == [(Rule.HARD_CEILING, False)]


@pytest.mark.parametrize("bound", [-10.0, 250.0])
def test_a_reading_at_a_bound_beside_a_bad_one_is_not_the_one_named(bound: float) -> None:
    """The chamber named is the implausible one, not a neighbour exactly at a bound."""
    actions = Feed(Watchdog(LIMITS), watch())([bound, math.nan, 0, 0])
    assert [(a.rule, a.chamber) for a in actions] == [(Rule.IMPLAUSIBLE_DATA, 2)]


@pytest.mark.parametrize(("reading", "value", "limit"), [
    (-10.1, -10.1, -10.0),
    (250.1, 250.1, 250.0),
    (math.inf, None, 250.0),
])
def test_implausible_reading_names_the_bound_it_broke(reading: float, value: float | None,
                                                      limit: float) -> None:
    actions = Feed(Watchdog(LIMITS), watch())([0, reading, 0, 0])
    assert [(a.rule, a.chamber, a.value, a.limit) for a in actions] == [
        (Rule.IMPLAUSIBLE_DATA, 2, value, limit)]


# ---------------------------------------------------------------- rule 7


def test_offline_in_session_is_a_high_alarm() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    actions = dog.on_offline(w, 1.0)
    assert [(a.rule, a.severity, a.alarm) for a in actions] == [
        (Rule.OFFLINE_IN_SESSION, Severity.HIGH, True)]
    assert not w.online
    idle = watch()
    assert dog.on_offline(idle, 1.0) == []


def test_offline_boot_gets_no_resends_until_it_is_back() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    assert vents(dog.on_offline(w, 1.0))
    assert dog.on_tick(w, 100.0) == []  # no vent_not_confirmed storm for an offline boot
    assert dog.on_online(w, 100.0) is True  # back: re-send the vent now
    assert dog.on_tick(w, 104.0) == []
    assert [a.rule for a in dog.on_tick(w, 105.5)] == [Rule.VENT_NOT_CONFIRMED]


def test_reboot_resets_the_seq_order() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    dog.on_telemetry(w, sample(SAFE, 500), 0.1)
    dog.on_offline(w, 0.2)
    feed_high = [80, 58, 56, 54]
    dog.on_telemetry(w, vented([5, 0, 0, 0], 900), 0.3)  # confirms the offline vent
    dog.on_online(w, 0.4)
    dog.start_session(w, "s2", PROGRAM, 0.5)
    results = [dog.on_telemetry(w, sample(feed_high, i), 0.6 + i / 10) for i in range(3)]
    assert results[:2] == [[], []] and vents(results[2])


def test_offline_boot_is_not_also_reported_silent() -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    w.online = False
    assert dog.on_tick(w, 100.0) == []


# ---------------------------------------------------------------- rule 8


def test_vent_not_confirmed_resends_with_one_alarm_then_gives_up() -> None:
    dog = Watchdog(LIMITS)
    w = watch()
    feed = Feed(dog, w)
    assert vents(feed([130, 0, 0, 0]))
    t0 = feed.t
    assert dog.on_tick(w, t0 + 4.9) == []
    first = dog.on_tick(w, t0 + 5.1)
    assert [(a.rule, a.vent, a.alarm) for a in first] == [(Rule.VENT_NOT_CONFIRMED, True, True)]
    second = dog.on_tick(w, t0 + 10.2)
    assert [(a.vent, a.alarm) for a in second] == [(True, False)]  # re-sent, alarm already up
    dog.on_tick(w, t0 + 15.3)
    assert dog.on_tick(w, t0 + 30.0) == []  # vent_resend_max=3 reached
    feed.t = t0 + 31
    confirmed = feed([5, 0, 0, 0], vent=True)
    assert len(confirmed) == 1 and isinstance(confirmed[0], VentConfirmed)
    assert confirmed[0].resends == 3 and confirmed[0].after_s == pytest.approx(31.1)


def test_confirmed_vent_rearms_the_rules() -> None:
    dog = Watchdog(LIMITS)
    feed = Feed(dog, watch())
    assert len(feed([130, 0, 0, 0])) == 1
    for i in range(5):  # still high while the vent acts: no second vent
        assert feed([125 - i, 0, 0, 0]) == []
    assert isinstance(feed([5, 0, 0, 0], vent=True)[0], VentConfirmed)
    assert len(vents(feed([130, 0, 0, 0]))) == 1


def test_a_vent_is_confirmed_only_strictly_below_the_safe_level() -> None:
    """Rule 8: the episode ends when every chamber is below SAFE_LEVEL_MMHG (10)."""
    dog = Watchdog(LIMITS)
    w = watch()
    feed = Feed(dog, w)
    assert vents(feed([130, 0, 0, 0]))
    assert feed([10.0, 0, 0, 0], vent=True) == []  # at the safe level: not yet
    assert feed([0, 0, 40, 0], vent=True) == []  # shows the vent, but a chamber is still up
    assert w.venting
    assert isinstance(feed([9.9, 0, 0, 0], vent=True)[0], VentConfirmed)


def test_vent_resent_strictly_after_each_deadline_and_at_most_resend_max_times() -> None:
    dog = Watchdog(LIMITS)
    w = watch()
    assert vents(dog.on_telemetry(w, sample([130, 0, 0, 0]), 1.0))
    assert dog.on_tick(w, 6.0) == []  # exactly the 5 s deadline
    resends = [dog.on_tick(w, 6.25)]
    assert dog.on_tick(w, 11.25) == []  # the deadline runs again from the re-send
    resends += [dog.on_tick(w, 11.5), dog.on_tick(w, 17.0)]
    assert dog.on_tick(w, 100.0) == []  # vent_resend_max (3) re-sends made
    # each re-send: a vent, one alarm for the episode, value = time since the first vent
    assert [[(a.rule, a.vent, a.alarm, a.value) for a in r] for r in resends] == [
        [(Rule.VENT_NOT_CONFIRMED, True, True, 5.25)],
        [(Rule.VENT_NOT_CONFIRMED, True, False, 10.5)],
        [(Rule.VENT_NOT_CONFIRMED, True, False, 16.0)],
    ]


@pytest.mark.parametrize("phase", [Phase.PAUSE, Phase.DEFLATE, Phase.UNKNOWN])
def test_a_boot_still_in_its_cycle_does_not_confirm_a_vent(phase: Phase) -> None:
    """Empty chambers in a pause are not a vent: the boot may not have received it yet, and
    would inflate again at the next cycle. Confirmation needs a sample that shows the vent."""
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch())
    feed = Feed(dog, w)
    assert vents(feed([130, 0, 0, 0]))
    t = feed.t
    low = sample(SAFE, 100, phase=phase)
    assert dog.on_telemetry(w, low, t + 0.1) == [] and w.venting
    idle = sample(SAFE, 101, phase=Phase.IDLE, session_id=None)
    assert isinstance(dog.on_telemetry(w, idle, t + 0.2)[0], VentConfirmed)


def test_seq_order_edges() -> None:
    """Fresh: above the highest seq so far, or more than SEQ_RESET_WINDOW (1000) below it
    (a restarted boot). Equal, or up to 1000 below: a duplicate or late sample."""
    w = watch()
    assert Watchdog.is_newer(w, 7)  # the first sample
    w.last_seq = 5000
    assert Watchdog.is_newer(w, 5001)
    assert not Watchdog.is_newer(w, 5000)
    assert not Watchdog.is_newer(w, 4999)
    assert not Watchdog.is_newer(w, 5000 - SEQ_RESET_WINDOW)
    assert Watchdog.is_newer(w, 5000 - SEQ_RESET_WINDOW - 1)


# ---------------------------------------------------------------- rules 9 and 10


def test_program_refused_is_a_low_severity_record() -> None:
    a = Watchdog.program_refused(["too high", "too long"])
    assert (a.rule, a.severity, a.vent, a.alarm, a.action) == (
        Rule.PROGRAM_REFUSED, Severity.LOW, False, False, "refuse")
    assert a.detail == "too high; too long"


def test_user_stop_is_a_safety_event_without_vent() -> None:
    dog = Watchdog(LIMITS)
    ev = BootEvent(kind=EventKind.USER_STOP, ts=1.0, session_id="s1", detail="tingling")
    actions = dog.on_event(in_session(dog, watch()), ev, 1.0)
    assert len(actions) == 1
    assert actions[0].rule is Rule.USER_STOP and not actions[0].vent and actions[0].alarm
    assert actions[0].severity is Severity.MEDIUM and "tingling" in actions[0].detail
    done = BootEvent(kind=EventKind.SESSION_COMPLETED, ts=1.0, session_id="s1")
    assert dog.on_event(watch(), done, 1.0) == []


# ---------------------------------------------------------------- properties

CEILING = 100.0  # min(hard 120, device 120, clinic 100)
OVER = [t + 15 for t in TARGETS]

safe_value = st.floats(min_value=0, max_value=50, allow_nan=False)
safe_sample = st.lists(safe_value, min_size=4, max_size=4)


@st.composite
def deliveries(draw: st.DrawFn, n: int) -> list[int]:
    """Which seq arrives when: samples lost, duplicated and swapped with their neighbour."""
    order: list[int] = []
    for i in range(n):
        fate = draw(st.sampled_from(["ok"] * 6 + ["lost", "dup", "swap"]))
        if fate == "lost":
            continue
        order.append(i)
        if fate == "dup":
            order.append(i)
        elif fate == "swap" and len(order) >= 2:
            order[-1], order[-2] = order[-2], order[-1]
    return order


@st.composite
def traces(draw: st.DrawFn) -> tuple[list[list[float]], list[int]]:
    n = draw(st.integers(10, 60))
    trace = draw(st.lists(safe_sample, min_size=n, max_size=n))
    if draw(st.booleans()):  # one excursion: over target, or over the ceiling
        start = draw(st.integers(0, n - 1))
        chamber = draw(st.integers(0, 3))
        high = draw(st.booleans())
        lo = CEILING + 0.1 if high else OVER[chamber] + 0.1
        hi = 200.0 if high else CEILING
        for i in range(start, n):  # the chamber stays high: nothing vents it in this trace
            trace[i][chamber] = draw(st.floats(lo, hi))
    return trace, draw(deliveries(n))


def expected_vent_index(trace: list[list[float]], order: list[int]) -> int | None:
    """Where a vent must happen in the delivered stream: the first delivered sample over the
    ceiling, or the sample that completes K fresh (newer-seq) samples over target+tolerance."""
    newest = -1
    runs = [0] * 4
    for idx, seq in enumerate(order):
        ps = trace[seq]
        if max(ps) > CEILING:
            return idx
        if seq <= newest:
            continue
        newest = seq
        runs = [r + 1 if p > o else 0 for r, p, o in zip(runs, ps, OVER, strict=True)]
        if max(runs) >= LIMITS.over_target_samples:
            return idx
    return None


@settings(max_examples=400, deadline=None)
@given(traces())
def test_exactly_one_vent_per_episode_at_the_allowed_sample(
    case: tuple[list[list[float]], list[int]],
) -> None:
    trace, order = case
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch(period=0.1))
    vented_at = [idx for idx, seq in enumerate(order)
                 if vents(dog.on_telemetry(w, sample(trace[seq], seq), 0.1 * idx))]
    expected = expected_vent_index(trace, order)
    assert vented_at == ([] if expected is None else [expected])


@settings(max_examples=200, deadline=None)
@given(st.lists(safe_sample, min_size=1, max_size=300), st.data())
def test_a_trace_inside_every_limit_never_vents(trace: list[list[float]], data: st.DataObject
                                                ) -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch(period=0.1))
    order = data.draw(deliveries(len(trace)))
    for idx, seq in enumerate(order):
        assert dog.on_telemetry(w, sample(trace[seq], seq), 0.1 * idx) == []
        assert dog.on_tick(w, 0.1 * idx + 0.05) == []


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(0, 3))
def test_each_episode_gets_its_own_single_vent(episodes: int, chamber: int) -> None:
    dog = Watchdog(LIMITS)
    w = in_session(dog, watch(period=0.1))
    feed = Feed(dog, w)
    count = 0
    for _ in range(episodes):
        high = list(SAFE)
        high[chamber] = 150.0
        for _ in range(5):
            count += len(vents(feed(high)))
        for _ in range(3):
            feed(SAFE, vent=True)
        dog.start_session(w, "s1", PROGRAM, feed.t)  # a new session after the vent
    assert count == episodes


def test_an_implausible_reading_names_the_limit_it_broke() -> None:
    """-inf broke the low limit, +inf and NaN the high one (NaN has no side: the high)."""
    dog = Watchdog(LIMITS)
    for value, limit in ((-math.inf, -10.0), (math.inf, 250.0), (math.nan, 250.0),
                         (-10.5, -10.0), (250.5, 250.0)):
        w = watch()
        [a] = dog.on_telemetry(w, sample([value, 0, 0, 0], 1), 1.0)
        assert isinstance(a, SafetyAction) and a.rule is Rule.IMPLAUSIBLE_DATA
        assert a.limit == limit, (value, a.limit)


# ---------------------------------------------------------------- rule 5 under any traffic

RULE5_LIMITS = BACKLOG_LIMITS.model_copy(update={"telemetry_loss_floor_s": 1.0})
TICK = RULE5_LIMITS.tick_interval_s
GRACE = RULE5_LIMITS.receive_backlog_grace_s
JUNK = "junk"  # another client's messages (bad payloads, other boots) in the same socket


class _ModelBoot:
    def __init__(self, dog: Watchdog, name: str, period: float, offset: float) -> None:
        self.name, self.period, self.next_send = name, period, offset
        self.watch = watch(period=period)
        dog.start_session(self.watch, "s1", None, 0.0)
        self.limit = dog.silence_limit(self.watch)
        self.silent = False
        self.seq = 0
        self.last_read = 0.0  # the silence clock starts with the session
        self.first_overdue: float | None = None  # first tick that found it past its limit
        self.vented_at: float | None = None


class Rule5UnderAnyTraffic(RuleBasedStateMachine):
    """Rule 5 in a model of the gateway's loop: two boots and any other traffic share one
    socket (FIFO), read `capacity` messages per loop turn; the loop ticks every 1/8 s, or
    stalls (no read, no tick) while the boots keep sending. Checked at every tick:

    (a) no boot goes unvented later than limit + grace + one tick after the gateway received
        its last sample, nor later than the grace after the first tick that found it past
        its limit (the first tick after a stall): whatever the traffic, stalls and flags;
    (b) unless the traffic outruns the reader (`overload`), a boot that keeps sending is never
        vented for silence, however its samples are delayed by stalls and bursts.
    """

    @initialize(capacity=st.integers(4, 100), overload=st.booleans(),
                periods=st.tuples(*[st.sampled_from([0.125, 0.25, 0.5])] * 2),
                offsets=st.tuples(*[st.integers(0, 7)] * 2))
    def setup(self, capacity: int, overload: bool, periods: tuple[float, float],
              offsets: tuple[int, int]) -> None:
        self.dog = Watchdog(RULE5_LIMITS)
        self.capacity, self.overload = capacity, overload
        self.quiet, self.steady = (_ModelBoot(self.dog, name, p, k / 64) for name, p, k in
                                   zip(("quiet", "steady"), periods, offsets, strict=True))
        self.boots = {b.name: b for b in (self.quiet, self.steady)}
        self.socket: deque[list[object]] = deque()  # runs of [sender, count]
        self.queued = 0
        self.t = 0.0

    # ------------------------------------------------------------------ the model's parts

    def _put(self, sender: str, n: int = 1) -> None:
        if n <= 0:
            return
        if self.socket and self.socket[-1][0] == sender:
            self.socket[-1][1] += n  # type: ignore[operator]
        else:
            self.socket.append([sender, n])
        self.queued += n

    def _send_until(self, t: float) -> None:
        for boot in self.boots.values():
            while not boot.silent and boot.next_send <= t:
                self._put(boot.name)
                boot.next_send += boot.period

    def _room(self) -> int:
        """Without overload, the socket never holds more than 5 loop turns' worth."""
        return 5 * self.capacity - self.queued

    def _read(self) -> None:
        budget = self.capacity
        while budget and self.socket:
            run = self.socket[0]
            sender, n = run
            take = min(budget, n)  # type: ignore[call-overload]
            budget -= take
            self.queued -= take
            if take == n:
                self.socket.popleft()
            else:
                run[1] = n - take  # type: ignore[operator]
            if sender == JUNK:
                continue
            boot = self.boots[sender]  # type: ignore[index]
            for _ in range(take):
                boot.seq += 1
                assert self.dog.on_telemetry(boot.watch, sample(SAFE, boot.seq), self.t) == []
            boot.last_read, boot.first_overdue = self.t, None

    def _tick(self) -> None:
        backlog = self.queued > 0
        for boot in self.boots.values():
            if boot.vented_at is not None:
                continue
            overdue = self.t - boot.last_read > boot.limit
            if overdue and boot.first_overdue is None:
                boot.first_overdue = self.t
            actions = self.dog.on_tick(boot.watch, self.t, backlog)
            if any(isinstance(a, SafetyAction) and a.rule is Rule.TELEMETRY_LOSS
                   for a in actions):
                assert overdue, f"{boot.name} vented inside its limit at {self.t}"
                assert self.overload or boot.silent, (
                    f"{boot.name} vented at {self.t} while sending (last read "
                    f"{boot.last_read}, {self.queued} unread)")
                boot.vented_at = self.t
            elif boot.first_overdue is not None:
                bound = max(boot.last_read + boot.limit + TICK, boot.first_overdue) + GRACE
                assert self.t < bound, (
                    f"{boot.name} not vented at {self.t}: last sample read at "
                    f"{boot.last_read}, limit {boot.limit}, first overdue at "
                    f"{boot.first_overdue}, backlog {backlog}")

    def _step(self, read_first: bool, flood: int) -> None:
        self.t += TICK
        self._send_until(self.t)
        self._put(JUNK, flood)
        if read_first:
            self._read()
        self._tick()
        if not read_first:
            self._read()

    # ------------------------------------------------------------------ what can happen

    @rule(steps=st.integers(1, 24), read_first=st.booleans(), flood=st.integers(0, 300))
    def run(self, steps: int, read_first: bool, flood: int) -> None:
        """The loop runs on time: each 1/8 s, a read and a tick in either order, with `flood`
        other messages arriving per turn (at most half the reader's capacity unless
        overload)."""
        if not self.overload:
            flood = min(flood, self.capacity // 2)
        for _ in range(steps):
            self._step(read_first, flood)

    @rule(seconds=st.sampled_from([0.0625, 0.25, 0.5, 1.0, 1.5, 2.5, 4.0]))
    def stall(self, seconds: float) -> None:
        """The gateway's own loop stands still (CPU starvation, GC, a slow call): no read and
        no tick, while the boots keep sending into the socket.

        Without overload the reader keeps up on average: a stall comes only once the last
        one's backlog is down to a loop turn's worth. (Stalls back to back, with the reader
        never catching up, are traffic outrunning it: rule 5 then vents, on purpose, §3.6.)"""
        if not self.overload:
            if self.queued > self.capacity:
                return
            rate = sum(seconds / b.period + 1 for b in self.boots.values() if not b.silent)
            if rate > self._room():
                return
        self.t += seconds
        self._send_until(self.t)

    @rule(n=st.integers(1, 2000))
    def burst(self, n: int) -> None:
        """A burst of other messages lands in the socket at once."""
        self._put(JUNK, n if self.overload else min(n, self._room()))

    @precondition(lambda self: not self.quiet.silent)
    @rule()
    def go_silent(self) -> None:
        self.quiet.silent = True

    def teardown(self) -> None:
        """A silent boot whose last sample has been read is vented, once time runs on."""
        if not getattr(self, "quiet", None) or not self.quiet.silent or any(
                run[0] == self.quiet.name for run in self.socket):
            return
        for _ in range(200):
            if self.quiet.vented_at is not None:
                break
            self._step(True, 0)
        assert self.quiet.vented_at is not None


Rule5UnderAnyTraffic.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None)
test_rule_5_under_any_traffic = Rule5UnderAnyTraffic.TestCase
