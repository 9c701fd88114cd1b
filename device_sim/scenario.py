"""Fleet-simulation scenarios as files: the fleet, its sessions, scripted faults, pass criteria.

A scenario is YAML (.yaml/.yml) or TOML (.toml), validated by the pydantic models below (no
unknown keys anywhere). Every problem is reported as `file:line: field.path: message`, so ops
can fix a file without reading Python: YAML lines come from the composed node tree, TOML lines
from a cheap scan for `key =` and table headers (best effort; the path is always given).

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

Cross-field rules (checked on load, each with its own line): at_s xor rate; times inside the
run; boots per fault within the boots that can take it; chamber only where a kind acts on one
and within the fleet's chambers; programs in the gateway's catalogue and acceptable to its
default limits; sessions need `gateway_url`; `telemetry_stored` needs `influx`; detection
windows not shorter than the gateway's own timing (`faults.nominal_detect_s`).
"""

from __future__ import annotations

import math
import os
import random
import re
import string
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic import model_validator as _model_validator

from device_sim.faults import (
    CHAMBER_KINDS,
    EXPECTED,
    PARAMS,
    Expectation,
    FaultKind,
    FaultParams,
    PlannedFault,
    ReconnectStormParams,
    default_ceiling_mmhg,
    expectation,
    nominal_detect_s,
)
from gateway.boot_credentials import CredentialsError, load_credentials
from gateway.contract import ID_PATTERN, MAX_CHAMBERS
from gateway.programs import CATALOGUE, BootLimits, check_program
from gateway.settings import ProgramLimits, WatchdogSettings

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ENV_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
HTTP_PATTERN = r"^https?://[^\s/]+(/\S*)?$"
DEFAULT_DETECT_S = 10.0
# A kind left to the `default` window gets at least the gateway's own timing plus this.
DETECT_MARGIN_S = 2.0
# After a fault's detection window: time for the vent to be confirmed and a session to restart.
RECOVERY_S = 15.0
# Faults needing a session come no earlier than start_within_s + this (the start's round trip).
SESSION_SETTLE_S = 2.0
# processes: 0 -> one simulator process per this many boots (at most 2 per CPU).
BOOTS_PER_PROCESS = 500
# A plan this long is a typo in a rate, not a simulation.
MAX_PLANNED_FAULTS = 100_000
# Random boots tried for a fault before scanning the whole pool for a free one.
_PROBES = 8
# Deeper nesting than this is no scenario (they nest four levels) but a stack overflow in the
# parsers (PyYAML's composer and tomllib recurse per level): refused first, with its line.
MAX_NESTING = 50

Loc = tuple[str | int, ...]


# ---------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a scenario: where (field path, line) and what."""

    loc: Loc
    msg: str
    line: int | None = None

    def format(self, path: Path | str | None = None) -> str:
        where = f"{path}:{self.line}" if path is not None and self.line else (
            str(path) if path is not None else (f"line {self.line}" if self.line else ""))
        field = ".".join(str(p) for p in self.loc)
        return ": ".join(p for p in (where, field, self.msg) if p)


class ScenarioError(Exception):
    """A scenario that cannot run; the message has one `file:line: field: problem` per line."""

    def __init__(self, problems: Sequence[Problem], path: Path | str | None = None) -> None:
        self.problems = list(problems)
        self.path = path
        super().__init__("\n".join(p.format(path) for p in self.problems))


# ---------------------------------------------------------------- the schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _env(name: str | None, loc: Loc) -> str | None:
    if name is None:
        return None
    value = os.environ.get(name)
    if value is None:
        raise ScenarioError([Problem(loc, f"environment variable {name} is not set")])
    return value


