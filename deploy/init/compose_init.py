"""The compose stack's one-shot init steps (compose.yaml services `init` and `provision`).

Run in the project's image, so they use the project's own commands and nothing else:

    compose_init.py broker ...   before the broker starts:
        1. refuse to go on while a secret from `.env` is unset, too short or still the
           `change-me...` placeholder of `.env.example` (InfluxDB and Grafana take theirs
           unchecked, so this step checks them: they wait for it);
        2. `boot-gateway certs init`: the private CA and the broker's certificate;
        3. `boot-gateway broker init`: the dynamic-security file with the admin's and the
           gateway's accounts (their passwords generated into files of their own), once;
           handed to the broker's user.
    compose_init.py boots ...    once the broker runs: `boot-gateway boots add` for every
        simulated boot that has no account yet, into the credentials file the simulator reads.

Both are idempotent: `docker compose up` runs them at every start, and they keep what exists
(the CA above all: every boot pins it). Exit codes: 0 done, 1 refused (the reason on stderr,
never a secret's value), 2 bad arguments, 3 failed (the broker did not answer in time).

No Docker in CI: tests/test_compose.py runs these steps natively, with the volumes mapped to
temporary directories, against a real Mosquitto started with deploy/mosquitto/mosquitto.conf.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gateway import certs, provision
from gateway.boot_credentials import CredentialsError, load_credentials
from gateway.logs import setup_logging
from gateway.settings import PLACEHOLDER_PREFIX, GatewaySettings

OK, REFUSED, USAGE, FAILED = 0, 1, 2, 3
ACTOR = "compose-init"  # the audit trail's actor for the accounts made here
# How a boot of the simulated fleet is named: as `device_sim run --boots N --clinics C` names
# them (device_sim/fleet.py SimFleet.make), so both tools describe the same fleet.
DEVICE_WIDTH_MIN = 3


def _say(text: str) -> None:
    sys.stderr.write(f"compose-init: {text}\n")


def _secret_spec(value: str) -> tuple[str, int]:
    name, _, min_chars = value.partition(":")
    if not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{value!r}: NAME or NAME:MIN_CHARS")
    try:
        return name, int(min_chars or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: MIN_CHARS is a number") from None


def _owner(value: str) -> tuple[int, int]:
    uid, sep, gid = value.partition(":")
    try:
        return int(uid), int(gid if sep else uid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not UID[:GID]") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compose_init.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)

    b = sub.add_parser("broker", help="secrets check, certificates, dynamic-security file")
    b.add_argument("--check-secret", type=_secret_spec, action="append", default=[],
                   metavar="NAME[:MIN_CHARS]", help="an environment variable that must be "
                   "set, at least MIN_CHARS long and not a change-me placeholder")
    b.add_argument("--certs", type=Path, required=True, help="the broker's certificate dir")
    b.add_argument("--ca-dir", type=Path, required=True, help="the CA's key and certificate")
    b.add_argument("--host", action="append", default=[], required=True,
                   help="names the broker's certificate must carry (certs init --host)")
    b.add_argument("--dynsec", type=Path, required=True,
                   help="the plugin's file (plugin_opt_config_file, as seen from here)")
    b.add_argument("--gateway-password-file", type=Path, required=True,
                   help="the gateway's broker password (generated if missing)")
    b.add_argument("--broker-owner", type=_owner, metavar="UID[:GID]",
                   help="the broker's user: owner of its key and of the plugin's file")

    s = sub.add_parser("boots", help="broker accounts of the simulated fleet")
    s.add_argument("--boots", type=int, required=True)
    s.add_argument("--clinics", type=int, required=True)
    s.add_argument("--clinic-prefix", default="clinic-")
    s.add_argument("--credentials-out", type=Path, required=True,
                   help="the credentials file the simulator reads (--credentials)")
    s.add_argument("--wait-s", type=float, default=60.0,
                   help="how long to wait for the broker to accept the admin")
    return p


# ---------------------------------------------------------------- broker (before the broker)


def secret_problems(specs: Sequence[tuple[str, int]], env: dict[str, str]) -> list[str]:
    """What is wrong with each secret, naming the variable, never showing its value."""
    problems = []
    for name, min_chars in specs:
        value = env.get(name, "").strip()
        if not value:
            problems.append(f"{name} is not set (.env)")
        elif value.lower().startswith(PLACEHOLDER_PREFIX):
            problems.append(f"{name} is still the placeholder from .env.example: set a real "
                            "secret")
        elif len(value) < min_chars:
            problems.append(f"{name} has {len(value)} characters, at least {min_chars} needed")
    return problems


def _placeholder_file(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8").strip().lower().startswith(PLACEHOLDER_PREFIX)
    except (OSError, UnicodeDecodeError):
        return False  # unreadable: `broker init` says so itself


def certs_argv(args: argparse.Namespace) -> list[str]:
    """The `boot-gateway certs ...` command this step runs (tests parse it)."""
    argv = ["init", str(args.certs), "--ca-dir", str(args.ca_dir)]
    for host in args.host:
        argv += ["--host", host]
    if args.broker_owner is not None:
        argv += ["--owner", f"{args.broker_owner[0]}:{args.broker_owner[1]}"]
    return argv


def broker_init_argv(args: argparse.Namespace) -> list[str]:
    """The `boot-gateway broker init ...` command this step runs once (tests parse it)."""
    return ["broker", "init", str(args.dynsec),
            "--gateway-password-file", str(args.gateway_password_file)]


def step_broker(args: argparse.Namespace) -> int:
    problems = secret_problems(args.check_secret, dict(os.environ))
    if problems:
        for problem in problems:
            _say(f"refused: {problem}")
        _say("nothing started: set the values in .env (docs/deploy.md §1.1)")
        return REFUSED
    rc = certs.cli(certs_argv(args))
    if rc != OK:
        return rc
    try:
        settings = GatewaySettings()
    except ValueError as exc:
        _say(f"configuration error: {exc}")
        return USAGE
    admin_file = settings.broker_admin.password_file
    if admin_file is None:
        _say("refused: BOOTGW_BROKER_ADMIN__PASSWORD_FILE is not set")
        return REFUSED
    files = {"the admin's password": admin_file,
             "the gateway's password": args.gateway_password_file}
    placeholders = [f"{what} ({path})" for what, path in files.items()
                    if path.exists() and _placeholder_file(path)]
    if placeholders:
        _say(f"refused: {', '.join(placeholders)} still a change-me placeholder; put a real "
             "password there or delete the file to have one generated")
        return REFUSED
    if args.dynsec.exists():
        missing = [f"{what} ({path})" for what, path in files.items() if not path.exists()]
        if missing:
            _say(f"refused: {args.dynsec} exists but {', '.join(missing)} is missing: the "
                 "accounts in it cannot be used. Restore the file from the backup, or start "
                 "over with `docker compose down -v` (every boot then needs a new account)")
            return REFUSED
        _say(f"dynamic-security file kept: {args.dynsec}")
    else:
        rc = asyncio.run(provision.run(broker_init_argv(args), settings))
        if rc != OK:
            return rc
    if args.broker_owner is not None:
        # The broker rewrites the file (a `.new` file next to it, then a rename) as its own
        # user after dropping root: it needs the directory and the file.
        for path in (args.dynsec.parent, args.dynsec):
            os.chown(path, *args.broker_owner)
    args.dynsec.chmod(0o600)
    return OK


# ---------------------------------------------------------------- boots (broker running)


def fleet_members(boots: int, clinics: int, prefix: str) -> list[str]:
    """'clinic/device' keys of the simulated fleet, named as device_sim names them."""
    width = max(DEVICE_WIDTH_MIN, len(str(boots)))
    return [f"{prefix}{i % clinics + 1}/boot-{i + 1:0{width}d}" for i in range(boots)]


def add_argv(key: str, credentials_out: Path) -> list[str]:
    """The `boot-gateway boots add ...` command for one boot (tests parse it)."""
    clinic, device = key.split("/")
    return ["boots", "add", clinic, device, "--credentials-out", str(credentials_out),
            "--actor", ACTOR]


async def _provisioned(settings: GatewaySettings, wait_s: float) -> set[str] | None:
    """The boots the broker has accounts for; retried until the broker answers or wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        out, err = io.StringIO(), io.StringIO()
        rc = await provision.run(["boots", "list", "--json"], settings, stdout=out, stderr=err)
        if rc == OK:
            return {f"{b['clinic']}/{b['device']}" for b in json.loads(out.getvalue())}
        if rc != FAILED or time.monotonic() >= deadline:
            _say(f"the broker did not accept the admin: {err.getvalue().strip()}")
            return None
        await asyncio.sleep(1.0)


