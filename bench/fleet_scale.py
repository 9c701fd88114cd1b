"""A scenario file run against a private stack: the simulator's own cost at scale.

Starts Mosquitto, influxd and the gateway (`python -m gateway`) like the other benchmarks,
points the scenario at them, runs it (`device_sim.runner`, several simulator processes) and
prints the report's totals with the gateway's CPU and memory beside the simulator's.

    .venv/bin/python bench/fleet_scale.py scenarios/stress.yaml --duration-s 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, rss_mb, stack
from device_sim import runner


async def measure(args: argparse.Namespace) -> dict[str, object]:
    async with stack("fleet") as st:
        data = yaml.safe_load(args.scenario.read_text())
        data["broker"]["port"] = st.mq.port
        data["gateway_url"] = str(st.api.base_url).rstrip("/")
        os.environ["BENCH_API_TOKEN"] = st.token  # the simulator's processes read it
        data["api_token_env"] = "BENCH_API_TOKEN"
        data["influx"] = {"url": st.influx.url, "database": st.database}
        if args.duration_s:
            data["duration_s"] = args.duration_s
        path = st.work / args.scenario.name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        cpu0, t0 = cpu_seconds(st.gw.pid), time.monotonic()
        report = await runner.run(path, st.work / "report", live=False)
        elapsed = time.monotonic() - t0
        gw_cpu = cpu_seconds(st.gw.pid) - cpu0
        stats = await st.stats()
        return {
            "scenario": report.scenario, "passed": report.passed,
            "failures": report.failures[:10], "report_dir": str(st.work / "report"),
            **report.totals.model_dump(),
            "gateway_cpu_percent": round(100 * gw_cpu / elapsed, 1),
            "gateway_peak_rss_mb": round(rss_mb(st.gw.pid), 1),
            "gateway_loop_lag_max_ms": stats["loop_lag_max_ms"],
            "reaction_p50_ms": report.reaction.reaction.p50_s and
            round(report.reaction.reaction.p50_s * 1000, 1),
            "reaction_max_ms": report.reaction.reaction.max_s and
            round(report.reaction.reaction.max_s * 1000, 1),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", type=Path)
    p.add_argument("--duration-s", type=float, help="override the scenario's duration")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    text = json.dumps(asyncio.run(measure(args)), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
