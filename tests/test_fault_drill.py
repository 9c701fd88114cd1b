"""The fault drill: every fault kind against real Mosquitto, influxd and the gateway.

The scenario file shipped for ops (`scenarios/fault-drill.yaml`) is run as ops would run it,
pointed at this test's servers; the assertions read the JSON report it writes. Its
`clock_step` must cause nothing, its return included: the drill fails while the gateway
times rule 3 (sustained inflation) on the boot's clock instead of its own monotonic one.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import httpx
import pytest
import yaml

from device_sim import runner
from device_sim.faults import FaultKind
from device_sim.local_stack import LocalInflux, LocalMosquitto
from device_sim.scenario import Scenario
from gateway import points
from gateway.contract import Channel, Telemetry, TopicAddress
from gateway.lineprotocol import encode_batch
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
    # Away longer than its window: judged by the boot's own vent, not the gateway's late one.
    assert by_kind["disconnect"][0]["vented_by"] == "boot"
    assert by_kind["clock_step"][0]["outcome"] == "ok_nothing_expected"
    assert by_kind["ignore_vent"][0]["rule"] == "vent_not_confirmed"
    assert by_kind["malformed"][0]["source"] == "device_fault"
    assert data["false_vents"] == []
    assert data["totals"]["telemetry_stored"] >= data["totals"]["telemetry_sent"]


async def test_stored_telemetry_is_counted_on_the_boots_own_clocks(influx: LocalInflux) -> None:
    """Telemetry is stamped with the boot's clock: samples of a boot stepped 5 minutes back
    lie before the run began and must still be found; an earlier run's are not counted."""
    db = f"t_{secrets.token_hex(4)}"
    async with httpx.AsyncClient(base_url=influx.url, timeout=10) as http:
        (await http.post("/query", params={"q": f'CREATE DATABASE "{db}"'})).raise_for_status()
        prefix = f"ts{secrets.token_hex(2)}-"
        scenario = Scenario.model_validate({
            "name": "clocks", "duration_s": 120, "gateway_url": "http://127.0.0.1:1",
            "influx": {"url": influx.url, "database": db},
            "fleet": {"boots": 2, "clinics": 1, "clinic_prefix": prefix},
            "faults": [{"kind": "clock_step", "at_s": [30],
                        "params": {"step_s": -300, "return_after_s": 60}}]})
        (c, on_time), (_, stepped) = scenario.boot_ids()
        started = time.time()

        def samples(device: str, first_ts: float, n: int) -> list[points.Point]:
            addr = TopicAddress(c, device, Channel.TELEMETRY)
            return [points.telemetry(addr, Telemetry.model_validate(
                {"seq": k, "ts": first_ts + k, "phase": "inflate", "pressures": [40.0] * 4}))
                for k in range(n)]

        body, refused = encode_batch(
            samples(on_time, started + 1, 5) + samples(stepped, started + 31 - 300, 7)
            + samples(on_time, started - 3600, 3))  # the same clinic an hour ago: not this run
        assert not refused
        (await http.post("/write", params={"db": db, "precision": "u"},
                         content=body)).raise_for_status()
    detections = runner.Detections(scenario)
    try:
        stored = await detections.telemetry_by_boot(started)
    finally:
        await detections.client.aclose()
    assert stored == {f"{c}/{on_time}": 5, f"{c}/{stepped}": 7}
