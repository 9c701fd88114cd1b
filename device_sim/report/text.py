"""The report as text for people: plain (at most 100 columns, for files and CI logs) and rich.

Both show the same content in the same order: the verdict and its reasons first, then the
outcome per fault kind, reaction times and totals. `rich` is imported only by `print_summary`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from device_sim.report.model import Report

if TYPE_CHECKING:
    from rich.console import Console

WIDTH = 100  # columns of the plain-text summary
MAX_LISTED = 12  # failures/notes listed in the summary; the JSON has them all

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

