"""The scenario schema: pydantic models of a fleet simulation and its cross-field checks.

No unknown keys anywhere. Programs and detection windows are checked against the gateway's own
catalogue, default limits and timing (through `device_sim.gateway_rules`), and the fault plan
must fit (`device_sim.scenario.plan`); every problem is a `Problem` with its field path, to
which the loader adds the line.

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
import string
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, cast

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic import model_validator as _model_validator

from device_sim.faults import (
    CHAMBER_KINDS,
    EXPECTED,
    PARAMS,
    Expectation,
    FaultKind,
    FaultParams,
    PlannedFault,
    expectation,
    nominal_detect_s,
)
from device_sim.gateway_rules import (
    CATALOGUE,
    BootLimits,
    ProgramLimits,
    WatchdogSettings,
    check_program,
    default_ceiling_mmhg,
)
from device_sim.scenario.errors import Loc, Problem, ScenarioError
from device_sim.scenario.plan import expand
from gateway.contract import ID_PATTERN, MAX_CHAMBERS

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ENV_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
HTTP_PATTERN = r"^https?://[^\s/]+(/\S*)?$"
DEFAULT_DETECT_S = 10.0
# A kind left to the `default` window gets at least the gateway's own timing plus this.
DETECT_MARGIN_S = 2.0
# Faults needing a session come no earlier than start_within_s + this (the start's round trip).
SESSION_SETTLE_S = 2.0
# processes: 0 -> one simulator process per this many boots (at most 2 per CPU).
BOOTS_PER_PROCESS = 500


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
            problems = expand(self, self.seed)[1]
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
        plan, problems = expand(self, self.seed if seed is None else seed)
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