async def _step_boots(args: argparse.Namespace) -> int:
    if args.boots < 1 or args.clinics < 1:
        _say("refused: --boots and --clinics must be at least 1")
        return USAGE
    try:
        settings = GatewaySettings()
    except ValueError as exc:
        _say(f"configuration error: {exc}")
        return USAGE
    try:
        known = (load_credentials(args.credentials_out) if args.credentials_out.exists()
                 else {})
    except CredentialsError as exc:
        _say(f"refused: {exc}")
        return REFUSED
    existing = await _provisioned(settings, args.wait_s)
    if existing is None:
        return FAILED
    wanted = fleet_members(args.boots, args.clinics, args.clinic_prefix)
    added = 0
    for key in wanted:
        if key in existing and key in known:
            continue
        if key in existing:
            # An account whose password nobody here knows any more (the credentials volume
            # was lost): replace it, so the simulated boot can log in again.
            clinic, device = key.split("/")
            rc = await provision.run(["boots", "remove", clinic, device, "--actor", ACTOR],
                                     settings)
            if rc != OK:
                return rc
        rc = await provision.run(add_argv(key, args.credentials_out), settings,
                                 stdout=io.StringIO())
        if rc != OK:
            return rc
        added += 1
    extra = sorted(set(known) - set(wanted))
    if extra:
        _say(f"{len(extra)} boot(s) in {args.credentials_out} are not in the fleet any more "
             f"(e.g. {extra[0]}); kept: `boot-gateway boots remove` them if they should go")
    _say(f"fleet of {len(wanted)} simulated boots: {added} account(s) added, "
         f"{len(wanted) - added} kept; credentials in {args.credentials_out}")
    return OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:
        return OK if exc.code == 0 else USAGE
    # Structured like the gateway's (the audit records of `boots add` among them).
    setup_logging(os.environ.get("BOOTGW_LOG_LEVEL", "INFO"),
                  os.environ.get("BOOTGW_LOG_FORMAT", "json"))
    if args.step == "broker":
        return step_broker(args)
    return asyncio.run(_step_boots(args))


if __name__ == "__main__":
    sys.exit(main())
