"""`python -m device_sim`: the demo (main job), scenario runs with a report, a plain fleet."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

import httpx
from pydantic import ValidationError

from device_sim import runner
from device_sim.demo import DemoOptions, run_demo
from device_sim.fleet import SimFleet
from device_sim.gateway_rules import CATALOGUE
from device_sim.link_settings import BootLinkSettings
from device_sim.scenario import ScenarioError, load_scenario
from device_sim.worker import run_worker
from gateway.boot_credentials import BootCredentials, CredentialsError, load_credentials
from gateway.logs import setup_logging
from gateway.settings import PLACEHOLDER_PREFIX

log = logging.getLogger("device_sim")

# The simulator's API token from the environment (compose), when no --api-token-file is given.
API_TOKEN_ENV = "BOOTSIM_API_TOKEN"


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
    r.add_argument("--boots", type=int, help="default 10, or every boot in --credentials")
    r.add_argument("--clinics", type=int, default=2)
    r.add_argument("--clinic-prefix", default="clinic-",
                   help="clinic ids are PREFIX1..PREFIXn; one prefix per simulator process")
    r.add_argument("--mqtt-host", default="127.0.0.1")
    r.add_argument("--mqtt-port", type=int, help="default 1883, 8883 with TLS")
    _add_mqtt_tls_arguments(r)
    a = r.add_argument_group("broker accounts", "per-boot accounts of a broker with the "
                             "dynamic-security plugin (docs/deploy.md §2.2), or one shared one")
    a.add_argument("--credentials", type=Path, metavar="FILE", help="per-boot credentials "
                   "(JSON/TOML, written by `boot-gateway boots add --credentials-out`); "
                   "without --boots the fleet is the boots listed there")
    a.add_argument("--mqtt-username", help="one account for every boot without an entry in "
                   "--credentials (a broker without per-boot accounts)")
    a.add_argument("--mqtt-password-file", type=Path, metavar="FILE",
                   help="the password of --mqtt-username")
    r.add_argument("--telemetry-hz", type=float, default=2.0)
    r.add_argument("--gateway-url", help="start sessions through this gateway's HTTP API")
    r.add_argument("--api-token-file", type=Path, metavar="FILE", help="the bearer token "
                   f"for --gateway-url (a front_desk or ops user's); or ${API_TOKEN_ENV}")
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


def _add_mqtt_tls_arguments(p: argparse.ArgumentParser) -> None:
    """The boots' TLS options: BootLinkSettings (device_sim/link_settings.py, README)."""
    g = p.add_argument_group("MQTT over TLS", "plain TCP is refused to a broker off loopback "
                             "unless --mqtt-allow-plaintext")
    g.add_argument("--mqtt-tls", action="store_true",
                   help="TLS 1.2+, the broker's certificate verified (implied by the next three)")
    g.add_argument("--mqtt-ca", type=Path, metavar="PEM",
                   help="CA the broker's certificate must chain to (default: system store)")
    g.add_argument("--mqtt-cert", type=Path, metavar="PEM",
                   help="client certificate for mutual TLS (with --mqtt-key)")
    g.add_argument("--mqtt-key", type=Path, metavar="PEM", help="the client certificate's key")
    g.add_argument("--mqtt-insecure-skip-hostname-check", action="store_true",
                   help="accept any certificate from the CA, whatever host it names (warned)")
    g.add_argument("--mqtt-allow-plaintext", action="store_true",
                   help="allow plain TCP to a broker off loopback (trusted networks only)")


