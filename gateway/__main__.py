"""`python -m gateway`: the gateway service with its HTTP API, until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from gateway.logs import setup_logging
from gateway.server import serve
from gateway.service import Gateway
from gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    setup_logging(settings.log_level, settings.log_format)

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(Gateway(settings), stop)

    asyncio.run(_run())


if __name__ == "__main__":
    main()
