"""Final report of a fleet simulation: did the gateway catch every injected fault, and only those?

Ops run a simulation to decide whether a gateway release may go near patients, so the verdict
must be explicit: every expectation that failed is one readable sentence, and `exit_code` is
non-zero. This module is pure (no network, no clock): the runner collects what happened (the
faults it injected, the safety events and device faults the gateway stored, the vents the
simulated boots received, a few pressure traces, totals) and `build_report` judges it. The
result renders as JSON (machines), plain text and rich (people) and a PNG (plots).

Matching rules, in one place so they can be argued about:

* An injection is **detected** by the first detection on the same boot, at or after
  ``at - CLOCK_SLACK_S`` (the gateway's and the simulator's clocks differ slightly), whose rule
  is in ``expected_rules`` (a ``safety_event``) or that is a ``device_fault`` when
  ``expect_device_fault``. It is **late** if that detection, or the vent when one is expected,
  came after the deadline (``at + detect_within_s``; the vent gets ``CLOCK_SLACK_S`` more, as
  it is timed on the boot's clock), **missed** if there is none, **not_vented** if it was
  detected in time but no vent ever reached the boot. The search for a late detection stops
  at the boot's next injection, which owns the detections after it.
* A fault that cuts the boot off from the gateway (``self_vent_within_s`` set: ``disconnect``,
  ``reconnect_storm``) is judged by the gateway's detection (e.g. the LWT's
  ``offline_in_session``, within ``detect_within_s``) and by the boot's **own self-vent**
  (a ``SelfVent``, within ``self_vent_within_s``, its heartbeat timeout), not by the gateway's
  vent: that one can only reach the boot after the reconnect, however long it was away.
  No self-vent is **not_vented**, a later one **late**.
* An injection that expects nothing (``expected_rules`` empty, no device fault, no vent, e.g.
  ``slow_leak``, ``clock_skew`` or ``clock_step``) fails as **unexpected_detection** when any
  safety event hits that boot within ``[at - CLOCK_SLACK_S, end + detect_within_s]``, where
  ``end`` is ``cleared_at`` when the fault was taken out (a clock step's return is a step of
  its own), else ``at``.
* A vent is **false** unless its boot had an injection with ``vent_expected`` and the vent
  came within ``[at - CLOCK_SLACK_S, end + detect_within_s + AFTERMATH_S]`` (the aftermath
  covers re-sent vents of the same episode, rule 8; ``end`` as above, so the vent a
  disconnected boot gets after its reconnect belongs to its fault).
* A safety event is **unexplained** unless it matched an injection, was already reported as
  an unexpected detection, or falls within the same aftermath window of an injection that
  expected a reaction. Unexplained events are listed and never fail the run by themselves:
  when they caused a vent, that vent fails it as a false vent. One failure, counted once.
  Self-vents outside such a window are listed in a note (the gateway's heartbeat stalled?).
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from rich.console import Console

CLOCK_SLACK_S = 1.0  # the simulator's and the gateway's clocks may differ by this much
AFTERMATH_S = 30.0  # after a vented fault, re-sent vents and follow-up events still belong to it
WIDTH = 100  # columns of the plain-text summary
MAX_LISTED = 12  # failures/notes listed in the summary; the JSON has them all


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


_Timed = TypeVar("_Timed", Detection, VentSeen, SelfVent)


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


# ---------------------------------------------------------------- judging


def _stats(values: Iterable[float]) -> DelayStats:
    vals = sorted(values)
    if not vals:
        return DelayStats()

    def pct(q: float) -> float:
        return vals[max(0, math.ceil(q / 100 * len(vals)) - 1)]

    return DelayStats(values_s=vals, count=len(vals), p50_s=pct(50), p95_s=pct(95),
                      p99_s=pct(99), max_s=vals[-1])


def _what(inj: Injection) -> str:
    chamber = f" (chamber {inj.chamber + 1})" if inj.chamber is not None else ""
    return f"{inj.kind} on {inj.boot}{chamber}"


def _expected_phrase(inj: Injection) -> str:
    names = [*inj.expected_rules, *(["a device_fault"] if inj.expect_device_fault else [])]
    return " or ".join(names) if names else "a vent"


def _counts_for(d: Detection, inj: Injection) -> bool:
    if d.source == "device_fault":
        return inj.expect_device_fault
    return d.rule in inj.expected_rules


def _judge(inj: Injection, horizon: float, dets: list[Detection], vents: list[VentSeen],
           self_vents: Sequence[SelfVent] = ()) -> tuple[InjectionResult, Detection | None]:
    """Outcome of one injection, and the detection it claimed (to tell explained events)."""
    lo = inj.at - CLOCK_SLACK_S
    deadline = inj.at + inj.detect_within_s
    base = {"boot": inj.boot, "kind": inj.kind, "chamber": inj.chamber, "at": inj.at}
    what = _what(inj)

    if not inj.expects_reaction:
        quiet_until = inj.end + inj.detect_within_s
        hit = next((d for d in dets if d.source == "safety_event" and lo <= d.at <= quiet_until),
                   None)
        cleared = inj.cleared_at is not None
        if hit is None:
            span = (f"while it lasted ({inj.end - inj.at:.1f} s) and {inj.detect_within_s:g} s "
                    "after it was cleared" if cleared else f"within {inj.detect_within_s:g} s")
            return InjectionResult(
                **base, outcome=Outcome.OK_NOTHING_EXPECTED, passed=True,
                detail=f"{what}: no safety event {span}, as expected."), None
        after_clear = (f" ({hit.at - inj.end:.2f} s after it was cleared)"
                       if cleared and hit.at >= inj.end else "")
        return InjectionResult(
            **base, outcome=Outcome.UNEXPECTED_DETECTION, passed=False, rule=hit.rule,
            source=hit.source, detected_at=hit.at, delay_s=hit.at - inj.at,
            detail=(f"{what} should cause no safety event, but {hit.rule} fired "
                    f"{hit.at - inj.at:.2f} s after the injection{after_clear}."),
        ), hit

    match = None
    if inj.expected_rules or inj.expect_device_fault:
        match = next((d for d in dets if lo <= d.at < horizon and _counts_for(d, inj)), None)
    by_boot = inj.self_vent_within_s is not None  # cut off: the boot's own vent is judged
    vent: VentSeen | SelfVent | None = None
    if inj.vent_expected:
        pool: Sequence[VentSeen | SelfVent] = self_vents if by_boot else vents
        vent = next((v for v in pool if lo <= v.at < horizon), None)
    found: dict[str, object] = {}
    if match is not None:
        found |= {"rule": match.rule, "source": match.source, "detected_at": match.at,
                  "delay_s": match.at - inj.at}
    if vent is not None:
        found |= {"vent_at": vent.at, "vent_delay_s": vent.at - inj.at,
                  "vented_by": "boot" if by_boot else "gateway"}
    if inj.self_vent_within_s is not None:
        vent_deadline = inj.at + inj.self_vent_within_s
        vent_limit = f"its heartbeat timeout, {inj.self_vent_within_s:g} s"
    else:
        vent_deadline = deadline + CLOCK_SLACK_S
        vent_limit = f"{inj.detect_within_s:g} s"
    limit = f"{inj.detect_within_s:g} s"

    def result(outcome: Outcome, detail: str) -> tuple[InjectionResult, Detection | None]:
        return InjectionResult(**base, **found, outcome=outcome, passed=outcome in PASSING,
                               detail=detail), match

    if inj.expected_rules or inj.expect_device_fault:
        if match is None:
            return result(Outcome.MISSED, f"{what} was not detected: no {_expected_phrase(inj)}"
                                          f" after the injection.")
        took = f"{match.rule} after {match.at - inj.at:.2f} s"
        if match.at > deadline:
            return result(Outcome.LATE, f"{what} was detected late: {took} (limit {limit}).")
        if inj.vent_expected and vent is None:
            return result(Outcome.NOT_VENTED, f"{what} was detected ({took}) but " + (
                f"the boot did not vent itself (due within {vent_limit})." if by_boot
                else "no vent reached the boot."))
        if vent is not None and vent.at > vent_deadline:
            return result(Outcome.LATE, f"{what} was vented late: " + (
                "the boot vented itself" if by_boot else "the vent reached the boot")
                + f" {vent.at - inj.at:.2f} s after the injection (limit {vent_limit}).")
        if by_boot and vent is not None:
            took += f"; the boot vented itself after {vent.at - inj.at:.2f} s"
        return result(Outcome.DETECTED, f"{what} was detected: {took}.")
    # a vent is the only reaction expected
    if vent is None:
        return result(Outcome.MISSED, f"{what} was not vented: " + (
            "the boot did not vent itself." if by_boot else "no vent reached the boot."))
    took = f"{vent.at - inj.at:.2f} s"
    if vent.at > vent_deadline:
        return result(Outcome.LATE, f"{what} was vented late: after {took} (limit {vent_limit}).")
    return result(Outcome.DETECTED, f"{what} was vented after {took}.")


def _by_boot(items: Iterable[_Timed]) -> dict[str, list[_Timed]]:
    out: dict[str, list[_Timed]] = defaultdict(list)
    for item in sorted(items, key=lambda x: x.at):
        out[item.boot].append(item)
    return out


def _boot_list(boots: Sequence[str], limit: int = 5) -> str:
    counts = Counter(boots)
    parts = [f"{b} ({n}x)" if n > 1 else b for b, n in counts.most_common(limit)]
    more = len(counts) - limit
    return ", ".join(parts) + (f" and {more} more boots" if more > 0 else "")


def build_report(
    totals: Totals,
    injections: Sequence[Injection],
    detections: Sequence[Detection],
    vents: Sequence[VentSeen],
    traces: Sequence[Trace],
    expectations: Expectations,
    self_vents: Sequence[SelfVent] = (),
) -> Report:
    """Judge a run against its expectations (rules in the module docstring)."""
    dets = _by_boot(detections)
    vents_by = _by_boot(vents)
    self_vents_by = _by_boot(self_vents)
    injs = sorted(injections, key=lambda i: (i.at, i.boot))
    inj_by: dict[str, list[Injection]] = defaultdict(list)
    for inj in injs:
        inj_by[inj.boot].append(inj)

    results: list[InjectionResult] = []
    claimed: set[int] = set()
    for inj in injs:
        later = [o.at for o in inj_by[inj.boot] if o.at > inj.at]
        horizon = (max(min(later) - CLOCK_SLACK_S, inj.at + inj.detect_within_s)
                   if later else math.inf)
        res, det = _judge(inj, horizon, dets[inj.boot], vents_by[inj.boot],
                          self_vents_by[inj.boot])
        results.append(res)
        if det is not None:
            claimed.add(id(det))

    def covered(boot: str, at: float, *, vent: bool) -> bool:
        return any(
            (i.vent_expected if vent else i.expects_reaction)
            and i.at - CLOCK_SLACK_S <= at <= i.end + i.detect_within_s + AFTERMATH_S
            for i in inj_by.get(boot, ())
        )

    false_vents = [v for vs in vents_by.values() for v in vs
                   if not covered(v.boot, v.at, vent=True)]
    false_vents.sort(key=lambda v: v.at)
    unexplained = [d for ds in dets.values() for d in ds
                   if d.source == "safety_event" and id(d) not in claimed
                   and not covered(d.boot, d.at, vent=False)]
    unexplained.sort(key=lambda d: d.at)
    lone_self_vents = sorted(
        (v for vs in self_vents_by.values() for v in vs if not any(
            i.self_vent_within_s is not None
            and i.at - CLOCK_SLACK_S <= v.at <= i.end + i.detect_within_s + AFTERMATH_S
            for i in inj_by.get(v.boot, ()))), key=lambda v: v.at)

    failures = [r.detail for r in results if not r.passed]
    notes: list[str] = []
    if len(false_vents) > expectations.false_vents:
        failures.append(
            f"{len(false_vents)} vents reached boots without an injected fault calling for one "
            f"(allowed {expectations.false_vents}): "
            f"{_boot_list([v.boot for v in false_vents])}.")
    elif false_vents:
        notes.append(f"{len(false_vents)} vents on boots without a fault (allowed "
                     f"{expectations.false_vents}): {_boot_list([v.boot for v in false_vents])}.")

    missing = None
    if totals.telemetry_stored is not None:
        missing = max(0, totals.telemetry_sent - totals.telemetry_stored)
        if totals.telemetry_stored > totals.telemetry_sent:
            notes.append(f"InfluxDB holds {totals.telemetry_stored} telemetry points, more than "
                         f"the {totals.telemetry_sent} sent (duplicates or another writer?).")
    if expectations.telemetry_stored:
        if totals.telemetry_stored is None:
            failures.append("Telemetry in InfluxDB was not checked, but the scenario expects "
                            "every sample to be stored.")
        elif missing:
            share = 100 * missing / max(1, totals.telemetry_sent)
            failures.append(f"Telemetry missing in InfluxDB: {missing} of "
                            f"{totals.telemetry_sent} samples sent were not stored "
                            f"({share:.2f} %).")
    elif totals.telemetry_stored is None:
        notes.append("Telemetry in InfluxDB was not checked.")

    # no sessions requested: nothing can be too few (a connect-only scenario)
    fraction = (totals.sessions_started / totals.sessions_requested
                if totals.sessions_requested else 1.0)
    if fraction < expectations.min_sessions_started_fraction:
        failures.append(
            f"Too few sessions started: {totals.sessions_started} of "
            f"{totals.sessions_requested} ({100 * fraction:.1f} %), expected at least "
            f"{100 * expectations.min_sessions_started_fraction:.1f} %.")

    if unexplained:
        rules = Counter(d.rule for d in unexplained)
        notes.append(
            f"{len(unexplained)} safety events not explained by an injected fault ("
            + ", ".join(f"{r} {n}x" for r, n in rules.most_common())
            + "); listed in the JSON, they fail the run only through a vent they caused.")
    if lone_self_vents:
        causes = Counter(v.cause or "?" for v in lone_self_vents)
        notes.append(
            f"{len(lone_self_vents)} self-vents by boots no injected fault cut off ("
            + ", ".join(f"{c} {n}x" for c, n in causes.most_common()) + "): "
            f"{_boot_list([v.boot for v in lone_self_vents])}; did the gateway's heartbeat "
            "stall?")
    if totals.connect_failures or totals.boots_connected < totals.boots:
        notes.append(f"{totals.boots_connected} of {totals.boots} boots connected "
                     f"({totals.connect_failures} connect failures).")
    if totals.fd_limit_note:
        notes.append(f"File descriptors: {totals.fd_limit_note}")

    return Report(
        scenario=totals.scenario,
        passed=not failures,
        failures=failures,
        notes=notes,
        kinds=_kind_summaries(results),
        reaction=_reactions(results),
        totals=totals,
        expectations=expectations,
        telemetry_missing=missing,
        sessions_started_fraction=fraction,
        false_vents=false_vents,
        unexplained_detections=unexplained,
        unexplained_self_vents=lone_self_vents,
        injections=results,
        traced_boots=[t.boot for t in traces],
    )


def _reaction_of(r: InjectionResult) -> float | None:
    return r.vent_delay_s if r.vent_delay_s is not None else r.delay_s


def _reactions(results: Sequence[InjectionResult]) -> ReactionTimes:
    reacted = [r for r in results if r.outcome is not Outcome.UNEXPECTED_DETECTION]
    return ReactionTimes(
        detection=_stats(r.delay_s for r in reacted if r.delay_s is not None),
        vent=_stats(r.vent_delay_s for r in reacted if r.vent_delay_s is not None),
        reaction=_stats(x for r in reacted if (x := _reaction_of(r)) is not None),
    )


def _kind_summaries(results: Sequence[InjectionResult]) -> list[KindSummary]:
    groups: dict[str, list[InjectionResult]] = defaultdict(list)
    for r in results:
        groups[r.kind].append(r)
    out = []
    for kind in sorted(groups):
        rs = groups[kind]
        counts = Counter(r.outcome.value for r in rs)
        ok = [r for r in rs if r.outcome is not Outcome.UNEXPECTED_DETECTION]
        det = _stats(r.delay_s for r in ok if r.delay_s is not None)
        vent = _stats(r.vent_delay_s for r in ok if r.vent_delay_s is not None)
        out.append(KindSummary(
            kind=kind, injected=len(rs), **{o.value: counts[o.value] for o in Outcome},
            delay_p50_s=det.p50_s, delay_max_s=det.max_s,
            vent_delay_p50_s=vent.p50_s, vent_delay_max_s=vent.max_s))
    return out


# ---------------------------------------------------------------- text


_COLUMNS = (  # header, KindSummary field, width
    ("injected", "injected", 9), ("detected", "detected", 9), ("late", "late", 5),
    ("missed", "missed", 7), ("no vent", "not_vented", 8), ("unexp.", "unexpected_detection", 7),
    ("ok", "ok_nothing_expected", 4),
)
_DELAYS = (("detection", "delay_p50_s", "delay_max_s"),
           ("vent", "vent_delay_p50_s", "vent_delay_max_s"))
_KIND_W = 18


def _secs(seconds: float | None) -> str:
    """At most 7 characters: the table's delay columns are 8 wide."""
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if abs(seconds) < 99.995 else f"{seconds:.0f} s"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _verdict(report: Report) -> str:
    if report.passed:
        return f'PASS  scenario "{report.scenario}": every expectation held'
    n = len(report.failures)
    return f'FAIL  scenario "{report.scenario}": {n} expectation{"s" * (n != 1)} failed'


