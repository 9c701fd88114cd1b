"""Vent reaction time while the gateway's HTTP API is flooded, and without the flood.

The gateway runs as its own process (`python -m gateway`, default settings, an API token), with
private Mosquitto and influxd, and `--load-boots` idle boots streaming telemetry from their own
process. The probe boots run here. Two phases, the same measurements in each:

* `spike`: single samples of 150 mmHg (rule 1), one per probe per round, timed from the probe
  publishing the sample to the probe receiving the vent (as bench/reaction_time.py);
* `silence`: `--silent-probes` probes in session stop their telemetry at once (rule 5), timed
  from the stop to the vent's arrival (limit 3 s with the defaults; a probe not vented within
  `--silence-timeout-s` is counted in `not_vented`).

The flood (`python -m device_sim.flood api`, in `--flood-procs` processes of its own) mixes, by
default, 20 MB bodies without a token and valid authenticated GETs as fast as they go.

    .venv/bin/python bench/reaction_under_flood.py
    .venv/bin/python bench/reaction_under_flood.py --rounds 10 --out flood.json

Run from another checkout to measure that code (the gateway is started from the tree this file
is in; copy bench/reaction_under_flood.py and device_sim/flood.py there first). Prints one JSON
object with p50/p99/max per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.common import Stack, cpu_seconds, stack  # noqa: E402
from bench.reaction_time import percentile  # noqa: E402
from device_sim.boot import SimBoot  # noqa: E402
from device_sim.fleet import SimFleet  # noqa: E402
from gateway.settings import MqttSettings  # noqa: E402

TOKEN = "bench-" + secrets.token_hex(16)


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, every process (other engineers' too)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(statistics.median(values), 2),
            "p99": round(percentile(values, 99), 2), "max": round(max(values), 2)}


@contextlib.asynccontextmanager
async def api_flood(url: str, procs: int, concurrency: int, kinds: str
                    ) -> AsyncIterator[list[dict[str, Any]]]:
    """The flood in `procs` processes, in force for the block; their summaries after it."""
    floods = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "device_sim.flood", "api", "--url", url, "--token", TOKEN,
        "--concurrency", str(concurrency), "--kinds", kinds, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE) for _ in range(procs)]
    results: list[dict[str, Any]] = []
    try:
        for proc in floods:
            assert proc.stdout is not None
            async with asyncio.timeout(60):
                assert (await proc.stdout.readline()).strip() == b"flooding"
        yield results
    finally:
        for proc in floods:
            if proc.returncode is None:
                proc.terminate()
        for proc in floods:
            out, _ = await proc.communicate()
            with contextlib.suppress(ValueError, IndexError):
                results.append(json.loads(out.strip().splitlines()[-1]))


async def spikes(probes: list[SimBoot], rounds: int, interval_s: float, hz: float
                 ) -> tuple[list[float], int, list[tuple[SimBoot, int, int]]]:
    """Rule 1 reactions (ms), the faults not vented within 10 s, and (probe, spike index,
    vent index) of each reaction."""
    reactions: list[float] = []
    missed = 0
    faults: list[tuple[SimBoot, int, int]] = []
    for _ in range(rounds):
        base = {b.key: (len(b.spikes_published_at), len(b.vents_received_at)) for b in probes}
        for boot in probes:
            boot.inject_spike(0, 150.0)
            await asyncio.sleep(interval_s)
        for boot in probes:
            k_spike, k_vent = base[boot.key]

            def vent_after(b: SimBoot = boot, s: int = k_spike, v: int = k_vent) -> int | None:
                """Index of the first vent received after the spike went out (a late vent of
                an earlier spike may come first)."""
                if len(b.spikes_published_at) <= s:
                    return None
                return next((i for i in range(v, len(b.vents_received_at))
                             if b.vents_received_at[i] >= b.spikes_published_at[s]), None)

            try:
                await boot.wait_until(lambda f=vent_after: f() is not None, timeout=10)
            except TimeoutError:
                missed += 1
                continue
            k = vent_after()
            assert k is not None
            reactions.append(
                (boot.vents_received_at[k] - boot.spikes_published_at[k_spike]) * 1000)
            faults.append((boot, k_spike, k))
        # one vent per episode: the gateway re-arms once it has seen the boot vented and safe
        for boot in probes:
            await boot.wait_until(lambda b=boot: max(b.model.pressures) < 5, timeout=30)
        await asyncio.sleep(3 / hz)
    return reactions, missed, faults


async def split_at_decision(st: Stack, faults: list[tuple[SimBoot, int, int]], since_ms: int
                            ) -> tuple[list[float], list[float]]:
    """Publish -> the gateway's decision (its safety_event time, ms), and decision -> the
    probe's receipt: whose CPU the time went to."""
    want = len(faults)
    decided: dict[str, list[float]] = {}
    for _ in range(40):  # the safety events reach InfluxDB within a flush or two
        series = st.influx.query(st.database, "SELECT value FROM safety_event WHERE rule = "
                                 f"'hard_ceiling' AND time >= {since_ms}ms GROUP BY device")
        decided = {x["tags"]["device"]: [v[0] / 1000 for v in x["values"]] for x in series}
        if sum(len(v) for v in decided.values()) >= want:
            break
        await asyncio.sleep(0.5)
    before, after = [], []
    used: dict[str, int] = {}  # per probe: decisions already matched, in time order
    for boot, k_spike, k_vent in faults:
        published = boot.spikes_published_at[k_spike]
        times = sorted(decided.get(boot.device, []))
        n = used.get(boot.device, 0)
        while n < len(times) and times[n] < published - 0.002:  # ms stamps: 2 ms of slack
            n += 1  # a decision on an earlier spike (one whose vent came too late to count)
        if n < len(times):
            used[boot.device] = n + 1
            before.append((times[n] - published) * 1000)
            after.append((boot.vents_received_at[k_vent] - times[n]) * 1000)
    return before, after


