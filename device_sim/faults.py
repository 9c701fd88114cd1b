"""Fault kinds for fleet simulations: what each one does to a boot and what the gateway must do.

A scenario (`device_sim.scenario`) lists faults by kind; its fault plan turns them into
`PlannedFault`s (when, which boot, which chamber). `inject` applies one to a running `SimBoot`
and `clear` takes it out again; both record it on the boot (`faults_injected`,
`faults_cleared`) with the true clock time, so the report can match what the gateway did.

`EXPECTED` says, per kind and with default parameters, which safety events (the `rule` tag of
`safety_event`) count as the gateway detecting it, whether it must vent, and which
`device_fault` kinds it leaves. Every entry was checked against `gateway/watchdog.py` and
`gateway/service.py` with the gateway's default settings; `expectation()` adjusts it for
parameters that change the outcome (a spike below the ceiling, a dead sensor that reads a
plausible value, ...). One entry is a requirement the gateway does not meet yet: a
`clock_step` must cause nothing, while today's rule 3 times inflation on the boot's clock
(see its note). It is kept as the requirement, not bent to today's gateway.

The gateway's rule names, default settings and `default_ceiling_mmhg` (re-exported here)
come from `device_sim.gateway_rules`, the simulator's one door into the gateway's rules.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal

import aiomqtt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from device_sim.boot import MalformedKind, SimBoot
from device_sim.gateway_rules import ProgramLimits, Rule, WatchdogSettings, default_ceiling_mmhg
from gateway.contract import SENSOR_MIN_MMHG

log = logging.getLogger(__name__)


class FaultKind(StrEnum):
    STUCK_VALVE = "stuck_valve"  # an inlet valve stays open: over-pressure
    SLOW_LEAK = "slow_leak"  # a chamber loses pressure: under-inflation, no hazard
    SENSOR_DROPOUT = "sensor_dropout"  # a dead transducer reads the bottom of its range
    SENSOR_SPIKE = "sensor_spike"  # one sample with a wild value
    SENSOR_NAN = "sensor_nan"  # one sample with NaN / infinity
    SILENCE = "silence"  # network loss: connected, but no telemetry
    DISCONNECT = "disconnect"  # the TCP link drops without DISCONNECT: the LWT fires
    RECONNECT_STORM = "reconnect_storm"  # many boots drop and reconnect at once
    USER_STOP = "user_stop"  # the patient presses the boot's stop button
    IGNORE_VENT = "ignore_vent"  # firmware ignores vents while a valve is stuck
    CLOCK_SKEW = "clock_skew"  # the boot's wall clock is off
    CLOCK_STEP = "clock_step"  # an NTP step of the boot's wall clock (and optionally back)
    MALFORMED = "malformed"  # garbage / wrong-type payloads on the telemetry topic


# ---------------------------------------------------------------- parameters per kind


class FaultParams(BaseModel):
    """Kind-specific parameters; `down_s`, where a kind has it, is how long the fault lasts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def hold_s(self) -> float | None:
        """Seconds from inject to clear: 0 for a one-off, None for the rest of the run."""
        return getattr(self, "down_s", 0.0)

    @property
    def return_s(self) -> float:
        """Seconds after the inject at which clearing the fault is an event of its own that
        must be judged too (a clock step's return); 0 for kinds whose clear is harmless."""
        return 0.0

    @property
    def clock_offset_s(self) -> float:
        """How far (either way) the fault moves the boot's wall clock, so its timestamps."""
        return 0.0


class NoParams(FaultParams):
    """Kinds without parameters (stuck_valve: cleared by the vent; user_stop: a press)."""


_DOWN = "seconds until the fault is cleared"


class SlowLeakParams(FaultParams):
    leak_mmhg_per_s: float = Field(2.0, gt=0, le=50, description="pressure lost per second "
                                   "while the chamber holds pressure")
    down_s: float | None = Field(None, gt=0, le=86400,
                                 description=f"{_DOWN}; null: the rest of the run")


