"""Fleet-simulation scenarios as files: the fleet, its sessions, scripted faults, pass criteria.

Split by job: `schema` (the pydantic models and their cross-field checks), `plan` (the fault
planner behind `Scenario.fault_plan`), `loader` (YAML/TOML with `file:line: field: problem`
errors), `errors` (`Problem`, `ScenarioError`). Import from `device_sim.scenario` as before.
"""

from __future__ import annotations

from device_sim.scenario.errors import Loc, Problem, ScenarioError
from device_sim.scenario.loader import MAX_NESTING, load_scenario
from device_sim.scenario.plan import MAX_PLANNED_FAULTS, RECOVERY_S
from device_sim.scenario.schema import (
    BOOTS_PER_PROCESS,
    DEFAULT_DETECT_S,
    DETECT_MARGIN_S,
    ENV_PATTERN,
    HTTP_PATTERN,
    NAME_PATTERN,
    SESSION_SETTLE_S,
    BrokerConfig,
    ExpectConfig,
    FaultSpec,
    FleetConfig,
    InfluxConfig,
    Scenario,
    SessionsConfig,
)

__all__ = [
    "BOOTS_PER_PROCESS", "DEFAULT_DETECT_S", "DETECT_MARGIN_S", "ENV_PATTERN", "HTTP_PATTERN",
    "MAX_NESTING", "MAX_PLANNED_FAULTS", "NAME_PATTERN", "RECOVERY_S", "SESSION_SETTLE_S",
    "BrokerConfig", "ExpectConfig", "FaultSpec", "FleetConfig", "InfluxConfig", "Loc", "Problem",
    "Scenario", "ScenarioError", "SessionsConfig", "load_scenario",
]
