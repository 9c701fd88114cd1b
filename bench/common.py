"""What the benchmarks share: a private broker, influxd and gateway process; a paced publisher."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port  # noqa: E402
from gateway.contract import BootState, Channel, Phase, Telemetry, topic  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, peak: bool = True) -> float:
    key = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def start_gateway(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=ROOT,
                                stdout=log, stderr=log)


@dataclass
class Stack:
    work: Path
    mq: LocalMosquitto
    influx: LocalInflux
    gw: subprocess.Popen[bytes]
    api: httpx.AsyncClient  # sends the ops token
    database: str
    token: str  # the gateway's api.token (BOOTGW_API__TOKEN)

    async def stats(self) -> dict[str, object]:
        return (await self.api.get("/api/v1/stats")).json()


@asynccontextmanager
async def stack(prefix: str, **gateway_env: str) -> AsyncIterator[Stack]:
    """Mosquitto, influxd and `python -m gateway` in a temporary directory, up and connected."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    mq = LocalMosquitto("mosquitto", work / "mosquitto", free_port()).start()
    influx = LocalInflux("influxd", work / "influxdb", free_port()).start()
    api_port = free_port()
    # The API is closed: the simple setup, one ops token (the caller's, if it gives one).
    token = gateway_env.get("api__token") or secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "BOOTGW_MQTT__PORT": str(mq.port),
        "BOOTGW_INFLUX__URL": influx.url,
        "BOOTGW_INFLUX__DATABASE": "bench",
        "BOOTGW_INFLUX__SPOOL_DIR": str(work / "spool"),
        "BOOTGW_SESSION_JOURNAL": str(work / "sessions.jsonl"),
        "BOOTGW_API__PORT": str(api_port),
        "BOOTGW_API__TOKEN": token,
        "BOOTGW_LOG_LEVEL": "WARNING",
        "BOOTGW_CONFIG_FILE": str(work / "none.toml"),
        **{f"BOOTGW_{k.upper()}": v for k, v in gateway_env.items()},
    }
    gw = start_gateway(env, work / "gateway.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30,
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await api.get("/health")).json()["mqtt_connected"]:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not come up; see {work}")
                await asyncio.sleep(0.2)
            yield Stack(work, mq, influx, gw, api, "bench", token)
    finally:
        if gw.poll() is None:
            gw.terminate()
            gw.wait(60)
        influx.stop()
        mq.stop()


class Publisher:
    """One MQTT client speaking for many boots: the gateway, not the simulator, is measured."""

    def __init__(self, client: aiomqtt.Client, boots: int, clinic: str = "bench") -> None:
        self.client = client
        self.boots = boots
        self.clinic = clinic
        self.sent = 0

    async def announce(self, telemetry_period_s: float) -> None:
        for i in range(self.boots):
            state = BootState(online=True, firmware="bench", chambers=4,
                              zones=["foot", "calf", "knee", "thigh"], max_pressure_mmhg=120,
                              telemetry_period_s=telemetry_period_s, ts=time.time())
            await self.client.publish(topic(self.clinic, f"b{i}", Channel.STATE),
                                      state.to_payload(), qos=1, retain=True)

    async def stream(self, rate: float, seconds: float, qos: int = 0) -> float:
        """Telemetry round-robin over the boots at `rate` msg/s; returns the seconds taken."""
        t0 = time.monotonic()
        start = self.sent
        while time.monotonic() - t0 < seconds:
            for i in range(self.boots):
                sample = Telemetry(seq=self.sent, ts=time.time(), phase=Phase.IDLE,
                                   pressures=[1.0, 2.0, 3.0, 4.0])
                await self.client.publish(topic(self.clinic, f"b{i}", Channel.TELEMETRY),
                                          sample.to_payload(), qos=qos)
                self.sent += 1
                if (self.sent - start) % 50 == 0:  # pace to the target rate
                    await asyncio.sleep(max(0.0, t0 + (self.sent - start) / rate
                                            - time.monotonic()))
        return time.monotonic() - t0