def _listed(items: Sequence[str]) -> list[str]:
    lines = [textwrap.fill(s, WIDTH, initial_indent="  - ", subsequent_indent="    ")
             for s in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more (see the JSON report)")
    return lines


def _reaction_lines(report: Report) -> list[tuple[str, str]]:
    out = []
    for name, st in (("detection", report.reaction.detection), ("vent", report.reaction.vent)):
        val = ("no data" if not st.count else
               f"n={st.count}  p50 {_ms(st.p50_s)}  p95 {_ms(st.p95_s)}  "
               f"p99 {_ms(st.p99_s)}  max {_ms(st.max_s)}")
        out.append((f"reaction ({name})", val))
    return out


def _totals_lines(report: Report) -> list[tuple[str, str]]:
    t = report.totals
    if t.telemetry_stored is None:
        stored = "not checked in InfluxDB"
    else:
        stored = (f"{t.telemetry_stored} stored in InfluxDB, "
                  f"{report.telemetry_missing or 'none'} missing")
    fd = f", fd limit {t.fd_limit}" + (f" ({t.fd_limit_note})" if t.fd_limit_note else "")
    return [
        ("fleet", f"{t.boots} boots in {t.clinics} clinics, {t.processes} processes; "
                  f"{t.boots_connected} connected, {t.connect_failures} connect failures"),
        ("duration", f"{t.duration_s:.1f} s"),
        ("telemetry", f"{t.telemetry_sent} sent ({t.messages_per_s:.1f} msg/s); {stored}"),
        ("sessions", f"{t.sessions_started} of {t.sessions_requested} started "
                     f"({100 * report.sessions_started_fraction:.1f} %; at least "
                     f"{100 * report.expectations.min_sessions_started_fraction:.1f} % expected)"),
        ("false vents", f"{len(report.false_vents)} (allowed {report.expectations.false_vents});"
                        f" unexplained safety events {len(report.unexplained_detections)}"),
        ("simulator", f"CPU {t.sim_cpu_percent:.1f} %, peak RSS {t.sim_peak_rss_mb:.1f} MB{fd}"),
    ]


def _kind_table_lines(report: Report) -> list[str]:
    counts_w = _KIND_W + sum(w for _, _, w in _COLUMNS)
    group = " " * counts_w + "".join(f"{f'{name} delay':^16}" for name, _, _ in _DELAYS)
    head = f"{'kind':<{_KIND_W}}" + "".join(f"{h:>{w}}" for h, _, w in _COLUMNS)
    head += f"{'p50':>8}{'max':>8}" * len(_DELAYS)
    lines = [group.rstrip(), head]
    for k in report.kinds:
        row = f"{k.kind[:_KIND_W - 1]:<{_KIND_W}}"
        row += "".join(f"{getattr(k, f):>{w}}" for _, f, w in _COLUMNS)
        row += "".join(f"{_secs(getattr(k, p50)):>8}{_secs(getattr(k, mx)):>8}"
                       for _, p50, mx in _DELAYS)
        lines.append(row)
    if not report.kinds:
        lines.append("(no faults injected)")
    return lines


def summary_text(report: Report) -> str:
    """Plain text, at most 100 columns: the verdict and its reasons first, then the detail."""
    lines = [_verdict(report), *_listed(report.failures)]
    if report.notes:
        lines += ["", "Notes:", *_listed(report.notes)]
    lines += ["", "Injected faults (delays after injection: detection stored, vent at the boot)"]
    lines += _kind_table_lines(report)
    lines.append("")
    lines += [f"{name:<22}{val}" for name, val in _reaction_lines(report)]
    lines += ["", "Totals"]
    for name, val in _totals_lines(report):
        lines.append(textwrap.fill(val, WIDTH, initial_indent=f"  {name:<13}",
                                   subsequent_indent=" " * 15))
    return "\n".join(lines) + "\n"


def print_summary(report: Report, console: Console) -> None:
    """The same content as `summary_text`, in colour, for the terminal."""
    from rich.table import Table
    from rich.text import Text

    style = "bold white on green" if report.passed else "bold white on red"
    console.print(Text(f" {_verdict(report)} ", style=style))
    listed = Table.grid(padding=(0, 1))
    listed.add_column(no_wrap=True)
    listed.add_column()
    for f in report.failures[:MAX_LISTED]:
        listed.add_row(" -", Text(f, style="red"))
    if len(report.failures) > MAX_LISTED:
        listed.add_row("", f"... and {len(report.failures) - MAX_LISTED} more (see the JSON)")
    for n in report.notes[:MAX_LISTED]:
        listed.add_row(Text(" note", style="yellow"), Text(n, style="yellow"))
    console.print(listed)
    console.print()

    table = Table(title="Injected faults (delays after injection, s)", title_justify="left",
                  box=None, padding=(0, 1), collapse_padding=True, pad_edge=False,
                  header_style="bold underline")
    table.add_column("kind", no_wrap=True)
    for h, _, _ in _COLUMNS:
        table.add_column(h, justify="right", no_wrap=True)
    for name, _, _ in _DELAYS:
        table.add_column(f"{name} p50/max", justify="right")
    for k in report.kinds:
        bad = k.late + k.missed + k.not_vented + k.unexpected_detection
        table.add_row(k.kind, *(str(getattr(k, f)) for _, f, _ in _COLUMNS),
                      *(f"{_secs(getattr(k, p50))[:-2]} / {_secs(getattr(k, mx))[:-2]}"
                        if getattr(k, p50) is not None else "-" for _, p50, mx in _DELAYS),
                      style="red" if bad else None)
    if not report.kinds:
        table.add_row("(no faults injected)")
    console.print(table)
    console.print()

    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    for name, val in [*_reaction_lines(report), *_totals_lines(report)]:
        facts.add_row(name, val)
    console.print(facts)


# ---------------------------------------------------------------- plot

_OUTCOME_COLOURS = {
    Outcome.DETECTED: "#2ca02c", Outcome.OK_NOTHING_EXPECTED: "#98df8a",
    Outcome.LATE: "#ff7f0e", Outcome.NOT_VENTED: "#9467bd", Outcome.MISSED: "#d62728",
    Outcome.UNEXPECTED_DETECTION: "#8c564b",
}


_FAULT_COLOUR = "#d62728"
_CHAMBER_COLOURS = [f"C{i}" for i in (0, 1, 2, 4, 5, 7, 8, 9)] + ["#393b79", "#637939",
                                                                   "#8c6d31", "#7b4173"]


def _no_data(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14, color="grey",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_reactions(ax: Axes, report: Report) -> None:
    st = report.reaction.reaction
    title = "Reaction time: fault injected -> vent at the boot"
    if not st.count:
        _no_data(ax, title)
        return
    ms = [v * 1000 for v in st.values_s]
    bins = max(5, min(40, round(2 * math.sqrt(len(ms)))))
    ax.hist(ms, bins=bins, color="#1f77b4", alpha=0.8, label=f"{st.count} injections")
    for q, value, colour in (("p50", st.p50_s, "black"), ("p99", st.p99_s, "#d62728")):
        if value is not None:
            ax.axvline(value * 1000, color=colour, linestyle="--", linewidth=1.5,
                       label=f"{q} {value * 1000:.0f} ms")
    ax.set_title(title)
    ax.set_xlabel("ms after injection (detection delay where no vent was expected)")
    ax.set_ylabel("injections")
    ax.legend(loc="upper right", fontsize="small")


def _plot_outcomes(ax: Axes, report: Report) -> None:
    title = "Outcome per fault kind"
    if not report.kinds:
        _no_data(ax, title)
        return
    names = [k.kind for k in report.kinds]
    left = [0] * len(names)
    for outcome, colour in _OUTCOME_COLOURS.items():
        counts = [getattr(k, outcome.value) for k in report.kinds]
        if any(counts):
            ax.barh(names, counts, left=left, color=colour, label=outcome.value.replace("_", " "))
            left = [a + b for a, b in zip(left, counts, strict=True)]
    for y, k in enumerate(report.kinds):
        good = k.detected + k.ok_nothing_expected
        ax.text(k.injected, y, f" {good}/{k.injected} ok", va="center", fontsize="small")
    ax.set_xlim(0, max(k.injected for k in report.kinds) * 1.15)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel("injections")
    ax.legend(loc="lower right", fontsize="small")


def pick_trace(traces: Sequence[Trace]) -> Trace | None:
    """The boot worth showing: a vented stuck valve, else any stuck valve, vent or fault."""
    usable = [t for t in traces if t.t and t.pressures]
    prefs = (
        lambda t: t.kind == "stuck_valve" and bool(t.vents_at),
        lambda t: t.kind == "stuck_valve",
        lambda t: bool(t.vents_at),
        lambda t: t.fault_at is not None or t.kind is not None,
        lambda t: True,
    )
    for pref in prefs:
        found = next((t for t in usable if pref(t)), None)
        if found is not None:
            return found
    return None


def _plot_trace(ax: Axes, trace: Trace | None) -> None:
    title = "Chamber pressures of a faulty boot"
    if trace is None:
        _no_data(ax, title)
        return
    import numpy as np

    n = min(len(trace.t), len(trace.pressures))
    chambers = max(len(row) for row in trace.pressures[:n])
    p = np.full((n, chambers), np.nan)
    for i, row in enumerate(trace.pressures[:n]):
        p[i, : len(row)] = row
    t0 = trace.fault_at if trace.fault_at is not None else trace.t[0]
    t = np.asarray(trace.t[:n]) - t0
    colours = [_CHAMBER_COLOURS[i % len(_CHAMBER_COLOURS)] for i in range(chambers)]
    for c in range(chambers):
        ax.plot(t, p[:, c], color=colours[c], linewidth=1.4, label=f"chamber {c + 1}")
    for c, target in enumerate((trace.targets or [])[:chambers]):
        ax.axhline(target, color=colours[c], linestyle="--", linewidth=1, alpha=0.8,
                   label="target (dashed)" if c == 0 else None)
    at_top = ax.get_xaxis_transform()  # x in data, y in axes fraction
    if trace.fault_at is not None:
        ax.axvline(0, color=_FAULT_COLOUR, linewidth=2, label="fault injected")
        ax.text(0, 0.98, f"fault: {trace.kind or '?'} ", transform=at_top, ha="right",
                va="top", color=_FAULT_COLOUR, fontweight="bold")
    for i, v in enumerate(sorted(trace.vents_at)):
        label = f"vent received (+{v - t0:.2f} s)" if i == 0 else None
        ax.axvline(v - t0, color="black", linewidth=2, linestyle=":", label=label)
        if i == 0:
            ax.text(v - t0, 0.98, f" vent +{v - t0:.2f} s", transform=at_top, ha="left",
                    va="top", fontweight="bold")
    ax.set_title(f"{title}: {trace.boot}" + (f" ({trace.kind})" if trace.kind else ""))
    since = "fault injection" if trace.fault_at is not None else "first sample"
    ax.set_xlabel(f"time since {since} (s)")
    ax.set_ylabel("pressure (mmHg)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", ncol=2)


def plot(report: Report, traces: Sequence[Trace], path: Path, *, width_px: int = 1600,
         height_px: int = 1000, dpi: int = 100) -> None:
    """Write a PNG of exactly width_px x height_px; missing data gives "no data" panels."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.3])
    _plot_reactions(fig.add_subplot(grid[0, 0]), report)
    _plot_outcomes(fig.add_subplot(grid[0, 1]), report)
    _plot_trace(fig.add_subplot(grid[1, :]), pick_trace(traces))
    t = report.totals
    verdict = "PASS" if report.passed else f"FAIL ({len(report.failures)} failures)"
    fig.suptitle(f"Fleet simulation {report.scenario!r}: {verdict}   "
                 f"{t.boots} boots, {t.duration_s:.0f} s, {t.messages_per_s:.0f} msg/s",
                 fontsize=15, fontweight="bold", color="#2ca02c" if report.passed else "#d62728")
    fig.savefig(path, dpi=dpi, format="png")


def write_all(report: Report, traces: Sequence[Trace], directory: Path) -> dict[str, Path]:
    """report.json, report.txt and report.png in one directory (the runner's usual output)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "report.json", "text": directory / "report.txt",
             "png": directory / "report.png"}
    report.write_json(paths["json"])
    paths["text"].write_text(summary_text(report), encoding="utf-8")
    plot(report, traces, paths["png"])
    return paths