class BrokerConfig(_Strict):
    """The MQTT broker the simulated boots connect to."""

    host: str = Field("127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker TCP port")
    username: str | None = Field(
        None, description="MQTT username; may contain {device} and {clinic} for per-boot "
        "usernames (production ACLs use the device id)")
    password_env: str | None = Field(
        None, pattern=ENV_PATTERN, description="environment variable holding the password "
        "(never the password itself: scenario files get committed)")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive; the broker "
                             "detects a dead boot after 1.5 times this")
    credentials_file: Path | None = Field(
        None, description="per-boot broker accounts (JSON/TOML, `boot-gateway boots add "
        "--credentials-out`), relative to the scenario file; a boot listed there connects "
        "with its own username, password and client id, the others with username/password_env")

    @field_validator("username")
    @classmethod
    def _placeholders(cls, value: str | None) -> str | None:
        if value is not None:
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
            if not fields <= {"device", "clinic"}:
                raise ValueError(f"only {{device}} and {{clinic}} may be used, not {fields}")
        return value

    def username_for(self, clinic: str, device: str) -> str | None:
        return None if self.username is None else self.username.format(
            clinic=clinic, device=device)

    def password(self) -> str | None:
        """Read from the environment at run time; ScenarioError if the variable is unset."""
        return _env(self.password_env, ("broker", "password_env"))


class InfluxConfig(_Strict):
    """The gateway's InfluxDB, read by the report (detections, stored telemetry)."""

    url: str = Field("http://127.0.0.1:8086", pattern=HTTP_PATTERN, description="base URL")
    database: str = Field("boots", pattern=ID_PATTERN, description="database (v1 API) the "
                          "gateway writes to")
    token_env: str | None = Field(None, pattern=ENV_PATTERN, description="environment "
                                  "variable with an InfluxDB 2.x token, if it needs one")

    def token(self) -> str | None:
        return _env(self.token_env, ("influx", "token_env"))


class FleetConfig(_Strict):
    """The simulated boots: how many, where, how they talk."""

    boots: int = Field(50, ge=1, le=100_000, description="number of simulated boots")
    clinics: int = Field(5, ge=1, le=10_000, description="boots are spread round-robin over "
                         "this many clinics")
    clinic_prefix: str = Field("sim-", pattern=r"^[A-Za-z0-9_-]{0,40}$",
                               description="clinic ids are PREFIX1..PREFIXn")
    telemetry_hz: float = Field(1.0, ge=1 / 60, le=50, description="telemetry rate per boot")
    telemetry_qos: Literal[0, 1] = Field(0, description="telemetry QoS (the contract says 0)")
    processes: int = Field(0, ge=0, le=1024, description="simulator processes; 0 = auto (one "
                           f"per ~{BOOTS_PER_PROCESS} boots, at most 2 per CPU)")
    connect_per_s: float = Field(200.0, gt=0, le=100_000, description="boots connecting per "
                                 "second at start-up (the broker's CONNACK rate is finite)")
    chambers: int = Field(4, ge=1, le=MAX_CHAMBERS, description="chambers per boot")
    max_pressure_mmhg: float = Field(120.0, gt=0, le=300, description="each boot's own limit")

    @property
    def telemetry_period_s(self) -> float:
        return 1.0 / self.telemetry_hz

    def resolved_processes(self, cpu_count: int | None = None) -> int:
        """`processes`, with 0 replaced by the automatic choice."""
        if self.processes:
            return self.processes
        cpus = cpu_count or os.cpu_count() or 1
        return max(1, min(math.ceil(self.boots / BOOTS_PER_PROCESS), 2 * cpus))


class SessionsConfig(_Strict):
    """Sessions started through the gateway's HTTP API, as the front desk would."""

    programs: dict[str, float] = Field(
        default_factory=lambda: {"post_workout_recovery": 1.0}, min_length=1,
        description="catalogue program (gateway/programs.py) -> relative weight (> 0)")
    fraction: float = Field(1.0, ge=0, le=1, description="share of boots that run sessions")
    start_within_s: float = Field(10.0, ge=0, le=3600, description="session starts are spread "
                                  "evenly over this many seconds after the fleet is up")
    repeat: bool = Field(True, description="start a new session when one ends (completed, "
                         "stopped or vented)")

    @field_validator("programs")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in value.items() if not (math.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"weights must be > 0 (not for {', '.join(bad)})")
        return value


