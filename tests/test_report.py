"""The final report of a fleet simulation: pure judging and rendering, no servers.

A synthetic run (what a runner would collect from a small fleet) is built once, every test
breaks one expectation and checks the verdict names it, since ops gate releases on it.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from device_sim.report import (
    Detection,
    Expectations,
    Injection,
    Outcome,
    Report,
    SelfVent,
    Totals,
    Trace,
    VentSeen,
    build_report,
    exit_code,
    pick_trace,
    plot,
    print_summary,
    summary_text,
    write_all,
)

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_767_261_000.0  # run start, unix s
STUCK = [f"clinic-{c}/boot-{n:04d}" for c, n in ((1, 3), (1, 7), (2, 12), (2, 19), (3, 25))]
LEAK = "clinic-1/boot-0010"
SKEW = "clinic-2/boot-0014"
MALFORMED = "clinic-3/boot-0031"
SILENT = "clinic-3/boot-0033"
HEALTHY = "clinic-1/boot-0001"


def totals(**kw: object) -> Totals:
    base: dict[str, object] = dict(
        scenario="mixed-faults", boots=40, clinics=3, processes=2, duration_s=120.0,
        telemetry_sent=9600, messages_per_s=80.0, sessions_requested=40, sessions_started=40,
        telemetry_stored=9600, sim_cpu_percent=35.5, sim_peak_rss_mb=180.0, boots_connected=40,
        connect_failures=0, fd_limit=4096)
    return Totals.model_validate(base | kw)


def expectations(**kw: object) -> Expectations:
    base: dict[str, object] = dict(telemetry_stored=True, min_sessions_started_fraction=0.95)
    return Expectations.model_validate(base | kw)


def stuck(boot: str, at: float) -> Injection:
    return Injection(boot=boot, kind="stuck_valve", at=at, chamber=1,
                     expected_rules=["over_target", "hard_ceiling"], vent_expected=True,
                     detect_within_s=5.0)


def run() -> dict[str, list]:
    """Injections with the detections and vents a healthy gateway would produce."""
    injections: list[Injection] = []
    detections: list[Detection] = []
    vents: list[VentSeen] = []
    for i, boot in enumerate(STUCK):
        at = T0 + 30 + 7 * i
        injections.append(stuck(boot, at))
        delay = 0.9 + 0.05 * i
        detections.append(Detection(boot=boot, rule="over_target", at=at + delay,
                                    source="safety_event"))
        vents.append(VentSeen(boot=boot, at=at + delay + 0.012))
    injections += [
        Injection(boot=LEAK, kind="slow_leak", at=T0 + 40, chamber=0, detect_within_s=60.0),
        Injection(boot=SKEW, kind="clock_skew", at=T0 + 35, detect_within_s=60.0),
        Injection(boot=MALFORMED, kind="malformed_payload", at=T0 + 50, expect_device_fault=True,
                  detect_within_s=5.0),
        Injection(boot=SILENT, kind="telemetry_silence", at=T0 + 60,
                  expected_rules=["telemetry_loss"], vent_expected=True, detect_within_s=10.0),
    ]
    detections += [
        Detection(boot=MALFORMED, rule="not_json", at=T0 + 50.2, source="device_fault"),
        Detection(boot=SILENT, rule="telemetry_loss", at=T0 + 63.1, source="safety_event"),
        # a follow-up of the stuck valve's vent episode: explained, not a failure
        Detection(boot=STUCK[0], rule="vent_not_confirmed", at=T0 + 36.0, source="safety_event"),
    ]
    vents += [VentSeen(boot=SILENT, at=T0 + 63.12), VentSeen(boot=STUCK[0], at=T0 + 36.0)]
    return {"injections": injections, "detections": detections, "vents": vents}


def stuck_trace(boot: str = STUCK[0], fault_at: float = T0 + 30, vent_delay: float = 0.912
                ) -> Trace:
    """4 chambers cycling to their targets; chamber 2's inlet sticks and climbs until vented."""
    targets = [70.0, 65.0, 60.0, 55.0]
    t, pressures = [], []
    p_stuck = 0.0
    for k in range(0, 120):  # 2 Hz, from 20 s before the fault to 40 s after
        ts = fault_at - 20 + 0.5 * k
        row = []
        for c, target in enumerate(targets):
            phase = ((ts - T0) - 4 * c) % 30
            p = target * (1 - math.exp(-phase / 2)) if phase < 16 else target * math.exp(
                -(phase - 16) / 1.5)
            row.append(p)
        if fault_at <= ts < fault_at + vent_delay:
            p_stuck = max(p_stuck, row[1]) + (150 - max(p_stuck, row[1])) * 0.35
            row[1] = p_stuck
        elif ts >= fault_at + vent_delay:
            row = [r * math.exp(-(ts - fault_at - vent_delay) / 0.8) for r in row]
        t.append(ts)
        pressures.append(row)
    return Trace(boot=boot, kind="stuck_valve", t=t, pressures=pressures, targets=targets,
                 vents_at=[fault_at + vent_delay], fault_at=fault_at)


