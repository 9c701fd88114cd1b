"""Run the gateway and its HTTP API together in one event loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from gateway.aio import cancel_and_wait
from gateway.api import create_app
from gateway.api_users import ApiClosedError
from gateway.redact import redact
from gateway.service import Gateway

log = logging.getLogger("gateway")


async def serve(gateway: Gateway, stop: asyncio.Event | None = None) -> None:
    """Run gateway and API until `stop` is set (or forever); then shut down in order.

    An API with no users that is not open on purpose (api.allow_anonymous) is a refusal to
    start, raised before anything runs: `python -m gateway` then exits 1 with the reason logged.
    """
    settings = gateway.settings
    try:
        app = create_app(gateway)
    except ApiClosedError as exc:
        log.error("gateway refuses to start", extra={"reason": str(exc)})
        raise
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.api.host, port=settings.api.port,
        log_config=None, access_log=False, lifespan="off",
    ))
    gw_task = asyncio.create_task(gateway.run(), name="gateway")
    api_task = asyncio.create_task(server.serve(), name="api")
    log.info("gateway starting", extra={
        "gateway_id": settings.gateway_id, "broker": f"{settings.mqtt.host}:{settings.mqtt.port}",
        "influx": redact(settings.influx.url), "api": f"http://{settings.api.host}:{settings.api.port}"})
    waiters: list[asyncio.Task[Any]] = [gw_task, api_task]
    if stop is not None:
        waiters.append(asyncio.create_task(stop.wait(), name="stop"))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    results = await cancel_and_wait([t for t in waiters if t is not api_task])
    results.append((await asyncio.gather(api_task, return_exceptions=True))[0])
    failures = [r for r in results
                if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)]
    for r in failures:
        log.error("gateway task failed", exc_info=r)
    if failures:
        raise failures[0]  # a refusal to start (spool in use, port taken) is not a clean stop
