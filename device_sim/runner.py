"""Run a scenario: worker processes with the boots, a live view, then the pass/fail report.

    python -m device_sim scenario scenarios/fault-drill.yaml --out run/fault-drill

The runner starts `fleet.processes` workers (`device_sim.worker`), waits until their boots
are connected, gives them one start time, shows progress while they run, and stops them
after `duration_s`. It then reads what the gateway detected from InfluxDB (safety events and
device faults) and compares it with what the workers injected (`device_sim.report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from device_sim import report as rpt
from device_sim.scenario import Scenario, load_scenario
from gateway.schema import Measurement

FD_PER_BOOT = 1  # one MQTT socket each
FD_MARGIN = 200  # per process: stdio, HTTP clients, the event loop's own
STORAGE_SETTLE_S = 3.0  # the gateway writes in batches: wait this long for the last ones
# Telemetry is stamped with each boot's own clock: the stored-telemetry count looks this much
# beyond the run's wall-clock span on both sides, besides the largest injected clock offset.
CLOCK_MARGIN_S = 60.0
OVERLOAD_LAG_S = 1.0  # a simulator process this far behind makes its own timings suspect


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process
    last: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] | None = None

    async def read(self, want: str) -> dict[str, Any]:
        """Lines until one of type `want` (stats lines on the way are kept as `last`)."""
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.index} exited (code {self.proc.returncode})")
            msg = json.loads(line)
            if msg["type"] == "final":
                self.final = msg
            else:
                self.last = msg
            if msg["type"] == want:
                return msg

    async def follow(self) -> None:
        with contextlib.suppress(RuntimeError):
            await self.read("final")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.write((line + "\n").encode())


def raise_fd_limit(needed: int) -> tuple[int, str | None]:
    """Lift the soft limit to what the boots need (up to the hard limit); say if short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft < needed:
        return soft, (f"file descriptors: each process may open {soft} but needs {needed}; "
                      f"raise the hard limit (ulimit -Hn, or LimitNOFILE= in systemd) or use "
                      f"more processes")
    return soft, None


class Detections:
    """What the gateway recorded, read back from its InfluxDB (v1 API, InfluxQL)."""

    def __init__(self, scenario: Scenario) -> None:
        assert scenario.influx is not None
        self.influx = scenario.influx
        headers = {}
        if token := scenario.influx.token():
            headers["Authorization"] = f"Token {token}"
        self.client = httpx.AsyncClient(base_url=scenario.influx.url, headers=headers,
                                        timeout=30)
        self.clinics = "/^" + re.escape(scenario.fleet.clinic_prefix) + r"\d+$/"
        # How far a boot's clock may be from true time in this run (skews and steps injected).
        self.clock_margin_s = scenario.max_clock_offset_s() + CLOCK_MARGIN_S

    async def query(self, q: str) -> list[dict[str, Any]]:
        r = await self.client.post("/query", params={"db": self.influx.database, "q": q,
                                                     "epoch": "ms"})
        r.raise_for_status()
        result = r.json()["results"][0]
        if "error" in result:
            raise RuntimeError(f"InfluxDB: {result['error']} in {q}")
        return result.get("series", [])

    def _where(self, since: float) -> str:
        return f"clinic =~ {self.clinics} AND time >= {int(since * 1000)}ms"

    async def rows(self, q: str) -> list[dict[str, Any]]:
        return [dict(zip(s["columns"], row, strict=True))
                for s in await self.query(q) for row in s["values"]]

    async def events(self, since: float) -> list[rpt.Detection]:
        """Safety events (by rule) and device faults (by kind) of the scenario's clinics."""
        found = []
        for measurement, label, field_, source in (
            (Measurement.SAFETY_EVENT, "rule", "detail", "safety_event"),
            (Measurement.DEVICE_FAULT, "kind", "reason", "device_fault"),
        ):
            for r in await self.rows(f"SELECT {field_}, clinic, device, {label} FROM "
                                     f"{measurement} WHERE {self._where(since)}"):
                found.append(rpt.Detection(boot=f"{r['clinic']}/{r['device']}", rule=r[label],
                                           at=r["time"] / 1000, source=source))
        return sorted(found, key=lambda d: d.at)

    async def telemetry_by_boot(self, since: float, until: float | None = None
                                ) -> dict[str, int]:
        """Stored samples per boot sent between `since` and `until` (default now), true time.

        Samples are stamped with the boot's own clock (gateway.points.telemetry_time_us), so a
        boot whose clock was behind (or stepped back) stored them before `since`: the window
        is widened by the largest clock offset the scenario injects, plus a margin.
        """
        until = time.time() if until is None else until
        lo = int((since - self.clock_margin_s) * 1000)
        hi = int((until + self.clock_margin_s) * 1000)
        series = await self.query(
            f"SELECT count(seq) FROM {Measurement.TELEMETRY} WHERE clinic =~ {self.clinics} AND "
            f"time >= {lo}ms AND time <= {hi}ms GROUP BY clinic, device")
        return {f"{s['tags']['clinic']}/{s['tags']['device']}": int(s["values"][0][1])
                for s in series}

    async def settled_counts(self, since: float, until: float | None = None
                             ) -> tuple[list[rpt.Detection], dict[str, int]]:
        """Detections and stored telemetry per boot once two reads in a row agree."""
        last: tuple[int, int] | None = None
        deadline = time.monotonic() + 60
        while True:
            events = await self.events(since)
            by_boot = await self.telemetry_by_boot(since, until)
            now = (len(events), sum(by_boot.values()))
            if last == now or time.monotonic() > deadline:
                return events, by_boot
            last = now
            await asyncio.sleep(STORAGE_SETTLE_S)