async def silences(api: httpx.AsyncClient, probes: list[SimBoot], timeout_s: float
                   ) -> tuple[list[float], int, int]:
    """Rule 5 reactions (s): sessions started, then every probe silent at once. Returns the
    reactions, the probes not vented within timeout_s, and the probes whose start failed."""
    for boot in probes:
        with contextlib.suppress(httpx.HTTPError):  # a start refused or timed out: counted
            await api.post(f"/api/v1/boots/{boot.clinic}/{boot.device}/session",
                           json={"program": "post_workout_recovery"})
    started = [b for b in probes if b.in_session]
    for boot in started:  # a sample of the session out, so the gateway watches it running
        await boot.wait_until(lambda b=boot: b.telemetry_sent_by_session.get(
            b.session_id or "", 0) > 0, timeout=10)
    before = {b.key: b.vents_received for b in started}
    silent_at = {}
    for boot in started:
        boot.set_silent(True)
        silent_at[boot.key] = boot.clock()
    reactions: list[float] = []
    missed = 0
    for boot in started:
        try:
            await boot.wait_until(lambda b=boot: b.vents_received > before[b.key],
                                  timeout=max(0.1, silent_at[boot.key] + timeout_s
                                              - boot.clock()))
            reactions.append(boot.vents_received_at[before[boot.key]] - silent_at[boot.key])
        except TimeoutError:
            missed += 1
    for boot in started:
        boot.set_silent(False)
        if boot.in_session and boot.vents_received == before[boot.key]:  # never vented
            await api.post(f"/api/v1/boots/{boot.clinic}/{boot.device}/vent",
                           json={"reason": "bench: rule 5 did not vent"})
    for boot in started:  # the vent ends the session on both sides
        await boot.wait_until(lambda b=boot: not b.in_session, timeout=30)
    return reactions, missed, len(probes) - len(started)


