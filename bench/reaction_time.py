"""Reaction time of the safety path under load.

From the simulated boot's publish of its first over-limit sample to that boot's receipt of the
vent, with N boots streaming at R Hz at the same time. The gateway runs as its own process
(`python -m gateway`), as in production; Mosquitto and influxd are private instances.

    .venv/bin/python bench/reaction_time.py --boots 500 --hz 2 --faults 200
    .venv/bin/python bench/reaction_time.py --pause-influx   # storage stopped (SIGSTOP)

Prints one JSON object (also written to --out) with p50/p99/max in ms and the context.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_sim.fleet import SimFleet  # noqa: E402
from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port  # noqa: E402
from gateway.settings import MqttSettings  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def start_gateway(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=ROOT,
                                stdout=log, stderr=log)


async def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-reaction-"))
    mq = LocalMosquitto("mosquitto", work / "mosquitto", free_port()).start()
    influx = LocalInflux("influxd", work / "influxdb", free_port()).start()
    api_port = free_port()
    env = {
        **os.environ,
        "BOOTGW_MQTT__PORT": str(mq.port),
        "BOOTGW_INFLUX__URL": influx.url,
        "BOOTGW_INFLUX__DATABASE": "bench",
        "BOOTGW_API__PORT": str(api_port),
        "BOOTGW_LOG_LEVEL": "WARNING",
        "BOOTGW_CONFIG_FILE": str(work / "none.toml"),
    }
    gw = start_gateway(env, work / "gateway.log")
    result: dict[str, object] = {}
    try:
        api_url = f"http://127.0.0.1:{api_port}"
        async with httpx.AsyncClient(base_url=api_url, timeout=30) as api:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await api.get("/health")).json()["mqtt_connected"]:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("gateway did not come up; see " + str(work))
                await asyncio.sleep(0.2)
            fleet = SimFleet.make(args.boots, args.clinics,
                                  MqttSettings(host="127.0.0.1", port=mq.port),
                                  telemetry_period_s=1.0 / args.hz, seed=1)
            async with fleet:
                deadline = time.monotonic() + 60
                while (await api.get("/health")).json()["boots"]["online"] < args.boots:
                    if time.monotonic() > deadline:
                        raise RuntimeError("not every boot reached the gateway")
                    await asyncio.sleep(0.2)
                sem = asyncio.Semaphore(50)

                async def start(key: str) -> int:
                    clinic, device = key.split("/")
                    async with sem:
                        r = await api.post(f"/api/v1/boots/{clinic}/{device}/session",
                                           json={"program": "post_workout_recovery"})
                        return r.status_code

                codes = await asyncio.gather(*(start(k) for k in fleet.boots))
                started = sum(c == 202 for c in codes)
                if args.pause_influx:
                    influx.pause()
                await asyncio.sleep(2.0)  # let every boot reach its cycle
                cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
                msgs0 = fleet.telemetry_sent
                victims = random.Random(7).sample(list(fleet.boots.values()),
                                                  min(args.faults, len(fleet.boots)))
                for boot in victims:
                    boot.inject_spike(0, args.spike_mmhg)
                    await asyncio.sleep(args.fault_interval_s)
                await asyncio.gather(*(b.wait_until(lambda b=b: b.vents_received_at, timeout=30)
                                       for b in victims))
                elapsed = time.monotonic() - t0
                cpu = cpu_seconds(gw.pid) - cpu0
                msg_rate = (fleet.telemetry_sent - msgs0) / elapsed
                reactions = [(b.vents_received_at[0] - b.spikes_published_at[0]) * 1000
                             for b in victims]
                healthy_vented = sum(1 for b in fleet.boots.values()
                                     if b not in victims and b.vents_received)
                if args.pause_influx:
                    influx.resume()
            result = {
                "boots": args.boots, "telemetry_hz": args.hz, "sessions_started": started,
                "faults": len(reactions), "storage_paused": args.pause_influx,
                "reaction_ms": {
                    "p50": round(statistics.median(reactions), 2),
                    "p99": round(percentile(reactions, 99), 2),
                    "max": round(max(reactions), 2),
                    "min": round(min(reactions), 2),
                },
                "telemetry_msgs_per_s": round(msg_rate, 1),
                "gateway_cpu_percent": round(100 * cpu / elapsed, 1),
                "gateway_peak_rss_mb": round(rss_mb(gw.pid), 1),
                "healthy_boots_vented": healthy_vented,
                "cores": os.cpu_count(),
            }
    finally:
        gw.terminate()
        gw.wait(30)
        influx.stop()
        mq.stop()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boots", type=int, default=500)
    p.add_argument("--clinics", type=int, default=10)
    p.add_argument("--hz", type=float, default=2.0)
    p.add_argument("--faults", type=int, default=200)
    p.add_argument("--fault-interval-s", type=float, default=0.05)
    p.add_argument("--spike-mmhg", type=float, default=150.0)
    p.add_argument("--pause-influx", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
