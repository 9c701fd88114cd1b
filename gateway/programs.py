"""Session programs: the starting catalogue and the checks run before a program is sent (rule 9).

Catalogue entries are templates (intensity word, duration, timing); they become a concrete
`SessionProgram` for one boot by mapping the intensity to mmHg (a clinic setting) and
spreading it over the boot's chambers, proximal chambers a little lower so the thigh is
never squeezed harder than the calf.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.contract import Mode, ProgramTiming, SessionProgram
from gateway.settings import Intensity, ProgramLimits

# Catalogue timings are written for a four-chamber sleeve (foot, calf, knee, thigh).
REFERENCE_CHAMBERS = 4


@dataclass(frozen=True)
class ProgramTemplate:
    key: str
    title: str
    intensity: Intensity
    duration_s: float
    mode: Mode
    timing: ProgramTiming
    when: str
    proximal_factor: float = 0.85  # thigh pressure relative to the most distal chamber

    def resolve(self, chambers: int, limits: ProgramLimits) -> SessionProgram:
        """Targets for this boot; the foot-to-thigh sweep lasts the same for any chamber count."""
        base = limits.intensity_mmhg[self.intensity]
        sweep_s = self.timing.inflate_s * REFERENCE_CHAMBERS
        if chambers == 1:
            targets = [base]
        else:
            step = (1.0 - self.proximal_factor) / (chambers - 1)
            targets = [round(base * (1.0 - i * step), 1) for i in range(chambers)]
        return SessionProgram(
            name=self.key,
            mode=self.mode,
            targets_mmhg=targets,
            duration_s=self.duration_s,
            timing=self.timing.model_copy(update={"inflate_s": round(sweep_s / chambers, 3)}),
        )


def _t(inflate: float, hold: float, deflate: float, pause: float) -> ProgramTiming:
    return ProgramTiming(inflate_s=inflate, hold_s=hold, deflate_s=deflate, pause_s=pause)


CATALOGUE: dict[str, ProgramTemplate] = {
    p.key: p
    for p in (
        ProgramTemplate(
            "post_workout_recovery", "Post-workout recovery", Intensity.LOW_MODERATE,
            25 * 60, Mode.SEQUENTIAL, _t(4, 6, 6, 6), "2-6 h after training",
        ),
        ProgramTemplate(
            "doms_24_48h", "DOMS 24-48 h", Intensity.MODERATE,
            30 * 60, Mode.SEQUENTIAL, _t(4, 5, 8, 10), "the next day or 48 h after",
        ),
        ProgramTemplate(
            "rest_day_reset", "Rest-day reset", Intensity.LOW,
            20 * 60, Mode.FLOW, _t(5, 4, 8, 8), "before mobility work or a walk",
        ),
        ProgramTemplate(
            "before_mobility", "Before mobility", Intensity.VERY_LOW,
            12 * 60, Mode.WAVE, _t(3, 3, 6, 6), "then active mobility",
        ),
        ProgramTemplate(
            "office_travel", "Office day / travel", Intensity.LOW,
            25 * 60, Mode.SEQUENTIAL, _t(4, 6, 6, 6), "on returning home",
        ),
    )
}


@dataclass(frozen=True)
class BootLimits:
    """What the gateway knows of a boot when it checks a program for it."""

    clinic: str
    chambers: int
    max_pressure_mmhg: float
    online: bool
    in_session: bool
    gateway_ceiling_mmhg: float = float("inf")  # the watchdog's hard ceiling (rule 1)
    gateway_max_inflation_s: float = float("inf")  # the watchdog's absolute cap (rule 3)
    venting: bool = False  # a vent of the gateway's is not yet confirmed (rule 8)
    telemetry_period_s: float = 0.0  # from its state: how often the watchdog sees it


def check_program(program: SessionProgram, boot: BootLimits, limits: ProgramLimits) -> list[str]:
    """Every reason the program must not be sent to this boot; empty means it may be sent."""
    reasons: list[str] = []
    if not boot.online:
        reasons.append("the boot is offline")
    if boot.in_session:
        reasons.append("the boot is already running a session; stop it first")
    if boot.venting:
        reasons.append("the gateway's vent of this boot is not confirmed yet (rule 8)")
    n = len(program.targets_mmhg)
    if n != boot.chambers:
        reasons.append(f"the program has {n} chamber targets but the boot has {boot.chambers}")
    clinic_ceiling = limits.ceiling_for(boot.clinic)
    ceiling = min(boot.max_pressure_mmhg, clinic_ceiling, boot.gateway_ceiling_mmhg)
    highest = ceiling - limits.ceiling_margin_mmhg
    for i, p in enumerate(program.targets_mmhg, start=1):
        if p > highest:
            gw = (f", the gateway's {boot.gateway_ceiling_mmhg:g}"
                  if boot.gateway_ceiling_mmhg < float("inf") else "")
            reasons.append(
                f"chamber {i} target {p:g} mmHg is above {highest:g} mmHg: the ceiling of "
                f"{ceiling:g} mmHg (lowest of the boot's {boot.max_pressure_mmhg:g}{gw} and "
                f"the clinic's {clinic_ceiling:g}) less a margin of "
                f"{limits.ceiling_margin_mmhg:g} mmHg"
            )
        elif p < limits.min_pressure_mmhg:
            reasons.append(
                f"chamber {i} target {p:g} mmHg is below the minimum of "
                f"{limits.min_pressure_mmhg:g} mmHg"
            )
    cycle = program.timing.cycle_s(n)
    if not limits.min_cycle_s <= cycle <= limits.max_cycle_s:
        reasons.append(
            f"one inflate/deflate cycle takes {cycle:g} s; it must be between "
            f"{limits.min_cycle_s:g} and {limits.max_cycle_s:g} s"
        )
    if not limits.min_duration_s <= program.duration_s <= limits.max_duration_s:
        reasons.append(
            f"duration {program.duration_s / 60:g} min is outside "
            f"{limits.min_duration_s / 60:g}-{limits.max_duration_s / 60:g} min"
        )
    release = program.timing.deflate_s + program.timing.pause_s
    need = max(limits.min_release_s, 2 * boot.telemetry_period_s)
    if release < need:
        reasons.append(
            f"deflate_s + pause_s is {release:g} s per cycle; at least {need:g} s are needed "
            "so every chamber empties and is seen empty (intermittent, never a fixed squeeze)"
        )
    inflated = program.longest_inflation_s()
    if program.max_inflation_s is not None and program.max_inflation_s < inflated:
        reasons.append(
            f"max_inflation_s {program.max_inflation_s:g} s is shorter than the program's own "
            f"longest inflation of {inflated:g} s (n x inflate_s + hold_s + deflate_s)"
        )
    if inflated > boot.gateway_max_inflation_s:
        reasons.append(
            f"the most distal chamber stays inflated {inflated:g} s per cycle, above the "
            f"gateway's limit of {boot.gateway_max_inflation_s:g} s"
        )
    for i in range(1, n):
        if program.targets_mmhg[i] > program.targets_mmhg[0]:
            reasons.append(
                f"chamber {i + 1} target is above the most distal chamber's; pressure must not "
                "rise towards the thigh"
            )
            break
    return reasons