class SensorDropoutParams(FaultParams):
    reading_mmhg: float = Field(
        SENSOR_MIN_MMHG, allow_inf_nan=True,
        description="what the dead sensor reports (default: the bottom of the transducer "
        "range, an open circuit; .nan is allowed); a plausible value here is NOT detectable",
    )
    down_s: float = Field(10.0, gt=0, le=86400, description=_DOWN)

    @field_validator("reading_mmhg")
    @classmethod
    def _bounded(cls, value: float) -> float:
        if math.isfinite(value) and abs(value) > 1000:
            raise ValueError("a finite reading must be within -1000..1000 mmHg")
        return value


class SensorSpikeParams(FaultParams):
    mmhg: float = Field(150.0, ge=-1000, le=1000, description="the value of the one bad sample")


class SensorNanParams(FaultParams):
    value: Literal["nan", "inf", "-inf"] = Field(
        "nan", description="the non-finite value of the one bad sample")


class SilenceParams(FaultParams):
    down_s: float = Field(10.0, gt=0, le=86400, description=_DOWN)


class DisconnectParams(FaultParams):
    down_s: float = Field(5.0, gt=0, le=86400, description="seconds before the boot reconnects")


class ReconnectStormParams(FaultParams):
    fraction: float = Field(0.25, gt=0, le=1, description="share of the fleet that drops")
    down_s: float = Field(3.0, gt=0, le=86400, description="seconds before they reconnect")


class IgnoreVentParams(FaultParams):
    down_s: float = Field(20.0, gt=0, le=86400,
                          description="seconds the firmware ignores vents (and the valve sticks)")


class ClockSkewParams(FaultParams):
    skew_s: float = Field(2.0, ge=-3600, le=3600, description="seconds the boot's clock is "
                          "ahead (negative: behind); see expectation() for large values")
    down_s: float | None = Field(None, gt=0, le=86400,
                                 description=f"{_DOWN}; null: the rest of the run")

    @property
    def clock_offset_s(self) -> float:
        return abs(self.skew_s)


class ClockStepParams(FaultParams):
    step_s: float = Field(-30.0, ge=-3600, le=3600, description="seconds the boot's wall clock "
                          "jumps at the injection (negative: backward, as NTP does to a clock "
                          "that ran fast)")
    return_after_s: float | None = Field(
        None, gt=0, le=86400, description="seconds until the clock steps back to true time "
        "(a forward step after a backward fault); null: it stays stepped for the rest of the run")

    @field_validator("step_s")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("a step of 0 s changes nothing")
        return value

    @property
    def hold_s(self) -> float | None:
        return self.return_after_s

    @property
    def return_s(self) -> float:
        return self.return_after_s or 0.0

    @property
    def clock_offset_s(self) -> float:
        return abs(self.step_s)


class MalformedParams(FaultParams):
    payload: MalformedKind = Field("not_json", description="what kind of garbage is sent")
    count: int = Field(1, ge=1, le=100, description="how many bad messages, back to back")


PARAMS: dict[FaultKind, type[FaultParams]] = {
    FaultKind.STUCK_VALVE: NoParams,
    FaultKind.SLOW_LEAK: SlowLeakParams,
    FaultKind.SENSOR_DROPOUT: SensorDropoutParams,
    FaultKind.SENSOR_SPIKE: SensorSpikeParams,
    FaultKind.SENSOR_NAN: SensorNanParams,
    FaultKind.SILENCE: SilenceParams,
    FaultKind.DISCONNECT: DisconnectParams,
    FaultKind.RECONNECT_STORM: ReconnectStormParams,
    FaultKind.USER_STOP: NoParams,
    FaultKind.IGNORE_VENT: IgnoreVentParams,
    FaultKind.CLOCK_SKEW: ClockSkewParams,
    FaultKind.CLOCK_STEP: ClockStepParams,
    FaultKind.MALFORMED: MalformedParams,
}

# Kinds that act on one chamber (the others ignore `chamber`).
CHAMBER_KINDS = frozenset({
    FaultKind.STUCK_VALVE, FaultKind.SLOW_LEAK, FaultKind.SENSOR_DROPOUT,
    FaultKind.SENSOR_SPIKE, FaultKind.SENSOR_NAN, FaultKind.IGNORE_VENT,
})

