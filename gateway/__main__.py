"""`python -m gateway` / `boot-gateway`: the gateway service with its HTTP API, until
SIGINT/SIGTERM; with arguments, the provisioning commands (USAGE)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from pydantic import ValidationError

from gateway.gc_tuning import tune_for_latency
from gateway.logs import setup_logging
from gateway.server import serve
from gateway.service import Gateway
from gateway.settings import GatewaySettings


async def _tune_when_ready(gateway: Gateway) -> None:
    await gateway.ready.wait()
    await asyncio.sleep(1.0)  # let the API server finish starting: its objects are frozen too
    tune_for_latency(gateway.gc_pauses)


USAGE = """usage: boot-gateway                 run the gateway service (until SIGINT/SIGTERM)
       boot-gateway boots add|remove|list ...   boots' broker accounts (docs/deploy.md §2.2)
       boot-gateway broker init FILE ...        the broker's dynamic-security file
       boot-gateway users new|hash ...          HTTP API users
       boot-gateway certs init DIR --host ...   a private CA and the broker's certificate
"""


def _subcommand(args: list[str]) -> int:
    """The provisioning commands; imported only when asked for, so the service starts no
    slower for them."""
    if args[0] in ("boots", "broker"):
        from gateway.provision import cli as provision_cli

        return provision_cli(args)
    if args[0] == "users":
        from gateway.api_users import cli as users_cli

        return users_cli(args[1:])
    if args[0] == "certs":
        from gateway.certs import cli as certs_cli

        return certs_cli(args[1:])
    if args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    sys.stderr.write(f"unknown command {args[0]!r}\n{USAGE}")
    return 2


def main(argv: list[str] | None = None) -> None:
    """No arguments: the service. With arguments: one of the commands in USAGE."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        sys.exit(_subcommand(args))
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        # One line per refused setting, without the values (hide_input_in_errors): a service
        # manager's journal shows what to fix, and no secret.
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in err["loc"]) or "settings"
            sys.stderr.write(f"boot-gateway: configuration refused: {where}: {err['msg']}\n")
        sys.exit(2)
    setup_logging(settings.log_level, settings.log_format)

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        gateway = Gateway(settings)
        tuning = asyncio.create_task(_tune_when_ready(gateway))
        try:
            await serve(gateway, stop)
        finally:
            tuning.cancel()

    try:
        asyncio.run(_run())
    except Exception:  # logged by serve: the exit code tells the service manager
        sys.exit(1)


if __name__ == "__main__":
    main()