def report_of(data: dict[str, list] | None = None, traces: list[Trace] | None = None,
              tot: Totals | None = None, exp: Expectations | None = None) -> Report:
    data = run() if data is None else data
    return build_report(tot or totals(), data["injections"], data["detections"], data["vents"],
                        traces or [], exp or expectations())


def by_boot(report: Report, boot: str):
    return next(r for r in report.injections if r.boot == boot)


def test_a_run_where_everything_worked_passes() -> None:
    report = report_of()
    assert report.failures == []
    assert report.passed and exit_code(report) == 0
    kinds = {k.kind: k for k in report.kinds}
    assert kinds["stuck_valve"].injected == kinds["stuck_valve"].detected == 5
    assert kinds["slow_leak"].ok_nothing_expected == 1
    assert kinds["clock_skew"].ok_nothing_expected == 1
    assert kinds["malformed_payload"].detected == 1
    assert by_boot(report, MALFORMED).source == "device_fault"
    assert kinds["telemetry_silence"].detected == 1
    first = by_boot(report, STUCK[0])
    assert first.outcome is Outcome.DETECTED and first.rule == "over_target"
    assert first.delay_s == pytest.approx(0.9)
    assert first.vent_delay_s == pytest.approx(0.912)
    assert kinds["stuck_valve"].delay_max_s == pytest.approx(1.1)
    # nearest-rank: 7 delays, p50 is the 4th smallest (a delay that really happened)
    assert report.reaction.detection.count == 7
    assert report.reaction.detection.p50_s == pytest.approx(1.0)
    assert report.reaction.vent.count == 6
    assert report.reaction.vent.max_s == pytest.approx(3.12)
    assert report.false_vents == [] and report.unexplained_detections == []


def test_missed_fault_fails() -> None:
    data = run()
    data["detections"] = [d for d in data["detections"] if d.boot != STUCK[2]]
    data["vents"] = [v for v in data["vents"] if v.boot != STUCK[2]]
    report = report_of(data)
    assert not report.passed and exit_code(report) == 1
    row = by_boot(report, STUCK[2])
    assert row.outcome is Outcome.MISSED and row.delay_s is None
    assert len(report.failures) == 1
    assert STUCK[2] in report.failures[0] and "not detected" in report.failures[0]
    assert "chamber 2" in report.failures[0]  # 0-based index 1, shown 1-based
    assert {k.kind: k for k in report.kinds}["stuck_valve"].missed == 1


def test_a_detection_by_another_rule_is_not_a_detection() -> None:
    data = run()
    data["detections"] = [
        d.model_copy(update={"rule": "user_stop"}) if d.boot == STUCK[1] else d
        for d in data["detections"]]
    report = report_of(data)
    assert by_boot(report, STUCK[1]).outcome is Outcome.MISSED
    assert not report.passed


def test_late_fault_fails_with_its_delay() -> None:
    data = run()
    at = next(i.at for i in data["injections"] if i.boot == STUCK[3])
    data["detections"] = [d.model_copy(update={"at": at + 7.5}) if d.boot == STUCK[3] else d
                          for d in data["detections"]]
    report = report_of(data)
    row = by_boot(report, STUCK[3])
    assert row.outcome is Outcome.LATE and row.delay_s == pytest.approx(7.5)
    assert not report.passed
    assert "late" in report.failures[0] and "7.50 s" in report.failures[0]
    assert "limit 5 s" in report.failures[0]