# The gateway's device_fault `kind` for each malformed payload (service._reject / decode).
MALFORMED_DEVICE_FAULT: dict[MalformedKind, str] = {
    "not_json": "not_json",
    "wrong_type": "invalid",
    "null_pressure": "invalid",
    "too_large": "too_large",
}


# ---------------------------------------------------------------- what the gateway must do


@dataclass(frozen=True, slots=True)
class Expectation:
    """The gateway's answer to one fault on one boot (gateway defaults)."""

    detected_by: frozenset[str]  # safety_event rule tags; any one of them counts as detection
    vent_expected: bool  # the detecting rule vents this boot (so a vent here is not false)
    session_required: bool  # inject only into a boot in session (else FaultNotApplied)
    device_faults: frozenset[str] = frozenset()  # device_fault kinds it leaves in InfluxDB
    also: frozenset[str] = frozenset()  # other rules it may trigger on that boot: not false
    only_in_session: bool = False  # nothing is detected if the boot was idle
    # The fault cuts the boot off from the gateway: its vent is the boot's own self-vent (due
    # within its heartbeat timeout); the gateway's vent can only arrive after the reconnect.
    self_vent: bool = False
    note: str = ""

    @property
    def detectable(self) -> bool:
        return bool(self.detected_by or self.device_faults)


def _rules(*rules: Rule) -> frozenset[str]:
    return frozenset(r.value for r in rules)


EXPECTED: dict[FaultKind, Expectation] = {
    FaultKind.STUCK_VALVE: Expectation(
        _rules(Rule.OVER_TARGET, Rule.HARD_CEILING), vent_expected=True, session_required=True,
        note="the chamber climbs to the relief valve (max + 5 mmHg): rule 2 after 3 samples "
        "above target + 15, or rule 1 first once it passes the ceiling (100 mmHg by default)",
    ),
    FaultKind.SLOW_LEAK: Expectation(
        frozenset(), vent_expected=False, session_required=True,
        note="under-inflation is no hazard the gateway checks; it must cause no vent",
    ),
    FaultKind.SENSOR_DROPOUT: Expectation(
        _rules(Rule.IMPLAUSIBLE_DATA), vent_expected=True, session_required=False,
        device_faults=_rules(Rule.IMPLAUSIBLE_DATA), also=_rules(Rule.VENT_NOT_CONFIRMED),
        note="a reading below -10 mmHg is rule 6 on the next sample; while it lasts the vent "
        "cannot be confirmed, so rule 8 re-sends every 5 s",
    ),
    FaultKind.SENSOR_SPIKE: Expectation(
        _rules(Rule.HARD_CEILING), vent_expected=True, session_required=False,
        note="one sample of 150 mmHg: above the 100 mmHg ceiling, inside the plausible range "
        "(above 250 it would be rule 6); in or out of a session",
    ),
    FaultKind.SENSOR_NAN: Expectation(
        _rules(Rule.IMPLAUSIBLE_DATA), vent_expected=True, session_required=False,
        device_faults=_rules(Rule.IMPLAUSIBLE_DATA),
        note="NaN/Infinity pass the schema on purpose and are rule 6 on that sample",
    ),
    FaultKind.SILENCE: Expectation(
        _rules(Rule.TELEMETRY_LOSS), vent_expected=True, session_required=True,
        also=_rules(Rule.VENT_NOT_CONFIRMED),
        note="rule 5 after max(3 s, 6 periods) of silence; the boot obeys the vent but, still "
        "silent, cannot confirm it, so rule 8 re-sends until telemetry returns",
    ),
    FaultKind.DISCONNECT: Expectation(
        _rules(Rule.OFFLINE_IN_SESSION), vent_expected=True, session_required=True,
        self_vent=True,
        note="the LWT makes rule 7 fire at once; the boot vents itself (connection lost, "
        "within its heartbeat timeout at the latest) and receives the gateway's vent only "
        "after it reconnects (clean start: the broker drops it), so that vent is not timed",
    ),
    FaultKind.RECONNECT_STORM: Expectation(
        _rules(Rule.OFFLINE_IN_SESSION), vent_expected=True, session_required=False,
        only_in_session=True, self_vent=True,
        note="as disconnect, for each boot of the storm that was in session; idle boots "
        "just go offline and come back",
    ),
    FaultKind.USER_STOP: Expectation(
        _rules(Rule.USER_STOP), vent_expected=False, session_required=True,
        note="rule 10 records it (medium alarm); no vent: the boot's own stop deflates it",
    ),
    FaultKind.IGNORE_VENT: Expectation(
        _rules(Rule.VENT_NOT_CONFIRMED), vent_expected=True, session_required=True,
        also=_rules(Rule.OVER_TARGET, Rule.HARD_CEILING),
        note="a stuck valve is vented (rule 1 or 2), the firmware ignores it, and rule 8 "
        "re-sends with a high alarm 5 s later, up to 10 times",
    ),
    FaultKind.CLOCK_SKEW: Expectation(
        frozenset(), vent_expected=False, session_required=False,
        note="2 s of skew change no rule; stored telemetry (stamped with the boot's time) "
        "is shifted by it",
    ),
    FaultKind.CLOCK_STEP: Expectation(
        frozenset(), vent_expected=False, session_required=True,
        note="a wall-clock step (and its return) must cause no safety event and no vent: the "
        "gateway must time every duration on its own monotonic clock. Today's gateway times "
        "rule 3 on the boot's timestamps, so a forward step, or the return of a backward one, "
        "while a chamber is inflated can give a false sustained_inflation vent: a known hole, "
        "this expectation fails until it is fixed. Stored telemetry is shifted by the step",
    ),
    FaultKind.MALFORMED: Expectation(
        frozenset(), vent_expected=False, session_required=False,
        device_faults=frozenset({"not_json"}),
        note="dropped as bad input and stored as a device_fault; never acted on",
    ),
}

