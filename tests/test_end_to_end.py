"""The whole chain against a real Mosquitto and influxd: boots, gateway, API, storage."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalMosquitto
from gateway.contract import AckStatus, BootState, Channel, Command, CommandKind, EventKind, topic
from tests.helpers import RunningGateway, mqtt_of, short_program, wait_for

pytestmark = pytest.mark.integration


async def start_via_api(gw: RunningGateway, clinic: str, device: str, program) -> dict:
    resp = await gw.api.post(
        f"/api/v1/boots/{clinic}/{device}/session",
        json={"custom": program.model_dump(mode="json")},
    )
    assert resp.status_code == 202, resp.text
    return resp.json()


async def wait_boots_known(gw: RunningGateway, keys: list[str]) -> None:
    await wait_for(lambda: all(k in gw.gw.fleet.boots and gw.gw.fleet.boots[k].online
                               for k in keys), 10, "boots to be known online")


async def test_fleet_of_20_runs_sessions_end_to_end(
    gateway: RunningGateway, mosquitto: LocalMosquitto
) -> None:
    clinics = [gateway.clinic(1), gateway.clinic(2)]
    members = [(clinics[i % 2], f"boot-{i:03d}") for i in range(20)]
    program = short_program(duration_s=4.0)
    fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.2, telemetry_qos=1,
                     seed=7)
    async with fleet:
        await wait_boots_known(gateway, list(fleet.boots))
        results = await asyncio.gather(
            *(start_via_api(gateway, c, d, program) for c, d in members)
        )
        assert all(r["outcome"] == "accepted" for r in results)
        session_ids = {r["session_id"] for r in results}
        assert len(session_ids) == 20

        await fleet.wait_all(lambda b: b.sessions_completed >= 1, timeout=30)
        for boot in fleet.boots.values():
            assert await boot.wait_for_ack(AckStatus.ACCEPTED, timeout=1)
            assert boot.vents_received == 0
        # The gateway saw every completion and no session is left open.
        await wait_for(lambda: all(gateway.gw.fleet.boots[k].session is None
                                   for k in fleet.boots), 10, "sessions closed")
    published = fleet.telemetry_sent
    assert published > 20 * 4 / 0.2 * 0.8  # every boot streamed the whole session

    await wait_for(lambda: gateway.gw.stats.messages["telemetry"] >= published, 20,
                   "gateway to receive all telemetry")
    await gateway.flush()
    clinic_re = f"/^{gateway.clinic_prefix}/"
    stored = gateway.count(f"SELECT count(seq) FROM telemetry WHERE clinic =~ {clinic_re}")
    assert stored == published
    in_session = gateway.count(
        f"SELECT count(seq) FROM telemetry WHERE clinic =~ {clinic_re} AND session_id != ''")
    assert in_session == sum(sum(b.telemetry_sent_by_session.values())
                             for b in fleet.boots.values())
    completed = gateway.count(
        "SELECT count(session_id) FROM session WHERE outcome = 'completed'")
    assert completed == 20
    assert gateway.count("SELECT count(detail) FROM safety_event") == 0


async def test_stuck_valve_is_vented_and_recorded(
    gateway: RunningGateway, mosquitto: LocalMosquitto
) -> None:
    clinic = gateway.clinic()
    members = [(clinic, f"b{i}") for i in range(5)]
    fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.1, seed=3)
    async with fleet:
        await wait_boots_known(gateway, list(fleet.boots))
        faulty = fleet.boots[f"{clinic}/b2"]
        faulty.inject_stuck_valve(1)  # 0-based: the second chamber (calf)
        program = short_program(duration_s=5.0)
        for c, d in members:
            await start_via_api(gateway, c, d, program)

        vent_at = await faulty.wait_for_vent(timeout=10)
        assert vent_at > 0
        cmd = await faulty.wait_for_command(CommandKind.VENT, timeout=1)
        assert cmd.reason and "over_target" in cmd.reason
        # The boot deflates: every chamber back below the safe level.
        await faulty.wait_until(lambda: max(faulty.model.pressures) < 10, timeout=10)
        await faulty.wait_for_event(EventKind.VENTED, timeout=5)

        healthy = [b for k, b in fleet.boots.items() if b is not faulty]
        await fleet.wait_all(lambda b: b is faulty or b.sessions_completed >= 1, timeout=30)
        assert all(b.vents_received == 0 for b in healthy)

    await gateway.flush()
    rows = gateway.query("SELECT rule, chamber, value, \"limit\", device, action "
                         "FROM safety_event")
    assert len(rows) == 1
    values = rows[0]["values"]
    assert len(values) == 1
    _, rule, chamber, value, limit, device, action = values[0]
    assert (rule, chamber, device, action) == ("over_target", 2, "b2", "vent")
    assert value > limit == pytest.approx(58 + 15)
    assert gateway.count("SELECT count(cmd_id) FROM command WHERE kind = 'vent'") >= 1
    outcome = gateway.query("SELECT session_id FROM session WHERE outcome = 'vented'")
    assert len(outcome[0]["values"]) == 1


async def test_silent_boot_is_vented_with_alarm_and_user_stop_recorded(
    gateway: RunningGateway, mosquitto: LocalMosquitto
) -> None:
    clinic = gateway.clinic()
    members = [(clinic, "quiet"), (clinic, "stopper"), (clinic, "fine")]
    fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.1, seed=5)
    async with fleet:
        await wait_boots_known(gateway, list(fleet.boots))
        program = short_program(duration_s=20.0)
        for c, d in members:
            await start_via_api(gateway, c, d, program)
        quiet, stopper, fine = (fleet.boots[f"{clinic}/{d}"] for _, d in members)
        await quiet.wait_until(lambda: quiet.telemetry_sent > 5, timeout=5)

        quiet.set_silent(True)
        await quiet.wait_for_vent(timeout=5)

        await stopper.press_stop()
        await wait_for(lambda: gateway.gw.fleet.boots[stopper.key].session is None, 5,
                       "user stop to end the session")
        await gateway.flush()
        assert fine.vents_received == 0 and stopper.vents_received == 0
        assert gateway.gw.fleet.boots[fine.key].session is not None

    rows = gateway.query("SELECT device, rule, severity, action, \"value\", \"limit\" "
                         "FROM safety_event")
    events = {(r[1], r[2]): r for r in rows[0]["values"]}
    loss = events[("quiet", "telemetry_loss")]
    assert loss[3] == "high" and loss[4] == "vent"
    assert loss[5] > loss[6] == pytest.approx(1.0)  # silent longer than the 1 s floor
    stop = events[("stopper", "user_stop")]
    assert stop[4] == "alarm"
    assert ("fine", "telemetry_loss") not in events
    assert gateway.count("SELECT count(session_id) FROM session WHERE outcome = 'user_stop'") == 1


async def test_program_above_ceiling_is_refused_before_sending(
    gateway: RunningGateway, mosquitto: LocalMosquitto
) -> None:
    clinic = gateway.clinic()
    async with SimFleet([(clinic, "b1")], mqtt_of(mosquitto), seed=1) as fleet:
        boot = fleet.boots[f"{clinic}/b1"]
        await wait_boots_known(gateway, [boot.key])
        too_high = short_program(target=130.0)
        resp = await gateway.api.post(f"/api/v1/boots/{clinic}/b1/session",
                                      json={"custom": too_high.model_dump(mode="json")})
        assert resp.status_code == 409
        body = resp.json()["detail"]
        assert body["detail"] == "program refused"
        assert any("chamber 1 target 130 mmHg is above 95 mmHg: the ceiling of 100 mmHg" in r
                   for r in body["reasons"])
        # A stop sent afterwards arrives; nothing arrived before it, so nothing was sent.
        stop = await gateway.api.post(f"/api/v1/boots/{clinic}/b1/stop")
        assert stop.status_code == 200 and stop.json()["outcome"] == "done"
        assert [c.kind for c in boot.commands_received] == [CommandKind.STOP]

        unknown = await gateway.api.post(f"/api/v1/boots/{clinic}/b1/session",
                                         json={"program": "no_such_program"})
        assert unknown.status_code == 404
        catalogue = await gateway.api.post(f"/api/v1/boots/{clinic}/b1/session",
                                           json={"program": "post_workout_recovery"})
        assert catalogue.status_code == 202, catalogue.text
        assert catalogue.json()["outcome"] == "accepted"
        busy = await gateway.api.post(f"/api/v1/boots/{clinic}/b1/session",
                                      json={"program": "post_workout_recovery"})
        assert busy.status_code == 409
        assert "already running a session" in busy.text


async def test_command_without_ack_is_reported_failed(
    gateway: RunningGateway, mosquitto: LocalMosquitto
) -> None:
    """A boot that announces itself but never answers: the start times out as failed.

    It has the start's expiry (5 s here) plus the ack timeout (5 s) to answer, since it may
    accept until the start expires. Being silent, it is vented by rule 5 meanwhile: a start
    is watched from the moment it is sent (the boot may be running it unheard).
    """
    clinic = gateway.clinic()
    state = BootState(online=True, firmware="mute-1", chambers=4,
                      zones=["foot", "calf", "knee", "thigh"], max_pressure_mmhg=120,
                      telemetry_period_s=0.5, ts=0)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=f"mute-{clinic}",
                              protocol=aiomqtt.ProtocolVersion.V5) as mute:
        await mute.subscribe(topic(clinic, "mute", Channel.CMD), qos=1)
        await mute.publish(topic(clinic, "mute", Channel.STATE), state.to_payload(), qos=1,
                           retain=True)
        await wait_boots_known(gateway, [f"{clinic}/mute"])
        resp = await gateway.api.post(f"/api/v1/boots/{clinic}/mute/session",
                                      json={"custom": short_program().model_dump(mode="json")})
        assert resp.status_code == 502
        assert resp.json()["detail"]["reasons"] == ["no ack within 10 s"]
        # The start really went out, with an MQTT 5 expiry and an expires_at.
        message = await asyncio.wait_for(anext(aiter(mute.messages)), 5)
        assert message.properties.MessageExpiryInterval == 5
        cmd = Command.model_validate_json(message.payload)
        assert cmd.kind is CommandKind.START and cmd.expires_at == pytest.approx(
            cmd.issued_at + 5)
        cmd_id = resp.json()["detail"].get("cmd_id") or cmd.cmd_id
        status = (await gateway.api.get(f"/api/v1/commands/{cmd_id}")).json()
        assert status["outcome"] == "failed"
        assert gateway.gw.fleet.boots[f"{clinic}/mute"].session is None
        await mute.publish(topic(clinic, "mute", Channel.STATE), b"", qos=1, retain=True)
    await gateway.flush()
    assert gateway.count("SELECT count(cmd_id) FROM command WHERE outcome = 'failed' "
                         "AND kind = 'start'") == 1
    assert gateway.count("SELECT count(session_id) FROM session WHERE outcome = 'vented'") == 1
    assert gateway.count("SELECT count(detail) FROM safety_event "
                         "WHERE rule = 'telemetry_loss'") == 1
    # Clearing the retained state (empty payload) removes the boot instead of a rejection.
    assert f"{clinic}/mute" not in gateway.gw.fleet.boots
    assert gateway.gw.stats.rejected.total() == 0
