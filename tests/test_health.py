"""The gateway's own health: written to InfluxDB as `gateway_health` and logged."""

from __future__ import annotations

import logging

import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto
from tests.helpers import gateway_settings, mqtt_of, running_gateway, wait_for

pytestmark = pytest.mark.integration


async def test_health_is_written_and_logged(
    mosquitto: LocalMosquitto, influx: LocalInflux, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gateway_settings(mosquitto, influx, gateway_id="gw-health", health_interval_s=0.2)
    caplog.set_level(logging.INFO, logger="gateway.service")
    async with running_gateway(settings, influx) as gw:
        members = [(gw.clinic(1), f"boot-{i}") for i in range(3)]
        async with SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.1, seed=3) as fleet:
            await wait_for(lambda: gw.gw.stats.messages["telemetry"] >= 15, 10, "telemetry")
            await wait_for(lambda: gw.gw.health_fields()["boots_online"] == 3, 10, "3 online")
            seen = gw.gw.stats.messages["telemetry"]
            # two reports after the boots are known, so the stored one includes them
            await wait_for(lambda: gw.count("SELECT count(msgs_telemetry) FROM gateway_health "
                                            f"WHERE msgs_telemetry >= {seen}") >= 1,
                           10, "a health point counting the telemetry seen")
            assert fleet.telemetry_sent >= seen
        rows = gw.query("SELECT last(*) FROM gateway_health WHERE gateway = 'gw-health'")
    last = dict(zip(rows[0]["columns"], rows[0]["values"][0], strict=True))
    assert last["last_mqtt_connected"] == 1
    assert last["last_influx_connected"] == 1
    assert last["last_msgs_rejected"] == 0
    assert last["last_points_written"] > 0
    assert last["last_msgs_state"] >= 3
    logged = [r for r in caplog.records if r.getMessage() == "gateway health"]
    assert logged and getattr(logged[-1], "mqtt_connected", None) == 1