VENT_WORTHY = frozenset(k for k, e in EXPECTED.items() if e.vent_expected)


def expectation(
    kind: FaultKind, params: FaultParams | None = None, *, ceiling_mmhg: float | None = None,
    limits: WatchdogSettings | None = None,
) -> Expectation:
    """EXPECTED[kind], adjusted for parameters that change the gateway's answer."""
    base = EXPECTED[kind]
    limits = limits or WatchdogSettings()
    ceiling = default_ceiling_mmhg() if ceiling_mmhg is None else ceiling_mmhg
    lo, hi = limits.plausible_min_mmhg, limits.plausible_max_mmhg

    def implausible(v: float) -> bool:
        return not math.isfinite(v) or v < lo or v > hi

    if isinstance(params, SensorSpikeParams):
        if implausible(params.mmhg):
            return Expectation(
                _rules(Rule.IMPLAUSIBLE_DATA), vent_expected=True, session_required=False,
                device_faults=_rules(Rule.IMPLAUSIBLE_DATA),
                note=f"{params.mmhg:g} mmHg is outside the plausible {lo:g}..{hi:g}: rule 6")
        if params.mmhg <= ceiling:
            return Expectation(
                frozenset(), vent_expected=False, session_required=False,
                note=f"one plausible sample at or below the {ceiling:g} mmHg ceiling: no rule "
                "acts on a single sample (rule 2 needs 3 in a row)")
    elif isinstance(params, SensorDropoutParams) and not implausible(params.reading_mmhg):
        return Expectation(
            frozenset(), vent_expected=False, session_required=False,
            note=f"a dead sensor reading a plausible {params.reading_mmhg:g} mmHg is invisible "
            "to the gateway (docs/safety.md §6)")
    elif isinstance(params, MalformedParams):
        return Expectation(
            frozenset(), vent_expected=False, session_required=False,
            device_faults=frozenset({MALFORMED_DEVICE_FAULT[params.payload]}), note=base.note)
    elif isinstance(params, ClockSkewParams):
        notes = []
        # Rule 3 times inflation on the boot's clock; a chamber stays above the inflated level
        # up to ~1 s longer than the program's longest inflation, inside the grace.
        if params.skew_s > limits.sustained_inflation_grace_s - 1.0:
            notes.append(f"a forward step of {params.skew_s:g} s while a chamber is inflated "
                         "makes rule 3 see a longer inflation than there was: a false "
                         "sustained_inflation vent is possible")
        expiry = ProgramLimits().start_expiry_s
        if params.skew_s > expiry:
            notes.append(f"{params.skew_s:g} s ahead is past the {expiry:g} s start expiry: the "
                         "boot rejects every start as expired (sessions fail, no safety event)")
        if notes:
            return Expectation(
                frozenset(), vent_expected=False, session_required=False,
                also=_rules(Rule.SUSTAINED_INFLATION) if notes[0].startswith("a forward")
                else frozenset(), note="; ".join(notes))
    elif isinstance(params, ClockStepParams):
        # Still nothing may happen, whatever the step (no rule is excused, unlike a skew's).
        expiry = ProgramLimits().start_expiry_s
        if params.step_s > expiry:
            return replace(base, note=f"{base.note}; {params.step_s:g} s ahead is past the "
                           f"{expiry:g} s start expiry: until the return the boot rejects "
                           "every start as expired (sessions fail, no safety event)")
    return base


