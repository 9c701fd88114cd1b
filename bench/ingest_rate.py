"""How many telemetry messages per second one gateway process takes in, and at what CPU.

One publisher (not hundreds of simulated clients, so the gateway is what is measured)
announces N boots and streams telemetry for them at a fixed total rate to a private
Mosquitto; the gateway (`python -m gateway`, its own process) writes to a private influxd.

    .venv/bin/python bench/ingest_rate.py --rate 1000 --rate 2000 --rate 4000

Prints one JSON line per rate: messages sent, received, seconds to drain, gateway CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reaction_time import cpu_seconds, start_gateway  # noqa: E402
from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port  # noqa: E402
from gateway.contract import BootState, Channel, Phase, Telemetry, topic  # noqa: E402


async def measure(rate: int, boots: int, seconds: float) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    mq = LocalMosquitto("mosquitto", work / "mosquitto", free_port()).start()
    influx = LocalInflux("influxd", work / "influxdb", free_port()).start()
    api = free_port()
    env = {**os.environ, "BOOTGW_MQTT__PORT": str(mq.port), "BOOTGW_INFLUX__URL": influx.url,
           "BOOTGW_INFLUX__DATABASE": "bench", "BOOTGW_API__PORT": str(api),
           "BOOTGW_LOG_LEVEL": "WARNING", "BOOTGW_CONFIG_FILE": str(work / "none.toml")}
    gw = start_gateway(env, work / "gateway.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await http.get("/health")).json()["mqtt_connected"]:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not come up; see {work}")
                await asyncio.sleep(0.2)
            async with aiomqtt.Client("127.0.0.1", mq.port,
                                      protocol=aiomqtt.ProtocolVersion.V5) as client:
                for i in range(boots):
                    state = BootState(online=True, firmware="bench", chambers=4,
                                      zones=["foot", "calf", "knee", "thigh"],
                                      max_pressure_mmhg=120, telemetry_period_s=boots / rate,
                                      ts=time.time())
                    await client.publish(topic("bench", f"b{i}", Channel.STATE),
                                         state.to_payload(), qos=1, retain=True)
                await asyncio.sleep(1.0)
                cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
                sent = 0
                while time.monotonic() - t0 < seconds:
                    for i in range(boots):
                        sample = Telemetry(seq=sent, ts=time.time(), phase=Phase.IDLE,
                                           pressures=[1.0, 2.0, 3.0, 4.0])
                        await client.publish(topic("bench", f"b{i}", Channel.TELEMETRY),
                                             sample.to_payload(), qos=0)
                        sent += 1
                        if sent % 50 == 0:  # pace to the target rate
                            await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
                send_s = time.monotonic() - t0
            received = 0
            for _ in range(150):
                received = (await http.get("/api/v1/stats")).json()["messages"].get(
                    "telemetry", 0)
                if received >= sent:
                    break
                await asyncio.sleep(0.2)
            drained_s = time.monotonic() - t0
            cpu = cpu_seconds(gw.pid) - cpu0
        return {"target_rate": rate, "boots": boots, "sent": sent,
                "send_s": round(send_s, 1), "received": received,
                "drained_s": round(drained_s, 1),
                "received_per_s": round(received / drained_s, 1),
                "gateway_cpu_percent": round(100 * cpu / drained_s, 1)}
    finally:
        gw.terminate()
        gw.wait(60)
        influx.stop()
        mq.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, action="append", help="msg/s; repeat for several")
    p.add_argument("--boots", type=int, default=500)
    p.add_argument("--seconds", type=float, default=15.0)
    args = p.parse_args()
    for rate in args.rate or [1000, 2000]:
        print(json.dumps(asyncio.run(measure(rate, args.boots, args.seconds))), flush=True)


if __name__ == "__main__":
    main()