def test_detected_but_vent_never_arrived_or_arrived_late() -> None:
    data = run()
    data["vents"] = [v for v in data["vents"] if v.boot != STUCK[4]]
    report = report_of(data)
    assert by_boot(report, STUCK[4]).outcome is Outcome.NOT_VENTED
    assert "no vent reached" in report.failures[0]

    data = run()
    at = next(i.at for i in data["injections"] if i.boot == STUCK[4])
    data["vents"] = [v.model_copy(update={"at": at + 6.5}) if v.boot == STUCK[4] else v
                     for v in data["vents"]]
    report = report_of(data)
    row = by_boot(report, STUCK[4])
    assert row.outcome is Outcome.LATE and row.vent_delay_s == pytest.approx(6.5)
    assert "vented late" in report.failures[0]


def test_clock_slack_of_one_second() -> None:
    data = run()
    at = next(i.at for i in data["injections"] if i.boot == STUCK[0])
    data["detections"][0] = data["detections"][0].model_copy(update={"at": at - 0.5})
    report = report_of(data)
    assert by_boot(report, STUCK[0]).outcome is Outcome.DETECTED
    assert by_boot(report, STUCK[0]).delay_s == pytest.approx(-0.5)

    data["detections"][0] = data["detections"][0].model_copy(update={"at": at - 1.5})
    report = report_of(data)
    assert by_boot(report, STUCK[0]).outcome is Outcome.MISSED


def test_false_vent_on_a_healthy_boot_fails() -> None:
    data = run()
    data["vents"].append(VentSeen(boot=HEALTHY, at=T0 + 80))
    data["detections"].append(Detection(boot=HEALTHY, rule="over_target", at=T0 + 79.99,
                                        source="safety_event"))
    report = report_of(data)
    assert not report.passed
    assert [v.boot for v in report.false_vents] == [HEALTHY]
    assert len(report.failures) == 1  # the unexplained event is not counted a second time
    assert "1 vents reached boots without an injected fault" in report.failures[0]
    assert HEALTHY in report.failures[0]
    assert [d.boot for d in report.unexplained_detections] == [HEALTHY]

    tolerant = report_of(data, exp=expectations(false_vents=1))
    assert tolerant.passed and len(tolerant.false_vents) == 1
    assert any(HEALTHY in n for n in tolerant.notes)


def test_a_vent_long_after_the_fault_is_a_false_vent() -> None:
    data = run()
    at = next(i.at for i in data["injections"] if i.boot == STUCK[0])
    data["vents"].append(VentSeen(boot=STUCK[0], at=at + 5 + 30 + 1))
    report = report_of(data)
    assert [v.boot for v in report.false_vents] == [STUCK[0]]
    assert not report.passed


def test_a_vent_on_a_slow_leak_boot_is_false() -> None:
    data = run()
    data["vents"].append(VentSeen(boot=LEAK, at=T0 + 45))
    report = report_of(data)
    assert [v.boot for v in report.false_vents] == [LEAK]


def test_unexpected_detection_for_slow_leak_fails() -> None:
    data = run()
    data["detections"].append(Detection(boot=LEAK, rule="sustained_inflation", at=T0 + 52,
                                        source="safety_event"))
    report = report_of(data)
    row = by_boot(report, LEAK)
    assert row.outcome is Outcome.UNEXPECTED_DETECTION and not row.passed
    assert row.rule == "sustained_inflation" and row.delay_s == pytest.approx(12.0)
    assert not report.passed
    assert "slow_leak" in report.failures[0] and "sustained_inflation" in report.failures[0]
    assert report.unexplained_detections == []  # already reported by its injection
    kinds = {k.kind: k for k in report.kinds}
    assert kinds["slow_leak"].unexpected_detection == 1


def test_a_device_fault_on_a_slow_leak_boot_is_no_safety_event() -> None:
    data = run()
    data["detections"].append(Detection(boot=LEAK, rule="invalid", at=T0 + 41,
                                        source="device_fault"))
    assert report_of(data).passed


def test_an_unexplained_safety_event_without_vent_is_listed_not_failed() -> None:
    data = run()
    data["detections"].append(Detection(boot=LEAK, rule="user_stop", at=T0 + 110,
                                        source="safety_event"))  # after slow_leak's window
    report = report_of(data)
    assert report.passed
    assert [d.rule for d in report.unexplained_detections] == ["user_stop"]
    assert any("not explained" in n for n in report.notes)


