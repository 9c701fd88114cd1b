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
