"""The gateway's own health: written to InfluxDB as `gateway_health` and logged."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port
from gateway.contract import Channel
from gateway.settings import InfluxSettings
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


def _shared_counters(health: dict[str, Any], api: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every counter both reports carry, as (health value, API value), by health name.

    Names that are the same in both are paired automatically, so a counter added to both
    later is compared too; the few the API spells differently are paired by hand."""
    renamed = {"queue_depth": "storage_queue"}
    pairs: dict[str, tuple[Any, Any]] = {}
    for name, value in health.items():
        if name.startswith("msgs_") and name != "msgs_rejected":
            pairs[name] = (value, api["messages"].get(name.removeprefix("msgs_"), 0))
        elif name == "msgs_rejected":
            pairs[name] = (value, sum(api["rejected"].values()))
        elif name in api["storage_faults"]:
            pairs[name] = (value, api["storage_faults"][name])
        elif name in api or name in renamed:
            theirs = api[renamed.get(name, name)]
            pairs[name] = (value, int(theirs) if isinstance(theirs, bool) else theirs)
    return pairs


@pytest.mark.parametrize("influx_up", [True, False], ids=["influx-up", "influx-down-no-spool"])
async def test_api_stats_and_health_fields_agree_after_real_traffic(
    mosquitto: LocalMosquitto, influx: LocalInflux, influx_up: bool
) -> None:
    """`/api/v1/stats` and the gateway_health fields come from one snapshot: every counter
    they share has one value, after telemetry, rejected junk and a vent; with InfluxDB down
    and no spool as well, so that the loss counters (`points_dropped`, the queue) are not 0."""
    over: dict[str, Any] = {}
    if not influx_up:  # nothing listens there; a 100-point queue overflows with the junk
        over["influx"] = InfluxSettings(
            url=f"http://127.0.0.1:{free_port()}", database="t_down", spool_dir=None,
            queue_max_points=100, flush_interval_s=0.1, retry_min_s=5, retry_max_s=5)
    settings = gateway_settings(mosquitto, influx, health_interval_s=3600, **over)
    async with running_gateway(settings, influx) as gateway:
        clinic = gateway.clinic()
        async with SimFleet([(clinic, "a"), (clinic, "b")], mqtt_of(mosquitto),
                            telemetry_period_s=0.1, telemetry_qos=1, seed=5) as fleet:
            boot = fleet.boots[f"{clinic}/a"]
            await boot.wait_until(lambda: boot.telemetry_sent >= 5, timeout=10)
            junk = [b"{not json", b'{"seq": "x"}', b"[]"] * 50  # each one a device_fault point
            for payload in junk:
                await boot.publish_raw(Channel.TELEMETRY, payload, qos=1)
            r = await gateway.api.post(f"/api/v1/boots/{clinic}/a/vent")
            assert r.status_code < 300, r.text
            await wait_for(lambda: sum(gateway.gw.stats.rejected.values()) >= len(junk), 10,
                           "junk counted")
        if influx_up:
            await gateway.flush()

        # The counters move while the gateway runs (late messages, write retries): take the
        # API's reading between two equal readings of the health fields.
        for _ in range(50):
            before = _still(gateway.gw.health_fields())
            r = await gateway.api.get("/api/v1/stats")
            after = gateway.gw.health_fields()
            if before == _still(after):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the gateway's counters never stood still")
    assert r.status_code == 200, r.text
    pairs = _shared_counters(after, r.json())
    moving = ("loop_lag_max_ms", "gc_pause_max_ms")  # maxima, may grow between readings
    assert {k: v for k, v in pairs.items() if k not in moving and v[0] != v[1]} == {}
    for name in moving:
        assert pairs[name][1] <= pairs[name][0]
    # the comparison covered what matters, and the traffic made the counters non-trivial
    assert {"msgs_telemetry", "msgs_rejected", "points_written", "points_dropped",
            "queue_depth", "spool_bytes", "vents_sent", "influx_connected",
            "spool_fault", "mqtt_reconnects"} <= set(pairs)
    assert after["msgs_telemetry"] >= 5 and after["msgs_rejected"] >= len(junk)
    assert after["vents_sent"] >= 1
    if influx_up:
        assert after["points_written"] > 0 and after["influx_connected"] == 1
    else:
        assert after["points_dropped"] > 0 and after["queue_depth"] > 0
        assert after["influx_connected"] == 0 and after["write_errors"] >= 1


def _still(fields: dict[str, Any]) -> dict[str, Any]:
    """The health fields without the maxima that may grow at any moment."""
    return {k: v for k, v in fields.items() if k not in ("loop_lag_max_ms", "gc_pause_max_ms",
                                                         "gc_collections")}