class _FaultSpecBase(_Strict):
    kind: FaultKind = Field(description="what goes wrong (device_sim.faults.FaultKind)")
    at_s: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, min_length=1, description="exact times, seconds after the run starts")
    rate_per_boot_hour: float | None = Field(
        None, gt=0, le=3600, description="Poisson rate per boot (instead of at_s)")
    boots: int = Field(1, ge=1, description="with at_s: distinct boots hit at each time")
    chamber: int | None = Field(None, ge=1, le=MAX_CHAMBERS, description="1-based chamber "
                                "(foot = 1) for kinds acting on one; default: one per fault, "
                                "chosen from the seed")
    params: FaultParams = Field(default_factory=FaultParams, description="kind-specific")


def _spec_model(kind: FaultKind) -> type[_FaultSpecBase]:
    name = "".join(w.title() for w in kind.value.split("_")) + "Fault"
    params = PARAMS[kind]
    # Literal of a runtime value: a real type for pydantic, no static type form for mypy.
    only_this_kind = cast(Any, Literal[kind])
    return create_model(
        name, __base__=_FaultSpecBase,
        kind=(only_this_kind, Field(description="what goes wrong")),
        params=(params, Field(default_factory=params, description=params.__doc__ or "")),
    )


_SPEC_MODELS = tuple(_spec_model(k) for k in FaultKind)
if TYPE_CHECKING:
    # The union is built at run time, so mypy cannot see it: statically every member is a
    # _FaultSpecBase (its kind and params narrowed per member only at run time).
    FaultSpec = _FaultSpecBase
else:
    FaultSpec = Annotated[Union[_SPEC_MODELS], Field(discriminator="kind")]  # noqa: UP007


class ExpectConfig(_Strict):
    """What the run must show to pass."""

    detect_within_s: dict[str, Annotated[float, Field(gt=0, le=3600)]] = Field(
        default_factory=lambda: {"default": DEFAULT_DETECT_S},
        description="seconds from injection to the gateway's detection, per fault kind; "
        "'default' covers the others, raised where the gateway's own timing needs longer "
        "(e.g. ignore_vent: over-pressure + the 5 s vent deadline) to that timing + "
        f"{DETECT_MARGIN_S:g} s")
    false_vents: int = Field(0, ge=0, description="vents allowed on boots with no injected "
                             "vent-worthy fault at that time")
    telemetry_stored: bool = Field(False, description="the telemetry must be in InfluxDB "
                                   "(needs `influx`)")
    min_sessions_started_fraction: float = Field(
        0.95, ge=0, le=1, description="share of the planned sessions that must start")

    def window(self, kind: FaultKind, telemetry_period_s: float) -> float:
        """The detection window for `kind`: its own, else the default (see the field)."""
        d = self.detect_within_s
        if kind.value in d:
            return d[kind.value]
        return max(d.get("default", DEFAULT_DETECT_S),
                   round(nominal_detect_s(kind, telemetry_period_s) + DETECT_MARGIN_S, 1))


