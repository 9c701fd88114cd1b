"""The main job: real Mosquitto + InfluxDB, the gateway, a small fleet with one stuck valve.

Everything runs on this machine: the servers in their own data dirs and ports (or ones given
by settings), the gateway in this process with its HTTP API, and the boots as real MQTT
clients. Sessions are started through the HTTP API, as a clinic app would.

The API is closed, as in production: the demo makes a fresh token for an `ops` user named
`demo` (the gateway holds only its SHA-256), prints it so that the API can be tried while the
demo runs, and calls the API with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from device_sim.fleet import SimFleet
from device_sim.link_settings import BootLinkSettings
from device_sim.local_stack import LocalInflux, LocalMosquitto, count, free_port
from gateway.api_users import ApiUser, Role, hash_token, new_token
from gateway.logs import setup_logging
from gateway.schema import Measurement
from gateway.server import serve
from gateway.service import Gateway
from gateway.settings import ApiSettings, GatewaySettings, InfluxSettings, MqttSettings

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    boots: int = 8
    clinics: int = 2
    seconds: float = 40.0
    program: str = "post_workout_recovery"
    stuck_boot: int = 3  # 1-based index of the boot with the stuck valve; 0 for none
    stuck_chamber: int = 2  # 1-based
    telemetry_hz: float = 2.0
    workdir: Path = Path("run/demo")
    mqtt_host: str | None = None  # use an existing broker instead of starting one
    mqtt_port: int = 1883
    influx_url: str | None = None  # use an existing InfluxDB instead of starting one


def _line(out: TextIO, text: str = "") -> None:
    out.write(text + "\n")
    out.flush()


async def run_demo(opts: DemoOptions, out: TextIO) -> int:
    """Returns a process exit code: 0 when the stuck valve was vented and nothing else was."""
    t_start = time.monotonic()
    workdir = opts.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "gateway.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with log_path.open("w") as log_file:
        setup_logging("INFO", "json", log_file)
        servers: list[LocalMosquitto | LocalInflux] = []
        try:
            if opts.mqtt_host is None:
                mq = LocalMosquitto("mosquitto", workdir / "mosquitto", free_port()).start()
                servers.append(mq)
                mqtt = MqttSettings(host="127.0.0.1", port=mq.port)
            else:
                mqtt = MqttSettings(host=opts.mqtt_host, port=opts.mqtt_port)
            if opts.influx_url is None:
                influx = LocalInflux("influxd", workdir / "influxdb", free_port()).start()
                servers.append(influx)
            else:
                influx = LocalInflux("influxd", workdir / "influxdb", 0)
            influx_url = opts.influx_url or influx.url
            _line(out, f"broker   mqtt://{mqtt.host}:{mqtt.port}")
            _line(out, f"influxdb {influx_url} (database 'boots')")
            return await _run(opts, mqtt, influx_url, influx, out, log_path, t_start)
        finally:
            for s in servers:
                s.stop()
            # The log file closes here: a handler left on it would make every later log call
            # in this process fail (the demo runs inside other programs and the tests too).
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])


async def _run(opts: DemoOptions, mqtt: MqttSettings, influx_url: str, influx: LocalInflux,
               out: TextIO, log_path: Path, t_start: float) -> int:
    db = "boots"
    since_ms = int(time.time() * 1000)  # this run's points: the boots' clocks are this clock
    token = new_token()
    settings = GatewaySettings(
        mqtt=mqtt.model_copy(update={"client_id": "boot-gateway-demo"}),
        influx=InfluxSettings(url=influx_url, database=db, spool_dir=log_path.parent / "spool"),
        api=ApiSettings(port=free_port(), users=[
            ApiUser(name="demo", role=Role.OPS, token_sha256=hash_token(token))]),
        session_journal=log_path.parent / "sessions.jsonl",
    )
    gateway = Gateway(settings)
    stop = asyncio.Event()
    gw_task = asyncio.create_task(serve(gateway, stop))
    api_url = f"http://127.0.0.1:{settings.api.port}"
    _line(out, f"gateway  {api_url}/docs  (log: {log_path})")
    _line(out, f"api      user 'demo' (ops), while the demo runs: curl -H 'Authorization: "
          f"Bearer {token}' {api_url}/api/v1/boots")
    # The boots get a boot's settings (device_sim/link_settings.py), not the gateway's.
    boot_link = BootLinkSettings(host=mqtt.host, port=mqtt.port)
    fleet = SimFleet.make(opts.boots, opts.clinics, boot_link,
                          telemetry_period_s=1.0 / opts.telemetry_hz, seed=42)
    keys = list(fleet.boots)
    stuck_key = keys[opts.stuck_boot - 1] if 0 < opts.stuck_boot <= len(keys) else None
    try:
        await asyncio.wait_for(gateway.ready.wait(), 30)
        async with fleet, httpx.AsyncClient(base_url=api_url, timeout=15, headers={
                "Authorization": f"Bearer {token}"}) as api:
            await _wait_api(api)
            deadline = time.monotonic() + 15
            while not all(k in gateway.fleet.boots for k in keys):
                if time.monotonic() > deadline:
                    raise TimeoutError("boots did not all announce themselves")
                await asyncio.sleep(0.05)
            if stuck_key:
                fleet.boots[stuck_key].inject_stuck_valve(opts.stuck_chamber - 1)
                _line(out, f"fault    {stuck_key}: stuck valve on chamber {opts.stuck_chamber}")
            _line(out, f"start    '{opts.program}' on {len(keys)} boots through the HTTP API")
            for key in keys:
                clinic, device = key.split("/")
                r = await api.post(f"/api/v1/boots/{clinic}/{device}/session",
                                   json={"program": opts.program})
                status = r.json().get("outcome") if r.status_code == 202 else r.text
                _line(out, f"         {key:<22} {r.status_code} {status}")
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < opts.seconds:
                await asyncio.sleep(min(5.0, opts.seconds - elapsed))
                c = gateway.fleet.counts()
                _line(out, f"t+{time.monotonic() - t0:4.0f}s  online {c['online']}/{len(keys)}"
                      f"  in session {c['in_session']}  telemetry "
                      f"{gateway.stats.messages['telemetry']}  vents {gateway.stats.vents_sent}")
            for key in keys:
                if gateway.fleet.boots[key].session is not None:
                    clinic, device = key.split("/")
                    await api.post(f"/api/v1/boots/{clinic}/{device}/stop")
            boots_view = (await api.get("/api/v1/boots")).json()
        await gateway.writer.flush(timeout=15)
        _summary(out, gateway, boots_view, influx, db, stuck_key, fleet, since_ms)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(gw_task, 20)
    vented = {b.key for b in fleet.boots.values() if b.vents_received}
    ok = vented == ({stuck_key} if stuck_key else set())
    _line(out, f"\nresult   {'PASS' if ok else 'FAIL'}: vented {sorted(vented) or 'none'}, "
          f"expected {stuck_key or 'none'}  ({time.monotonic() - t_start:.0f} s in all)")
    return 0 if ok else 1


async def _wait_api(api: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            if (await api.get("/health")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("gateway API did not come up")
        await asyncio.sleep(0.1)


def _summary(out: TextIO, gateway: Gateway, boots_view: list[dict], influx: LocalInflux,
             db: str, stuck_key: str | None, fleet: SimFleet, since_ms: int) -> None:
    """What this run stored: the demo's InfluxDB keeps earlier runs' data in its workdir."""
    this_run = f"time >= {since_ms}ms"
    _line(out, "\nFleet summary")
    _line(out, f"{'boot':<22} {'online':<6} {'outcome':<10} {'vents':>5} {'max now':>8} "
          f"{'sent':>6} {'stored':>6}")
    for b in boots_view:
        key = f"{b['clinic']}/{b['device']}"
        stored = count(influx, db, f"SELECT count(seq) FROM {Measurement.TELEMETRY} WHERE clinic = "
                       f"'{b['clinic']}' AND device = '{b['device']}' AND {this_run}"
                       ) if influx.port else -1
        now_max = max(b["pressures_mmhg"]) if b["pressures_mmhg"] else 0.0
        mark = "  <- stuck valve" if key == stuck_key else ""
        _line(out, f"{key:<22} {'yes' if b['online'] else 'no':<6} "
              f"{b['last_outcome'] or '-':<10} {b['vents']:>5} {now_max:>8.1f} "
              f"{fleet.boots[key].telemetry_sent:>6} {stored:>6}{mark}")
    if influx.port:
        series = influx.query(db, "SELECT device, rule, chamber, \"value\", \"limit\", detail "
                                  f"FROM {Measurement.SAFETY_EVENT} WHERE {this_run}")
        _line(out, "\nSafety events stored in InfluxDB")
        for s in series:
            for row in s["values"]:
                when = time.strftime("%H:%M:%S", time.localtime(row[0] / 1000))
                _line(out, f"  {when} {row[1]:<10} {row[2]:<14} {row[6]}")
        if not series:
            _line(out, "  none")
        audit = influx.query(db, f"SELECT count(detail) FROM {Measurement.AUDIT} WHERE {this_run} "
                                 "GROUP BY actor, action, result")
        _line(out, "\nAudit trail in InfluxDB (who did what through the API)")
        for s in audit:
            tags = s["tags"]
            _line(out, f"  {tags['actor']:<10} {tags['action']:<14} {tags['result']:<8} "
                  f"{s['values'][0][1]:>3}")
        if not audit:
            _line(out, "  none")
    st = gateway.stats
    w = gateway.writer.stats
    _line(out, f"\ngateway  messages {dict(st.messages)}  rejected {dict(st.rejected) or 0}  "
          f"points written {w.points_written}  dropped {w.points_dropped}")
