"""The gateway's rules and limits, for the simulator's judge and scenario checks.

The simulator judges runs against the gateway's own rules and limits, on purpose: a scenario
is refused when the gateway (default limits) would refuse its programs, and what the gateway
must do about each fault is written in the watchdog's own rule names and derived from its
default settings, so the simulator's verdict cannot drift from the gateway it tests. This is
the only place device_sim reaches into the gateway's configuration (`ProgramLimits`,
`WatchdogSettings`), its rules (`gateway.watchdog.Rule`) and its program catalogue and checks
(`gateway.programs`): `faults`, `scenario` and the CLI import these names from here, and the
report and runner need none of them (each injection they judge carries its rules and deadline).
The device contract (`gateway.contract`) and the MQTT connection settings are shared by both
sides by design and are imported directly where they are used.
"""

from __future__ import annotations

import math

from gateway.programs import CATALOGUE, BootLimits, check_program
from gateway.settings import ProgramLimits, WatchdogSettings
from gateway.watchdog import Rule

__all__ = [
    "CATALOGUE", "BootLimits", "ProgramLimits", "Rule", "WatchdogSettings", "check_program",
    "default_ceiling_mmhg",
]


def default_ceiling_mmhg(device_max_mmhg: float = math.inf) -> float:
    """Rule 1's ceiling with the gateway's default settings for a boot of this maximum."""
    return min(WatchdogSettings().hard_ceiling_mmhg, ProgramLimits().clinic_ceiling_mmhg,
               device_max_mmhg)