class Scenario(_Strict):
    """One fleet simulation: who, how long, what breaks, and what counts as a pass."""

    name: str = Field(pattern=NAME_PATTERN, description="short id, used in file names")
    description: str = Field("", max_length=4000, description="what the run is for")
    seed: int = Field(0, description="one seed for every random choice: same seed, same run")
    duration_s: float = Field(gt=0, le=7 * 86400, description="how long the run lasts after "
                              "the fleet is up")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="MQTT broker")
    gateway_url: str | None = Field(None, pattern=HTTP_PATTERN, description="gateway HTTP API; "
                                    "sessions are started through it")
    api_token_env: str | None = Field(None, pattern=ENV_PATTERN, description="environment "
                                      "variable with the gateway API bearer token")
    influx: InfluxConfig | None = Field(None, description="the gateway's InfluxDB, for the "
                                        "report's checks of detections and stored telemetry")
    fleet: FleetConfig = Field(default_factory=FleetConfig, description="the simulated boots")
    sessions: SessionsConfig = Field(default_factory=SessionsConfig, description="sessions")
    faults: list[FaultSpec] = Field(default_factory=list, description="scripted faults")
    expect: ExpectConfig = Field(default_factory=ExpectConfig, description="pass criteria")

    @_model_validator(mode="after")
    def _cross_check(self) -> Scenario:
        problems = self._problems()
        if not problems:
            problems = self._expand(self.seed)[1]
        if problems:
            raise ScenarioError(problems)  # not a ValueError: pydantic lets it through as is
        return self

    # ------------------------------------------------------------------ helpers for the runner

    def api_token(self) -> str | None:
        return _env(self.api_token_env, ("api_token_env",))

    def boot_ids(self) -> list[tuple[str, str]]:
        """(clinic, device) per boot index, named as SimFleet.make names them."""
        n, f = self.fleet.boots, self.fleet
        width = max(3, len(str(n)))
        return [(f"{f.clinic_prefix}{i % f.clinics + 1}", f"boot-{i + 1:0{width}d}")
                for i in range(n)]

    def session_boots(self, seed: int | None = None) -> list[int]:
        """Indices of the boots that run sessions (`sessions.fraction` of them, by seed)."""
        seed = self.seed if seed is None else seed
        k = round(self.sessions.fraction * self.fleet.boots)
        return sorted(random.Random(f"sessions/{seed}").sample(range(self.fleet.boots), k))

    def detect_window(self, kind: FaultKind) -> float:
        """Seconds the gateway has to detect `kind` in this scenario."""
        return self.expect.window(kind, self.fleet.telemetry_period_s)

    def expectation(self, fault: PlannedFault) -> Expectation:
        """What the gateway must do about this fault, for this fleet's boots."""
        return expectation(fault.kind, fault.params,
                           ceiling_mmhg=default_ceiling_mmhg(self.fleet.max_pressure_mmhg))

    def max_clock_offset_s(self) -> float:
        """The furthest any boot's wall clock (so its telemetry timestamps) is moved from true
        time by the faults of this run (clock_skew, clock_step); 0 without such faults."""
        return max((abs(spec.params.clock_offset_s) for spec in self.faults), default=0.0)

    def fault_plan(self, seed: int | None = None) -> list[PlannedFault]:
        """Every fault of the run, by time: deterministic for a seed (default: `seed`)."""
        plan, problems = self._expand(self.seed if seed is None else seed)
        if problems:
            raise ScenarioError(problems)
        return plan

    # ------------------------------------------------------------------ validation

    def _earliest_s(self, kind: FaultKind) -> float:
        if EXPECTED[kind].session_required:
            return self.sessions.start_within_s + SESSION_SETTLE_S
        return 0.0

    def _problems(self) -> list[Problem]:
        out: list[Problem] = []
        fleet, sessions, expect = self.fleet, self.sessions, self.expect
        if fleet.clinics > fleet.boots:
            out.append(Problem(("fleet", "clinics"),
                               f"{fleet.clinics} clinics for {fleet.boots} boots"))
        out += self._program_problems()
        if sessions.fraction > 0 and self.gateway_url is None:
            out.append(Problem(("sessions", "fraction"), "sessions are started through the "
                               "gateway's HTTP API: set gateway_url (or fraction: 0)"))
        if expect.telemetry_stored and self.influx is None:
            out.append(Problem(("expect", "telemetry_stored"),
                               "checking stored telemetry needs `influx`"))
        kinds = {k.value for k in FaultKind}
        for key in expect.detect_within_s:
            if key != "default" and key not in kinds:
                out.append(Problem(("expect", "detect_within_s", key), "unknown fault kind; "
                                   f"use 'default' or one of {', '.join(sorted(kinds))}"))
        n_session = round(sessions.fraction * fleet.boots)
        for i, spec in enumerate(self.faults):
            out += self._fault_problems(i, spec, n_session)
        for kind in sorted({s.kind for s in self.faults}):
            need = nominal_detect_s(kind, fleet.telemetry_period_s)
            window = expect.detect_within_s.get(kind.value)
            if window is not None and window < need:
                out.append(Problem(
                    ("expect", "detect_within_s", kind.value),
                    f"{window:g} s is shorter than the gateway's own timing for "
                    f"{kind.value} at {fleet.telemetry_hz:g} Hz ({need:.1f} s)"))
        return out

    def _program_problems(self) -> list[Problem]:
        out: list[Problem] = []
        limits = ProgramLimits()
        boot = BootLimits(clinic=f"{self.fleet.clinic_prefix}1", chambers=self.fleet.chambers,
                          max_pressure_mmhg=self.fleet.max_pressure_mmhg, online=True,
                          in_session=False,
                          gateway_ceiling_mmhg=WatchdogSettings().hard_ceiling_mmhg)
        for name in self.sessions.programs:
            template = CATALOGUE.get(name)
            if template is None:
                out.append(Problem(("sessions", "programs", name), "not in the catalogue; one "
                                   f"of {', '.join(sorted(CATALOGUE))}"))
                continue
            reasons = check_program(template.resolve(self.fleet.chambers, limits), boot, limits)
            if reasons:
                out.append(Problem(("sessions", "programs", name), "the gateway (default "
                                   "limits) would refuse it for these boots: "
                                   + "; ".join(reasons)))
        return out

    def _fault_problems(self, i: int, spec: _FaultSpecBase, n_session: int) -> list[Problem]:
        out: list[Problem] = []
        loc: Loc = ("faults", i)
        kind = spec.kind
        storm = kind is FaultKind.RECONNECT_STORM
        if spec.at_s is not None and spec.rate_per_boot_hour is not None:
            out.append(Problem((*loc, "rate_per_boot_hour"),
                               "give either at_s or rate_per_boot_hour, not both"))
        elif spec.at_s is None and spec.rate_per_boot_hour is None:
            out.append(Problem(loc, "needs at_s (exact times) or rate_per_boot_hour"))
        if storm and spec.rate_per_boot_hour is not None:
            out.append(Problem((*loc, "rate_per_boot_hour"),
                               "a reconnect_storm is a fleet event: give at_s"))
        if "boots" in spec.model_fields_set:
            if storm:
                out.append(Problem((*loc, "boots"), "a reconnect_storm takes "
                                   "params.fraction of the fleet; leave boots out"))
            elif spec.rate_per_boot_hour is not None:
                out.append(Problem((*loc, "boots"),
                                   "only with at_s; a rate hits one boot per arrival"))
        needs_session = EXPECTED[kind].session_required
        pool = n_session if needs_session else self.fleet.boots
        if needs_session and n_session == 0:
            out.append(Problem((*loc, "kind"), f"{kind.value} needs a session and no boot "
                               "runs one (sessions.fraction)"))
        elif spec.boots > pool:
            out.append(Problem((*loc, "boots"), f"{spec.boots} boots, but only {pool} can "
                               "take it" + (" (boots in session)" if needs_session else "")))
        if spec.chamber is not None:
            if kind not in CHAMBER_KINDS:
                out.append(Problem((*loc, "chamber"), f"{kind.value} does not act on a chamber"))
            elif spec.chamber > self.fleet.chambers:
                out.append(Problem((*loc, "chamber"),
                                   f"the boots have {self.fleet.chambers} chambers"))
        window = self.detect_window(kind)
        earliest = self._earliest_s(kind)
        back = spec.params.return_s  # a clock step's return is judged too
        for j, at in enumerate(spec.at_s or ()):
            if at + back + window > self.duration_s:
                ret = f" + the return after {back:g} s" if back else ""
                out.append(Problem((*loc, "at_s", j), f"{at:g} s{ret} + the {window:g} s "
                                   f"detection window ends after the run ({self.duration_s:g} s)"))
            elif at < earliest:
                out.append(Problem((*loc, "at_s", j), f"{kind.value} needs a running session: "
                                   f"not before {earliest:g} s (sessions.start_within_s + "
                                   f"{SESSION_SETTLE_S:g})"))
        if spec.rate_per_boot_hour is not None and earliest >= self.duration_s - window - back:
            out.append(Problem((*loc, "rate_per_boot_hour"), "no time left for it: the run "
                               f"is {self.duration_s:g} s, faults may start from {earliest:g} s "
                               f"and need a {window:g} s detection window"
                               + (f" after their {back:g} s return" if back else "")))
        return out

    # ------------------------------------------------------------------ the plan

    def _expand(self, seed: int) -> tuple[list[PlannedFault], list[Problem]]:
        """The fault plan and the explicit faults that do not fit (non-overlap rule)."""
        rng = random.Random(f"faults/{seed}")
        in_session = self.session_boots(seed)
        everyone = list(range(self.fleet.boots))
        events: list[tuple[float, int, int]] = []  # (at_s, spec index, at_s index or -1)
        arrivals: list[tuple[float, int, int]] = []
        for i, spec in enumerate(self.faults):
            if spec.at_s is not None:
                events += [(at, i, j) for j, at in enumerate(spec.at_s)]
                continue
            assert spec.rate_per_boot_hour is not None
            pool = len(in_session) if EXPECTED[spec.kind].session_required else len(everyone)
            rate = spec.rate_per_boot_hour * pool / 3600.0
            t = self._earliest_s(spec.kind)
            end = self.duration_s - self.detect_window(spec.kind) - spec.params.return_s
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
            spec = self.faults[i]
            window = self.detect_window(spec.kind)
            hold = spec.params.hold_s
            until = at + (math.inf if hold is None else hold) + window + RECOVERY_S
            pool_ids = in_session if EXPECTED[spec.kind].session_required else everyone
            if isinstance(spec.params, ReconnectStormParams):
                count = max(1, round(spec.params.fraction * self.fleet.boots))
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
                    chamber = rng.randint(1, self.fleet.chambers)
                busy.setdefault(boot, []).append((at, until))
                plan.append(PlannedFault(
                    at_s=at, boot_index=boot, kind=spec.kind,
                    chamber=chamber if spec.kind in CHAMBER_KINDS else None,
                    params=spec.params, spec_index=i, group=group, detect_within_s=window))
        plan.sort(key=lambda f: (f.at_s, f.boot_index, f.spec_index))
        return plan, problems