def _live_table(sc: Scenario, workers: list[Worker], t0: float, detected: int,
                rate: float) -> Table:
    stats = [w.last for w in workers]
    total = sum(s.get("boots", 0) for s in stats)
    elapsed = max(0.0, time.time() - t0)
    t = Table(title=f"{sc.name}: {min(elapsed, sc.duration_s):.0f}/{sc.duration_s:.0f} s, "
                    f"{len(workers)} process(es)", show_header=True, expand=False)
    for col in ("boots online", "in session", "msg/s", "vents", "faults injected",
                "gateway detections", "sessions started", "simulator lag"):
        t.add_column(col, justify="right")
    t.add_row(f"{sum(s.get('connected', 0) for s in stats)}/{total}",
              str(sum(s.get("in_session", 0) for s in stats)), f"{rate:.0f}",
              str(sum(s.get("vents", 0) for s in stats)),
              str(sum(s.get("faults_injected", 0) for s in stats)), str(detected),
              f"{sum(s.get('sessions_started', 0) for s in stats)}/"
              f"{sum(s.get('sessions_requested', 0) for s in stats)}",
              f"{max((s.get('loop_lag_max_s', 0.0) for s in stats), default=0.0):.2f} s")
    return t


def prepare(path: Path, out: Path) -> tuple[Scenario, Path]:
    """Validate the scenario (ScenarioError names the bad line) and make the output folder."""
    sc = load_scenario(path)
    out.mkdir(parents=True, exist_ok=True)
    return sc, path.resolve()


async def run(path: Path, out: Path, *, live: bool = True,
              console: Console | None = None) -> rpt.Report:
    """Run the scenario at `path` (see `prepare`), writing workers' logs and the report to
    `out`; returns the report."""
    sc, path = prepare(path, out)
    console = console or Console(stderr=True)
    n = sc.fleet.resolved_processes()
    per_process = -(-sc.fleet.boots // n)
    fd_limit, fd_note = raise_fd_limit(per_process * FD_PER_BOOT + FD_MARGIN)
    started = time.time()
    workers = []
    for i in range(n):
        log = (out / f"worker-{i}.log").open("w")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "device_sim", "worker", str(path),
            "--shard", str(i), "--shards", str(n),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            limit=2**26)
        workers.append(Worker(i, proc))
    detections = Detections(sc) if sc.influx is not None else None
    try:
        ready = await asyncio.gather(*(w.read("ready") for w in workers))
        connected = sum(r.get("connected", 0) for r in ready)
        t0 = time.time() + 1.0
        for w in workers:
            w.send(f"go {t0}")
        followers = [asyncio.create_task(w.follow()) for w in workers]
        sent0, tick = 0, time.monotonic()
        detected, rate, polled = 0, 0.0, 0.0
        with Live(_live_table(sc, workers, t0, 0, 0), console=console, refresh_per_second=2,
                  transient=False) if live else contextlib.nullcontext() as view:
            while time.time() < t0 + sc.duration_s:
                await asyncio.sleep(1.0)
                sent = sum(w.last.get("telemetry_sent", 0) for w in workers)
                now = time.monotonic()
                rate, sent0, tick = (sent - sent0) / (now - tick), sent, now
                if detections is not None and now - polled >= 5:
                    polled = now
                    with contextlib.suppress(httpx.HTTPError, RuntimeError):
                        detected = len(await detections.events(t0))
                if view is not None:
                    view.update(_live_table(sc, workers, t0, detected, rate))
        stopped_at = time.time()
        for w in workers:
            w.send("stop")
        async with asyncio.timeout(120):
            await asyncio.gather(*followers)
            await asyncio.gather(*(w.proc.wait() for w in workers))
        finals = [w.final or {} for w in workers]
        elapsed = time.time() - started
        if detections is not None:
            found, stored_by_boot = await detections.settled_counts(started, time.time())
            stored: int | None = sum(stored_by_boot.values())
            # What the gateway saw of the shutdown itself is no finding of the run.
            found = [d for d in found if d.at <= stopped_at]
        else:
            found, stored, stored_by_boot = [], None, {}
    finally:
        for w in workers:
            if w.proc.returncode is None:
                w.proc.kill()
        if detections is not None:
            await detections.client.aclose()
    traces = [rpt.Trace(**t) for f in finals for t in f.get("traces", [])]
    report = _report(sc, finals, traces, found, stored, elapsed, n, fd_limit, fd_note,
                     connected, stopped_at)
    if stored_by_boot:
        sent_by_boot = {k: v for f in finals for k, v in f.get("telemetry_by_boot", {}).items()}
        short = {k: v - stored_by_boot.get(k, 0) for k, v in sent_by_boot.items()
                 if stored_by_boot.get(k, 0) < v}
        if short:
            report.notes.append("telemetry missing by boot: " + ", ".join(
                f"{k} {n}" for k, n in sorted(short.items())[:20]))
    rpt.write_all(report, traces, out)
    rpt.print_summary(report, console)
    return report


