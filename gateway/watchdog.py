"""The safety watchdog: pure rules over (boot watch state, sample, now) returning actions.

No I/O and no clock of its own: the caller passes `now` (monotonic seconds) so every rule can
be tested exhaustively. The caller carries out the actions (vent first, then storage).

One vent per episode: once a vent is decided the boot is `venting`, and no rule vents it again
until every chamber is back below the safe level; until then rule 8 (vent not confirmed)
re-sends the vent at its deadline and raises a high-priority alarm.

Samples are ordered by `seq`: a duplicate or late (reordered) sample is checked for the
instantaneous hazards (rules 1 and 6) but does not advance the per-sample counters of rule 2.

Every duration is measured so that it stays right through a step of the boot's clock (NTP
steps real devices, either way) and through a stall of the gateway's own event loop: rules 4,
5 and 8 run on the gateway's monotonic clock; rule 3 runs on `BootWatch.step_free_s`, the boot's
sample times with every step taken out by the gateway's monotonic clock (`_advance_clock`).

Rule 5 judges silence on receive times. Input still unread in the gateway's socket (`backlog`
in `on_tick`, after a stall of the gateway's own loop or under a flood) may hold a boot's
newest samples, so an overdue boot is then given `receive_backlog_grace_s` more, once per
silence and never longer: no input, however much or however timed, can defer a vent past
limit + grace + one tick from the last sample received (`_silence`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

from gateway.contract import BootEvent, EventKind, Phase, SessionProgram, Severity, Telemetry
from gateway.settings import WatchdogSettings

# A seq this far below the last one is a restarted boot, not a late sample.
SEQ_RESET_WINDOW = 1000
# A sample in one of these phases, with a session id, shows a boot still running its cycle
# (a phase this gateway does not know included): low pressure then is a pause, not a vent, so
# rule 8 waits for the boot to show it vented; and the session is still on.
CYCLE_PHASES = frozenset(Phase) - {Phase.IDLE, Phase.VENT}
# Rule 3's clock: between two samples, the boot's clock may run this much ahead of the
# gateway's before the difference is taken for a step (network jitter stays well below).
CLOCK_STEP_TOLERANCE_S = 0.5
# Gateway time not yet matched by the boot's clock is kept at most this long, so a gateway
# stall's backlog is still timed by the boots' own sample times.
CLOCK_CREDIT_CAP_S = 10.0


class Rule(StrEnum):
    HARD_CEILING = "hard_ceiling"  # 1
    OVER_TARGET = "over_target"  # 2
    SUSTAINED_INFLATION = "sustained_inflation"  # 3
    SESSION_OVERRUN = "session_overrun"  # 4
    TELEMETRY_LOSS = "telemetry_loss"  # 5
    IMPLAUSIBLE_DATA = "implausible_data"  # 6
    OFFLINE_IN_SESSION = "offline_in_session"  # 7
    VENT_NOT_CONFIRMED = "vent_not_confirmed"  # 8
    PROGRAM_REFUSED = "program_refused"  # 9
    USER_STOP = "user_stop"  # 10


RULE_NUMBER = {rule: n for n, rule in enumerate(Rule, start=1)}


@dataclass(frozen=True, slots=True)
class SafetyAction:
    rule: Rule
    severity: Severity
    vent: bool
    alarm: bool
    detail: str
    chamber: int | None = None  # 1-based, distal to proximal
    value: float | None = None
    limit: float | None = None
    stop: bool = False  # send a stop before the vent (rule 4)
    fault: bool = False  # the boot's data is at fault (rule 6)
    record: bool = True  # store as a safety event (False: a repeat inside the same episode)

    @property
    def action(self) -> str:
        if self.vent:
            return "stop+vent" if self.stop else "vent"
        return "refuse" if self.rule is Rule.PROGRAM_REFUSED else "alarm"


@dataclass(frozen=True, slots=True)
class VentConfirmed:
    """Every chamber is below the safe level again: the episode is over."""

    after_s: float | None
    resends: int


Outcome = SafetyAction | VentConfirmed


@dataclass(slots=True)
class BootWatch:
    """What the watchdog remembers of one boot between samples."""

    chambers: int
    device_max_mmhg: float
    clinic_ceiling_mmhg: float
    telemetry_period_s: float
    online: bool = True
    # the running session (None when idle)
    session_id: str | None = None
    targets_mmhg: list[float] | None = None
    session_started_at: float | None = None
    session_duration_s: float | None = None
    overrun_limit_s: float | None = None  # rule 4: running longer than this is an overrun
    inflation_limit_s: float | None = None
    overrun_reported: bool = False
    start_provisional: bool = False  # session_started_at is a guess until the boot's elapsed
    # samples
    last_sample_at: float | None = None
    last_seq: int | None = None
    over_target_run: list[int] = field(default_factory=list)
    inflated_since: list[float | None] = field(default_factory=list)
    silence_reported: bool = False
    # rule 5: from when this silence counts as overdue (None: not overdue); see _silence
    silence_due_since: float | None = None
    # rule 3's step-free clock (see _advance_clock)
    step_free_s: float = 0.0
    clock_device_ts: float | None = None
    clock_gateway_s: float | None = None
    clock_credit_s: float = 0.0
    # the vent episode
    venting: bool = False
    vent_sent_at: float | None = None
    vent_first_sent_at: float | None = None
    vent_resends: int = 0

    def __post_init__(self) -> None:
        self.over_target_run = [0] * self.chambers
        self.inflated_since = [None] * self.chambers

    @property
    def in_session(self) -> bool:
        return self.session_id is not None

    def end_session(self) -> None:
        self.session_id = None
        self.targets_mmhg = None
        self.session_started_at = None
        self.session_duration_s = None
        self.overrun_limit_s = None
        self.inflation_limit_s = None
        self.over_target_run = [0] * self.chambers


class Watchdog:
    def __init__(self, limits: WatchdogSettings) -> None:
        self.limits = limits

    # ------------------------------------------------------------------ limits

    def ceiling(self, watch: BootWatch) -> float:
        return min(self.limits.hard_ceiling_mmhg, watch.device_max_mmhg, watch.clinic_ceiling_mmhg)

    def silence_limit(self, watch: BootWatch) -> float:
        return max(
            self.limits.telemetry_loss_floor_s,
            self.limits.telemetry_loss_periods * watch.telemetry_period_s,
        )

    def inflation_limit(self, program: SessionProgram | None) -> float:
        """Rule 3: the program's longest inflation plus grace, never above the absolute cap.

        `SessionProgram.longest_inflation_s` is the same model rule 9 checks a program with,
        so a program that passed rule 9 run by a correct boot cannot trip this rule.
        """
        if program is None:
            return self.limits.max_inflation_s
        longest = program.max_inflation_s or program.longest_inflation_s()
        return min(self.limits.max_inflation_s, longest + self.limits.sustained_inflation_grace_s)

    def overrun_limit(self, program: SessionProgram) -> float:
        """Rule 4: the program's duration, its final deflate, then the grace."""
        return program.duration_s + program.timing.deflate_s + self.limits.overrun_grace_s

    # ------------------------------------------------------------------ session bookkeeping

    def start_session(
        self, watch: BootWatch, session_id: str, program: SessionProgram | None, now: float,
        elapsed_s: float = 0.0, provisional: bool = False,
    ) -> None:
        """Program None: a session resumed from telemetry alone (rules 2 and 4 cannot apply).

        provisional: `elapsed_s` is a guess that the boot's next `session_elapsed_s` replaces.
        """
        watch.session_id = session_id
        watch.start_provisional = provisional
        watch.targets_mmhg = list(program.targets_mmhg) if program else None
        watch.session_started_at = now - elapsed_s
        watch.session_duration_s = program.duration_s if program else None
        watch.overrun_limit_s = self.overrun_limit(program) if program else None
        watch.inflation_limit_s = self.inflation_limit(program)
        watch.overrun_reported = False
        watch.over_target_run = [0] * watch.chambers
        watch.silence_reported = False
        watch.silence_due_since = None
        watch.last_seq = None  # a boot may have rebooted since its last sample
        # The silence clock starts with the session: a boot just back online has its whole
        # limit to send its first sample, not what is left since its last one.
        watch.last_sample_at = now

    def vent_sent(self, watch: BootWatch, now: float) -> None:
        """A vent went out (by a rule or by hand): the confirmation deadline runs from now."""
        watch.venting = True
        watch.vent_sent_at = now
        if watch.vent_first_sent_at is None:
            watch.vent_first_sent_at = now

    # ------------------------------------------------------------------ rules on samples

    def on_telemetry(self, watch: BootWatch, sample: Telemetry, now: float) -> list[Outcome]:
        """Rules 6, 1, 2, 3, and the end of a vent episode."""
        fresh = self._is_fresh(watch, sample.seq)
        watch.last_sample_at = now
        watch.silence_reported = False
        watch.silence_due_since = None
        pressures = sample.pressures
        step_free = watch.step_free_s
        if fresh:
            step_free = self._advance_clock(watch, sample.ts, now)
            elapsed = sample.session_elapsed_s
            if (elapsed is not None and sample.session_id == watch.session_id
                    and watch.session_started_at is not None):
                # Rule 4 cross-check with the boot's own account of the session: the longer
                # one counts, except over a resumed session's first guess (made on the boot's
                # wall clock, which may be off).
                watch.session_started_at = (now - elapsed if watch.start_provisional else
                                            min(watch.session_started_at, now - elapsed))
            if sample.session_id == watch.session_id:
                watch.start_provisional = False

        bad = self._implausible(watch, pressures)
        if bad is not None:
            if watch.venting:  # same episode: a fault to record, not a new vent
                return [replace(bad, vent=False, alarm=False, record=False)]
            return [self._vent(watch, now, bad)]

        if watch.venting:
            if (fresh and max(pressures) < self.limits.safe_level_mmhg
                    and not (sample.session_id is not None and sample.phase in CYCLE_PHASES)):
                return [self._confirmed(watch, now)]
            return []

        ceiling = self.ceiling(watch)
        top = max(pressures)  # all finite here (rule 6): the first chamber at the top is worst
        if top > ceiling:
            worst = pressures.index(top)
            return [self._vent(watch, now, SafetyAction(
                rule=Rule.HARD_CEILING, severity=Severity.HIGH, vent=True, alarm=True,
                chamber=worst + 1, value=pressures[worst], limit=ceiling,
                detail=f"chamber {worst + 1} at {pressures[worst]:.1f} mmHg above the ceiling "
                f"of {ceiling:g} mmHg",
            ))]
        if not fresh:
            return []
        return (self._over_target(watch, pressures, now)
                or self._sustained(watch, pressures, step_free, now))

    @staticmethod
    def _advance_clock(watch: BootWatch, device_ts: float, now: float) -> float:
        """Rule 3's clock: the boot's sample times, unless they disagree with the gateway's.

        The boot's timestamps are right for the spacing of its samples even when the gateway
        falls behind and reads a burst at once; the gateway's monotonic clock is right across
        a step of the boot's clock. So each interval is the boot's, as long as the gateway has
        seen at least that much time pass (its unused time is kept as credit, up to a cap, for
        the burst after a stall); an interval that runs backwards counts as none, one that runs
        ahead of the gateway's time is cut to it.
        """
        last_ts, last_now = watch.clock_device_ts, watch.clock_gateway_s
        watch.clock_device_ts, watch.clock_gateway_s = device_ts, now
        if last_ts is None or last_now is None:  # mutate: equivalent or -> and (set together)
            return watch.step_free_s
        device_dt = device_ts - last_ts
        credit = watch.clock_credit_s + max(0.0, now - last_now)
        if device_dt < 0:  # mutate: equivalent < -> <= (a zero interval is a zero step anyway)
            step = 0.0
        elif device_dt <= credit + CLOCK_STEP_TOLERANCE_S:
            step = device_dt
        else:
            step = credit
        watch.clock_credit_s = min(CLOCK_CREDIT_CAP_S, max(0.0, credit - step))
        watch.step_free_s += step
        return watch.step_free_s

    @staticmethod
    def is_newer(watch: BootWatch, seq: int) -> bool:
        """The sample is the newest yet (or the first of a restarted boot), not a duplicate
        or a late one: only such a sample may say that a session began or ended."""
        last = watch.last_seq
        return last is None or seq > last or last - seq > SEQ_RESET_WINDOW

    def _is_fresh(self, watch: BootWatch, seq: int) -> bool:
        if self.is_newer(watch, seq):
            watch.last_seq = seq
            return True
        return False

    def _implausible(self, watch: BootWatch, pressures: list[float]) -> SafetyAction | None:
        lo, hi = self.limits.plausible_min_mmhg, self.limits.plausible_max_mmhg
        n = len(pressures)
        # Every reading finite and in range, the common sample: no loop. (At a bound exactly
        # the loop below decides, and says the same.)
        if (n == watch.chambers and math.isfinite(sum(pressures))
                and lo <= min(pressures)  # mutate: equivalent <= -> < (the loop decides alike)
                and max(pressures) <= hi):  # mutate: equivalent <= -> < (the loop decides alike)
            return None
        if n != watch.chambers:
            return SafetyAction(
                rule=Rule.IMPLAUSIBLE_DATA, severity=Severity.HIGH, vent=True, alarm=True,
                fault=True, value=float(len(pressures)), limit=float(watch.chambers),
                detail=f"{len(pressures)} pressures for a boot with {watch.chambers} chambers",
            )
        for i, p in enumerate(pressures):
            if not math.isfinite(p) or p < lo or p > hi:
                return SafetyAction(
                    rule=Rule.IMPLAUSIBLE_DATA, severity=Severity.HIGH, vent=True, alarm=True,
                    fault=True, chamber=i + 1, value=p if math.isfinite(p) else None,
                    # -inf: the low limit; NaN: the high one
                    limit=lo if p < lo else hi,  # mutate: equivalent < -> <= (lo is plausible)
                    detail=f"chamber {i + 1} reads {p} mmHg, outside the plausible "
                    f"{lo:g}..{hi:g} mmHg",
                )
        return None

    def _over_target(self, watch: BootWatch, pressures: list[float], now: float
                     ) -> list[Outcome]:
        targets = watch.targets_mmhg
        if targets is None:
            return []
        tol = self.limits.over_target_tolerance_mmhg
        tripped: int | None = None
        for i, (p, target) in enumerate(zip(pressures, targets, strict=True)):
            if p > target + tol:
                watch.over_target_run[i] += 1
                if watch.over_target_run[i] >= self.limits.over_target_samples and (
                    tripped is None or p - target > pressures[tripped] - targets[tripped]
                ):
                    tripped = i
            else:
                watch.over_target_run[i] = 0
        if tripped is None:
            return []
        return [self._vent(watch, now, SafetyAction(
            rule=Rule.OVER_TARGET, severity=Severity.HIGH, vent=True, alarm=True,
            chamber=tripped + 1, value=pressures[tripped], limit=targets[tripped] + tol,
            detail=f"chamber {tripped + 1} at {pressures[tripped]:.1f} mmHg above target "
            f"{targets[tripped]:g} + {tol:g} mmHg for {watch.over_target_run[tripped]} samples",
        ))]

    def _sustained(self, watch: BootWatch, pressures: list[float], step_free: float,
                   now: float) -> list[Outcome]:
        limit = watch.inflation_limit_s or self.limits.max_inflation_s
        level = self.limits.inflated_level_mmhg
        worst: tuple[float, int] | None = None
        for i, p in enumerate(pressures):
            if p <= level:
                watch.inflated_since[i] = None
                continue
            since = watch.inflated_since[i]
            if since is None:
                watch.inflated_since[i] = step_free
            elif step_free - since > limit and (worst is None or step_free - since > worst[0]):
                worst = (step_free - since, i)
        if worst is None:
            return []
        held, i = worst
        return [self._vent(watch, now, SafetyAction(
            rule=Rule.SUSTAINED_INFLATION, severity=Severity.HIGH, vent=True, alarm=True,
            chamber=i + 1, value=round(held, 3), limit=limit,
            detail=f"chamber {i + 1} inflated above {level:g} mmHg for {held:.1f} s "
            f"(limit {limit:g} s)",
        ))]

    # ------------------------------------------------------------------ rules on time

    def on_tick(self, watch: BootWatch, now: float, backlog: bool = False) -> list[Outcome]:
        """Rules 8 (vent not confirmed), 5 (telemetry loss) and 4 (session overrun).

        backlog: input is waiting unread in the gateway's MQTT socket right now, so a boot's
        newest samples may be in it rather than missing (rule 5, see `_silence`).
        """
        if watch.venting:
            return self._unconfirmed(watch, now)
        if not watch.in_session or not watch.online:
            return []
        silence = self._silence(watch, now, backlog)
        if silence:
            return silence
        if (watch.session_started_at is not None and watch.overrun_limit_s is not None
                and watch.session_duration_s is not None and not watch.overrun_reported
                and not watch.start_provisional):  # a guess waits for the boot's next sample
            running = now - watch.session_started_at
            limit = watch.overrun_limit_s
            if running > limit:
                watch.overrun_reported = True
                return [self._vent(watch, now, SafetyAction(
                    rule=Rule.SESSION_OVERRUN, severity=Severity.HIGH, vent=True, alarm=True,
                    stop=True, value=round(running, 3), limit=limit,
                    detail=f"session still running after {running:.0f} s "
                    f"(program {watch.session_duration_s:g} s + final deflate + grace "
                    f"{self.limits.overrun_grace_s:g} s = {limit:g} s)",
                ))]
        return []

    def _silence(self, watch: BootWatch, now: float, backlog: bool) -> list[Outcome]:
        """Rule 5: no sample received for longer than the boot's silence limit.

        Once the limit is passed, a vent waits only while input is unread in the gateway's
        socket (its samples may be there: the gateway is behind, not the boot), and for at
        most `receive_backlog_grace_s` from when the boot became overdue as the gateway could
        see it: the end of its limit, or one tick before the tick that found it overdue if
        the gateway was not ticking then (its own loop had stalled, and what piled up in the
        socket meanwhile needs the grace to drain). The deferral is state of this silence,
        not of the input: more input, or input timed to keep arriving, cannot extend it, so
        no outside traffic holds this rule off for longer than the grace.
        """
        # Defensive only, so neither side is ever true here: a session always has
        # last_sample_at (start_session sets it), and a reported silence has opened a vent
        # episode, which on_tick hands to rule 8 before this.
        reported = watch.silence_reported
        if watch.last_sample_at is None or reported:  # mutate: equivalent or -> and (see above)
            return []
        silent = now - watch.last_sample_at
        limit = self.silence_limit(watch)
        if silent <= limit:
            watch.silence_due_since = None
            return []
        due = watch.silence_due_since
        if due is None:
            due = watch.silence_due_since = max(watch.last_sample_at + limit,
                                                now - self.limits.tick_interval_s)
        grace = self.limits.receive_backlog_grace_s
        if backlog and now - due <= grace:
            return []
        watch.silence_reported = True
        return [self._vent(watch, now, SafetyAction(
            rule=Rule.TELEMETRY_LOSS, severity=Severity.HIGH, vent=True, alarm=True,
            value=round(silent, 3), limit=limit,
            detail=f"no telemetry for {silent:.1f} s in session (limit {limit:g} s"
            + (f", input still unread after the {grace:g} s grace)" if backlog else ")"),
        ))]

    def _unconfirmed(self, watch: BootWatch, now: float) -> list[Outcome]:
        if watch.vent_sent_at is None or not watch.online:
            return []  # an offline boot cannot confirm; rule 7 has raised its alarm
        waited = now - watch.vent_sent_at
        deadline = self.limits.vent_confirm_deadline_s
        if waited <= deadline or watch.vent_resends >= self.limits.vent_resend_max:
            return []
        watch.vent_resends += 1
        watch.vent_sent_at = now
        first = watch.vent_resends == 1
        return [SafetyAction(
            rule=Rule.VENT_NOT_CONFIRMED, severity=Severity.HIGH, vent=True, alarm=first,
            value=round(now - (watch.vent_first_sent_at or now), 3), limit=deadline,
            detail=f"chambers not below {self.limits.safe_level_mmhg:g} mmHg {waited:.1f} s "
            f"after the vent; re-sent ({watch.vent_resends}/{self.limits.vent_resend_max})",
        )]

    # ------------------------------------------------------------------ rules on events

    def on_offline(self, watch: BootWatch, now: float) -> list[Outcome]:
        """Rule 7: the boot dropped off (LWT or keep-alive) mid-session; it must vent itself."""
        watch.online = False
        if not watch.in_session:
            return []
        return [self._vent(watch, now, SafetyAction(
            rule=Rule.OFFLINE_IN_SESSION, severity=Severity.HIGH, vent=True, alarm=True,
            detail="boot went offline during a session; it must vent by itself "
            "(vent sent in case it comes back)",
        ))]

    def on_online(self, watch: BootWatch, now: float) -> bool:
        """A boot is back (reconnect or reboot). True: re-send the vent of an open episode,
        whose confirmation deadline starts again now."""
        watch.online = True
        watch.last_seq = None  # a rebooted boot counts seq from 0 again
        if watch.venting:
            watch.vent_sent_at = now
            return True
        return False

    @staticmethod
    def on_announce(watch: BootWatch) -> None:
        """A state message from a connected boot: it may have rebooted without dropping off
        (its seq restarts at 0), so the next sample is taken as the newest."""
        watch.last_seq = None

    def on_event(self, watch: BootWatch, event: BootEvent, now: float) -> list[Outcome]:
        """Rule 10: the user's stop button is a safety signal (numbness, tingling, pain)."""
        if event.kind is EventKind.USER_STOP:
            return [SafetyAction(
                rule=Rule.USER_STOP, severity=Severity.MEDIUM, vent=False, alarm=True,
                detail="stopped by the user at the boot" + (
                    f": {event.detail}" if event.detail else ""),
            )]
        return []

    def session_not_ended(self, watch: BootWatch, session_id: str, outcome: str, now: float
                          ) -> SafetyAction:
        """Rule 8's case of a boot still running a session the gateway has closed (vented it,
        or gave up on its start): the gateway's word did not take, so it vents again."""
        return self._vent(watch, now, SafetyAction(
            rule=Rule.VENT_NOT_CONFIRMED, severity=Severity.HIGH, vent=True, alarm=True,
            detail=f"boot still runs session {session_id}, which the gateway ended "
            f"({outcome}); vented",
        ))

    @staticmethod
    def program_refused(reasons: list[str]) -> SafetyAction:
        """Rule 9: a program that failed its checks was not sent."""
        return SafetyAction(
            rule=Rule.PROGRAM_REFUSED, severity=Severity.LOW, vent=False, alarm=False,
            detail="; ".join(reasons)[:500],
        )

    # ------------------------------------------------------------------ helpers

    def _vent(self, watch: BootWatch, now: float, action: SafetyAction) -> SafetyAction:
        self.vent_sent(watch, now)
        watch.vent_resends = 0
        return action

    def _confirmed(self, watch: BootWatch, now: float) -> VentConfirmed:
        after = now - watch.vent_first_sent_at if watch.vent_first_sent_at is not None else None
        outcome = VentConfirmed(after_s=after, resends=watch.vent_resends)
        watch.venting = False
        watch.vent_sent_at = None
        watch.vent_first_sent_at = None
        watch.vent_resends = 0
        watch.over_target_run = [0] * watch.chambers
        watch.inflated_since = [None] * watch.chambers
        return outcome
