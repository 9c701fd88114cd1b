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
import sys
import time
from pathlib import Path

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Publisher, cpu_seconds, stack


async def measure(rate: int, boots: int, seconds: float) -> dict[str, object]:
    async with stack("ingest") as st:
        async with aiomqtt.Client("127.0.0.1", st.mq.port,
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            pub = Publisher(client, boots)
            await pub.announce(telemetry_period_s=boots / rate)
            await asyncio.sleep(1.0)
            cpu0, t0 = cpu_seconds(st.gw.pid), time.monotonic()
            send_s = await pub.stream(rate, seconds)
        received = 0
        for _ in range(150):
            received = (await st.stats())["messages"].get("telemetry", 0)
            if received >= pub.sent:
                break
            await asyncio.sleep(0.2)
        drained_s = time.monotonic() - t0
        cpu = cpu_seconds(st.gw.pid) - cpu0
    return {"target_rate": rate, "boots": boots, "sent": pub.sent,
            "send_s": round(send_s, 1), "received": received,
            "drained_s": round(drained_s, 1),
            "received_per_s": round(received / drained_s, 1),
            "gateway_cpu_percent": round(100 * cpu / drained_s, 1)}


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
