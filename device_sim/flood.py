"""Hostile outside traffic, for the tests and benches that show it cannot stall the safety path.

Each flood is meant to run in a process of its own, as an attacker's would, so that its own CPU
time is not spent inside the gateway's event loop:

    python -m device_sim.flood api --url http://127.0.0.1:8080 --token T --seconds 10
    python -m device_sim.flood mqtt --port 1883 --clinic c1 --device quiet --seconds 10

`api`: many concurrent clients, each sending one kind of request in a loop (`--kinds`): 20 MB
bodies without a token (401 unread), 20 MB bodies with the token, with and without
Content-Length (413), small bodies that are not JSON (422), valid authenticated GETs.
`mqtt`: one client publishing payloads that every gateway must reject (not JSON, invalid,
larger than `max_payload_bytes`, topics outside the contract), on the topics of the boots
named and of made-up ones, QoS 0, as fast as it can or at `--rate`. Both print a first line
`flooding` once in force, and a JSON summary of what they sent (and, for `api`, the status
codes received) when they stop (SIGTERM or the time is up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

BIG = 20 << 20  # what took 650 ms to parse before the API's gate (docs/safety.md §6)
GETS = ("/api/v1/boots", "/api/v1/stats", "/api/v1/alarms", "/health")
SESSION = "/api/v1/boots/{clinic}/{device}/session"


async def _big_body(size: int) -> AsyncIterator[bytes]:
    """A body sent chunked (no Content-Length), so only counting bytes can refuse it."""
    chunk = b"1," * (1 << 15)
    sent = 0
    while sent < size:
        yield chunk
        sent += len(chunk)


API_KINDS = ("big_no_token", "big_token", "big_chunked_token", "bad_json", "get", "get", "get")


async def api_flood(url: str, token: str | None, seconds: float, concurrency: int,
                    clinic: str, device: str, stop: asyncio.Event,
                    started: Callable[[], None] = lambda: None,
                    kinds: tuple[str, ...] = API_KINDS) -> dict[str, object]:
    """Client n sends only requests of `kinds[n % len(kinds)]`, so the GETs never wait
    behind an upload. `started` is called once, at the first answer: the flood is in force."""
    import httpx  # only this flood needs it

    big = b'{"custom": {"targets_mmhg": [' + b"1," * (BIG // 2) + b'1]}}'
    path = SESSION.format(clinic=clinic, device=device)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    json_type = {"content-type": "application/json"}
    codes: Counter[str] = Counter()

    async def worker(n: int) -> None:
        kind = kinds[n % len(kinds)]
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            while True:
                try:
                    if kind == "big_no_token":
                        r = await client.post(path, content=big, headers=json_type)
                    elif kind == "big_token":
                        r = await client.post(path, content=big, headers=auth | json_type)
                    elif kind == "big_chunked_token":
                        r = await client.post(path, content=_big_body(BIG),
                                              headers=auth | json_type)
                    elif kind == "bad_json":
                        r = await client.post(path, content=b'{"program": ', headers=auth
                                              | json_type)
                    else:
                        r = await client.get(random.choice(GETS), headers=auth)
                    codes[f"{kind}:{r.status_code}"] += 1
                except httpx.HTTPError as exc:
                    # the gateway may answer and close before the body is sent: expected
                    codes[f"{kind}:{type(exc).__name__}"] += 1
                if sum(codes.values()) == 1:
                    started()

    t0 = time.monotonic()
    tasks = [asyncio.create_task(worker(n)) for n in range(concurrency)]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    for task in tasks:  # mid-request too: a 20 MB upload is not waited for
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - t0
    requests = sum(codes.values())
    return {"flood": "api", "requests": requests, "seconds": round(elapsed, 2),
            "rate": round(requests / elapsed, 1) if elapsed else 0.0, "codes": dict(codes)}


def _bad_payloads(max_payload_bytes: int) -> list[tuple[str, bytes]]:
    """(channel, payload) pairs a gateway must reject; none of them is valid for any boot."""
    return [
        ("telemetry", b"\x00\xff not json"),
        ("telemetry", b'{"seq": "one", "ts": 1, "phase": "hold", "pressures": [1]}'),
        ("telemetry", b'{"seq": 1, "ts": 1, "phase": "hold", "pressures": "high"}'),
        ("state", b'{"online": "maybe"}'),
        ("event", b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["),
        ("ack", b'{"cmd_id": 5}'),
        ("telemetry", b"[" + b"1," * (max_payload_bytes // 2 + 16) + b"1]"),  # too large
    ]


async def mqtt_flood(host: str, port: int, boots: list[tuple[str, str]], seconds: float,
                     rate: float, max_payload_bytes: int, stop: asyncio.Event,
                     started: Callable[[], None] = lambda: None) -> dict[str, object]:
    """`started` is called once the first 100 messages are out."""
    import aiomqtt  # only this flood needs it

    payloads = _bad_payloads(max_payload_bytes)
    targets = boots + [(clinic, f"ghost-{i}") for clinic, _ in boots[:1] for i in range(20)]
    sent = 0
    t0 = time.monotonic()
    async with aiomqtt.Client(host, port, identifier=f"flood-{random.getrandbits(32):08x}",
                              max_queued_outgoing_messages=10_000) as client:
        while not stop.is_set() and time.monotonic() - t0 < seconds:
            channel, payload = payloads[sent % len(payloads)]
            clinic, device = targets[sent % len(targets)]
            name = (f"boots/v1/{clinic}/{device}/{channel}" if sent % 11 else
                    f"boots/v1/{clinic}/{device}/{channel}/extra/levels")  # outside the contract
            await client.publish(name, payload, qos=0)
            sent += 1
            if sent == 100:
                started()
            if rate > 0:
                ahead = t0 + sent / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            elif sent % 200 == 0:
                await asyncio.sleep(0)  # let paho write what it has queued
    elapsed = time.monotonic() - t0
    return {"flood": "mqtt", "messages": sent, "seconds": round(elapsed, 2),
            "rate": round(sent / elapsed, 1) if elapsed else 0.0}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device_sim.flood", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("api", help="flood the gateway's HTTP API")
    a.add_argument("--url", required=True)
    a.add_argument("--token", help="the valid bearer token (some requests carry it)")
    a.add_argument("--concurrency", type=int, default=32)
    a.add_argument("--clinic", default="c1")
    a.add_argument("--device", default="b1")
    a.add_argument("--kinds", default=",".join(API_KINDS), help="comma-separated mix of "
                   f"{', '.join(sorted(set(API_KINDS)))}; one kind per client, in turn")
    m = sub.add_parser("mqtt", help="flood boot topics with payloads the gateway must reject")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--clinic", required=True)
    m.add_argument("--device", action="append", default=[],
                   help="a boot whose topics get bad payloads too (repeatable)")
    m.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: as fast as it can")
    m.add_argument("--max-payload-bytes", type=int, default=16_384)
    for sp in (a, m):
        sp.add_argument("--seconds", type=float, default=3600.0)
    return p


async def _main(args: argparse.Namespace) -> dict[str, object]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def started() -> None:
        print("flooding", flush=True)  # the first line: a parent may wait for it

    if args.command == "api":
        kinds = tuple(k for k in args.kinds.split(",") if k)
        if not kinds or set(kinds) - set(API_KINDS):
            raise SystemExit(f"--kinds: choose from {sorted(set(API_KINDS))}")
        return await api_flood(args.url, args.token, args.seconds, args.concurrency,
                               args.clinic, args.device, stop, started, kinds)
    boots = [(args.clinic, d) for d in args.device] or [(args.clinic, "b1")]
    return await mqtt_flood(args.host, args.port, boots, args.seconds, args.rate,
                            args.max_payload_bytes, stop, started)


def main() -> None:
    args = _parser().parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(asyncio.run(_main(args))), flush=True)


if __name__ == "__main__":
    main()