def test_a_later_injection_on_the_same_boot_owns_later_detections() -> None:
    first = stuck(STUCK[0], T0 + 10)
    second = stuck(STUCK[0], T0 + 100)
    det = Detection(boot=STUCK[0], rule="over_target", at=T0 + 101, source="safety_event")
    vent = VentSeen(boot=STUCK[0], at=T0 + 101.01)
    report = build_report(totals(), [second, first], [det], [vent], [], expectations())
    outcomes = [(r.at, r.outcome) for r in report.injections]
    assert outcomes == [(T0 + 10, Outcome.MISSED), (T0 + 100, Outcome.DETECTED)]


def test_missing_telemetry_fails_with_the_count() -> None:
    report = report_of(tot=totals(telemetry_stored=9550))
    assert not report.passed and report.telemetry_missing == 50
    assert "Telemetry missing in InfluxDB: 50 of 9600" in report.failures[0]
    # not expected: reported, not failed
    assert report_of(tot=totals(telemetry_stored=9550),
                     exp=expectations(telemetry_stored=False)).passed


def test_telemetry_not_checked_fails_only_when_expected() -> None:
    report = report_of(tot=totals(telemetry_stored=None))
    assert not report.passed and "not checked" in report.failures[0]
    relaxed = report_of(tot=totals(telemetry_stored=None), exp=expectations(telemetry_stored=False))
    assert relaxed.passed and any("not checked" in n for n in relaxed.notes)


def test_too_few_sessions_fail() -> None:
    report = report_of(tot=totals(sessions_started=37))
    assert not report.passed
    assert report.sessions_started_fraction == pytest.approx(37 / 40)
    assert "Too few sessions started: 37 of 40 (92.5 %)" in report.failures[0]
    assert report_of(tot=totals(sessions_started=38)).passed  # 95 % exactly is enough
    assert report_of(tot=totals(sessions_requested=0, sessions_started=0)).passed


def test_json_round_trip(tmp_path: Path) -> None:
    data = run()
    data["vents"].append(VentSeen(boot=HEALTHY, at=T0 + 80))
    report = report_of(data)
    parsed = json.loads(report.to_json())
    assert parsed["passed"] is False
    assert parsed["failures"] == report.failures and len(parsed["failures"]) == 1
    assert parsed["injections"][0]["outcome"] == "detected"
    assert parsed["totals"]["scenario"] == "mixed-faults"
    assert Report.from_json(report.to_json()) == report
    path = tmp_path / "report.json"
    report.write_json(path)
    assert Report.from_json(path.read_text()) == report


def test_summary_text_leads_with_the_verdict_and_reasons() -> None:
    data = run()
    data["detections"] = [d for d in data["detections"] if d.boot != STUCK[2]]
    report = report_of(data, tot=totals(sessions_started=30))
    text = summary_text(report)
    lines = text.splitlines()
    assert lines[0].startswith("FAIL") and "2 expectations failed" in lines[0]
    assert STUCK[2] in lines[1] and "not detected" in lines[1]
    assert "Too few sessions started" in text
    assert text.index("Too few sessions") < text.index("Injected faults") < text.index("Totals")
    assert max(len(line) for line in lines) <= 100
    assert any(line.startswith("stuck_valve") and " 5 " in line for line in lines)

    ok = summary_text(report_of())
    assert ok.startswith("PASS") and "FAIL" not in ok


def test_summary_text_caps_a_flood_of_failures_and_wraps_long_names() -> None:
    boot = "c" * 64 + "/" + "d" * 64
    injections = [stuck(f"{boot[:-3]}{n:03d}", T0 + n) for n in range(30)]
    report = build_report(totals(), injections, [], [], [], expectations())
    text = summary_text(report)
    assert "... and 18 more (see the JSON report)" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_rich_summary_says_the_same() -> None:
    data = run()
    data["vents"].append(VentSeen(boot=HEALTHY, at=T0 + 80))
    report = report_of(data)
    console = Console(file=io.StringIO(), record=True, width=100, color_system=None)
    print_summary(report, console)
    out = console.export_text()
    assert "FAIL" in out and HEALTHY in out and "stuck_valve" in out and "telemetry" in out