def _report(sc: Scenario, finals: list[dict[str, Any]], traces: list[rpt.Trace],
            found: list[rpt.Detection],
            stored: int | None, elapsed: float, processes: int, fd_limit: int,
            fd_note: str | None, connected: int,
            stopped_at: float = math.inf) -> rpt.Report:
    injections = []
    for f in finals:
        for j in f.get("injections", []):
            injections.append(rpt.Injection(
                boot=j["boot"], kind=j["kind"], at=j["at"],
                chamber=None if j["chamber"] is None else j["chamber"] - 1,
                expected_rules=j["expected_rules"], vent_expected=j["vent_expected"],
                expect_device_fault=j["expect_device_fault"],
                detect_within_s=j["detect_within_s"], cleared_at=j.get("cleared_at"),
                self_vent_within_s=j.get("self_vent_within_s")))
    vents = [rpt.VentSeen(boot=b, at=at) for f in finals for b, at in f.get("vents_seen", [])]
    self_vents = [rpt.SelfVent(boot=b, at=at, cause=cause) for f in finals
                  for b, at, cause in f.get("self_vents_seen", []) if at <= stopped_at]
    sent = sum(f.get("telemetry_sent", 0) for f in finals)
    totals = rpt.Totals(
        scenario=sc.name, boots=sc.fleet.boots, clinics=sc.fleet.clinics, processes=processes,
        duration_s=round(elapsed, 1), telemetry_sent=sent,
        messages_per_s=round(sent / max(elapsed, 1e-9), 1),
        sessions_requested=sum(f.get("sessions_requested", 0) for f in finals),
        sessions_started=sum(f.get("sessions_started", 0) for f in finals),
        telemetry_stored=stored,
        sim_cpu_percent=round(100 * sum(f.get("cpu_s", 0.0) for f in finals) / elapsed, 1),
        sim_peak_rss_mb=round(sum(f.get("peak_rss_mb", 0.0) for f in finals), 1),
        boots_connected=connected,
        connect_failures=sum(f.get("connect_failures", 0) for f in finals),
        fd_limit=fd_limit, fd_limit_note=fd_note)
    expectations = rpt.Expectations(
        false_vents=sc.expect.false_vents, telemetry_stored=sc.expect.telemetry_stored,
        min_sessions_started_fraction=sc.expect.min_sessions_started_fraction)
    report = rpt.build_report(totals, injections, found, vents, traces, expectations,
                              self_vents)
    skipped = [s for f in finals for s in f.get("skipped", [])]
    if skipped:
        report.notes.append(f"{len(skipped)} planned fault(s) not injected: "
                            + "; ".join(f"{s['kind']} on {s['boot']}: {s['reason']}"
                                        for s in skipped[:5]))
    lag = max((f.get("loop_lag_max_s", 0.0) for f in finals), default=0.0)
    if lag > OVERLOAD_LAG_S:
        report.notes.insert(0, f"the simulator was overloaded (a process fell {lag:.1f} s "
                               "behind): late vents, late acks and failed session starts may be "
                               "the simulator's own delay, not the gateway's. Use more "
                               "processes, fewer boots, or another machine for the simulator.")
    failures = [s for f in finals for s in f.get("session_failures", [])]
    if failures:
        report.notes.append(f"session starts refused: {'; '.join(failures[:5])}")
    return report


def main(path: Path, out: Path | None, live: bool) -> int:
    out = out or Path("run") / f"scenario-{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    report = asyncio.run(run(path, out, live=live))
    Console(stderr=True).print(f"report: {out}/report.json, report.txt, report.png")
    return rpt.exit_code(report)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(Path(sys.argv[1]), None, os.isatty(2)))
