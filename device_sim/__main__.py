"""`python -m device_sim`: the demo (main job), scenario runs with a report, a plain fleet."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

import httpx

from device_sim import runner
from device_sim.demo import DemoOptions, run_demo
from device_sim.fleet import SimFleet
from device_sim.scenario import ScenarioError, load_scenario
from device_sim.worker import run_worker
from gateway.logs import setup_logging
from gateway.programs import CATALOGUE
from gateway.settings import MqttSettings

log = logging.getLogger("device_sim")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device_sim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="local broker + InfluxDB + gateway + fleet with one fault")
    d.add_argument("--boots", type=int, default=DemoOptions.boots)
    d.add_argument("--clinics", type=int, default=DemoOptions.clinics)
    d.add_argument("--seconds", type=float, default=DemoOptions.seconds,
                   help="how long the sessions run before the demo stops them")
    d.add_argument("--program", choices=sorted(CATALOGUE), default=DemoOptions.program)
    d.add_argument("--stuck-boot", type=int, default=DemoOptions.stuck_boot,
                   help="1-based boot index with a stuck valve (0: none)")
    d.add_argument("--workdir", type=Path, default=DemoOptions.workdir)
    d.add_argument("--mqtt-host", help="use this broker instead of starting one")
    d.add_argument("--mqtt-port", type=int, default=1883)
    d.add_argument("--influx-url", help="use this InfluxDB instead of starting one")

    r = sub.add_parser("run", help="run simulated boots against a broker and gateway")
    r.add_argument("--boots", type=int, default=10)
    r.add_argument("--clinics", type=int, default=2)
    r.add_argument("--clinic-prefix", default="clinic-",
                   help="clinic ids are PREFIX1..PREFIXn; one prefix per simulator process")
    r.add_argument("--mqtt-host", default="127.0.0.1")
    r.add_argument("--mqtt-port", type=int, default=1883)
    r.add_argument("--telemetry-hz", type=float, default=2.0)
    r.add_argument("--gateway-url", help="start sessions through this gateway's HTTP API")
    r.add_argument("--program", choices=sorted(CATALOGUE), default="post_workout_recovery")
    r.add_argument("--seconds", type=float, default=0, help="0: until interrupted")

    s = sub.add_parser("scenario", help="run a scenario file (YAML/TOML): live view, report, "
                       "exit code 1 when its expectations fail, 2 when the file is invalid")
    s.add_argument("path", type=Path)
    s.add_argument("--out", type=Path, help="report folder (default run/scenario-NAME-TIME)")
    s.add_argument("--no-live", action="store_true", help="no live view (logs and CI)")
    s.add_argument("--check", action="store_true",
                   help="validate the file and print the fault plan, run nothing")

    w = sub.add_parser("worker", help="(internal) one simulator process of a scenario run")
    w.add_argument("path", type=Path)
    w.add_argument("--shard", type=int, required=True)
    w.add_argument("--shards", type=int, required=True)
    return p


async def _run_fleet(args: argparse.Namespace) -> int:
    mqtt = MqttSettings(host=args.mqtt_host, port=args.mqtt_port)
    fleet = SimFleet.make(args.boots, args.clinics, mqtt, clinic_prefix=args.clinic_prefix,
                          telemetry_period_s=1.0 / args.telemetry_hz)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with fleet:
        log.info("fleet connected", extra={"boots": len(fleet), "broker": args.mqtt_host})
        if args.gateway_url:
            sem = asyncio.Semaphore(20)  # as a busy front desk would, not one at a time

            async def start(api: httpx.AsyncClient, key: str) -> None:
                clinic, device = key.split("/")
                async with sem:
                    for _ in range(20):  # 404: the gateway has not seen the boot's state yet
                        r = await api.post(f"/api/v1/boots/{clinic}/{device}/session",
                                           json={"program": args.program})
                        if r.status_code != 404:
                            break
                        await asyncio.sleep(0.5)
                log.info("session start", extra={"boot": key, "status": r.status_code,
                                                 "body": r.text[:200]})

            async with httpx.AsyncClient(base_url=args.gateway_url, timeout=30) as api:
                await asyncio.gather(*(start(api, key) for key in fleet.boots))
        t0 = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 10)
            log.info("fleet", extra=fleet.stats())
            if args.seconds and time.monotonic() - t0 >= args.seconds:
                break
    return 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        opts = DemoOptions(
            boots=args.boots, clinics=args.clinics, seconds=args.seconds,
            program=args.program, stuck_boot=args.stuck_boot, workdir=args.workdir,
            mqtt_host=args.mqtt_host, mqtt_port=args.mqtt_port, influx_url=args.influx_url,
        )
        sys.exit(asyncio.run(run_demo(opts, sys.stdout)))
    if args.command == "scenario":
        sys.exit(_scenario(args))
    if args.command == "worker":
        setup_logging("WARNING", "text")
        sys.exit(asyncio.run(run_worker(args.path, args.shard, args.shards)))
    setup_logging("INFO", "text")
    sys.exit(asyncio.run(_run_fleet(args)))


def _scenario(args: argparse.Namespace) -> int:
    try:
        sc = load_scenario(args.path)
    except ScenarioError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.check:
        plan = sc.fault_plan()
        print(f"{args.path}: valid. {sc.fleet.boots} boots in {sc.fleet.clinics} clinics, "
              f"{sc.fleet.resolved_processes()} process(es), {sc.duration_s:g} s, "
              f"{len(plan)} fault(s)")
        for f in plan:
            print(f"  {f.at_s:8.1f} s  {f.kind.value:<16} boot #{f.boot_index + 1}")
        return 0
    setup_logging("WARNING", "text")
    return runner.main(args.path, args.out, live=not args.no_live)


if __name__ == "__main__":
    main()