def _png_size(path: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    h, w = imread(path).shape[:2]
    return w, h


def test_png_is_written_at_the_configured_size(tmp_path: Path) -> None:
    data = run()
    traces = [stuck_trace(), Trace(boot=HEALTHY, t=[T0, T0 + 0.5], pressures=[[1, 2], [3, 4]])]
    report = report_of(data, traces)
    path = tmp_path / "report.png"
    plot(report, traces, path, width_px=1200, height_px=800)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert _png_size(path) == (1200, 800)
    blank = tmp_path / "blank.png"  # the same canvas with three "no data" panels
    plot(build_report(totals(), [], [], [], [], expectations()), [], blank,
         width_px=1200, height_px=800)
    assert len(raw) > 2 * len(blank.read_bytes()) > 20_000


def test_plot_survives_empty_and_ragged_data(tmp_path: Path) -> None:
    empty = build_report(totals(), [], [], [], [], expectations())
    path = tmp_path / "empty.png"
    plot(empty, [], path)
    assert path.read_bytes()[:4] == b"\x89PNG" and _png_size(path) == (1600, 1000)

    ragged = Trace(boot=HEALTHY, kind="stuck_valve", t=[T0, T0 + 0.5, T0 + 1.0],
                   pressures=[[10.0], [20.0, float("nan")]], targets=[60.0, 50.0, 40.0],
                   vents_at=[T0 + 0.7], fault_at=T0 + 0.2)
    blank = Trace(boot=SKEW, t=[], pressures=[])
    path = tmp_path / "ragged.png"
    plot(report_of(), [blank, ragged], path)
    assert _png_size(path) == (1600, 1000)


def test_the_plotted_trace_is_a_vented_stuck_valve_when_there_is_one() -> None:
    other = Trace(boot=HEALTHY, kind="slow_leak", t=[T0], pressures=[[1.0]], fault_at=T0)
    unvented = stuck_trace(boot=STUCK[1]).model_copy(update={"vents_at": []})
    vented = stuck_trace()
    assert pick_trace([other, unvented, vented]) is vented
    assert pick_trace([other, unvented]) is unvented
    assert pick_trace([other]) is other
    assert pick_trace([Trace(boot=HEALTHY, t=[], pressures=[])]) is None


def test_write_all_writes_the_three_files(tmp_path: Path) -> None:
    paths = write_all(report_of(), [stuck_trace()], tmp_path / "out")
    assert json.loads(paths["json"].read_text())["passed"] is True
    assert paths["text"].read_text().startswith("PASS")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_an_injection_expecting_only_a_vent_is_judged_by_the_vent() -> None:
    inj = Injection(boot=STUCK[0], kind="manual_vent", at=T0, vent_expected=True,
                    detect_within_s=2.0)
    ok = build_report(totals(), [inj], [], [VentSeen(boot=STUCK[0], at=T0 + 0.3)], [],
                      expectations())
    assert ok.passed and ok.injections[0].vent_delay_s == pytest.approx(0.3)
    missed = build_report(totals(), [inj], [], [], [], expectations())
    assert missed.injections[0].outcome is Outcome.MISSED and "not vented" in missed.failures[0]


# ------------------------------------------------------------------ cut off, and clocks stepped

DROPPED = "clinic-2/boot-0016"
STEPPED = "clinic-3/boot-0038"


def disconnect(at: float, down_s: float) -> tuple[Injection, Detection, VentSeen, SelfVent]:
    """A boot away for `down_s`: the LWT is detected at once, the boot vents itself, and the
    gateway's vent arrives only after the reconnect (clean start: the broker dropped it)."""
    inj = Injection(boot=DROPPED, kind="disconnect", at=at, expected_rules=["offline_in_session"],
                    vent_expected=True, detect_within_s=5.0, cleared_at=at + down_s,
                    self_vent_within_s=6.0)
    return (inj, Detection(boot=DROPPED, rule="offline_in_session", at=at + 0.04,
                           source="safety_event"),
            VentSeen(boot=DROPPED, at=at + down_s + 0.3), SelfVent(boot=DROPPED, at=at + 0.01,
                                                                  cause="mqtt connection lost"))


def test_a_disconnect_longer_than_its_window_is_judged_by_the_self_vent() -> None:
    for down_s in (3.0, 20.0, 90.0):  # shorter than the window, longer, longer than aftermath
        inj, det, vent, self_vent = disconnect(T0 + 70, down_s)
        report = build_report(totals(), [inj], [det], [vent], [], expectations(), [self_vent])
        row = report.injections[0]
        assert report.passed, (down_s, report.failures)
        assert row.outcome is Outcome.DETECTED and row.rule == "offline_in_session"
        assert row.vented_by == "boot" and row.vent_delay_s == pytest.approx(0.01)
        assert "vented itself" in row.detail
        assert report.false_vents == []  # the vent after the reconnect belongs to the fault

    inj, det, vent, self_vent = disconnect(T0 + 70, 20.0)
    # The boot never vented itself: its own safety duty failed, whatever the gateway sent.
    report = build_report(totals(), [inj], [det], [vent], [], expectations(), [])
    assert report.injections[0].outcome is Outcome.NOT_VENTED
    assert "did not vent itself" in report.failures[0]
    # It did, but only after its heartbeat timeout (6 s).
    late = self_vent.model_copy(update={"at": T0 + 77})
    report = build_report(totals(), [inj], [det], [vent], [], expectations(), [late])
    assert report.injections[0].outcome is Outcome.LATE
    assert "vented itself 7.00 s after" in report.failures[0]
    # The detection still has its own window.
    slow = det.model_copy(update={"at": T0 + 76})
    report = build_report(totals(), [inj], [slow], [vent], [], expectations(), [self_vent])
    assert report.injections[0].outcome is Outcome.LATE and "detected late" in report.failures[0]


def test_a_self_vent_no_fault_explains_is_a_note() -> None:
    data = run()
    lone = SelfVent(boot=HEALTHY, at=T0 + 90, cause="gateway heartbeat lost")
    report = build_report(totals(), data["injections"], data["detections"], data["vents"], [],
                          expectations(), [lone])
    assert report.passed and report.unexplained_self_vents == [lone]
    assert any("gateway heartbeat lost 1x" in n and HEALTHY in n for n in report.notes)


def clock_step(at: float, returned_after: float | None) -> Injection:
    return Injection(boot=STEPPED, kind="clock_step", at=at, detect_within_s=5.0,
                     cleared_at=None if returned_after is None else at + returned_after)


def test_a_clock_step_must_stay_quiet_until_after_its_return() -> None:
    inj = clock_step(T0 + 30, 25.0)
    quiet = build_report(totals(), [inj], [], [], [], expectations())
    assert quiet.passed and quiet.injections[0].outcome is Outcome.OK_NOTHING_EXPECTED
    assert "after it was cleared" in quiet.injections[0].detail
    # The return (a forward step) gives a false sustained_inflation 1.5 s later: a failure of
    # its own, not just a false vent, though it is 26.5 s after the injection.
    det = Detection(boot=STEPPED, rule="sustained_inflation", at=T0 + 56.5,
                    source="safety_event")
    vent = VentSeen(boot=STEPPED, at=T0 + 56.51)
    report = build_report(totals(), [inj], [det], [vent], [], expectations())
    row = report.injections[0]
    assert row.outcome is Outcome.UNEXPECTED_DETECTION and row.rule == "sustained_inflation"
    assert "1.50 s after it was cleared" in row.detail
    assert [v.boot for v in report.false_vents] == [STEPPED]
    assert len(report.failures) == 2 and report.unexplained_detections == []
    # Past the return's window the event is no longer the step's doing.
    later = det.model_copy(update={"at": T0 + 61})
    assert build_report(totals(), [inj], [later], [], [], expectations()).passed
    # Without a return only the step itself is watched.
    assert build_report(totals(), [clock_step(T0 + 30, None)], [det], [], [],
                        expectations()).passed


_WITHOUT_PLOT_LIBS = """
import sys
for name in ("matplotlib", "numpy", "rich"):
    sys.modules[name] = None  # importing any of them now raises ImportError
from device_sim.report import (Expectations, Totals, build_report, exit_code, plot,
                               summary_text)
totals = Totals(scenario="s", boots=1, clinics=1, processes=1, duration_s=1.0,
                telemetry_sent=0, messages_per_s=0.0, sessions_requested=0, sessions_started=0,
                sim_cpu_percent=0.0, sim_peak_rss_mb=0.0, boots_connected=1, connect_failures=0,
                fd_limit=1024)
report = build_report(totals, [], [], [], [], Expectations(telemetry_stored=False,
                                                           min_sessions_started_fraction=0))
assert summary_text(report).startswith("PASS"), summary_text(report)
assert exit_code(report) == 0
try:
    plot(report, [], "x.png")
except ImportError:
    print("plot needs matplotlib")
"""


def test_judging_and_text_work_without_the_plot_and_terminal_libraries(tmp_path: Path) -> None:
    """The report's plotting (matplotlib, numpy) and colour (rich) libraries are imported only
    where they are used, so a run can be judged and summarised where they are missing."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_PLOT_LIBS], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "plot needs matplotlib"
