"""Unit tests of the catalogue and the checks run before a program is sent (rule 9)."""

from __future__ import annotations

import pytest

from gateway.contract import ProgramTiming, SessionProgram
from gateway.programs import CATALOGUE, BootLimits, check_program
from gateway.settings import Intensity, ProgramLimits

LIMITS = ProgramLimits()
BOOT = BootLimits(clinic="c1", chambers=4, max_pressure_mmhg=120, online=True, in_session=False)


def program(targets: list[float], duration_s: float = 1200, inflate_s: float = 4) -> SessionProgram:
    return SessionProgram(
        name="p", targets_mmhg=targets, duration_s=duration_s,
        timing=ProgramTiming(inflate_s=inflate_s, hold_s=6, deflate_s=6, pause_s=6),
    )


@pytest.mark.parametrize("key", sorted(CATALOGUE))
@pytest.mark.parametrize("chambers", [1, 3, 4, 6])
def test_every_catalogue_program_passes_its_own_checks(key: str, chambers: int) -> None:
    p = CATALOGUE[key].resolve(chambers, LIMITS)
    boot = BootLimits("c1", chambers, 120, True, False)
    assert check_program(p, boot, LIMITS) == []
    assert len(p.targets_mmhg) == chambers
    assert p.targets_mmhg == sorted(p.targets_mmhg, reverse=True)  # thigh never above calf


def test_intensity_mapping_is_a_clinic_setting() -> None:
    limits = ProgramLimits(intensity_mmhg={**LIMITS.intensity_mmhg, Intensity.MODERATE: 80.0})
    p = CATALOGUE["doms_24_48h"].resolve(4, limits)
    assert p.targets_mmhg[0] == 80.0
    assert p.targets_mmhg[-1] == pytest.approx(80.0 * 0.85)


def test_catalogue_durations_match_the_recovery_guide() -> None:
    minutes = {k: t.duration_s / 60 for k, t in CATALOGUE.items()}
    assert 20 <= minutes["post_workout_recovery"] <= 30
    assert 25 <= minutes["doms_24_48h"] <= 40
    assert 15 <= minutes["rest_day_reset"] <= 25
    assert 10 <= minutes["before_mobility"] <= 15
    assert 20 <= minutes["office_travel"] <= 30


def test_above_clinic_ceiling_is_refused_with_a_reason() -> None:
    reasons = check_program(program([105, 95, 95, 90]), BOOT, LIMITS)
    assert reasons == [
        "chamber 1 target 105 mmHg is above 95 mmHg: the ceiling of 100 mmHg "
        "(lowest of the boot's 120 and the clinic's 100) less a margin of 5 mmHg"
    ]


def test_clinic_ceiling_above_the_gateway_ceiling_cannot_let_a_program_through() -> None:
    limits = ProgramLimits(clinic_ceilings={"c1": 150})
    boot = BootLimits("c1", 4, 160, True, False, gateway_ceiling_mmhg=120)
    reasons = check_program(program([130, 115, 110, 100]), boot, limits)
    assert reasons == [
        "chamber 1 target 130 mmHg is above 115 mmHg: the ceiling of 120 mmHg "
        "(lowest of the boot's 160, the gateway's 120 and the clinic's 150) less a margin "
        "of 5 mmHg"
    ]


def test_device_max_lower_than_clinic_ceiling_wins() -> None:
    boot = BootLimits("c1", 4, 80, True, False)
    reasons = check_program(program([85, 75, 75, 70]), boot, LIMITS)
    assert len(reasons) == 1 and "ceiling of 80 mmHg" in reasons[0]


def test_per_clinic_ceiling() -> None:
    limits = ProgramLimits(clinic_ceilings={"strict": 60})
    boot = BootLimits("strict", 4, 120, True, False)
    assert check_program(program([70, 65, 60, 55]), boot, limits)
    assert check_program(program([70, 65, 60, 55]), BOOT, limits) == []


@pytest.mark.parametrize(
    ("boot", "prog", "expect"),
    [
        (BootLimits("c1", 4, 120, False, False), program([60] * 4), "offline"),
        (BootLimits("c1", 4, 120, True, True), program([60] * 4), "already running"),
        (BOOT, program([60] * 3), "3 chamber targets but the boot has 4"),
        (BOOT, program([10] * 4), "below the minimum"),
        (BOOT, program([60] * 4, duration_s=60), "duration 1 min is outside 10-40 min"),
        (BOOT, program([60] * 4, inflate_s=20), "cycle takes 98 s"),
        (BOOT, program([60] * 4, inflate_s=0.1), "cycle takes 18.4 s"),
        (BOOT, program([50, 60, 50, 50]), "must not rise towards the thigh"),
    ],
)
def test_refusals_name_the_problem(boot: BootLimits, prog: SessionProgram, expect: str) -> None:
    reasons = check_program(prog, boot, LIMITS)
    assert any(expect in r for r in reasons), reasons


def test_program_model_rejects_nan_and_nonsense() -> None:
    with pytest.raises(ValueError):
        program([float("nan"), 50, 50, 50])
    with pytest.raises(ValueError):
        program([60, 50], duration_s=-1)
    with pytest.raises(ValueError):
        program([])


# ---------------------------------------------------------------- edges of the rule-9 limits