async def phase(name: str, st: Stack, api: httpx.AsyncClient, spike_probes: list[SimBoot],
                silent_probes: list[SimBoot], args: argparse.Namespace) -> dict[str, Any]:
    stats0 = (await api.get("/api/v1/stats")).json()
    cpu0, t0, since_ms = cpu_seconds(st.gw.pid), time.monotonic(), int(time.time() * 1000)
    busy0, total0 = machine_cpu()
    reactions, missed, faults = await spikes(spike_probes, args.rounds, args.fault_interval_s,
                                             args.hz)
    to_decision, decision_to_vent = await split_at_decision(st, faults, since_ms)
    quiet, not_vented, start_failures = await silences(api, silent_probes,
                                                       args.silence_timeout_s)
    elapsed = time.monotonic() - t0
    busy1, total1 = machine_cpu()
    stats1 = (await api.get("/api/v1/stats")).json()
    return {
        "phase": name,
        "spike_reaction_ms": summary(reactions), "spike_faults_not_vented_in_10s": missed,
        "spike_to_decision_ms": summary(to_decision),
        "spike_decision_to_vent_ms": summary(decision_to_vent),
        "silence_reaction_s": summary(quiet), "silence_not_vented": not_vented,
        "silence_start_failures": start_failures,
        "gateway_cpu_percent": round(100 * (cpu_seconds(st.gw.pid) - cpu0) / elapsed, 1),
        # every core of the machine busy: 100 %
        "machine_cpu_busy_percent": round(100 * (busy1 - busy0) / max(1, total1 - total0), 1),
        "gateway_loop_lag_max_ms": stats1.get("loop_lag_max_ms"),
        "vents_sent": stats1["vents_sent"] - stats0["vents_sent"],
        "seconds": round(elapsed, 1),
    }


def start_load(args: argparse.Namespace, mqtt_port: int) -> subprocess.Popen[bytes]:
    """Idle boots streaming telemetry from a process of their own."""
    return subprocess.Popen(
        [sys.executable, "-m", "device_sim", "run", "--boots", str(args.load_boots),
         "--clinics", "5", "--clinic-prefix", "load-", "--mqtt-port", str(mqtt_port),
         "--telemetry-hz", str(args.hz)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with stack("flood", api__token=TOKEN) as st:
        url = str(st.api.base_url).rstrip("/")
        load = start_load(args, st.mq.port) if args.load_boots else None
        result: dict[str, Any] = {}
        try:
            mqtt = MqttSettings(host="127.0.0.1", port=st.mq.port)
            probes = SimFleet.make(args.probes + args.silent_probes, 1, mqtt,
                                   clinic_prefix="probe-", telemetry_period_s=1.0 / args.hz,
                                   seed=3)
            async with probes, httpx.AsyncClient(
                    base_url=url, timeout=60,
                    headers={"Authorization": f"Bearer {TOKEN}"}) as api:
                boots = list(probes.boots.values())
                spike_probes, silent_probes = boots[:args.probes], boots[args.probes:]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # every probe announced (retained state)
                    known = {f"{b['clinic']}/{b['device']}" for b in
                             (await api.get("/api/v1/boots")).json()}
                    if all(b.key in known for b in boots):
                        break
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2.0)  # the load settles
                result["quiet"] = await phase("quiet", st, api, spike_probes, silent_probes,
                                              args)
                async with api_flood(url, args.flood_procs, args.concurrency,
                                     args.kinds) as floods:
                    result["api_flooded"] = await phase("api_flooded", st, api, spike_probes,
                                                        silent_probes, args)
                result["api_flooded"]["flood"] = floods
        finally:
            if load is not None:
                load.terminate()
                load.wait(30)
    result["context"] = {
        "tree": str(ROOT), "load_boots": args.load_boots, "telemetry_hz": args.hz,
        "probes": args.probes, "silent_probes": args.silent_probes, "rounds": args.rounds,
        "flood_procs": args.flood_procs, "flood_concurrency": args.concurrency,
        "flood_kinds": args.kinds,
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load-boots", type=int, default=200, help="idle boots in a process of "
                   "their own (0: none)")
    p.add_argument("--hz", type=float, default=2.0, help="telemetry rate of every boot")
    p.add_argument("--probes", type=int, default=10, help="boots that get the spikes")
    p.add_argument("--silent-probes", type=int, default=5, help="boots that go silent")
    p.add_argument("--rounds", type=int, default=10, help="spikes per probe and phase")
    p.add_argument("--fault-interval-s", type=float, default=0.05)
    p.add_argument("--silence-timeout-s", type=float, default=20.0)
    p.add_argument("--flood-procs", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=32, help="clients per flood process")
    p.add_argument("--kinds", default="big_no_token,get,get,get",
                   help="the flood's mix (python -m device_sim.flood api --help)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    text = json.dumps(asyncio.run(run(args)), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
