"""Helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from device_sim.local_stack import LocalInflux, LocalMosquitto, count
from gateway.contract import Mode, ProgramTiming, SessionProgram
from gateway.service import Gateway
from gateway.settings import MqttSettings


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


def mqtt_of(mosquitto: LocalMosquitto) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=mosquitto.port)