def nominal_detect_s(kind: FaultKind, telemetry_period_s: float,
                     limits: WatchdogSettings | None = None) -> float:
    """Longest time the gateway's default rules take to detect `kind`, before network delay.

    A scenario's detection window shorter than this can only fail.
    """
    limits = limits or WatchdogSettings()
    period = telemetry_period_s
    tick = limits.tick_interval_s
    # A stuck chamber passes target + 15 / the ceiling within ~2.5 s (tau 1.5 s towards the
    # relief valve); rule 2 then needs its consecutive samples.
    over_pressure = 2.5 + limits.over_target_samples * period
    silence = max(limits.telemetry_loss_floor_s, limits.telemetry_loss_periods * period)
    return {
        FaultKind.STUCK_VALVE: over_pressure,
        FaultKind.IGNORE_VENT: over_pressure + limits.vent_confirm_deadline_s + tick,
        FaultKind.SILENCE: silence + tick,
        FaultKind.SENSOR_DROPOUT: period,
        FaultKind.SENSOR_SPIKE: period,
        FaultKind.SENSOR_NAN: period,
    }.get(kind, 0.0)


# ---------------------------------------------------------------- the plan and its execution


@dataclass(frozen=True, slots=True)
class PlannedFault:
    """One fault on one boot at one time, as `Scenario.fault_plan` lays them out."""

    at_s: float  # seconds after the run starts
    boot_index: int  # 0-based index into Scenario.boot_ids()
    kind: FaultKind
    chamber: int | None  # 1-based (as safety events count), None for kinds without one
    params: FaultParams
    spec_index: int = 0  # which entry of the scenario's `faults`
    group: int = 0  # faults injected together share it (the boots of one reconnect storm)
    detect_within_s: float = 10.0  # the scenario's detection window for this kind

    @property
    def clear_at_s(self) -> float | None:
        """When to call clear(): None for one-off faults and those lasting the whole run."""
        hold = self.params.hold_s
        return None if not hold else self.at_s + hold

    @property
    def expectation(self) -> Expectation:
        return expectation(self.kind, self.params)


class FaultNotApplied(RuntimeError):
    """The fault could not be put into this boot now (idle, offline); count it, do not guess."""


def _chamber0(boot: SimBoot, fault: PlannedFault) -> int:
    chamber = (fault.chamber or 1) - 1
    if not 0 <= chamber < boot.chambers:
        raise FaultNotApplied(f"{boot.key} has no chamber {fault.chamber}")
    return chamber


