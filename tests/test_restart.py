"""A restarted gateway picks up the sessions that started before it and keeps them safe."""

from __future__ import annotations

import secrets
import time

import pytest

from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto
from tests.helpers import gateway_settings, mqtt_of, running_gateway, short_program, wait_for

pytestmark = pytest.mark.integration


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
