"""Points lost, gateway memory and spool drain time across an InfluxDB outage.

A publisher streams telemetry (QoS 1: every message counted was accepted by the broker) for
500 boots at 1,000 msg/s through a private Mosquitto to the gateway (`python -m gateway`, its
own process). InfluxDB is killed (SIGKILL) for `--outage-s` seconds and restarted; the stream
goes on all along. Reported: points lost (published minus stored; must be 0), the gateway's
peak RSS, how long the spool took to drain after InfluxDB came back, with live data flowing.

    .venv/bin/python bench/spool_drain.py --rate 1000 --outage-s 60
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

from bench.common import Publisher, rss_mb, stack
from device_sim.local_stack import count


async def measure(args: argparse.Namespace) -> dict[str, object]:
    async with stack("spool", INFLUX__TIMEOUT_S="2", INFLUX__RETRY_MAX_S="5") as st:
        async with aiomqtt.Client("127.0.0.1", st.mq.port,
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            pub = Publisher(client, args.boots)
            await pub.announce(telemetry_period_s=args.boots / args.rate)
            total_s = args.before_s + args.outage_s + args.after_s
            streaming = asyncio.create_task(pub.stream(args.rate, total_s, qos=1))
            await asyncio.sleep(args.before_s)
            st.influx.kill()
            killed_at = time.monotonic()
            rss_samples = []
            while time.monotonic() - killed_at < args.outage_s:
                rss_samples.append(rss_mb(st.gw.pid, peak=False))
                await asyncio.sleep(1.0)
            stats = await st.stats()
            spooled_at_restart = stats["spool_points"]
            st.influx.start()
            back_at = time.monotonic()
            drained_s = None
            while time.monotonic() - back_at < args.after_s + 300:
                stats = await st.stats()
                rss_samples.append(rss_mb(st.gw.pid, peak=False))
                if stats["spool_points"] == 0 and stats["influx_connected"]:
                    drained_s = time.monotonic() - back_at
                    break
                await asyncio.sleep(0.25)
            live_during_drain = not streaming.done()
            await streaming
        for _ in range(600):  # everything received and written
            stats = await st.stats()
            if (stats["messages"].get("telemetry", 0) >= pub.sent
                    and stats["storage_queue"] == 0 and stats["spool_points"] == 0):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # the last batch: one flush interval (1 s) and its write
        stored = count(st.influx, st.database, "SELECT count(seq) FROM telemetry")
        return {
            "rate_msgs_per_s": args.rate, "boots": args.boots, "outage_s": args.outage_s,
            "published_qos1": pub.sent, "received": stats["messages"].get("telemetry", 0),
            "stored": stored, "points_lost": pub.sent - stored,
            "spooled_points_at_restart": spooled_at_restart,
            "points_spooled": stats["points_spooled"], "points_replayed": stats["points_replayed"],
            "spool_drain_s": None if drained_s is None else round(drained_s, 1),
            "live_stream_during_drain": live_during_drain,
            "gateway_peak_rss_mb": round(rss_mb(st.gw.pid), 1),
            "gateway_rss_during_outage_max_mb": round(max(rss_samples), 1),
            "storage_queue_peak": stats["storage_queue_peak"],
            "points_dropped": stats["points_dropped"],  # every cause, spool full included
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--boots", type=int, default=500)
    p.add_argument("--before-s", type=float, default=10.0)
    p.add_argument("--outage-s", type=float, default=60.0)
    p.add_argument("--after-s", type=float, default=30.0, help="stream after the restart")
    p.add_argument("--out", type=Path)
    result = asyncio.run(measure(p.parse_args()))
    text = json.dumps(result, indent=2)
    print(text)
    args = p.parse_args()
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
