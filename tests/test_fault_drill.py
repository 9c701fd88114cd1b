"""The fault drill: every fault kind against real Mosquitto, influxd and the gateway.

The scenario file shipped for ops (`scenarios/fault-drill.yaml`) is run as ops would run it,
pointed at this test's servers; the assertions read the JSON report it writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from device_sim import runner
from device_sim.faults import FaultKind
from device_sim.local_stack import LocalInflux, LocalMosquitto
from tests.helpers import gateway_settings, running_gateway

pytestmark = pytest.mark.integration

DRILL = Path(__file__).resolve().parent.parent / "scenarios" / "fault-drill.yaml"


def pointed_at(tmp_path: Path, mosquitto: LocalMosquitto, influx: LocalInflux, db: str,
               api_port: int) -> Path:
    data = yaml.safe_load(DRILL.read_text())
    data["broker"]["port"] = mosquitto.port
    data["gateway_url"] = f"http://127.0.0.1:{api_port}"
    data["influx"] = {"url": influx.url, "database": db}
    path = tmp_path / "fault-drill.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def test_fault_drill_report_matches_what_was_injected(
    mosquitto: LocalMosquitto, influx: LocalInflux, tmp_path: Path
) -> None:
    settings = gateway_settings(mosquitto, influx)
    # The shipped drill runs on the gateway's default limits (1 Hz, 3 s silence floor).
    settings.watchdog.telemetry_loss_floor_s = 3.0
    async with running_gateway(settings, influx) as gw:
        scenario = pointed_at(tmp_path, mosquitto, influx, gw.db, settings.api.port)
        report = await runner.run(scenario, tmp_path / "out", live=False)
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000
    assert data["passed"] is True, data["failures"]
    assert report.passed and not data["failures"]
    kinds = {row["kind"]: row for row in data["kinds"]}
    assert set(kinds) == {k.value for k in FaultKind}, "every fault kind was injected"
    by_kind = {}
    for row in data["injections"]:
        by_kind.setdefault(row["kind"], []).append(row)
    detected = {"detected", "ok_nothing_expected"}
    for kind, rows in by_kind.items():
        assert all(r["outcome"] in detected for r in rows), (kind, rows)
    assert by_kind["stuck_valve"][0]["rule"] in {"over_target", "hard_ceiling"}
    assert by_kind["silence"][0]["rule"] == "telemetry_loss"
    assert by_kind["disconnect"][0]["rule"] == "offline_in_session"
    assert by_kind["ignore_vent"][0]["rule"] == "vent_not_confirmed"
    assert by_kind["malformed"][0]["source"] == "device_fault"
    assert data["false_vents"] == []
    assert data["totals"]["telemetry_stored"] >= data["totals"]["telemetry_sent"]
