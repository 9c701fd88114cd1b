"""No telemetry lost: real Mosquitto and influxd, faults made with real process signals.

Every test counts what the simulated boots had acknowledged by the broker (QoS 1) and what
InfluxDB holds afterwards; they must be equal: nothing lost, nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto, count, free_port
from gateway.settings import InfluxSettings
from tests.helpers import gateway_settings, mqtt_of, running_gateway, short_program, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


async def wait_stored(influx: LocalInflux, db: str, q: str, expected: int, timeout: float
                      ) -> int:
    """Poll InfluxDB until `q` counts `expected` (or time out); returns the last count."""
    deadline = time.monotonic() + timeout
    while True:
        n = count(influx, db, q)
        if n >= expected or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.2)


def per_device(influx: LocalInflux, db: str) -> dict[str, int]:
    series = influx.query(db, "SELECT count(seq) FROM telemetry GROUP BY device")
    return {s["tags"]["device"]: int(s["values"][0][1]) for s in series}


async def test_influxdb_killed_for_30s_during_a_200_boot_stream(
    mosquitto: LocalMosquitto, own_influx: LocalInflux, tmp_path: Path
) -> None:
    influx_settings = InfluxSettings(url=own_influx.url, database="killed", flush_interval_s=0.2,
                                     timeout_s=2.0, retry_max_s=2.0, spool_dir=tmp_path / "spool")
    settings = gateway_settings(mosquitto, own_influx, influx=influx_settings)
    async with running_gateway(settings, own_influx) as gw:
        members = [(gw.clinic(1 + i % 4), f"boot-{i:03d}") for i in range(200)]
        fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.5, telemetry_qos=1,
                         seed=11)
        async with fleet:
            await wait_for(lambda: gw.gw.stats.messages["telemetry"] >= 400, 20, "stream")
            own_influx.kill()
            outage_start = fleet.telemetry_sent
            await asyncio.sleep(30)  # the outage itself, not a synchronisation
            during = fleet.telemetry_sent - outage_start
            assert gw.gw.writer.spool_points > 0 and gw.gw.writer.in_outage
            assert gw.gw.writer.stats.connected is False
            own_influx.start()
            await wait_for(lambda: gw.gw.writer.stats.connected, 20, "writes to resume")
        sent = {b.device: b.telemetry_sent for b in fleet.boots.values()}
        published = sum(sent.values())
        await wait_for(lambda: gw.gw.stats.messages["telemetry"] >= published, 20,
                       "the gateway to receive all telemetry")
        await gw.flush()
        assert gw.gw.writer.spool_points == 0
        assert gw.gw.writer.stats.points_dropped_spool_full == 0
    assert during > 200 * 2 * 25  # ~2 Hz x 200 boots streamed through the outage
    assert count(own_influx, "killed", "SELECT count(seq) FROM telemetry") == published
    assert per_device(own_influx, "killed") == sent


async def test_paused_influxdb_fills_memory_then_the_spool_takes_over(
    mosquitto: LocalMosquitto, own_influx: LocalInflux, tmp_path: Path
) -> None:
    bound = 500
    influx_settings = InfluxSettings(url=own_influx.url, database="paused", flush_interval_s=0.2,
                                     batch_size=200, queue_max_points=bound, timeout_s=60.0,
                                     retry_max_s=1.0, spool_dir=tmp_path / "spool")
    settings = gateway_settings(mosquitto, own_influx, influx=influx_settings)
    async with running_gateway(settings, own_influx) as gw:
        members = [(gw.clinic(), f"boot-{i:02d}") for i in range(40)]
        fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.1, telemetry_qos=1,
                         seed=5)
        async with fleet:
            await wait_for(lambda: gw.gw.stats.messages["telemetry"] >= 200, 10, "stream")
            own_influx.pause()  # SIGSTOP: the write in flight hangs (timeout 60 s)
            try:
                # 400 msg/s against a bound of 500 points: memory fills within seconds.
                await wait_for(lambda: gw.gw.writer.spool_points >= 3 * bound, 20,
                               "the spool to take over from memory")
                assert gw.gw.writer.stats.queue_peak <= bound
            finally:
                own_influx.resume()
        sent = {b.device: b.telemetry_sent for b in fleet.boots.values()}
        published = sum(sent.values())
        await wait_for(lambda: gw.gw.stats.messages["telemetry"] >= published, 20,
                       "the gateway to receive all telemetry")
        await gw.flush()
        assert gw.gw.writer.stats.queue_peak <= bound
        assert gw.gw.writer.stats.points_replayed >= 3 * bound
    assert per_device(own_influx, "paused") == sent


# ---------------------------------------------------------------- a gateway as a process


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen:
    env = {"BOOTGW_API__ALLOW_ANONYMOUS": "true", **env}  # the API is closed by default
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env,
                                stdout=out, stderr=out)


@contextlib.asynccontextmanager
async def gateway_process(env: dict[str, str], log: Path) -> AsyncIterator[subprocess.Popen]:
    proc = _spawn(env, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['BOOTGW_API__PORT']}",
                                     timeout=5) as api:
            async def up() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await api.get("/health")).json()["mqtt_connected"]
                return False
            deadline = time.monotonic() + 30
            while not await up():
                assert proc.poll() is None, f"gateway exited; see {log}"
                assert time.monotonic() < deadline, f"gateway did not come up; see {log}"
                await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_gateway_sigterm_mid_stream_loses_nothing(
    mosquitto: LocalMosquitto, own_influx: LocalInflux, tmp_path: Path
) -> None:
    db = "sigterm"
    env = {
        **os.environ,
        "BOOTGW_CONFIG_FILE": str(tmp_path / "none.toml"),
        "BOOTGW_GATEWAY_ID": "gw-sigterm",
        "BOOTGW_MQTT__PORT": str(mosquitto.port),
        "BOOTGW_MQTT__CLIENT_ID": f"gw-sigterm-{os.getpid()}",
        "BOOTGW_INFLUX__URL": own_influx.url,
        "BOOTGW_INFLUX__DATABASE": db,
        "BOOTGW_INFLUX__FLUSH_INTERVAL_S": "0.2",
        "BOOTGW_INFLUX__TIMEOUT_S": "1",
        "BOOTGW_INFLUX__SPOOL_DIR": str(tmp_path / "spool"),
        "BOOTGW_SESSION_JOURNAL": str(tmp_path / "sessions.jsonl"),
        "BOOTGW_API__PORT": str(free_port()),
        "BOOTGW_LOG_LEVEL": "INFO",
    }
    log = tmp_path / "gateway.log"
    members = [("sigterm-c1", f"boot-{i:02d}") for i in range(20)]
    fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.1, telemetry_qos=1,
                     seed=9, self_vent=False)
    try:
        async with gateway_process(env, log) as first:
            await fleet.start()  # after the gateway's first subscription: nothing before it
            await wait_stored(own_influx, db, "SELECT count(seq) FROM telemetry", 200, 20)
            # Storage stalls, so the gateway holds points in memory when it is told to stop.
            own_influx.pause()
            await asyncio.sleep(1.0)  # a second of stream held in memory, not a synchronisation
            first.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(first.wait, 30) == 0
        assert any((tmp_path / "spool").glob("*.seg")), "points must wait in the spool"
        # The boots stream on while no gateway runs: the broker queues for its session.
        await asyncio.sleep(1.0)
        own_influx.resume()
        async with gateway_process(env, log) as second:
            await fleet.stop()
            sent = {b.device: b.telemetry_sent for b in fleet.boots.values()}
            stored = await wait_stored(own_influx, db, "SELECT count(seq) FROM telemetry",
                                       sum(sent.values()), 30)
            second.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        await fleet.stop()
    text = log.read_text()
    assert "points kept in the spool for the next start" in text
    assert "spool holds points from before; replaying" in text
    assert stored == sum(sent.values())
    assert per_device(own_influx, db) == sent
    assert _gaps(own_influx, db) == {}


def _gaps(influx: LocalInflux, db: str) -> dict[str, int]:
    """Per device, how many seq numbers are missing between the first and last stored."""
    series = influx.query(db, "SELECT seq FROM telemetry GROUP BY device")
    gaps = {}
    for s in series:
        seqs = sorted(int(v[1]) for v in s["values"])
        hole = (seqs[-1] - seqs[0] + 1) - len(set(seqs))
        if hole:
            gaps[s["tags"]["device"]] = hole
    return gaps


async def test_mosquitto_restart_mid_stream_loses_no_event_or_ack(
    influx: LocalInflux, tmp_path: Path
) -> None:
    broker = LocalMosquitto("mosquitto", tmp_path / "mosquitto", free_port()).start()
    try:
        settings = gateway_settings(broker, influx)
        async with running_gateway(settings, influx) as gw:
            clinic = gw.clinic()
            members = [(clinic, f"boot-{i}") for i in range(8)]
            fleet = SimFleet(members, mqtt_of(broker), telemetry_period_s=0.2, seed=4)
            program = short_program(duration_s=60.0).model_dump(mode="json")
            async with fleet:
                await wait_for(lambda: all(k in gw.gw.fleet.boots for k in fleet.boots), 10,
                               "boots known")
                for _, device in members:
                    r = await gw.api.post(f"/api/v1/boots/{clinic}/{device}/session",
                                          json={"custom": program})
                    assert r.status_code == 202, r.text
                broker.stop()  # SIGTERM: the broker saves sessions and retained state
                # Cut off in session, every boot vents itself: events made while offline.
                await fleet.wait_all(lambda b: b.self_vents >= 1, timeout=10)
                broker.start()
                await wait_for(lambda: gw.gw.link.connected.is_set(), 20, "gateway back")
                await wait_for(lambda: all(gw.gw.fleet.boots[k].online for k in fleet.boots),
                               20, "every boot back online")
                # rule 9 refuses a start until the gateway's vent (rule 7's) is confirmed
                await wait_for(lambda: not any(gw.gw.fleet.boots[k].watch.venting
                                               for k in fleet.boots), 10, "vents confirmed")
                # Commands and acks flow again: a new session and its stop on three boots.
                for _, device in members[:3]:
                    r = await gw.api.post(f"/api/v1/boots/{clinic}/{device}/session",
                                          json={"custom": program})
                    assert r.status_code == 202, r.text
                    stop = await gw.api.post(f"/api/v1/boots/{clinic}/{device}/stop")
                    assert stop.status_code == 200 and stop.json()["outcome"] == "done"
                events_sent = sum(len(b.events_sent) for b in fleet.boots.values())
                acks_sent = sum(len(b.acks_sent) for b in fleet.boots.values())
                await wait_for(lambda: gw.gw.stats.messages["event"] >= events_sent
                               and gw.gw.stats.messages["ack"] >= acks_sent, 20,
                               "every event and ack made during the outage to arrive")
            await gw.flush()
            assert gw.gw.link.reconnects >= 1
            # 8 starts, then 3 starts and 3 stops; and the acks of the vents rule 7 re-sent.
            assert acks_sent >= 8 + 6
            # QoS 1 is at least once: a message in flight at the restart may come twice.
            assert gw.gw.stats.messages["ack"] >= acks_sent
            stored_events = gw.count(
                f"SELECT count(device_ts) FROM boot_event WHERE clinic = '{clinic}'")
            assert stored_events == events_sent  # a duplicate overwrites itself
            assert gw.gw.stats.messages["event"] >= events_sent
            acked = gw.count(f"SELECT count(cmd_id) FROM command WHERE clinic = '{clinic}' "
                             "AND (outcome = 'done' OR outcome = 'accepted')")
            assert acked >= 14
    finally:
        broker.stop()


async def test_start_while_the_broker_is_stalled_is_a_clean_503(
    influx: LocalInflux, tmp_path: Path
) -> None:
    """No PUBACK within the start's expiry: refused with a reason, not a server error, and
    the gateway forgets the session it could not send."""
    broker = LocalMosquitto("mosquitto", tmp_path / "mosquitto", free_port()).start()
    try:
        settings = gateway_settings(broker, influx)
        async with running_gateway(settings, influx) as gw:
            clinic = gw.clinic()
            fleet = SimFleet([(clinic, "b1")], mqtt_of(broker), telemetry_period_s=0.2, seed=8)
            async with fleet:
                await wait_for(lambda: f"{clinic}/b1" in gw.gw.fleet.boots, 10, "boot known")
                broker.pause()  # SIGSTOP: connections stay open, nothing is acknowledged
                try:
                    r = await gw.api.post(f"/api/v1/boots/{clinic}/b1/session",
                                          json={"custom": short_program().model_dump(
                                              mode="json")})
                finally:
                    broker.resume()
                assert r.status_code == 503, r.text
                assert "did not take" in r.json()["detail"]
                assert gw.gw.fleet.boots[f"{clinic}/b1"].session is None
    finally:
        broker.stop()


async def test_a_second_gateway_on_the_same_spool_exits_non_zero(
    mosquitto: LocalMosquitto, influx: LocalInflux, tmp_path: Path
) -> None:
    """The spool takes one process; a second one refused it must say so to its service
    manager (exit code), not stop as if asked to."""
    settings = gateway_settings(mosquitto, influx)
    spool = settings.influx.spool_dir
    assert spool is not None
    async with running_gateway(settings, influx):
        env = {**os.environ, "BOOTGW_CONFIG_FILE": str(tmp_path / "none.toml"),
               "BOOTGW_MQTT__PORT": str(mosquitto.port), "BOOTGW_INFLUX__URL": influx.url,
               "BOOTGW_INFLUX__SPOOL_DIR": str(spool),
               "BOOTGW_SESSION_JOURNAL": str(tmp_path / "sessions.jsonl"),
               "BOOTGW_API__PORT": str(free_port()), "BOOTGW_MQTT__CLIENT_ID": "gw-second"}
        log = tmp_path / "second.log"
        proc = _spawn(env, log)
        try:
            rc = await asyncio.to_thread(proc.wait, 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert rc == 1, log.read_text()[-2000:]
    assert "is in use by another process" in log.read_text()