# ---------------------------------------------------------------- loading


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; ScenarioError names the file, line and field."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ScenarioError([Problem((), "a scenario is .yaml, .yml or .toml")], path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([Problem((), f"cannot read: {exc}")], path) from None
    if suffix == ".toml":
        data, line_of = _parse_toml(text, path)
    else:
        data, line_of = _parse_yaml(text, path)
    if not isinstance(data, dict):
        raise ScenarioError([Problem((), "the file must hold a mapping of fields", 1)], path)
    try:
        sc = Scenario.model_validate(data)
        creds = sc.broker.credentials_file
        if creds is not None and not creds.is_absolute():  # as the file's author sees it
            broker = sc.broker.model_copy(update={"credentials_file": path.parent / creds})
            sc = sc.model_copy(update={"broker": broker})
        if sc.broker.credentials_file is not None:
            try:  # an unusable file stops the run here, not in every worker
                load_credentials(sc.broker.credentials_file)
            except CredentialsError as exc:
                raise ScenarioError([Problem(("broker", "credentials_file"), str(exc))]
                                    ) from None
        return sc
    except ValidationError as exc:
        problems = _from_validation(exc)
    except ScenarioError as exc:
        problems = exc.problems
    raise ScenarioError([Problem(p.loc, p.msg, p.line or line_of(p.loc)) for p in problems],
                        path) from None


