"""`python -m gateway`: the gateway service with its HTTP API, until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from gateway.gc_tuning import tune_for_latency
from gateway.logs import setup_logging
from gateway.server import serve
from gateway.service import Gateway
from gateway.settings import GatewaySettings


async def _tune_when_ready(gateway: Gateway) -> None:
    await gateway.ready.wait()
    await asyncio.sleep(1.0)  # let the API server finish starting: its objects are frozen too
    tune_for_latency(gateway.gc_pauses)


def main() -> None:
    settings = GatewaySettings()
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