async def inject(boot: SimBoot, fault: PlannedFault) -> None:
    """Put `fault` into a running boot and record it. Raises FaultNotApplied when the boot
    is not in a state the fault needs (no session for a kind that needs one, offline)."""
    if EXPECTED[fault.kind].session_required and not boot.in_session:
        raise FaultNotApplied(f"{fault.kind} needs a session; {boot.key} is idle")
    p = fault.params
    at = boot.clock()
    try:
        match fault.kind:
            case FaultKind.STUCK_VALVE:
                boot.inject_stuck_valve(_chamber0(boot, fault))
            case FaultKind.SLOW_LEAK:
                assert isinstance(p, SlowLeakParams)
                boot.model.leak(_chamber0(boot, fault), p.leak_mmhg_per_s)
            case FaultKind.SENSOR_DROPOUT:
                assert isinstance(p, SensorDropoutParams)
                boot.set_sensor_dropout(_chamber0(boot, fault), p.reading_mmhg)
            case FaultKind.SENSOR_SPIKE:
                assert isinstance(p, SensorSpikeParams)
                boot.inject_spike(_chamber0(boot, fault), p.mmhg)
            case FaultKind.SENSOR_NAN:
                assert isinstance(p, SensorNanParams)
                boot.inject_spike(_chamber0(boot, fault), float(p.value))
            case FaultKind.SILENCE:
                boot.set_silent(True)
            case FaultKind.DISCONNECT | FaultKind.RECONNECT_STORM:
                assert isinstance(p, DisconnectParams | ReconnectStormParams)
                boot.drop_connection(offline_s=p.down_s)
            case FaultKind.USER_STOP:
                await boot.press_stop()
            case FaultKind.IGNORE_VENT:
                chamber = _chamber0(boot, fault)
                boot.set_ignore_vents(True)
                boot.inject_stuck_valve(chamber)
            case FaultKind.CLOCK_SKEW:
                assert isinstance(p, ClockSkewParams)
                boot.set_clock_skew(p.skew_s)
            case FaultKind.CLOCK_STEP:
                assert isinstance(p, ClockStepParams)
                boot.step_clock(p.step_s)
            case FaultKind.MALFORMED:
                assert isinstance(p, MalformedParams)
                for _ in range(p.count):
                    await boot.publish_malformed(p.payload)
    except aiomqtt.MqttError as exc:
        raise FaultNotApplied(f"{fault.kind} on {boot.key}: {exc}") from exc
    boot.record_fault(fault.kind.value, at=at)
    log.info("fault injected", extra={"boot": boot.key, "kind": fault.kind.value,
                                      "chamber": fault.chamber, "at_s": fault.at_s})


async def clear(boot: SimBoot, fault: PlannedFault) -> None:
    """Take `fault` out again (the end of its down_s); one-off kinds need nothing."""
    match fault.kind:
        case FaultKind.SLOW_LEAK:
            boot.model.leak(_chamber0(boot, fault), 0.0)
        case FaultKind.SENSOR_DROPOUT:
            boot.clear_sensor_dropout(_chamber0(boot, fault))
        case FaultKind.SILENCE:
            boot.set_silent(False)
        case FaultKind.DISCONNECT | FaultKind.RECONNECT_STORM:
            boot.reconnect_now()
        case FaultKind.IGNORE_VENT:
            boot.set_ignore_vents(False)
            boot.model.clear_stuck(_chamber0(boot, fault))
        case FaultKind.CLOCK_SKEW:
            boot.set_clock_skew(0.0)
        case FaultKind.CLOCK_STEP:  # the return: stepped back by as much, to true time
            assert isinstance(fault.params, ClockStepParams)
            boot.step_clock(-fault.params.step_s)
        case _:
            return
    boot.record_fault(fault.kind.value, cleared=True)
    log.info("fault cleared", extra={"boot": boot.key, "kind": fault.kind.value})


async def run_fault(boot: SimBoot, fault: PlannedFault) -> None:
    """Inject now, then clear after the fault's duration (a pacing sleep, not a sync point)."""
    await inject(boot, fault)
    hold = fault.params.hold_s
    if hold:
        await asyncio.sleep(hold)
        await clear(boot, fault)
