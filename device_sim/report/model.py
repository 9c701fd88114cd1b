"""What a fleet-simulation run collected, and the shape of its verdict: pydantic models only.

The runner fills the inputs (the faults it injected, the safety events and device faults the
gateway stored, the vents and self-vents the simulated boots saw, pressure traces, totals);
`device_sim.report.judge` turns them into a `Report`; `text` and `plot` render it. The models
live apart from the judging so the JSON a run writes can be read back (`Report.from_json`)
without the judge, the renderers or their libraries.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------- inputs (from the runner)


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Injection(_Input):
    """A fault the runner injected into one simulated boot, and what the gateway must do."""

    boot: str = Field(description='"clinic/device"')
    kind: str = Field(description="fault kind, e.g. stuck_valve, slow_leak, malformed_payload")
    at: float = Field(description="when it was injected, unix s (simulator clock)")
    chamber: int | None = Field(
        None, ge=0, description="0-based chamber index as in telemetry; shown to people as +1"
    )
    expected_rules: list[str] = Field(
        default_factory=list,
        description="safety_event rules that count as detection; empty: none expected",
    )
    vent_expected: bool = False
    expect_device_fault: bool = Field(
        False, description="detected as a device_fault (e.g. malformed payloads), not a rule"
    )
    detect_within_s: float = Field(gt=0, description="deadline after `at` for detection")
    cleared_at: float | None = Field(
        None, description="when the fault was taken out again, unix s (simulator clock): a "
        "reconnect, a clock step's return; None for one-off faults and those still in at the end")
    self_vent_within_s: float | None = Field(
        None, gt=0, description="the fault cuts the boot off from the gateway: the vent judged "
        "is the boot's own self-vent, due within this many seconds (its heartbeat timeout)")

    @property
    def end(self) -> float:
        """When the fault stopped acting: cleared_at, else the injection itself."""
        return self.at if self.cleared_at is None else max(self.at, self.cleared_at)

    @property
    def expects_reaction(self) -> bool:
        """False for faults the gateway must tolerate silently (slow_leak, clock_skew)."""
        return bool(self.expected_rules) or self.expect_device_fault or self.vent_expected


class Detection(_Input):
    """A safety event or device fault the gateway stored (read back by the runner)."""

    boot: str
    rule: str = Field(description="safety rule name, or the device fault kind")
    at: float = Field(description="unix s (gateway clock)")
    source: Literal["safety_event", "device_fault"]


class VentSeen(_Input):
    """A vent command received by a simulated boot (timed on the boot's own clock)."""

    boot: str
    at: float


class SelfVent(_Input):
    """A simulated boot venting itself (connection or heartbeat lost), on the boot's clock."""

    boot: str
    at: float
    cause: str = ""


class Trace(_Input):
    """Pressure samples of one boot, for the plot. Ragged or short data is tolerated."""

    boot: str
    kind: str | None = Field(None, description="injected fault kind; None for a healthy boot")
    t: list[float] = Field(description="sample times, unix s")
    pressures: list[list[float]] = Field(description="per sample, per chamber, mmHg")
    targets: list[float] | None = Field(None, description="per chamber, mmHg")
    vents_at: list[float] = Field(default_factory=list)
    fault_at: float | None = None


class Totals(_Input):
    """Counts of the whole run, as measured by the runner."""

    scenario: str
    boots: int = Field(ge=0)
    clinics: int = Field(ge=0)
    processes: int = Field(ge=0)
    duration_s: float = Field(ge=0)
    telemetry_sent: int = Field(ge=0)
    messages_per_s: float = Field(ge=0)
    sessions_requested: int = Field(ge=0)
    sessions_started: int = Field(ge=0)
    telemetry_stored: int | None = Field(None, ge=0, description="None: InfluxDB not checked")
    sim_cpu_percent: float = Field(ge=0)
    sim_peak_rss_mb: float = Field(ge=0)
    boots_connected: int = Field(ge=0)
    connect_failures: int = Field(ge=0)
    fd_limit: int
    fd_limit_note: str | None = None


class Expectations(_Input):
    """What the run must show to pass, besides every injected fault being handled in time."""

    false_vents: int = Field(0, ge=0, description="vents on healthy boots tolerated")
    telemetry_stored: bool = Field(description="every sent sample must be found in InfluxDB")
    min_sessions_started_fraction: float = Field(ge=0, le=1)


# ---------------------------------------------------------------- the report


class Outcome(StrEnum):
    """Only DETECTED and OK_NOTHING_EXPECTED pass; the others each name what went wrong."""

    DETECTED = "detected"
    LATE = "late"
    MISSED = "missed"
    NOT_VENTED = "not_vented"
    UNEXPECTED_DETECTION = "unexpected_detection"
    OK_NOTHING_EXPECTED = "ok_nothing_expected"


PASSING = frozenset({Outcome.DETECTED, Outcome.OK_NOTHING_EXPECTED})


class InjectionResult(BaseModel):
    """One injection and what the gateway did about it; ``detail`` is the sentence for people."""

    boot: str
    kind: str
    chamber: int | None
    at: float
    outcome: Outcome
    passed: bool
    rule: str | None = None
    source: Literal["safety_event", "device_fault"] | None = None
    detected_at: float | None = None
    delay_s: float | None = Field(None, description="detection.at - at; may be slightly < 0")
    vent_at: float | None = None
    vent_delay_s: float | None = None
    vented_by: Literal["gateway", "boot"] | None = Field(
        None, description="whose vent was judged: the gateway's, or the boot's own self-vent")
    detail: str


class DelayStats(BaseModel):
    """Nearest-rank percentiles: each one is a delay that really happened."""

    values_s: list[float] = Field(default_factory=list)
    count: int = 0
    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    max_s: float | None = None


class ReactionTimes(BaseModel):
    """Delays of detected and late injections: the numbers a release is compared on."""

    detection: DelayStats = Field(description="fault injected -> safety event/fault stored")
    vent: DelayStats = Field(description="fault injected -> vent at the boot (received from "
                             "the gateway, or its self-vent where the gateway cannot reach it)")
    reaction: DelayStats = Field(description="per injection: vent delay if vented, else detection")


class KindSummary(BaseModel):
    """Outcome counts per fault kind: a weak kind shows up even among thousands of boots."""

    kind: str
    injected: int = 0
    detected: int = 0
    late: int = 0
    missed: int = 0
    not_vented: int = 0
    unexpected_detection: int = 0
    ok_nothing_expected: int = 0
    delay_p50_s: float | None = None
    delay_max_s: float | None = None
    vent_delay_p50_s: float | None = None
    vent_delay_max_s: float | None = None


class Report(BaseModel):
    """The verdict of one run. ``failures`` empty <=> ``passed``."""

    scenario: str
    passed: bool
    failures: list[str] = Field(description="one readable sentence per failed expectation")
    notes: list[str] = Field(default_factory=list, description="worth knowing, not failures")
    kinds: list[KindSummary]
    reaction: ReactionTimes
    totals: Totals
    expectations: Expectations
    telemetry_missing: int | None = None
    sessions_started_fraction: float
    false_vents: list[VentSeen]
    unexplained_detections: list[Detection]
    unexplained_self_vents: list[SelfVent] = Field(default_factory=list)
    injections: list[InjectionResult]
    traced_boots: list[str] = Field(default_factory=list)

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    def write_json(self, path: Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, text: str | bytes) -> Report:
        return cls.model_validate_json(text)


def exit_code(report: Report) -> int:
    """0 when every expectation held, 1 otherwise (so CI and scripts can gate a release)."""
    return 0 if report.passed else 1

