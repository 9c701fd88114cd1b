"""Bad input from devices is counted, logged and stored as faults; nothing else suffers."""

from __future__ import annotations

import json
import logging

import aiomqtt
import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalMosquitto
from gateway.contract import Channel
from tests.helpers import RunningGateway, mqtt_of, short_program, wait_for

pytestmark = pytest.mark.integration


async def test_bad_input_is_counted_logged_and_harmless(
    gateway: RunningGateway, mosquitto: LocalMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.service")
    clinic = gateway.clinic()
    fleet = SimFleet([(clinic, "victim"), (clinic, "good")], mqtt_of(mosquitto),
                     telemetry_period_s=0.1, telemetry_qos=1, seed=11)
    async with fleet:
        victim, good = fleet.boots[f"{clinic}/victim"], fleet.boots[f"{clinic}/good"]
        await wait_for(lambda: good.key in gateway.gw.fleet.boots
                       and victim.key in gateway.gw.fleet.boots, 10, "boots known")
        await good.wait_until(lambda: good.telemetry_sent >= 10, timeout=5)
        await gateway.flush()
        where = f"clinic = '{clinic}' AND device = 'good'"
        stored_before = gateway.count(f"SELECT count(seq) FROM telemetry WHERE {where}")
        assert stored_before >= 10

        sample = {"seq": 1, "ts": 1.0, "phase": "idle", "pressures": [1.0, 1.0, 1.0, 1.0]}
        bad_payloads = {
            "not_json": b"{this is not json",
            "invalid": json.dumps({**sample, "pressures": ["high", 1, 1, 1]}).encode(),
            "nan": b'{"seq": 2, "ts": 1.0, "phase": "idle", "pressures": [NaN, 1, 1, 1]}',
            "chamber_count": json.dumps({**sample, "pressures": [1.0, 1.0, 1.0]}).encode(),
            "too_large": b"{" + b" " * (1024 * 1024) + b"}",
        }
        for payload in bad_payloads.values():
            await victim.publish_raw(Channel.TELEMETRY, payload, qos=1)
        await victim.publish_raw(Channel.EVENT, b'{"kind": "explode", "ts": 1}', qos=1)
        await victim.publish_raw(Channel.STATE, b"[]", qos=1)

        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="bad-actor",
                                  protocol=aiomqtt.ProtocolVersion.V5) as raw:
            # Bad ids on the channels the gateway reads (it subscribes to the four boot
            # channels only, what the broker's ACL lets it read: a bogus channel or a topic
            # of another depth never reaches it).
            for name in (f"boots/v1/{clinic}/victim.x/state",
                         f"boots/v1/{clinic}.x/victim/telemetry",
                         f"boots/v1/{clinic}/vic tim/telemetry",
                         f"boots/v1/{clinic}/{'v' * 65}/event"):
                await raw.publish(name, json.dumps(sample).encode(), qos=1)

        rejected = gateway.gw.stats.rejected
        # NaN and a wrong chamber count are implausible data (rule 6): counted as faults too.
        expected = {"not_json": 1, "invalid": 3, "implausible_data": 2, "too_large": 1,
                    "bad_topic": 4}
        await wait_for(lambda: all(rejected[k] >= n for k, n in expected.items()), 10,
                       f"rejections {expected}, have {dict(rejected)}")
        assert {k: rejected[k] for k in expected} == expected

        # Repeats are counted but logged once per device per interval.
        logged_before = sum(getattr(r, "device", "") == victim.key and
                            getattr(r, "kind", "") == "not_json" for r in caplog.records)
        for _ in range(10):
            await victim.publish_raw(Channel.TELEMETRY, b"garbage", qos=1)
        await wait_for(lambda: rejected["not_json"] == 11, 10, "ten more rejections")
        logged_after = sum(getattr(r, "device", "") == victim.key and
                           getattr(r, "kind", "") == "not_json" for r in caplog.records)
        assert logged_before == 1 and logged_after == 1

        # The gateway still serves every other boot: a full session on the good boot.
        resp = await gateway.api.post(f"/api/v1/boots/{clinic}/good/session",
                                      json={"custom": short_program(duration_s=2.0)
                                            .model_dump(mode="json")})
        assert resp.status_code == 202, resp.text
        await good.wait_for_session_completed(timeout=15)
        # The victim's valid telemetry is still accepted and watched.
        seen = gateway.gw.stats.messages["telemetry"]
        await wait_for(lambda: gateway.gw.stats.messages["telemetry"] > seen + 5, 5,
                       "telemetry keeps flowing")
        assert gateway.gw.fleet.boots[victim.key].faults >= 8

    await wait_for(lambda: gateway.gw.stats.messages["telemetry"] >= fleet.telemetry_sent, 10,
                   "all telemetry received")
    await gateway.flush()
    stored_after = gateway.count(f"SELECT count(seq) FROM telemetry WHERE {where}")
    assert stored_after == good.telemetry_sent >= stored_before
    kinds = gateway.query(f"SELECT count(reason) FROM device_fault WHERE clinic = '{clinic}' "
                          "GROUP BY kind")
    stored_kinds = {s["tags"]["kind"] for s in kinds}
    assert {"not_json", "invalid", "implausible_data", "too_large"} <= stored_kinds
    # Rule 6 vented the victim once for the episode and recorded it as a safety event.
    vents = gateway.query("SELECT detail, device FROM safety_event "
                          "WHERE rule = 'implausible_data'")
    assert [row[2] for row in vents[0]["values"]] == ["victim"]
    health = (await gateway.api.get("/health")).json()
    assert health["mqtt_connected"] and health["influx_connected"]
