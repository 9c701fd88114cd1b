"""One simulator process: a shard of a scenario's boots, driven by the runner over stdio.

Protocol (JSON lines on stdout; logs go to stderr):
    worker -> {"type": "ready", ...}                 every boot of the shard connected (or gave up)
    runner -> "go <t0>"                              the run starts at unix time t0
    worker -> {"type": "stats", ...}                 once a second
    runner -> "stop"                                 (or EOF) the run is over
    worker -> {"type": "final", ...}                 injections, vents, traces, counters
Several processes let one machine run thousands of boots, each with its own MQTT connection,
client id and LWT: one Python event loop saturates at a few hundred.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from device_sim.boot import SimBoot, account_kwargs
from device_sim.faults import FaultNotApplied, PlannedFault, clear, inject
from device_sim.link_settings import BootLinkSettings
from device_sim.scenario import Scenario, load_scenario
from gateway.aio import cancel_and_wait
from gateway.boot_credentials import load_credentials

log = logging.getLogger("device_sim.worker")

TRACE_BEFORE_S = 10.0  # a faulty boot's pressures are kept from this long before its fault
TRACE_AFTER_S = 40.0  # ... to this long after it
RESTART_PAUSE_S = 3.0  # between one session's end and the next (sessions.repeat)


def emit(kind: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"type": kind, **fields}) + "\n")
    sys.stdout.flush()


@dataclass
class Shard:
    scenario: Scenario
    index: int
    count: int
    boots: dict[int, SimBoot] = field(default_factory=dict)  # by scenario boot index
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    injections: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    traces: dict[int, dict[str, Any]] = field(default_factory=dict)
    sessions_requested: int = 0
    sessions_started: int = 0
    session_failures: list[str] = field(default_factory=list)
    connect_failures: int = 0
    faulted: set[int] = field(default_factory=set)
    loop_lag_max_s: float = 0.0  # this process's own backlog: its timings are only as good

    async def watch_lag(self, period_s: float = 0.5) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period_s
            await asyncio.sleep(period_s)
            self.loop_lag_max_s = max(self.loop_lag_max_s, loop.time() - due)

    @functools.cached_property
    def plan(self) -> list[PlannedFault]:
        return [f for f in self.scenario.fault_plan() if f.boot_index % self.count == self.index]

    def build(self) -> None:
        sc = self.scenario
        ids = sc.boot_ids()
        creds = ({} if sc.broker.credentials_file is None
                 else load_credentials(sc.broker.credentials_file))
        for i in range(self.index, len(ids), self.count):
            clinic, device = ids[i]
            mqtt = BootLinkSettings(host=sc.broker.host, port=sc.broker.port,
                                keepalive_s=sc.broker.keepalive_s,
                                username=sc.broker.username_for(clinic, device),
                                password=sc.broker.password())
            account = account_kwargs(creds.get(f"{clinic}/{device}"))
            self.boots[i] = SimBoot(
                clinic, device, mqtt, chambers=sc.fleet.chambers,
                max_pressure_mmhg=sc.fleet.max_pressure_mmhg,
                telemetry_period_s=sc.fleet.telemetry_period_s,
                telemetry_qos=sc.fleet.telemetry_qos, seed=sc.seed * 100_003 + i, **account)

    async def connect(self) -> None:
        """Start every boot, paced to the scenario's connect rate shared by all shards."""
        pace = self.count / self.scenario.fleet.connect_per_s
        for i, boot in self.boots.items():
            self.tasks[i] = asyncio.create_task(boot.run(), name=f"boot-{boot.key}")
            await asyncio.sleep(pace)
        deadline = time.monotonic() + 30 + len(self.boots) / 50
        pending = {i: b for i, b in self.boots.items()}
        while pending and time.monotonic() < deadline:
            for i in [i for i, b in pending.items() if b.connected]:
                del pending[i]
            await asyncio.sleep(0.2)
        self.connect_failures = len(pending)

    def stats(self) -> dict[str, Any]:
        boots = self.boots.values()
        return {
            "shard": self.index, "boots": len(self.boots),
            "connected": sum(b.connected for b in boots),
            "in_session": sum(b.in_session for b in boots),
            "telemetry_sent": sum(b.telemetry_sent for b in boots),
            "vents": sum(len(b.vents_received_at) for b in boots),
            "faults_injected": len(self.injections),
            "sessions_requested": self.sessions_requested,
            "sessions_started": self.sessions_started,
            "loop_lag_max_s": round(self.loop_lag_max_s, 3),
        }

    # ------------------------------------------------------------------ sessions

    async def sessions(self, t0: float, end: float) -> None:
        sc = self.scenario
        if sc.gateway_url is None:
            return
        mine = [i for i in sc.session_boots() if i in self.boots]
        rng = random.Random(f"starts/{sc.seed}/{self.index}")
        programs = list(sc.sessions.programs)
        weights = list(sc.sessions.programs.values())
        headers = {}
        if token := sc.api_token():
            headers["Authorization"] = f"Bearer {token}"
        async with httpx.AsyncClient(base_url=sc.gateway_url, timeout=30,
                                     headers=headers) as api:
            sem = asyncio.Semaphore(20)  # a busy front desk, not one at a time

            async def run_boot(i: int) -> None:
                boot = self.boots[i]
                await asyncio.sleep(max(0.0, t0 + rng.uniform(0, sc.sessions.start_within_s)
                                        - time.time()))
                while time.time() < end - 5:
                    program = rng.choices(programs, weights)[0]
                    async with sem:
                        await self._start(api, boot, program)
                    if not sc.sessions.repeat:
                        return
                    # Next session once this one is over; not on a boot we broke on purpose.
                    try:
                        await boot.wait_until(lambda: not boot.in_session,
                                              timeout=max(1.0, end - time.time()))
                    except TimeoutError:
                        return
                    if i in self.faulted:
                        return
                    await asyncio.sleep(RESTART_PAUSE_S)

            await asyncio.gather(*(run_boot(i) for i in mine), return_exceptions=True)

    async def _start(self, api: httpx.AsyncClient, boot: SimBoot, program: str) -> None:
        self.sessions_requested += 1
        r = None
        for _ in range(20):  # 404: the gateway has not seen this boot's state yet
            try:
                r = await api.post(f"/api/v1/boots/{boot.clinic}/{boot.device}/session",
                                   json={"program": program})
            except httpx.HTTPError as exc:
                self.session_failures.append(f"{boot.key}: {type(exc).__name__}")
                return
            if r.status_code != 404:
                break
            await asyncio.sleep(0.5)
        if r is not None and r.status_code == 202:
            self.sessions_started += 1
        elif r is not None and len(self.session_failures) < 50:
            self.session_failures.append(f"{boot.key}: HTTP {r.status_code} {r.text[:120]}")

    # ------------------------------------------------------------------ faults

    async def faults(self, t0: float) -> None:
        async def one(f: PlannedFault) -> None:
            boot = self.boots[f.boot_index]
            await asyncio.sleep(max(0.0, t0 + f.at_s - time.time()))
            was_in_session = boot.in_session
            try:
                await inject(boot, f)
            except FaultNotApplied as exc:
                self.skipped.append({"boot": boot.key, "kind": f.kind.value, "at_s": f.at_s,
                                     "reason": str(exc)})
                return
            self.faulted.add(f.boot_index)
            exp = self.scenario.expectation(f)  # with this fault's params, for this fleet
            quiet = exp.only_in_session and not was_in_session
            record = {
                "boot": boot.key, "kind": f.kind.value, "at": boot.clock(),
                "at_s": f.at_s, "chamber": f.chamber, "in_session": was_in_session,
                "detect_within_s": f.detect_within_s, "params": f.params.model_dump(),
                "expected_rules": [] if quiet else sorted(exp.detected_by),
                "vent_expected": exp.vent_expected and not quiet,
                "expect_device_fault": bool(exp.device_faults) and not quiet,
                # Cut off from the gateway: the boot's own vent is due within this.
                "self_vent_within_s": (boot.effective_heartbeat_timeout_s
                                       if exp.self_vent and exp.vent_expected and not quiet
                                       and boot.self_vent else None),
                "cleared_at": None,
            }
            self.injections.append(record)
            if f.clear_at_s is not None:
                await asyncio.sleep(max(0.0, t0 + f.clear_at_s - time.time()))
                await clear(boot, f)
                record["cleared_at"] = boot.clock()

        results = await asyncio.gather(*(one(f) for f in self.plan), return_exceptions=True)
        for f, result in zip(self.plan, results, strict=True):
            if isinstance(result, Exception):
                log.error("fault injection failed", extra={"kind": f.kind.value,
                                                            "error": repr(result)})
                self.skipped.append({"boot": self.boots[f.boot_index].key,
                                     "kind": f.kind.value, "at_s": f.at_s,
                                     "reason": f"error: {result!r}"})

    async def trace(self, t0: float) -> None:
        """Sample faulty boots' chamber pressures around their fault, for the report's plot."""
        windows = {f.boot_index: (t0 + f.at_s - TRACE_BEFORE_S, t0 + f.at_s + TRACE_AFTER_S,
                                  f.kind.value) for f in self.plan}
        period = self.scenario.fleet.telemetry_period_s / 2
        while True:
            now = time.time()
            for i, (start, stop, kind) in windows.items():
                if not start <= now <= stop:
                    continue
                boot = self.boots[i]
                tr = self.traces.setdefault(i, {"boot": boot.key, "kind": kind, "t": [],
                                                "pressures": [], "targets": None})
                tr["t"].append(now)
                tr["pressures"].append([round(p, 2) for p in boot.model.pressures])
                program = boot.model.program
                if program is not None:
                    tr["targets"] = list(program.targets_mmhg)
            await asyncio.sleep(period)

    async def end_sessions(self) -> None:
        """Stop running sessions through the gateway first, as a clinic closing would, so the
        run's end leaves no offline-in-session alarms behind."""
        sc = self.scenario
        running = [b for b in self.boots.values() if b.in_session and b.connected]
        if sc.gateway_url is None or not running:
            return
        headers = {"Authorization": f"Bearer {t}"} if (t := sc.api_token()) else {}
        sem = asyncio.Semaphore(20)
        async with httpx.AsyncClient(base_url=sc.gateway_url, timeout=10,
                                     headers=headers) as api:
            async def stop_one(boot: SimBoot) -> None:
                async with sem:
                    with contextlib.suppress(httpx.HTTPError):
                        await api.post(f"/api/v1/boots/{boot.clinic}/{boot.device}/stop")
            await asyncio.gather(*(stop_one(b) for b in running))

    async def stop(self) -> None:
        await cancel_and_wait(self.tasks.values())

    def final(self) -> dict[str, Any]:
        vents = [[b.key, at] for b in self.boots.values() for at in b.vents_received_at]
        for i, tr in self.traces.items():
            tr["vents_at"] = list(self.boots[i].vents_received_at)
            tr["fault_at"] = next((j["at"] for j in self.injections
                                   if j["boot"] == tr["boot"]), None)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            **self.stats(), "injections": self.injections, "skipped": self.skipped,
            "vents_seen": vents, "traces": list(self.traces.values()),
            "self_vents_seen": [[b.key, at, cause] for b in self.boots.values()
                                for at, cause in b.self_vents_at],
            "telemetry_by_boot": {b.key: b.telemetry_sent for b in self.boots.values()},
            "session_failures": self.session_failures[:50],
            "connect_failures": self.connect_failures,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
        }


async def _commands(queue: asyncio.Queue[str]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        await queue.put(line.decode().strip() if line else "stop")
        if not line:
            return


async def run_worker(path: Path, index: int, count: int) -> int:
    shard = Shard(load_scenario(path), index, count)
    shard.build()
    commands: asyncio.Queue[str] = asyncio.Queue()
    reader = asyncio.create_task(_commands(commands))
    await shard.connect()
    emit("ready", **shard.stats(), connect_failures=shard.connect_failures)
    cmd = await commands.get()
    if not cmd.startswith("go "):
        await shard.stop()
        emit("final", **shard.final())
        return 0
    t0 = float(cmd.split()[1])
    end = t0 + shard.scenario.duration_s
    jobs = [asyncio.create_task(shard.sessions(t0, end)), asyncio.create_task(shard.faults(t0)),
            asyncio.create_task(shard.trace(t0)), asyncio.create_task(shard.watch_lag())]
    stop = asyncio.create_task(commands.get())
    try:
        while not stop.done():
            emit("stats", **shard.stats())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(stop)
    finally:
        await cancel_and_wait([*jobs, reader])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                await shard.end_sessions()
        await shard.stop()
    emit("final", **shard.final())
    return 0
