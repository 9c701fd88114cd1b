"""Fixtures: a real Mosquitto and a real influxd per test session, a fresh gateway per test.

Each test gets its own database, gateway client id, API port and clinic ids, so tests sharing
the servers cannot see each other's data.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port
from gateway.server import serve
from gateway.service import Gateway
from gateway.settings import (
    ApiSettings,
    GatewaySettings,
    InfluxSettings,
    MqttSettings,
    ProgramLimits,
    WatchdogSettings,
)
from tests.helpers import RunningGateway


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMosquitto]:
    server = LocalMosquitto("mosquitto", tmp_path_factory.mktemp("mosquitto"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInflux]:
    server = LocalInflux("influxd", tmp_path_factory.mktemp("influxd"), free_port())
    server.start()
    yield server
    server.stop()


def gateway_settings(mosquitto: LocalMosquitto, influx: LocalInflux, db: str, **over: Any
                     ) -> GatewaySettings:
    return GatewaySettings(
        gateway_id="gw-test",
        mqtt=MqttSettings(host="127.0.0.1", port=mosquitto.port,
                          client_id=f"gw-{secrets.token_hex(4)}"),
        influx=InfluxSettings(url=influx.url, database=db, flush_interval_s=0.1),
        api=ApiSettings(port=free_port()),
        programs=ProgramLimits(min_duration_s=2, min_cycle_s=1, start_expiry_s=5),
        watchdog=over.pop("watchdog", WatchdogSettings(telemetry_loss_floor_s=1.0)),
        command_ack_timeout_s=5,
        heartbeat_interval_s=0.5,
        **over,
    )


@pytest.fixture
async def gateway(mosquitto: LocalMosquitto, influx: LocalInflux) -> AsyncIterator[RunningGateway]:
    db = f"t_{secrets.token_hex(4)}"
    settings = gateway_settings(mosquitto, influx, db)
    gw = Gateway(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(gw, stop))
    base = f"http://127.0.0.1:{settings.api.port}"
    async with httpx.AsyncClient(base_url=base, timeout=20) as api:
        await asyncio.wait_for(gw.ready.wait(), 10)

        async def api_up() -> bool:
            try:
                return (await api.get("/health")).status_code == 200
            except httpx.HTTPError:
                return False

        deadline = time.monotonic() + 10
        while not await api_up():
            assert time.monotonic() < deadline, "API did not come up"
            await asyncio.sleep(0.05)
        yield RunningGateway(gw, api, influx, db, f"c{secrets.token_hex(3)}-")
    stop.set()
    async with asyncio.timeout(20):  # a gateway that cannot shut down fails the test
        await task
