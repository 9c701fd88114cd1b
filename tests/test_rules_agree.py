"""Rule 9 and the watchdog agree, and the watchdog's durations survive clock steps.

* Any program rule 9 accepts, run by a correct boot, trips no rule: by the simulator's
  physics (first-order valves, noise) and by the slowest boot `docs/protocol.md` §9 allows
  (each chamber takes all of `inflate_s` to rise and all of `deflate_s` to fall). The
  inflation that rule 9 checks and the one rule 3 enforces come from one model of the cycle
  (`SessionProgram.longest_inflation_s`, deflate included).
* A step of the boot's wall clock, either way and back, neither vents a healthy boot nor
  hides a stuck inflation from rule 3 for as long as the step.
"""

from __future__ import annotations

import random

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from device_sim.physics import BootModel
from gateway.contract import Phase, ProgramTiming, SessionProgram, Telemetry
from gateway.programs import BootLimits, check_program
from gateway.settings import ProgramLimits, WatchdogSettings
from gateway.watchdog import BootWatch, Rule, SafetyAction, Watchdog

LIMITS = ProgramLimits()
WATCHDOG = WatchdogSettings()
WALL0 = 1_767_261_600.0


def boot_limits(chambers: int) -> BootLimits:
    return BootLimits("c1", chambers, 120.0, True, False,
                      gateway_ceiling_mmhg=WATCHDOG.hard_ceiling_mmhg,
                      gateway_max_inflation_s=WATCHDOG.max_inflation_s, telemetry_period_s=2.0)


@st.composite
def programs(draw: st.DrawFn) -> SessionProgram:
    n = draw(st.integers(1, 8))
    highest = LIMITS.clinic_ceiling_mmhg - LIMITS.ceiling_margin_mmhg
    first = draw(st.floats(LIMITS.min_pressure_mmhg, highest))
    targets = [first]
    for _ in range(n - 1):
        targets.append(draw(st.floats(LIMITS.min_pressure_mmhg, targets[-1])))
    # a cycle of 20-60 s (rule 9's bounds), split at random into its four phases
    cycle = draw(st.floats(LIMITS.min_cycle_s, LIMITS.max_cycle_s))
    w = [draw(st.floats(0.05, 1.0)) for _ in range(4)]
    w[1] *= draw(st.sampled_from([0.0, 1.0]))  # hold 0 sometimes
    w[3] *= draw(st.sampled_from([0.0, 1.0]))  # pause 0 sometimes
    share = [cycle * x / sum(w) for x in w]
    timing = ProgramTiming(inflate_s=max(0.01, share[0] / n), hold_s=share[1],
                           deflate_s=max(0.01, share[2]), pause_s=share[3])
    program = SessionProgram(
        name="p", targets_mmhg=[round(t, 1) for t in targets],
        duration_s=draw(st.floats(LIMITS.min_duration_s, LIMITS.min_duration_s + 300)),
        timing=timing)
    if draw(st.booleans()):
        program = program.model_copy(update={"max_inflation_s": program.longest_inflation_s()
                                             + draw(st.floats(0.0, 10.0))})
    return program


class SlowestBoot:
    """The cycle of protocol.md §9 taken literally: linear ramps over the whole of inflate_s
    and deflate_s (the boot the report's firmware team wrote). Same interface as BootModel."""

    def __init__(self, program: SessionProgram) -> None:
        self.program = program
        self._done = False

    def step(self, t: float) -> tuple[Phase, list[float]]:
        prog, timing = self.program, self.program.timing
        n = len(prog.targets_mmhg)
        if t >= prog.duration_s:
            self._done = True
        u = t % timing.cycle_s(n)
        deflate_at = n * timing.inflate_s + timing.hold_s
        pressures = []
        for i, target in enumerate(prog.targets_mmhg):
            start = i * timing.inflate_s
            if u < start:
                p = 0.0
            elif u < deflate_at:
                p = target * min(1.0, (u - start) / timing.inflate_s)
            elif u < deflate_at + timing.deflate_s:
                p = target * (1 - (u - deflate_at) / timing.deflate_s)
            else:
                p = 0.0
            pressures.append(p)
        phase = (Phase.INFLATE if u < n * timing.inflate_s else Phase.HOLD if u < deflate_at
                 else Phase.DEFLATE if u < deflate_at + timing.deflate_s else Phase.PAUSE)
        return phase, pressures

    def poll_completed(self) -> bool:
        return self._done


