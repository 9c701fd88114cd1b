"""Helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from device_sim.local_stack import LocalInflux, LocalMosquitto, count, free_port
from gateway.contract import Mode, ProgramTiming, SessionProgram
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


def short_program(chambers: int = 4, duration_s: float = 6.0, target: float = 60.0
                  ) -> SessionProgram:
    """A real program compressed in time, for tests whose limits allow short sessions."""
    return SessionProgram(
        name="test_short", mode=Mode.SEQUENTIAL,
        targets_mmhg=[target - 2 * i for i in range(chambers)], duration_s=duration_s,
        timing=ProgramTiming(inflate_s=0.4, hold_s=0.8, deflate_s=0.8, pause_s=0.4),
    )


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll a condition that has no event of its own (e.g. a server-side counter)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class RunningGateway:
    gw: Gateway
    api: httpx.AsyncClient
    influx: LocalInflux
    db: str
    clinic_prefix: str

    def clinic(self, n: int = 1) -> str:
        return f"{self.clinic_prefix}{n}"

    async def flush(self) -> None:
        assert await self.gw.writer.flush(timeout=15), "storage did not flush"

    def count(self, q: str) -> int:
        return count(self.influx, self.db, q)

    def query(self, q: str) -> list[dict[str, Any]]:
        return self.influx.query(self.db, q)


# Spools and journals of test gateways, removed when the test process exits (they were left
# in /tmp: thousands of directories after a few runs).
_SCRATCH = tempfile.TemporaryDirectory(prefix="gw-tests-")


def mqtt_of(mosquitto: LocalMosquitto) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=mosquitto.port)


def gateway_settings(mosquitto: LocalMosquitto, server: LocalInflux, db: str | None = None,
                     **over: Any) -> GatewaySettings:
    """Test settings: short programs allowed, fast flushes, tight silence floor.

    The API is open (`allow_anonymous`, every caller is ops): explicitly, since a gateway
    refuses to start with no API user otherwise. Pass `api=` for users or a token."""
    return GatewaySettings(
        gateway_id=over.pop("gateway_id", "gw-test"),
        mqtt=MqttSettings(host="127.0.0.1", port=mosquitto.port,
                          client_id=f"gw-{secrets.token_hex(4)}"),
        influx=over.pop("influx", None) or InfluxSettings(
            url=server.url, database=db or f"t_{secrets.token_hex(4)}", flush_interval_s=0.1,
            spool_dir=Path(tempfile.mkdtemp(prefix="gw-spool-", dir=_SCRATCH.name))),
        api=over.pop("api", None) or ApiSettings(port=free_port(), allow_anonymous=True),
        programs=ProgramLimits(min_duration_s=2, min_cycle_s=1, min_release_s=1, start_expiry_s=5),
        watchdog=over.pop("watchdog", WatchdogSettings(telemetry_loss_floor_s=1.0)),
        command_ack_timeout_s=over.pop("command_ack_timeout_s", 5),
        heartbeat_interval_s=0.5,
        session_journal=over.pop("session_journal", None) or Path(
            tempfile.mkdtemp(prefix="gw-state-", dir=_SCRATCH.name)) / "sessions.jsonl",
        **over,
    )


@contextlib.asynccontextmanager
async def running_gateway(settings: GatewaySettings, influx: LocalInflux,
                          clinic_prefix: str | None = None, token: str | None = None
                          ) -> AsyncIterator[RunningGateway]:
    """A gateway with its API on a free port, shut down (bounded) on exit; `api` sends
    `token` as its bearer token when given."""
    gw = Gateway(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(gw, stop))
    base = f"http://127.0.0.1:{settings.api.port}"
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=base, timeout=20, headers=headers) as api:
            async with asyncio.timeout(10):
                await gw.ready.wait()
            deadline = time.monotonic() + 10
            while True:
                try:
                    if (await api.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "API did not come up"
                await asyncio.sleep(0.05)
            yield RunningGateway(gw, api, influx, settings.influx.database,
                                 clinic_prefix or f"c{secrets.token_hex(3)}-")
    finally:
        stop.set()
        async with asyncio.timeout(20):  # a gateway that cannot shut down fails the test
            await task


GRAFANA_GENERATOR = Path(__file__).resolve().parent.parent / "grafana" / "generate.py"


def grafana_generator() -> ModuleType:
    """grafana/generate.py, imported by path: grafana/ is mounted into Grafana, not a package."""
    if "grafana_generate" in sys.modules:
        return sys.modules["grafana_generate"]
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA_GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["grafana_generate"] = module  # loaded once per test run
    spec.loader.exec_module(module)
    return module
