"""The audit trail: every start, stop, vent and alarm acknowledgement through the API, with
the authenticated actor and role, its result and its ids, in the log, in GET /api/v1/audit
and in InfluxDB (measurement `audit`, docs/schema.md)."""

from __future__ import annotations

import logging

import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port
from gateway.api_users import ApiUser, Role, hash_token, new_token
from gateway.audit import (
    AuditAction,
    AuditEvent,
    AuditResult,
    AuditTrail,
    audit_point,
)
from gateway.settings import ApiSettings
from tests.helpers import gateway_settings, mqtt_of, running_gateway, short_program, wait_for

DONE, REFUSED, FAILED = AuditResult.DONE, AuditResult.REFUSED, AuditResult.FAILED


def event(actor: str = "desk-1", action: AuditAction = AuditAction.VENT,
          result: AuditResult = DONE, device: str = "b1") -> AuditEvent:
    return AuditEvent(actor=actor, role="front_desk", action=action, result=result,
                      clinic="c1", device=device)


def test_the_trail_is_bounded_newest_first_and_filtered() -> None:
    trail = AuditTrail(keep=10)
    for i in range(25):
        trail.append(1000.0 + i, event(actor=f"u{i % 3}", device=f"b{i}",
                                       result=REFUSED if i % 2 else DONE))
    assert len(trail) == 10 and trail.recorded == 25
    assert [r.time for r in trail.query(limit=3)] == [1024.0, 1023.0, 1022.0]
    assert {r.event.actor for r in trail.query(limit=100, actor="u0")} == {"u0"}
    assert all(r.event.result is REFUSED for r in trail.query(limit=100, result=REFUSED))
    assert [r.event.device for r in trail.query(limit=100, since=1022.0)] == ["b24", "b23", "b22"]
    assert trail.query(limit=100, device="b3") == []  # long gone from the ring


def test_an_audit_point_has_only_ids_and_closed_words_as_tags() -> None:
    p = audit_point(AuditEvent(actor="mgr-1", role="manager", action=AuditAction.ALARM_ACK,
                               result=DONE, clinic="c1", device="b1", detail="x\n" * 400,
                               ids={"alarm_id": "a-1"}), 1)
    assert p.tags == {"action": "alarm_ack", "actor": "mgr-1", "role": "manager",
                      "result": "done", "clinic": "c1", "device": "b1"}
    assert p.fields["alarm_id"] == "a-1" and len(str(p.fields["detail"])) == 500
    with pytest.raises(ValueError, match="not an id"):
        AuditEvent(actor="Robert'); DROP", role="ops", action=AuditAction.VENT, result=DONE)