def run_session(program: SessionProgram, period: float, seed: int, slowest: bool = False
                ) -> list[SafetyAction]:
    """A correct boot runs the program to its end; the watchdog sees every sample and tick."""
    dog = Watchdog(WATCHDOG)
    n = len(program.targets_mmhg)
    watch = BootWatch(chambers=n, device_max_mmhg=120.0, clinic_ceiling_mmhg=100.0,
                      telemetry_period_s=period)
    boot: BootModel | SlowestBoot
    if slowest:
        boot = SlowestBoot(program)
    else:
        boot = BootModel(n, 120.0, rng=random.Random(seed))
        boot.start(program, 0.0)
    dog.start_session(watch, "s1", program, 0.0)
    acted: list[SafetyAction] = []
    t, seq = 0.0, 0
    while True:
        t += period
        phase, pressures = boot.step(t)
        if boot.poll_completed():
            break  # the boot sends session_completed: the gateway ends the session
        seq += 1
        sample = Telemetry(seq=seq, ts=WALL0 + t, session_id="s1", session_elapsed_s=t,
                           phase=phase, pressures=pressures)
        for out in dog.on_telemetry(watch, sample, t) + dog.on_tick(watch, t + period / 2):
            if isinstance(out, SafetyAction):
                acted.append(out)
    return acted


@settings(max_examples=60, deadline=None)
@given(programs(), st.sampled_from([0.5, 1.0, 2.0]), st.integers(0, 1000))
@example(  # the program of the report: accepted, then vented after 27.5 s by rule 3
    SessionProgram(name="p", targets_mmhg=[60, 57, 54, 51], duration_s=600,
                   timing=ProgramTiming(inflate_s=5, hold_s=0, deflate_s=30, pause_s=0)),
    0.5, 0)
def test_a_program_rule_9_accepts_trips_no_rule_on_a_correct_boot(
        program: SessionProgram, period: float, seed: int) -> None:
    assume(not check_program(program, boot_limits(len(program.targets_mmhg)), LIMITS))
    assert run_session(program, period, seed) == []
    assert run_session(program, period, seed, slowest=True) == []


def test_rule_9_refuses_a_max_inflation_shorter_than_the_programs_own() -> None:
    program = SessionProgram(name="p", targets_mmhg=[60, 57, 54, 51], duration_s=600,
                             timing=ProgramTiming(inflate_s=4, hold_s=6, deflate_s=6, pause_s=6),
                             max_inflation_s=27.9)
    reasons = check_program(program, boot_limits(4), LIMITS)
    assert reasons == ["max_inflation_s 27.9 s is shorter than the program's own longest "
                       "inflation of 28 s (n x inflate_s + hold_s + deflate_s)"]
    fits = program.model_copy(update={"max_inflation_s": 28.0})
    assert check_program(fits, boot_limits(4), LIMITS) == []


def test_rule_9_refuses_an_inflation_above_the_watchdogs_cap() -> None:
    program = SessionProgram(name="p", targets_mmhg=[60, 57], duration_s=600,
                             timing=ProgramTiming(inflate_s=5, hold_s=10, deflate_s=30,
                                                  pause_s=5))  # inflated 50 s per cycle
    tight = BootLimits("c1", 2, 120.0, True, False, gateway_max_inflation_s=49.0)
    assert any("above the gateway's limit of 49 s" in r
               for r in check_program(program, tight, LIMITS))
    assert check_program(program, boot_limits(2), LIMITS) == []


def test_rule_9_refuses_a_cycle_that_does_not_let_the_chambers_empty() -> None:
    """Found by the property test: 1 chamber, hold 20 s, deflate 1 s, no pause. The chamber
    never reads below the inflated level, a fixed squeeze; rule 3 vents it after 30 s."""
    squeeze = SessionProgram(name="p", targets_mmhg=[67], duration_s=600,
                             timing=ProgramTiming(inflate_s=4, hold_s=20, deflate_s=1,
                                                  pause_s=0))
    assert check_program(squeeze, boot_limits(1), LIMITS) == [
        "deflate_s + pause_s is 1 s per cycle; at least 4 s are needed so every chamber "
        "empties and is seen empty (intermittent, never a fixed squeeze)"]
    assert [a.rule for a in run_session(squeeze, 0.5, 0)][:1] == [Rule.SUSTAINED_INFLATION]
    slow = BootLimits("c1", 1, 120.0, True, False, telemetry_period_s=5.0)
    released = squeeze.model_copy(update={"timing": squeeze.timing.model_copy(
        update={"pause_s": 8.0})})
    assert check_program(released, boot_limits(1), LIMITS) == []
    assert "at least 10 s are needed" in check_program(released, slow, LIMITS)[0]


