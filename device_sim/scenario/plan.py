"""The fault planner: a scenario's faults expanded into a deterministic list of `PlannedFault`.

`Scenario.fault_plan(seed)` expands the faults into a deterministic list of `PlannedFault`:
exact times (`at_s`) or Poisson arrivals (`rate_per_boot_hour`, drawn with
`random.Random`), on boots chosen from the seed. Non-overlap rule: a fault occupies its boot
from `at_s` until its end (`params.down_s`, or the rest of the run for open-ended ones) plus
the kind's detection window plus RECOVERY_S (15 s, for the vent to be confirmed and a new
session to start); no other fault is planned on that boot in that span. So each boot has at
most one fault at a time and every safety event on it can be attributed to that one fault.
A fault whose clear is an event of its own (a `clock_step`'s return, `params.return_s`) must
leave that event's detection window inside the run as well.
Exact times are booked first and refused if they do not fit; a random arrival that finds no
free boot is left out. Faults that need a session go only to `session_boots()` and not before
`sessions.start_within_s` + 2 s; every fault leaves its detection window inside the run.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from device_sim.faults import CHAMBER_KINDS, EXPECTED, PlannedFault, ReconnectStormParams
from device_sim.scenario.errors import Problem

if TYPE_CHECKING:
    from device_sim.scenario.schema import Scenario

# After a fault's detection window: time for the vent to be confirmed and a session to restart.
RECOVERY_S = 15.0
# A plan this long is a typo in a rate, not a simulation.
MAX_PLANNED_FAULTS = 100_000
# Random boots tried for a fault before scanning the whole pool for a free one.
_PROBES = 8


def expand(sc: Scenario, seed: int) -> tuple[list[PlannedFault], list[Problem]]:
    """The fault plan and the explicit faults that do not fit (non-overlap rule)."""
    rng = random.Random(f"faults/{seed}")
    in_session = sc.session_boots(seed)
    everyone = list(range(sc.fleet.boots))
    events: list[tuple[float, int, int]] = []  # (at_s, spec index, at_s index or -1)
    arrivals: list[tuple[float, int, int]] = []
    for i, spec in enumerate(sc.faults):
        if spec.at_s is not None:
            events += [(at, i, j) for j, at in enumerate(spec.at_s)]
            continue
        assert spec.rate_per_boot_hour is not None
        pool = len(in_session) if EXPECTED[spec.kind].session_required else len(everyone)
        rate = spec.rate_per_boot_hour * pool / 3600.0
        t = sc._earliest_s(spec.kind)
        end = sc.duration_s - sc.detect_window(spec.kind) - spec.params.return_s
        if rate * (end - t) > MAX_PLANNED_FAULTS:
            return [], [Problem(("faults", i, "rate_per_boot_hour"), f"about "
                                f"{rate * (end - t):.0f} faults: more than "
                                f"{MAX_PLANNED_FAULTS} in one run")]
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= end:
                break
            arrivals.append((round(t, 3), i, -1))
    # Exact times are booked first, so random arrivals only fill the gaps they leave.
    busy: dict[int, list[tuple[float, float]]] = {}

    def free(boot: int, start: float, until: float) -> bool:
        return all(end <= start or begin >= until for begin, end in busy.get(boot, ()))

    plan: list[PlannedFault] = []
    problems: list[Problem] = []
    group = 0
    for at, i, j in sorted(events) + sorted(arrivals):
        spec = sc.faults[i]
        window = sc.detect_window(spec.kind)
        hold = spec.params.hold_s
        until = at + (math.inf if hold is None else hold) + window + RECOVERY_S
        pool_ids = in_session if EXPECTED[spec.kind].session_required else everyone
        if isinstance(spec.params, ReconnectStormParams):
            count = max(1, round(spec.params.fraction * sc.fleet.boots))
        else:
            count = spec.boots
        chosen: list[int] = []
        if count == 1 and pool_ids:  # most faults: a few random probes beat a full scan
            probes = (rng.choice(pool_ids) for _ in range(_PROBES))
            chosen = next(([b] for b in probes if free(b, at, until)), [])
        if not chosen:
            candidates = [b for b in pool_ids if free(b, at, until)]
            if len(candidates) < count:
                if j >= 0:
                    problems.append(Problem(
                        ("faults", i, "at_s", j), f"needs {count} boot(s) free of other "
                        f"faults at {at:g} s but only {len(candidates)} are (one fault "
                        f"per boot until its window + {RECOVERY_S:g} s is over)"))
                continue  # a random arrival with no free boot is not planned
            chosen = rng.sample(candidates, count)
        group += 1
        for boot in sorted(chosen):
            chamber = spec.chamber
            if chamber is None and spec.kind in CHAMBER_KINDS:
                chamber = rng.randint(1, sc.fleet.chambers)
            busy.setdefault(boot, []).append((at, until))
            plan.append(PlannedFault(
                at_s=at, boot_index=boot, kind=spec.kind,
                chamber=chamber if spec.kind in CHAMBER_KINDS else None,
                params=spec.params, spec_index=i, group=group, detect_within_s=window))
    plan.sort(key=lambda f: (f.at_s, f.boot_index, f.spec_index))
    return plan, problems
