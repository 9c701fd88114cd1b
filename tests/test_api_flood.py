"""An unauthenticated client cannot stall the gateway's event loop (and with it rule 5) by
posting large bodies: the gate answers before the body is read."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import SecretStr

from device_sim.local_stack import LocalInflux, LocalMosquitto
from gateway.settings import ApiSettings
from tests.helpers import gateway_settings, running_gateway

pytestmark = pytest.mark.integration

# 20 MB of JSON made of small values: costly to parse (about 5 million list items)
BODY = b'{"custom": {"targets_mmhg": [' + b"1," * (10 << 20) + b'1]}}'


async def test_large_unauthenticated_bodies_do_not_stall_the_event_loop(
        mosquitto: LocalMosquitto, influx: LocalInflux) -> None:
    settings = gateway_settings(mosquitto, influx)
    settings = settings.model_copy(update={"api": ApiSettings(
        port=settings.api.port, token=SecretStr("s3cret"))})
    async with running_gateway(settings, influx) as gw:
        base = f"http://127.0.0.1:{settings.api.port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as attacker:
            await asyncio.sleep(0.5)  # a few quiet ticks: the lag measured before is the idle one
            gw.gw.stats.loop_lag_max_ms = 0.0
            for _ in range(3):
                try:
                    r = await attacker.post("/api/v1/boots/c1/b1/session", content=BODY,
                                            headers={"content-type": "application/json"})
                    assert r.status_code == 401
                except httpx.HTTPError:
                    pass  # the server may close the connection without reading the rest
            await asyncio.sleep(0.3)  # let the ticker measure after the last request
        assert gw.gw.stats.loop_lag_max_ms < 100, gw.gw.stats.loop_lag_max_ms
