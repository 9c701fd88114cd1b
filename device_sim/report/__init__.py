"""Final report of a fleet simulation: the public names, and `write_all` (every rendering).

The report is split by job: `model` (what a run collected, the verdict's shape), `judge`
(what passed or failed, and why: the matching rules), `text` (plain and rich summaries),
`plot` (the PNG, matplotlib imported lazily). Import from `device_sim.report` as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from device_sim.report.judge import AFTERMATH_S, CLOCK_SLACK_S, build_report
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
    exit_code,
)
from device_sim.report.plot import pick_trace, plot
from device_sim.report.text import MAX_LISTED, WIDTH, print_summary, summary_text

__all__ = [
    "AFTERMATH_S", "CLOCK_SLACK_S", "MAX_LISTED", "PASSING", "WIDTH", "DelayStats", "Detection",
    "Expectations", "Injection", "InjectionResult", "KindSummary", "Outcome", "ReactionTimes",
    "Report", "SelfVent", "Totals", "Trace", "VentSeen", "build_report", "exit_code",
    "pick_trace", "plot", "print_summary", "summary_text", "write_all",
]


def write_all(report: Report, traces: Sequence[Trace], directory: Path) -> dict[str, Path]:
    """report.json, report.txt and report.png in one directory (the runner's usual output)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "report.json", "text": directory / "report.txt",
             "png": directory / "report.png"}
    report.write_json(paths["json"])
    paths["text"].write_text(summary_text(report), encoding="utf-8")
    plot(report, traces, paths["png"])
    return paths
