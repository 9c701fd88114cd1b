"""A restarted gateway picks up the sessions that started before it and keeps them safe."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto
from gateway.journal import OpenSession, SessionJournal
from tests.helpers import gateway_settings, mqtt_of, running_gateway, short_program, wait_for

pytestmark = pytest.mark.integration

TERMINAL = {"completed", "stopped", "user_stop", "vented", "rejected", "failed", "lost"}


async def test_restarted_gateway_resumes_sessions_and_vents(
    mosquitto: LocalMosquitto, influx: LocalInflux
) -> None:
    prefix = f"c{secrets.token_hex(3)}-"
    clinic = f"{prefix}1"
    members = [(clinic, f"b{i}") for i in range(3)]
    fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.1, seed=4)
    b0, b1, b2 = fleet.boots.values()
    async with fleet:
        settings = gateway_settings(mosquitto, influx)
        async with running_gateway(settings, influx, clinic_prefix=prefix) as first:
            await wait_for(lambda: all(k in first.gw.fleet.boots for k in fleet.boots), 10,
                           "boots known")
            program = short_program(duration_s=120.0).model_dump(mode="json")
            session_ids = {}
            for _, device in members:
                r = await first.api.post(f"/api/v1/boots/{clinic}/{device}/session",
                                         json={"custom": program})
                assert r.status_code == 202
                session_ids[device] = r.json()["session_id"]
            # The second gateway resumes from the retained state: wait until it carries every
            # session (a start still in flight at shutdown made this test time out under load).
            await wait_for(lambda: all(first.gw.fleet.boots[k].state.session is not None
                                       for k in fleet.boots), 10, "sessions in retained state")

        # The first gateway is gone; a boot develops a stuck valve while nobody watches.
        b1.inject_stuck_valve(0)
        await b1.wait_until(lambda: max(b1.model.pressures) > 110, timeout=10)
        assert b1.vents_received == 0

        settings2 = gateway_settings(mosquitto, influx, db=settings.influx.database)
        async with running_gateway(settings2, influx, clinic_prefix=prefix) as second:
            ready_at = time.time()
            # Over its limits at the restart: vented at once, by the ceiling rule.
            await b1.wait_for_vent(timeout=5)
            assert b1.vents_received_at[0] - ready_at < 1.0
            # The others are watched with their programs recovered from retained state.
            await wait_for(lambda: all(b.key in second.gw.fleet.boots
                                       and second.gw.fleet.boots[b.key].session is not None
                                       for b in (b0, b2)), 5, "sessions resumed")
            view = (await second.api.get(f"/api/v1/boots/{clinic}/b0")).json()
            assert view["session"]["resumed"] is True
            assert view["session"]["session_id"] == session_ids["b0"]
            assert view["session"]["program"] == "test_short"
            assert view["session"]["targets_mmhg"] == [60.0, 58.0, 56.0, 54.0]
            # Rule 2 needs the program's targets: it works on a resumed session.
            b2.inject_stuck_valve(1)
            await b2.wait_for_vent(timeout=5)
            assert b0.vents_received == 0 and b0.self_vents == 0
            await second.flush()
            rows = second.query("SELECT detail, device, rule FROM safety_event")[0]["values"]
            assert sorted((r[2], r[3]) for r in rows) == [
                ("b1", "hard_ceiling"), ("b2", "over_target")]
            assert second.gw.stats.sessions_resumed == 3


async def test_a_session_that_ends_while_the_gateway_is_down_gets_its_one_outcome(
    mosquitto: LocalMosquitto, influx: LocalInflux
) -> None:
    """Start, stop the gateway, the boot vents itself on heartbeat loss, restart: the event
    the broker queued for the gateway's session closes the journalled session as vented."""
    prefix = f"c{secrets.token_hex(3)}-"
    clinic = f"{prefix}1"
    fleet = SimFleet([(clinic, "b0")], mqtt_of(mosquitto), telemetry_period_s=0.1, seed=5)
    boot = fleet.boots[f"{clinic}/b0"]
    async with fleet:
        settings = gateway_settings(mosquitto, influx)  # the same client id and journal twice
        async with running_gateway(settings, influx, clinic_prefix=prefix) as first:
            await wait_for(lambda: boot.key in first.gw.fleet.boots, 10, "boot known")
            r = await first.api.post(f"/api/v1/boots/{clinic}/b0/session", json={
                "custom": short_program(duration_s=120.0).model_dump(mode="json")})
            assert r.status_code == 202, r.text
            session_id = r.json()["session_id"]
            await wait_for(lambda: first.gw.fleet.boots[boot.key].state.session is not None,
                           5, "the boot's state with its session seen")
        await boot.wait_for_self_vent(timeout=15)  # nobody watches: the boot's own duty
        async with running_gateway(settings, influx, clinic_prefix=prefix) as second:
            def outcomes() -> list[str]:
                series = second.query(
                    f"SELECT session_id, outcome FROM session WHERE session_id = '{session_id}'")
                return [row[2] for s in series for row in s["values"]]

            # the outcome has no event of its own: poll storage, past the 10 s window
            await wait_for(lambda: TERMINAL & set(outcomes()), 15, "a terminal outcome")
            await second.flush()
            stored = outcomes()
            assert stored == ["started", "vented"]
            assert second.gw.fleet.boots[boot.key].session is None


async def test_a_journalled_session_nobody_reports_is_recorded_lost(
    mosquitto: LocalMosquitto, influx: LocalInflux, tmp_path: Path
) -> None:
    """A session open at the last stop, of a boot that says nothing of it (no retained state
    with it, no queued event): after the reconcile window it gets the outcome `lost`."""
    journal = tmp_path / "sessions.jsonl"
    entry = OpenSession(key="c-lost-1/b9", session_id="s-lost-1", cmd_id="c-lost-1",
                        program=short_program(), requested_at=time.time() - 60,
                        started_at=time.time() - 59)
    SessionJournal(journal).opened(entry)
    settings = gateway_settings(mosquitto, influx, session_journal=journal,
                                reconcile_window_s=1.0)
    async with running_gateway(settings, influx) as gw:
        await wait_for(lambda: gw.count(
            "SELECT count(session_id) FROM session WHERE outcome = 'lost'"), 10, "'lost' stored")
        rows = gw.query("SELECT session_id, outcome, program, program_name FROM session"
                        )[0]["values"]
        assert [r[1:] for r in rows] == [["s-lost-1", "lost", "custom", "test_short"]]
    assert SessionJournal(journal).load() == {}
