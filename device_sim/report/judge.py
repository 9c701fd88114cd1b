"""The judge of a fleet simulation: did the gateway catch every injected fault, and only those?

Ops run a simulation to decide whether a gateway release may go near patients, so the verdict
must be explicit: every expectation that failed is one readable sentence, and `exit_code` is
non-zero. This module is pure (no network, no clock): `build_report` judges what the runner
collected (`device_sim.report.model`) against the expectations each injection carries (its
rules and deadlines, from the gateway's own rules and limits: `device_sim.gateway_rules`).

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
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import TypeVar

from device_sim.report.model import (
    PASSING,
    DelayStats,
    Detection,
    Expectations,
    Injection,
    InjectionResult,
    KindSummary,
    Outcome,
    ReactionTimes,
    Report,
    SelfVent,
    Totals,
    Trace,
    VentSeen,
)

CLOCK_SLACK_S = 1.0  # the simulator's and the gateway's clocks may differ by this much
AFTERMATH_S = 30.0  # after a vented fault, re-sent vents and follow-up events still belong to it

_Timed = TypeVar("_Timed", Detection, VentSeen, SelfVent)


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