@pytest.mark.integration
async def test_start_stop_vent_and_ack_are_audited_with_the_authenticated_actor(
        mosquitto: LocalMosquitto, influx: LocalInflux, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    tokens = {"desk-1": new_token(), "mgr-1": new_token(), "ops-1": new_token()}
    roles = {"desk-1": Role.FRONT_DESK, "mgr-1": Role.MANAGER, "ops-1": Role.OPS}
    api = ApiSettings(port=free_port(), users=[
        ApiUser(name=n, role=roles[n], token_sha256=hash_token(t)) for n, t in tokens.items()])

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name]}"}

    settings = gateway_settings(mosquitto, influx, api=api)
    async with running_gateway(settings, influx) as gw:
        clinic = gw.clinic()
        async with SimFleet([(clinic, "b1")], mqtt_of(mosquitto), telemetry_period_s=0.2,
                            seed=3) as fleet:
            boot = fleet.boots[f"{clinic}/b1"]
            await wait_for(lambda: boot.key in gw.gw.fleet.boots
                           and gw.gw.fleet.boots[boot.key].online, 10, "the boot")
            url = f"/api/v1/boots/{clinic}/b1"
            program = {"custom": short_program(duration_s=30).model_dump(mode="json")}

            # a manager may not start: 403, refused, and nothing was sent
            r = await gw.api.post(f"{url}/session", json=program, headers=auth("mgr-1"))
            assert r.status_code == 403
            # a boot nobody has seen: refused, and its name is no tag (no series at will)
            r = await gw.api.post(f"/api/v1/boots/{clinic}/ghost-1/session", json=program,
                                  headers=auth("desk-1"))
            assert r.status_code == 404

            # the front desk starts and stops
            r = await gw.api.post(f"{url}/session", json=program, headers=auth("desk-1"))
            assert r.status_code == 202, r.text
            first = r.json()
            await wait_for(lambda: boot.in_session, 10, "the session to run")
            r = await gw.api.post(f"{url}/stop", headers=auth("desk-1"))
            assert r.status_code == 200 and r.json()["outcome"] in ("accepted", "done")
            stop = r.json()
            await wait_for(lambda: gw.gw.fleet.boots[boot.key].session is None, 10, "stopped")

            # again, and the user presses the boot's stop button: an alarm (rule 10)
            r = await gw.api.post(f"{url}/session", json=program, headers=auth("desk-1"))
            assert r.status_code == 202, r.text
            await wait_for(lambda: boot.in_session, 10, "the second session")
            await boot.press_stop()
            alarm = await wait_for(lambda: next((a for a in gw.gw.alarms.listed()
                                                 if a.device == "b1"), None), 10, "the alarm")
            await wait_for(lambda: gw.gw.fleet.boots[boot.key].session is None, 10, "ended")

            # ops starts and vents
            r = await gw.api.post(f"{url}/session", json=program, headers=auth("ops-1"))
            assert r.status_code == 202, r.text
            third = r.json()
            r = await gw.api.post(f"{url}/vent", json={"reason": "patient asked"},
                                  headers=auth("ops-1"))
            assert r.status_code == 200, r.text
            vent = r.json()

            # the manager acknowledges, with a note in the body: the actor is still mgr-1
            r = await gw.api.post(f"/api/v1/alarms/{alarm.alarm_id}/ack",
                                  json={"by": "nurse Anna"}, headers=auth("mgr-1"))
            assert r.status_code == 200 and r.json()["acked_by"] == "mgr-1", r.text
            # the front desk may not; an unknown alarm is refused; a wrong token is nobody
            assert (await gw.api.post(f"/api/v1/alarms/{alarm.alarm_id}/ack", json={},
                                      headers=auth("desk-1"))).status_code == 403
            assert (await gw.api.post("/api/v1/alarms/a-000000000000/ack",
                                      headers=auth("mgr-1"))).status_code == 404
            assert (await gw.api.post(f"{url}/vent", headers={
                "Authorization": f"Bearer {new_token()}"})).status_code == 401

        expected = [  # (actor, role, action, result, ids), oldest first
            ("mgr-1", "manager", "session_start", "refused", {}),
            ("desk-1", "front_desk", "session_start", "refused", {}),
            ("desk-1", "front_desk", "session_start", "done",
             {"cmd_id": first["cmd_id"], "session_id": first["session_id"]}),
            ("desk-1", "front_desk", "session_stop", "done",
             {"cmd_id": stop["cmd_id"], "session_id": first["session_id"]}),
            ("desk-1", "front_desk", "session_start", "done", {}),
            ("ops-1", "ops", "session_start", "done",
             {"cmd_id": third["cmd_id"], "session_id": third["session_id"]}),
            ("ops-1", "ops", "vent", "done",
             {"cmd_id": vent["cmd_id"], "session_id": third["session_id"]}),
            ("mgr-1", "manager", "alarm_ack", "done", {"alarm_id": alarm.alarm_id}),
            ("desk-1", "front_desk", "alarm_ack", "refused", {"alarm_id": alarm.alarm_id}),
            ("mgr-1", "manager", "alarm_ack", "refused", {"alarm_id": "a-000000000000"}),
        ]

        # GET /api/v1/audit: managers and ops, newest first, with filters
        assert (await gw.api.get("/api/v1/audit", headers=auth("desk-1"))).status_code == 403
        listed = (await gw.api.get("/api/v1/audit", headers=auth("mgr-1"))).json()
        assert [(r["actor"], r["role"], r["action"], r["result"]) for r in reversed(listed)] == [
            e[:4] for e in expected]
        for row, (*_, ids) in zip(reversed(listed), expected, strict=True):
            assert ids.items() <= row["ids"].items(), row
            if "ghost-1" in row["detail"]:
                assert row["clinic"] is None and row["device"] is None, row
            elif row["action"] != "alarm_ack" or row["result"] == "done":
                assert (row["clinic"], row["device"]) == (clinic, "b1"), row
        assert sum("unknown boot" in r["detail"] for r in listed) == 1
        assert "nurse Anna" in listed[2]["detail"]  # the note is kept, as a note
        vents = (await gw.api.get("/api/v1/audit", params={"action": "vent", "actor": "ops-1"},
                                  headers=auth("ops-1"))).json()
        assert [r["ids"]["cmd_id"] for r in vents] == [vent["cmd_id"]]
        stats = (await gw.api.get("/api/v1/stats", headers=auth("ops-1"))).json()
        assert stats["audit_records"] == len(expected)  # the 401 is no audit record...
        assert stats["api_refused"]["unauthorized"] == 1  # ...it is counted

        # InfluxDB: the same records, tags and fields as docs/schema.md names them
        await gw.flush()
        rows = gw.query("SELECT actor, \"role\", \"action\", \"result\", clinic, device, cmd_id, "
                        "session_id, alarm_id, detail FROM audit")
        cols = rows[0]["columns"]
        stored = [dict(zip(cols, v, strict=True)) for v in rows[0]["values"]]
        assert [(r["actor"], r["role"], r["action"], r["result"]) for r in stored] == [
            e[:4] for e in expected]
        for row, (*_, ids) in zip(stored, expected, strict=True):
            assert all(row[k] == v for k, v in ids.items()), row
        assert gw.count("SELECT count(detail) FROM audit WHERE actor = 'desk-1' "
                        "AND \"action\" = 'session_start'") == 3
        devices = gw.query('SHOW TAG VALUES FROM "audit" WITH KEY = "device"')
        assert [v[1] for v in devices[0]["values"]] == ["b1"]

    logged = [r for r in caplog.records if r.name == "gateway.audit"]
    assert [(r.actor, r.action, r.result) for r in logged] == [e[:1] + e[2:4]
                                                              for e in expected]
