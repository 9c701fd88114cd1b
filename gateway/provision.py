"""`boot-gateway boots ...` and `boot-gateway broker init`: broker identities for the fleet.

    boot-gateway broker init FILE [--gateway-password-file F] [--force]
    boot-gateway boots add CLINIC DEVICE [--password-file F] [--credentials-out F]
                                          [--client-id ID] [--password-stdin] [--actor NAME]
    boot-gateway boots remove CLINIC DEVICE [--credentials-out F] [--actor NAME]
    boot-gateway boots list [--clinic C] [--json]

Settings as for the gateway (`BOOTGW_...`, `bootgw.toml`): the broker from `mqtt.*` (TLS
included), the admin account from `broker_admin.*`. Every add and remove is an audit record
(actor, role `ops`) in the log and, best effort, in InfluxDB (`audit` measurement).

Exit codes: 0 done, 1 refused (nothing changed; the reason on stderr), 2 bad arguments,
3 failed (broker unreachable, login refused, no answer, InfluxDB is never a reason).
A generated password goes to stdout alone (or to the files given), so that
`PW=$(boot-gateway boots add c1 d1)` works; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import httpx

from gateway.audit import AuditAction, AuditEvent, AuditResult, audit_point, log_audit
from gateway.boot_credentials import BootCredentials, CredentialsError, update_credentials
from gateway.broker_admin import (
    DEFAULT_GATEWAY_USERNAME,
    Account,
    BrokerAdmin,
    BrokerAdminError,
    ProvisionRefused,
    generate_password,
    initial_config,
    read_secret_file,
    write_initial_config,
)
from gateway.contract import is_valid_clinic, is_valid_id
from gateway.redact import redact
from gateway.settings import GatewaySettings
from gateway.storage import influx_client

T = TypeVar("T")
log = logging.getLogger("gateway.provision")

OK, REFUSED, USAGE, FAILED = 0, 1, 2, 3
AUDIT_ROLE = "ops"
# The CLI waits this long at most for InfluxDB: the audit record there is best effort.
AUDIT_WRITE_TIMEOUT_S = 5.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="boot-gateway", description="broker identities: "
                                "one account per boot (docs/deploy.md §2.2)")
    top = p.add_subparsers(dest="area", required=True)

    boots = top.add_parser("boots", help="add, remove, list boots' broker accounts")
    sub = boots.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create a boot's account: username = device id, its "
                         "client id bound, its own topics only; prints the password once")
    add.add_argument("clinic")
    add.add_argument("device")
    add.add_argument("--password-file", type=Path, help="write the password here (mode "
                     "0600, must not exist) instead of printing it")
    add.add_argument("--credentials-out", type=Path, help="add the boot to this credentials "
                     "file (JSON, mode 0600) for the simulator's --credentials")
    add.add_argument("--client-id", help="the client id to bind (default boot-CLINIC-DEVICE)")
    add.add_argument("--password-stdin", action="store_true", help="use the password read "
                     "from stdin (e.g. set at manufacturing) instead of generating one")
    add.add_argument("--actor", help="who is doing this, for the audit trail (default: "
                     "the OS user)")
    rm = sub.add_parser("remove", help="delete a boot's account and role, disconnect it, "
                        "clear its retained state")
    rm.add_argument("clinic")
    rm.add_argument("device")
    rm.add_argument("--credentials-out", type=Path, help="drop the boot from this "
                    "credentials file as well")
    rm.add_argument("--actor", help="who is doing this, for the audit trail")
    ls = sub.add_parser("list", help="the provisioned boots")
    ls.add_argument("--clinic")
    ls.add_argument("--json", action="store_true", help="one JSON array on stdout")

    broker = top.add_parser("broker", help="the broker's dynamic-security file")
    bsub = broker.add_subparsers(dest="command", required=True)
    init = bsub.add_parser("init", help="write the plugin's initial file: the admin "
                           "(broker_admin.*) and the gateway (mqtt.username, mqtt.client_id)")
    init.add_argument("file", type=Path, help="the file plugin_opt_config_file names")
    init.add_argument("--gateway-password-file", type=Path, help="the gateway's password: "
                      "read from this file, or generated into it (0600) if it does not exist; "
                      "needed unless mqtt.password / mqtt.password_file is set")
    init.add_argument("--force", action="store_true", help="replace an existing file (it "
                      "holds every provisioned boot: they would all be locked out)")
    return p


def _actor(given: str | None) -> str:
    if given is not None:
        if not is_valid_id(given):
            raise ProvisionRefused(f"--actor {given!r} is not an id (letters, digits, '_', '-')")
        return given
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    if not is_valid_id(user):
        raise ProvisionRefused("the OS user name is not an id; give --actor NAME")
    return user


async def _store_audit(settings: GatewaySettings, event: AuditEvent) -> None:
    """The record in the log, and in InfluxDB if it answers; a failure there is logged only."""
    log_audit(event)
    influx = settings.influx
    params = {"db": influx.database, "precision": "u"}
    if influx.retention_policy:
        params["rp"] = influx.retention_policy
    line = audit_point(event, int(time.time() * 1_000_000)).encode()
    try:
        # The gateway's own client: the same credentials, CA and TLS checks as its writes.
        async with influx_client(influx) as c:
            resp = await c.post("/write", params=params, content=line.encode(),
                                timeout=min(influx.timeout_s, AUDIT_WRITE_TIMEOUT_S))
        if resp.status_code != 204:
            log.warning("audit record not stored in InfluxDB", extra={
                "status": resp.status_code, "error": redact(resp.text[:200])})
    except httpx.HTTPError as exc:
        log.warning("audit record not stored in InfluxDB",
                    extra={"error": redact(str(exc) or type(exc).__name__)})


async def _audited(settings: GatewaySettings, base: dict[str, Any],
                   change: Callable[[BrokerAdmin], Awaitable[T]]) -> T:
    """Run one change on the broker; a refusal or a failure is audited before it is raised
    (what was done is audited by the caller, with what it did)."""
    try:
        async with BrokerAdmin.from_settings(settings) as admin:
            return await change(admin)
    except ProvisionRefused as exc:
        await _store_audit(settings, AuditEvent(**base, result=AuditResult.REFUSED,
                                                detail=str(exc)))
        raise
    except BrokerAdminError as exc:
        await _store_audit(settings, AuditEvent(**base, result=AuditResult.FAILED,
                                                detail=str(exc)))
        raise


def _write_password_file(path: Path, password: str) -> None:
    """Create `path` with mode 0600 and the password; never overwrite (O_EXCL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(password + "\n")


async def _boots_add(args: argparse.Namespace, settings: GatewaySettings, stdin: TextIO,
                     out: TextIO, err: TextIO) -> int:
    actor = _actor(args.actor)
    valid = is_valid_clinic(args.clinic) and is_valid_id(args.device)
    base: dict[str, Any] = dict(actor=actor, role=AUDIT_ROLE, action=AuditAction.BOOT_ADD,
                clinic=args.clinic if valid else None, device=args.device if valid else None)
    password = None
    if args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    if args.password_file is not None and args.password_file.exists():
        raise ProvisionRefused(f"{args.password_file} exists; it is never overwritten")
    new = await _audited(settings, base, lambda admin: admin.add_boot(
        args.clinic, args.device, password=password, client_id=args.client_id))
    boot = new.boot
    await _store_audit(settings, AuditEvent(**base, result=AuditResult.DONE,
                                            detail="broker account created",
                                            ids={"client_id": boot.client_id or ""}))
    creds = BootCredentials(boot.username, new.password, boot.client_id)
    stored = []
    try:
        if args.password_file is not None:
            _write_password_file(args.password_file, new.password)
            stored.append(str(args.password_file))
        if args.credentials_out is not None:
            update_credentials(args.credentials_out, boot.key, creds)
            stored.append(str(args.credentials_out))
    except (OSError, CredentialsError) as exc:
        # The account exists; only printing the password keeps it usable.
        err.write(f"could not store the password ({exc}); here it is, once:\n")
        out.write(new.password + "\n")
        return FAILED
    err.write(f"boot {boot.key} added: username {boot.username}, client id {boot.client_id}"
              + (f"; password in {', '.join(stored)}\n" if stored else
                 "; its password (shown once, put it in the boot's secure storage):\n"))
    if not stored and not args.password_stdin:
        out.write(new.password + "\n")
    return OK


async def _boots_remove(args: argparse.Namespace, settings: GatewaySettings, err: TextIO
                        ) -> int:
    actor = _actor(args.actor)
    valid = is_valid_clinic(args.clinic) and is_valid_id(args.device)
    base: dict[str, Any] = dict(actor=actor, role=AUDIT_ROLE, action=AuditAction.BOOT_REMOVE,
                clinic=args.clinic if valid else None, device=args.device if valid else None)
    boot = await _audited(settings, base,
                          lambda admin: admin.remove_boot(args.clinic, args.device))
    await _store_audit(settings, AuditEvent(**base, result=AuditResult.DONE,
                                            detail="broker account deleted, retained state "
                                            "cleared"))
    if args.credentials_out is not None:
        update_credentials(args.credentials_out, boot.key, None)
    err.write(f"boot {boot.key} removed: account and role deleted, disconnected, retained "
              "state cleared\n")
    return OK


async def _boots_list(args: argparse.Namespace, settings: GatewaySettings, out: TextIO) -> int:
    async with BrokerAdmin.from_settings(settings) as admin:
        boots = await admin.list_boots(args.clinic)
    if args.json:
        out.write(json.dumps([{"clinic": b.clinic, "device": b.device, "username": b.username,
                               "client_id": b.client_id} for b in boots]) + "\n")
    else:
        out.write("clinic\tdevice\tclient_id\n")
        for b in boots:
            out.write(f"{b.clinic}\t{b.device}\t{b.client_id or '-'}\n")
    return OK


def _secret_or_generated(path: Path | None, setting: str, err: TextIO) -> str | None:
    """The password in `path`, or a new one written there (0600) if it does not exist."""
    if path is None:
        return None
    if path.exists():
        return read_secret_file(path, setting)
    password = generate_password()
    _write_password_file(path, password)
    err.write(f"generated {setting}: {path}\n")
    return password


def _broker_init(args: argparse.Namespace, settings: GatewaySettings, err: TextIO) -> int:
    a, m = settings.broker_admin, settings.mqtt
    if a.password is not None:
        admin_pw: str | None = a.password.get_secret_value()
    else:
        admin_pw = _secret_or_generated(a.password_file, "broker_admin.password_file", err)
    if admin_pw is None:
        raise ProvisionRefused("no admin password: set BOOTGW_BROKER_ADMIN__PASSWORD_FILE "
                               "(created with a generated password if missing)")
    if m.password is not None:
        gw_pw: str | None = m.password.get_secret_value()
    elif m.password_file is not None:
        gw_pw = read_secret_file(m.password_file, "mqtt.password_file")
    else:
        gw_pw = _secret_or_generated(args.gateway_password_file, "the gateway's password", err)
    if gw_pw is None:
        raise ProvisionRefused("no gateway password: set BOOTGW_MQTT__PASSWORD_FILE or give "
                               "--gateway-password-file")
    gateway_user = m.username or DEFAULT_GATEWAY_USERNAME
    doc = initial_config(Account(a.username, a.client_id, admin_pw),
                         Account(gateway_user, m.client_id, gw_pw),
                         min_password_chars=a.min_password_chars)
    write_initial_config(args.file, doc, force=args.force)
    err.write(f"{args.file} written (mode 0600): admin {a.username!r} (client id "
              f"{a.client_id!r}), gateway {gateway_user!r} (client id {m.client_id!r}), "
              "default access deny, no boots yet. Point plugin_opt_config_file at it"
              + ("" if m.username else f"; set BOOTGW_MQTT__USERNAME={gateway_user}") + ".\n")
    return OK


async def run(argv: list[str], settings: GatewaySettings | None = None, *,
              stdin: TextIO | None = None, stdout: TextIO | None = None,
              stderr: TextIO | None = None) -> int:
    """The commands, for a caller that already runs an event loop (tests); `cli` otherwise."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the reason
        return OK if exc.code == 0 else USAGE
    try:
        settings = settings or GatewaySettings()
        if args.area == "broker":
            return _broker_init(args, settings, err)
        if args.command == "add":
            return await _boots_add(args, settings, stdin or sys.stdin, out, err)
        if args.command == "remove":
            return await _boots_remove(args, settings, err)
        return await _boots_list(args, settings, out)
    except ProvisionRefused as exc:
        err.write(f"refused: {exc}\n")
        return REFUSED
    except (BrokerAdminError, CredentialsError, OSError) as exc:
        err.write(f"failed: {exc}\n")
        return FAILED
    except ValueError as exc:  # settings that do not validate
        err.write(f"configuration error: {exc}\n")
        return USAGE


def cli(argv: list[str]) -> int:
    """Entry point from `boot-gateway` (gateway/__main__.py)."""
    from gateway.logs import setup_logging

    try:
        settings = GatewaySettings()
    except ValueError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        return USAGE
    setup_logging(settings.log_level, settings.log_format)
    return asyncio.run(run(argv, settings))