def test_rule_9_refuses_a_start_while_the_gateways_vent_is_unconfirmed() -> None:
    program = SessionProgram(name="p", targets_mmhg=[60, 57], duration_s=600,
                             timing=ProgramTiming(inflate_s=5, hold_s=5, deflate_s=5, pause_s=5))
    venting = BootLimits("c1", 2, 120.0, True, False, venting=True)
    assert check_program(program, venting, LIMITS) == [
        "the gateway's vent of this boot is not confirmed yet (rule 8)"]


# ---------------------------------------------------------------- clock steps (rule 3)

PROGRAM = SessionProgram(
    name="p", targets_mmhg=[60.0, 58.0, 56.0, 54.0], duration_s=600,
    timing=ProgramTiming(inflate_s=4, hold_s=6, deflate_s=6, pause_s=6),
)  # rule-3 limit: 4 x 4 + 6 + 6 + 5 s grace = 33 s


def feed_cycles(dog: Watchdog, watch: BootWatch, seconds: float,
                offset_at: dict[float, float], held: bool = False, period: float = 0.5
                ) -> list[tuple[float, Rule]]:
    """A boot cycling PROGRAM (chamber 0 held inflated if `held`); its wall clock gets the
    offset `offset_at[t]` from model time t on. Returns (time, rule) of every vent."""
    vents = []
    offset = 0.0
    seq = 0
    t = 0.0
    cycle = PROGRAM.timing.cycle_s(4)
    while t < seconds:
        t = round(t + period, 6)
        offset = offset_at.get(t, offset)
        u = t % cycle
        inflated = u < 4 * 4 + 6  # inflating or holding
        p0 = 60.0 if held or inflated else 0.0
        seq += 1
        sample = Telemetry(seq=seq, ts=WALL0 + t + offset, session_id="s1",
                           session_elapsed_s=t, phase=Phase.HOLD, pressures=[p0, 0, 0, 0])
        for out in dog.on_telemetry(watch, sample, t):
            if isinstance(out, SafetyAction) and out.vent:
                vents.append((t, out.rule))
    return vents


def new_watch(dog: Watchdog) -> BootWatch:
    watch = BootWatch(chambers=4, device_max_mmhg=120, clinic_ceiling_mmhg=100,
                      telemetry_period_s=0.5)
    dog.start_session(watch, "s1", PROGRAM, 0.0)
    return watch


def test_a_clock_step_back_and_its_return_do_not_vent_a_healthy_boot() -> None:
    """The report's trace: back 30 s, and 25 s later forward again (NTP both times)."""
    dog = Watchdog(WATCHDOG)
    for start in (2.0, 9.5, 15.0, 21.0):  # the steps land in every part of a cycle
        assert feed_cycles(dog, new_watch(dog), 200, {start: -30.0, start + 25: 0.0}) == []


def test_a_forward_clock_step_does_not_vent_a_healthy_boot() -> None:
    dog = Watchdog(WATCHDOG)
    for start in (2.0, 9.5, 15.0, 21.0):
        assert feed_cycles(dog, new_watch(dog), 200, {start: 45.0}) == []


def test_a_stuck_inflation_is_vented_on_time_while_the_boot_clock_is_behind() -> None:
    """Inflated from t=0.5 s; the clock steps back 30 s at t=5 s: rule 3 must still vent
    once the chamber has been up 33 s of real time, not 30 s later."""
    dog = Watchdog(WATCHDOG)
    vents = feed_cycles(dog, new_watch(dog), 60, {5.0: -30.0}, held=True)
    assert vents and vents[0][1] is Rule.SUSTAINED_INFLATION
    assert 33.5 <= vents[0][0] <= 34.5


def test_a_stuck_inflation_is_vented_on_time_after_a_forward_step() -> None:
    dog = Watchdog(WATCHDOG)
    vents = feed_cycles(dog, new_watch(dog), 60, {5.0: 20.0}, held=True)
    assert vents and vents[0][1] is Rule.SUSTAINED_INFLATION
    assert 33.5 <= vents[0][0] <= 34.5