def test_a_target_exactly_at_the_ceiling_less_its_margin_is_allowed() -> None:
    """Ceiling 100 (clinic) less the 5 mmHg margin: 95 may be sent, 95.1 may not."""
    assert check_program(program([95, 90, 90, 90]), BOOT, LIMITS) == []
    reasons = check_program(program([95.1, 90, 90, 90]), BOOT, LIMITS)
    assert len(reasons) == 1 and reasons[0].startswith("chamber 1 target 95.1 mmHg is above 95")


def test_a_target_exactly_at_the_minimum_pressure_is_allowed() -> None:
    assert check_program(program([20] * 4), BOOT, LIMITS) == []
    assert check_program(program([20, 20, 20, 19.9]), BOOT, LIMITS) == [
        "chamber 4 target 19.9 mmHg is below the minimum of 20 mmHg"]


@pytest.mark.parametrize(("inflate_s", "cycle", "allowed"), [
    (0.25, 19, False),
    (0.5, 20, True),  # exactly min_cycle_s
    (10.5, 60, True),  # exactly max_cycle_s
    (10.75, 61, False),
])
def test_a_cycle_exactly_at_its_bounds_is_allowed(inflate_s: float, cycle: float,
                                                  allowed: bool) -> None:
    prog = program([60] * 4, inflate_s=inflate_s)  # 4 x inflate_s + 6 + 6 + 6
    assert prog.timing.cycle_s(4) == cycle
    reasons = check_program(prog, BOOT, LIMITS)
    assert reasons == ([] if allowed else [
        f"one inflate/deflate cycle takes {cycle:g} s; it must be between 20 and 60 s"])


@pytest.mark.parametrize(("deflate_s", "pause_s", "period_s", "allowed"), [
    (2, 1.9, 0.0, False),
    (2, 2, 0.0, True),  # exactly MIN_RELEASE_S (4 s)
    (2, 3, 2.5, True),  # exactly two telemetry periods of the boot (5 s)
    (2, 2.9, 2.5, False),
])
def test_a_release_exactly_at_its_minimum_is_allowed(deflate_s: float, pause_s: float,
                                                     period_s: float, allowed: bool) -> None:
    """deflate_s + pause_s >= max(MIN_RELEASE_S, 2 x the boot's telemetry period)."""
    prog = SessionProgram(name="p", targets_mmhg=[60] * 4, duration_s=1200,
                          timing=ProgramTiming(inflate_s=4, hold_s=8, deflate_s=deflate_s,
                                               pause_s=pause_s))  # cycle 28-29 s
    boot = BootLimits("c1", 4, 120, True, False, telemetry_period_s=period_s)
    reasons = check_program(prog, boot, LIMITS)
    need = max(4, 2 * period_s)
    assert reasons == ([] if allowed else [
        f"deflate_s + pause_s is {deflate_s + pause_s:g} s per cycle; at least {need:g} s are "
        "needed so every chamber empties and is seen empty (intermittent, never a fixed "
        "squeeze)"])


@pytest.mark.parametrize(("duration_s", "allowed"), [
    (599.5, False),
    (600, True),  # exactly min_duration_s
    (2400, True),  # exactly max_duration_s
    (2400.5, False),
])
def test_a_duration_exactly_at_its_bounds_is_allowed(duration_s: float, allowed: bool) -> None:
    reasons = check_program(program([60] * 4, duration_s=duration_s), BOOT, LIMITS)
    assert (reasons == []) is allowed
    assert all(r.startswith(f"duration {duration_s / 60:g} min is outside 10-40 min")
               for r in reasons)


def test_equal_targets_are_allowed_but_no_rise_towards_the_thigh() -> None:
    assert check_program(program([60] * 4), BOOT, LIMITS) == []
    assert check_program(program([60, 60, 60.1, 60]), BOOT, LIMITS) == [
        "chamber 3 target is above the most distal chamber's; pressure must not rise towards "
        "the thigh"]


@pytest.mark.parametrize(("max_inflation_s", "allowed"), [
    (27.9, False),
    (28, True),  # exactly the program's own longest inflation: 4 x 4 + 6 + 6
    (40, True),
])
def test_max_inflation_may_not_be_shorter_than_the_programs_own_inflation(
    max_inflation_s: float, allowed: bool,
) -> None:
    prog = program([60] * 4).model_copy(update={"max_inflation_s": max_inflation_s})
    assert prog.longest_inflation_s() == 28
    reasons = check_program(prog, BOOT, LIMITS)
    assert reasons == ([] if allowed else [
        f"max_inflation_s {max_inflation_s:g} s is shorter than the program's own longest "
        "inflation of 28 s (n x inflate_s + hold_s + deflate_s)"])


@pytest.mark.parametrize(("cap", "allowed"), [(27.5, False), (28, True)])
def test_longest_inflation_exactly_at_the_gateways_cap_is_allowed(cap: float,
                                                                  allowed: bool) -> None:
    """The gateway's rule-3 cap (MAX_INFLATION_S): a program inflating a chamber longer per
    cycle than rule 3 allows would be vented by it, so rule 9 refuses it first."""
    boot = BootLimits("c1", 4, 120, True, False, gateway_max_inflation_s=cap)
    reasons = check_program(program([60] * 4), boot, LIMITS)
    assert reasons == ([] if allowed else [
        f"the most distal chamber stays inflated 28 s per cycle, above the gateway's limit of "
        f"{cap:g} s"])
