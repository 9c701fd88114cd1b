"""The safety path does not wait on storage: vents go out while InfluxDB is paused or dead,
and the safety events land once it is back."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto
from gateway.settings import InfluxSettings
from tests.helpers import gateway_settings, mqtt_of, running_gateway, short_program, wait_for

pytestmark = pytest.mark.integration


async def reaction_s(boot, chamber: int = 0, value: float = 150.0) -> float:
    """Publish one sample over the ceiling; seconds until the boot receives the vent."""
    before = len(boot.vents_received_at)
    boot.inject_spike(chamber, value)
    await boot.wait_until(lambda: len(boot.vents_received_at) > before, timeout=5)
    return boot.vents_received_at[before] - boot.spikes_published_at[-1]


async def test_vents_do_not_wait_for_a_paused_or_dead_influxdb(
    mosquitto: LocalMosquitto, own_influx: LocalInflux, tmp_path: Path
) -> None:
    influx_settings = InfluxSettings(url=own_influx.url, database="outage", flush_interval_s=0.1,
                                     timeout_s=2.0, retry_max_s=1.0,
                                     spool_dir=tmp_path / "spool")
    settings = gateway_settings(mosquitto, own_influx, influx=influx_settings)
    async with running_gateway(settings, own_influx) as gw:
        clinic = gw.clinic()
        members = [(clinic, f"b{i}") for i in range(4)]
        fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.1, telemetry_qos=1,
                         seed=2)
        async with fleet:
            await wait_for(lambda: all(k in gw.gw.fleet.boots for k in fleet.boots), 10,
                           "boots known")
            program = short_program(duration_s=60.0).model_dump(mode="json")
            for _, device in members:
                r = await gw.api.post(f"/api/v1/boots/{clinic}/{device}/session",
                                      json={"custom": program})
                assert r.status_code == 202
            boots = list(fleet.boots.values())
            baseline = await reaction_s(boots[0])

            own_influx.pause()  # SIGSTOP: writes hang until the client times out
            paused = await reaction_s(boots[1])
            assert gw.gw.writer.backlog > 0
            own_influx.resume()

            own_influx.kill()  # SIGKILL: writes are refused
            killed = await reaction_s(boots[2])
            await wait_for(lambda: not gw.gw.writer.stats.connected, 10, "writer to notice")
            health = (await gw.api.get("/health")).json()
            assert health["status"] == "degraded" and health["mqtt_connected"]
            own_influx.start()
            await gw.flush()
        published = fleet.telemetry_sent
        await wait_for(lambda: gw.gw.stats.messages["telemetry"] >= published, 10,
                       "all telemetry received")
        await gw.flush()
        # Every safety event and every telemetry point made it, none twice.
        rows = gw.query("SELECT detail, device, rule FROM safety_event")[0]["values"]
        # (b3 was still in session when the fleet shut down: rule 7 saw it go offline.)
        assert sorted((r[2], r[3]) for r in rows) == [
            ("b0", "hard_ceiling"), ("b1", "hard_ceiling"), ("b2", "hard_ceiling"),
            ("b3", "offline_in_session")]
        assert gw.count("SELECT count(seq) FROM telemetry") == published
    # The same reaction with storage paused or dead as with it healthy (loopback: well
    # under a second; the assertion bound is generous, the numbers are in bench/).
    assert max(baseline, paused, killed) < 0.5, (baseline, paused, killed)