def _mqtt_settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> BootLinkSettings:
    """BootLinkSettings from the command line; a refused combination exits 2 with the reason."""
    tls = bool(args.mqtt_tls or args.mqtt_ca or args.mqtt_cert or args.mqtt_key)
    fields: dict[str, object] = {
        "host": args.mqtt_host, "tls": tls, "ca_file": args.mqtt_ca,
        "cert_file": args.mqtt_cert, "key_file": args.mqtt_key,
        "tls_check_hostname": not args.mqtt_insecure_skip_hostname_check,
        "allow_plaintext": args.mqtt_allow_plaintext,
        "username": args.mqtt_username, "password_file": args.mqtt_password_file,
    }
    if args.mqtt_port is not None:
        fields["port"] = args.mqtt_port
    try:
        return BootLinkSettings.model_validate(fields)
    except ValidationError as exc:
        p.error("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()))


def _api_token(p: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The bearer token for --gateway-url: from --api-token-file or $BOOTSIM_API_TOKEN.

    The gateway's API is closed by default, so a run that starts sessions needs one; a
    placeholder from .env.example is refused here rather than answered 401 per boot."""
    env = os.environ.get(API_TOKEN_ENV, "").strip()
    if args.api_token_file is not None and env:
        p.error(f"--api-token-file and ${API_TOKEN_ENV} are both set: give one")
    token = env or None
    where = f"${API_TOKEN_ENV}"
    if args.api_token_file is not None:
        where = str(args.api_token_file)
        try:
            token = args.api_token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            p.error(f"--api-token-file {where}: cannot be read "
                    f"({getattr(exc, 'strerror', None) or type(exc).__name__})")
        if not token:
            p.error(f"--api-token-file {where} is empty")
    if token is not None and token.lower().startswith(PLACEHOLDER_PREFIX):
        p.error(f"the API token in {where} is still the placeholder from .env.example")
    if token is not None and not args.gateway_url:
        p.error("an API token is given but no --gateway-url to send it to")
    return token


def _fleet(p: argparse.ArgumentParser, args: argparse.Namespace, mqtt: BootLinkSettings
           ) -> SimFleet:
    """The boots to run; with --credentials each one listed there connects as itself."""
    creds: dict[str, BootCredentials] = {}
    if args.credentials is not None:
        try:
            creds = load_credentials(args.credentials)
        except CredentialsError as exc:
            p.error(str(exc))
        if not creds:
            p.error(f"{args.credentials}: no boots in it")
    period = 1.0 / args.telemetry_hz
    if creds and args.boots is None:
        members = sorted((k.split("/", 1)[0], k.split("/", 1)[1]) for k in creds)
        return SimFleet(members, mqtt, credentials=creds, telemetry_period_s=period)
    fleet = SimFleet.make(args.boots or 10, args.clinics, mqtt, credentials=creds,
                          clinic_prefix=args.clinic_prefix, telemetry_period_s=period)
    missing = [k for k in fleet.boots if k not in creds]
    if creds and missing and mqtt.username is None:
        p.error(f"{len(missing)} boot(s) have no entry in {args.credentials} (e.g. "
                f"{missing[:3]}) and no --mqtt-username is given")
    return fleet


async def _run_fleet(args: argparse.Namespace, fleet: SimFleet, api_token: str | None = None
                     ) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with fleet:
        log.info("fleet connected", extra={"boots": len(fleet), "broker": args.mqtt_host})
        if args.gateway_url:
            sem = asyncio.Semaphore(20)  # as a busy front desk would, not one at a time
            refused = asyncio.Event()

            async def start(api: httpx.AsyncClient, key: str) -> None:
                clinic, device = key.split("/")
                async with sem:
                    if refused.is_set():
                        return
                    for _ in range(20):  # 404: the gateway has not seen the boot's state yet
                        r = await api.post(f"/api/v1/boots/{clinic}/{device}/session",
                                           json={"program": args.program})
                        if r.status_code != 404:
                            break
                        await asyncio.sleep(0.5)
                if r.status_code in (401, 403):  # the same for every boot: say it once
                    if not refused.is_set():
                        refused.set()
                        log.error("gateway API refused the simulator's token: no session "
                                  "started", extra={
                                      "status": r.status_code, "body": r.text[:200],
                                      "hint": f"--api-token-file or ${API_TOKEN_ENV}"})
                    return
                log.info("session start", extra={"boot": key, "status": r.status_code,
                                                 "body": r.text[:200]})

            headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
            async with httpx.AsyncClient(base_url=args.gateway_url, timeout=30,
                                         headers=headers) as api:
                await asyncio.gather(*(start(api, key) for key in fleet.boots))
        t0 = time.monotonic()
        while not stop.is_set():
            wait = 10.0  # a stats line this often
            if args.seconds:
                wait = min(wait, max(0.0, args.seconds - (time.monotonic() - t0)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            log.info("fleet", extra=fleet.stats())
            if args.seconds and time.monotonic() - t0 >= args.seconds:
                break
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
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
    mqtt = _mqtt_settings(parser, args)
    api_token = _api_token(parser, args)
    setup_logging("INFO", "text")
    fleet = _fleet(parser, args, mqtt)
    sys.exit(asyncio.run(_run_fleet(args, fleet, api_token)))


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