def _from_validation(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors(include_url=False):
        loc = _normalise(err["loc"])
        msg = err["msg"]
        if err["type"] == "union_tag_invalid":  # a bad fault kind
            *head, last = [f"'{k.value}'" for k in FaultKind]
            loc, msg = (*loc, "kind"), f"Input should be {', '.join(head)} or {last}"
        elif err["type"] == "union_tag_not_found":
            loc, msg = (*loc, "kind"), "Field required"
        out.append(Problem(loc, msg))
    return out


def _normalise(loc: Sequence[str | int]) -> Loc:
    """Drop the union tag pydantic puts after `faults.N` (the kind): it is not in the file."""
    kinds = {k.value for k in FaultKind}
    out: list[str | int] = []
    for part in loc:
        if (part in kinds and len(out) >= 2 and out[-2] == "faults"
                and isinstance(out[-1], int)):
            continue
        out.append(part)
    return tuple(out)


def _parse_yaml(text: str, path: Path) -> tuple[Any, Any]:
    try:
        deep = _yaml_too_deep(text)
        if deep is not None:
            raise ScenarioError([Problem((), f"nested more than {MAX_NESTING} levels deep",
                                         deep)], path)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        if isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses: no mark
            line = text.count("\n", 0, exc.position) + 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError([Problem((), f"YAML syntax: {problem}", line)], path) from None
    if root is not None:
        dupes = _yaml_duplicates(root)
        if dupes:
            raise ScenarioError(dupes, path)

    def line_of(loc: Loc) -> int | None:
        return None if root is None else _yaml_line(root, loc)

    return data, line_of


def _yaml_too_deep(text: str) -> int | None:
    """The line where the nesting first exceeds MAX_NESTING, from the (iterative) scanner."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _YAML_OPEN):
            depth += 1
            if depth > MAX_NESTING:
                return int(token.start_mark.line) + 1
        elif isinstance(token, _YAML_CLOSE):
            depth -= 1
    return None


_YAML_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
              yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
_YAML_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _yaml_duplicates(root: yaml.Node) -> list[Problem]:
    """PyYAML keeps the last of two equal keys silently; a scenario must not.

    Each node is looked at once: an alias is the node it names, so nine aliases of nine
    aliases would otherwise be walked 9**9 times, and an alias inside its own anchor forever.
    """
    problems: list[Problem] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                name = str(key.value)
                if name in keys:
                    problems.append(Problem((*loc, name), "duplicate key",
                                            key.start_mark.line + 1))
                keys.add(name)
                stack.append((value, (*loc, name)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*loc, i)) for i, item in enumerate(node.value))
    return sorted(problems, key=lambda p: p.line or 0)


def _yaml_line(node: yaml.Node, loc: Loc) -> int:
    """Line (1-based) of the deepest node along `loc`: the key itself when it is there, else
    the mapping or item that should hold it (a missing field)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _parse_toml(text: str, path: Path) -> tuple[Any, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        line = int(m[1]) if m else len(text.splitlines()) or 1  # "at end of document"
        raise ScenarioError([Problem((), f"TOML syntax: {exc}", line)], path) from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ScenarioError([Problem((), f"nested more than {MAX_NESTING} levels deep",
                                     _toml_too_deep(text))], path) from None
    index = _toml_index(text)

    def line_of(loc: Loc) -> int | None:
        for n in range(len(loc), 0, -1):
            if loc[:n] in index:
                return index[loc[:n]]
        return 1  # nothing of it in the file: the top level, which starts at line 1

    return data, line_of


def _toml_too_deep(text: str) -> int | None:
    """The line where brackets first nest more than MAX_NESTING deep (strings not skipped:
    only called once tomllib has overflowed, to say where)."""
    depth = 0
    for n, line in enumerate(text.splitlines(), start=1):
        for c in line:
            depth += (c in "[{") - (c in "]}")
            if depth > MAX_NESTING:
                return n
    return None


_TOML_ARRAY = re.compile(r"^\[\[\s*([^\]]+?)\s*\]\]")
_TOML_TABLE = re.compile(r"^\[\s*([^\]]+?)\s*\]")
_TOML_KEY = re.compile(r"""^([A-Za-z0-9_\-."' ]+?)\s*=""")
_TOML_INLINE_KEY = re.compile(r"[{,]\s*([A-Za-z0-9_-]+)\s*=")


def _toml_index(text: str) -> dict[Loc, int]:
    """Field path -> line, from table headers and `key =` lines (a cheap scan, not a parser:
    multi-line strings that look like keys can mislead it; the path is reported anyway)."""
    index: dict[Loc, int] = {}
    arrays: dict[Loc, int] = {}  # array-of-tables path -> index of its latest element
    table: Loc = ()

    def keys(dotted: str) -> Loc:
        return tuple(k.strip().strip("\"'") for k in dotted.split("."))

    def resolve(path: Loc) -> Loc:
        out: Loc = ()
        for part in path:
            out = (*out, part)
            if out in arrays:
                out = (*out, arrays[out])
        return out

    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _TOML_ARRAY.match(line):
            parent = resolve(keys(m[1])[:-1])
            path = (*parent, keys(m[1])[-1])
            arrays[path] = arrays.get(path, -1) + 1
            index.setdefault(path, n)
            table = (*path, arrays[path])
            index[table] = n
        elif m := _TOML_TABLE.match(line):
            table = resolve(keys(m[1]))
            index.setdefault(table, n)
        elif m := _TOML_KEY.match(line):
            key = (*table, *keys(m[1]))
            index.setdefault(key, n)
            for inner in _TOML_INLINE_KEY.finditer(line):
                index.setdefault((*key, inner[1]), n)
    return index
