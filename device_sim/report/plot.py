"""The report as a PNG: reaction-time histogram, outcome per fault kind, one faulty boot's trace.

matplotlib (and numpy) are imported only when a plot is drawn, so the rest of the report works
where the `sim` extra's plotting libraries are missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from device_sim.report.model import Outcome, Report, Trace

if TYPE_CHECKING:
    from matplotlib.axes import Axes

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

