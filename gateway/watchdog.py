"""The safety watchdog: pure rules over (boot watch state, sample, now) returning actions.

No I/O and no clock of its own: the caller passes `now` (monotonic seconds) so every rule can
be tested exhaustively. The caller carries out the actions (vent first, then storage).

One vent per episode: once a vent is decided the boot is `venting` and no rule vents it again
until every chamber is back below the safe level (re-sending an unconfirmed vent is the job of
the vent-confirmation rule, not of a repeated trigger).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from gateway.contract import BootEvent, EventKind, Telemetry
from gateway.settings import WatchdogSettings


class Rule(StrEnum):
    HARD_CEILING = "hard_ceiling"  # rule 1
    OVER_TARGET = "over_target"  # rule 2
    TELEMETRY_LOSS = "telemetry_loss"  # rule 5
    USER_STOP = "user_stop"  # rule 10


class Severity(StrEnum):
    """Alarm priorities after IEC 60601-1-8."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


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


@dataclass(slots=True)
class BootWatch:
    """What the watchdog remembers of one boot between samples."""

    chambers: int
    device_max_mmhg: float
    clinic_ceiling_mmhg: float
    telemetry_period_s: float
    targets_mmhg: list[float] | None = None  # set while a session runs
    session_id: str | None = None
    last_sample_at: float | None = None
    over_target_run: list[int] = field(default_factory=list)
    venting: bool = False
    silence_reported: bool = False

    def start_session(self, session_id: str, targets: list[float], now: float) -> None:
        self.session_id = session_id
        self.targets_mmhg = list(targets)
        self.over_target_run = [0] * len(targets)
        self.silence_reported = False
        # A session starts the silence clock even if no sample has arrived yet.
        self.last_sample_at = now if self.last_sample_at is None else self.last_sample_at

    def end_session(self) -> None:
        self.session_id = None
        self.targets_mmhg = None
        self.over_target_run = []

    @property
    def in_session(self) -> bool:
        return self.targets_mmhg is not None


class Watchdog:
    def __init__(self, limits: WatchdogSettings) -> None:
        self.limits = limits

    def ceiling(self, watch: BootWatch) -> float:
        return min(self.limits.hard_ceiling_mmhg, watch.device_max_mmhg, watch.clinic_ceiling_mmhg)

    def silence_limit(self, watch: BootWatch) -> float:
        return max(
            self.limits.telemetry_loss_floor_s,
            self.limits.telemetry_loss_periods * watch.telemetry_period_s,
        )

    def on_telemetry(self, watch: BootWatch, sample: Telemetry, now: float) -> list[SafetyAction]:
        """Rules 1 and 2. The sample's chamber count must already match the boot's."""
        watch.last_sample_at = now
        watch.silence_reported = False
        pressures = sample.pressures
        if watch.venting:
            if max(pressures) < self.limits.safe_level_mmhg:
                watch.venting = False
                watch.over_target_run = [0] * len(watch.over_target_run)
            return []

        ceiling = self.ceiling(watch)
        worst = max(range(len(pressures)), key=pressures.__getitem__)
        if pressures[worst] > ceiling:
            return [self._vent(
                watch, Rule.HARD_CEILING, worst, pressures[worst], ceiling,
                f"chamber {worst + 1} at {pressures[worst]:.1f} mmHg above the ceiling "
                f"of {ceiling:g} mmHg",
            )]

        if watch.targets_mmhg is None:
            return []
        tol = self.limits.over_target_tolerance_mmhg
        tripped: int | None = None
        for i, (p, target) in enumerate(zip(pressures, watch.targets_mmhg, strict=True)):
            if p > target + tol:
                watch.over_target_run[i] += 1
                if watch.over_target_run[i] >= self.limits.over_target_samples and (
                    tripped is None or p - target > pressures[tripped] - watch.targets_mmhg[tripped]
                ):
                    tripped = i
            else:
                watch.over_target_run[i] = 0
        if tripped is None:
            return []
        limit = watch.targets_mmhg[tripped] + tol
        return [self._vent(
            watch, Rule.OVER_TARGET, tripped, pressures[tripped], limit,
            f"chamber {tripped + 1} at {pressures[tripped]:.1f} mmHg above target "
            f"{watch.targets_mmhg[tripped]:g} + {tol:g} mmHg for "
            f"{watch.over_target_run[tripped]} samples",
        )]

    def on_tick(self, watch: BootWatch, now: float) -> list[SafetyAction]:
        """Rule 5: a boot in session that has gone silent is vented and an alarm raised."""
        if not watch.in_session or watch.silence_reported or watch.last_sample_at is None:
            return []
        silent = now - watch.last_sample_at
        limit = self.silence_limit(watch)
        if silent <= limit:
            return []
        watch.silence_reported = True
        watch.venting = True
        return [SafetyAction(
            rule=Rule.TELEMETRY_LOSS, severity=Severity.HIGH, vent=True, alarm=True,
            value=round(silent, 3), limit=limit,
            detail=f"no telemetry for {silent:.1f} s in session (limit {limit:g} s)",
        )]

    def on_event(self, watch: BootWatch, event: BootEvent, now: float) -> list[SafetyAction]:
        """Rule 10: the user's stop button is a safety signal (numbness, tingling, pain)."""
        if event.kind is EventKind.USER_STOP:
            return [SafetyAction(
                rule=Rule.USER_STOP, severity=Severity.MEDIUM, vent=False, alarm=True,
                detail="stopped by the user at the boot" + (
                    f": {event.detail}" if event.detail else ""
                ),
            )]
        return []

    def _vent(
        self, watch: BootWatch, rule: Rule, idx: int, value: float, limit: float, detail: str
    ) -> SafetyAction:
        watch.venting = True
        return SafetyAction(
            rule=rule, severity=Severity.HIGH, vent=True, alarm=True, detail=detail,
            chamber=idx + 1, value=value, limit=limit,
        )
