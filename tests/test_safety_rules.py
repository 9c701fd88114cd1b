"""Rules 3, 4, 6, 7, 8 and 9 against real Mosquitto and influxd, with faulty simulated boots.

(Rules 1, 2, 5 and 10: test_end_to_end.py; restart: test_restart.py; storage outages:
test_storage_outage.py; the boot's self-vent: test_boot_selfvent.py.)
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto
from gateway.contract import ALARM_TOPIC_PREFIX, Alarm, AlarmState, CommandKind, EventKind
from gateway.settings import WatchdogSettings
from tests.helpers import (
    RunningGateway,
    gateway_settings,
    mqtt_of,
    running_gateway,
    short_program,
    wait_for,
)

pytestmark = pytest.mark.integration

FAST = WatchdogSettings(telemetry_loss_floor_s=1.0, sustained_inflation_grace_s=1.0,
                        overrun_grace_s=1.0, vent_confirm_deadline_s=1.0)


@pytest.fixture
async def gw(mosquitto: LocalMosquitto, influx: LocalInflux) -> AsyncIterator[RunningGateway]:
    async with running_gateway(gateway_settings(mosquitto, influx, watchdog=FAST), influx) as g:
        yield g


async def start(gw: RunningGateway, fleet: SimFleet, duration_s: float = 30.0) -> None:
    await wait_for(lambda: all(k in gw.gw.fleet.boots for k in fleet.boots), 10, "boots known")
    program = short_program(duration_s=duration_s).model_dump(mode="json")
    for key in fleet.boots:
        clinic, device = key.split("/")
        r = await gw.api.post(f"/api/v1/boots/{clinic}/{device}/session",
                              json={"custom": program})
        assert r.status_code == 202, r.text


def events(gw: RunningGateway) -> list[tuple[str, str, str]]:
    """(device, rule, action) of every stored safety event."""
    series = gw.query("SELECT action, device, rule FROM safety_event")
    return sorted((r[2], r[3], r[1]) for s in series for r in s["values"])


async def test_sustained_inflation_is_vented(gw: RunningGateway, mosquitto: LocalMosquitto
                                             ) -> None:
    clinic = gw.clinic()
    fleet = SimFleet([(clinic, "held"), (clinic, "ok")], mqtt_of(mosquitto),
                     telemetry_period_s=0.1, seed=8)
    async with fleet:
        held, ok = fleet.boots[f"{clinic}/held"], fleet.boots[f"{clinic}/ok"]
        held.inject_hold_valve(0)
        await start(gw, fleet)
        # Longest inflation of the program is 4 x 0.4 + 0.8 + 0.8 (deflate) = 3.2 s, + 1 s grace.
        await held.wait_for_vent(timeout=10)
        await held.wait_until(lambda: max(held.model.pressures) < 10, timeout=10)
        assert ok.vents_received == 0
        await gw.flush()
    stored = gw.query("SELECT \"value\", \"limit\", chamber FROM safety_event "
                      "WHERE rule = 'sustained_inflation'")[0]["values"]
    assert len(stored) == 1
    _, held_s, limit, chamber = stored[0]
    assert chamber == 1 and limit == pytest.approx(4.2) and held_s >= 4.2
    assert ("ok", "sustained_inflation", "vent") not in events(gw)


async def test_session_overrun_is_stopped_and_vented(gw: RunningGateway,
                                                     mosquitto: LocalMosquitto) -> None:
    clinic = gw.clinic()
    fleet = SimFleet([(clinic, "late"), (clinic, "ok")], mqtt_of(mosquitto),
                     telemetry_period_s=0.1, seed=9)
    async with fleet:
        late, ok = fleet.boots[f"{clinic}/late"], fleet.boots[f"{clinic}/ok"]
        late.inject_overrun()
        await start(gw, fleet, duration_s=2.0)
        await ok.wait_for_session_completed(timeout=10)
        await late.wait_for_vent(timeout=10)
        kinds = [c.kind for c in late.commands_received]
        assert kinds[-2:] == [CommandKind.STOP, CommandKind.VENT]
        assert ok.vents_received == 0
        await gw.flush()
    assert events(gw) == [("late", "session_overrun", "stop+vent")]


async def test_implausible_readings_vent_and_are_faults(gw: RunningGateway,
                                                        mosquitto: LocalMosquitto) -> None:
    clinic = gw.clinic()
    names = ["nan", "negative", "huge", "count", "ok"]
    fleet = SimFleet([(clinic, n) for n in names], mqtt_of(mosquitto), telemetry_period_s=0.1,
                     telemetry_qos=1, seed=10)
    async with fleet:
        boots = {n: fleet.boots[f"{clinic}/{n}"] for n in names}
        await start(gw, fleet)
        boots["nan"].inject_spike(2, math.nan)
        boots["negative"].inject_spike(0, -50.0)
        boots["huge"].inject_spike(1, 280.0)
        boots["count"].inject_chamber_count_mismatch(True)
        for n in names[:-1]:
            await boots[n].wait_for_vent(timeout=5)
        boots["count"].inject_chamber_count_mismatch(False)
        assert boots["ok"].vents_received == 0
        published = fleet.telemetry_sent
        await wait_for(lambda: gw.gw.stats.messages["telemetry"] >= published, 10,
                       "all telemetry received")
        await gw.flush()
    assert events(gw) == [(n, "implausible_data", "vent") for n in sorted(names[:-1])]
    faults = gw.query(f"SELECT count(reason) FROM device_fault WHERE clinic = '{clinic}' "
                      "GROUP BY device")
    assert {s["tags"]["device"] for s in faults} == set(names[:-1])
    # The NaN sample itself is stored, its bad value kept as text.
    bad = gw.query("SELECT bad_values FROM telemetry WHERE device = 'nan' AND "
                   "bad_values != ''")[0]["values"]
    assert [row[1] for row in bad] == ["p3=nan"]


async def test_unconfirmed_vent_is_resent_with_a_high_alarm(
    gw: RunningGateway, mosquitto: LocalMosquitto
) -> None:
    clinic = gw.clinic()
    fleet = SimFleet([(clinic, "deaf")], mqtt_of(mosquitto), telemetry_period_s=0.1, seed=12)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=f"app-{clinic}",
                              protocol=aiomqtt.ProtocolVersion.V5) as app, fleet:
        await app.subscribe(f"{ALARM_TOPIC_PREFIX}/{clinic}/#", qos=1)
        deaf = fleet.boots[f"{clinic}/deaf"]
        await start(gw, fleet)
        deaf.set_ignore_vents(True)
        deaf.inject_stuck_valve(0)

        alarms: list[Alarm] = []

        async def next_alarm() -> Alarm:
            async with asyncio.timeout(10):
                message = await anext(aiter(app.messages))
            alarm = Alarm.model_validate(json.loads(message.payload))
            alarms.append(alarm)
            return alarm

        first = await next_alarm()
        assert first.rule == "over_target" and first.severity == "high"
        escalation = await next_alarm()
        assert (escalation.rule, escalation.severity, escalation.state) == (
            "vent_not_confirmed", "high", AlarmState.ACTIVE)
        await deaf.wait_until(lambda: deaf.vents_received >= 2, timeout=5)  # re-sent
        assert max(deaf.model.pressures) > 100  # the ignored vent did nothing

        deaf.set_ignore_vents(False)  # the firmware recovers: the next re-send works
        await deaf.wait_for_event(EventKind.VENTED, timeout=5)
        resolved = {(a := await next_alarm()).rule: a for _ in range(2)}
        assert all(a.resolved and a.state is AlarmState.ACTIVE for a in resolved.values())

        r = await gw.api.post(f"/api/v1/alarms/{escalation.alarm_id}/ack", json={"by": "nurse"})
        assert r.status_code == 200 and r.json()["state"] == "cleared"
        listed = (await gw.api.get("/api/v1/alarms")).json()
        assert [a["rule"] for a in listed] == ["over_target"]  # latched until acknowledged
        cleared = await next_alarm()
        # the acknowledging user is the token's (anonymous here), not the body's note
        assert cleared.state is AlarmState.CLEARED and cleared.acked_by == "anonymous"
        await gw.flush()
    stored = events(gw)
    assert ("deaf", "vent_not_confirmed", "vent") in stored
    assert gw.count("SELECT count(resends) FROM vent_confirmed WHERE resends > 0") == 1
    states = gw.query("SELECT detail FROM alarm WHERE rule = 'vent_not_confirmed' "
                      "GROUP BY alarm_id, state")
    assert {s["tags"]["state"] for s in states} == {"active", "cleared"}
    assert {s["tags"]["alarm_id"] for s in states} == {escalation.alarm_id}


async def test_refused_program_is_a_recorded_safety_event(
    gw: RunningGateway, mosquitto: LocalMosquitto
) -> None:
    clinic = gw.clinic()
    async with SimFleet([(clinic, "b1")], mqtt_of(mosquitto), seed=13) as fleet:
        await wait_for(lambda: all(k in gw.gw.fleet.boots for k in fleet.boots), 10, "known")
        too_long = short_program(duration_s=3 * 3600).model_dump(mode="json")
        r = await gw.api.post(f"/api/v1/boots/{clinic}/b1/session", json={"custom": too_long})
        assert r.status_code == 409
        await gw.flush()
    rows = gw.query("SELECT action, detail, severity FROM safety_event "
                    "WHERE rule = 'program_refused'")[0]["values"]
    assert len(rows) == 1
    assert rows[0][1] == "refuse" and rows[0][3] == "low"
    assert "duration 180 min is outside" in rows[0][2]
