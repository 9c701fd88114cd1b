"""A flood of junk on boot topics cannot fill InfluxDB or the spool's safety reserve.

Every rejected message used to become a `device_fault` point, and `device_fault` is spooled
with the safety records' priority: a client sending junk as fast as it can was writing the
gateway's safety store full. Now the points come at most `device_fault_points_per_s` on
average (bursts of 10 s worth); the rest are counted, and every rejection still is.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

from device_sim.local_stack import LocalInflux, LocalMosquitto
from gateway.contract import Channel, topic
from gateway.lineprotocol import Point
from gateway.service import Gateway
from tests.helpers import gateway_settings


def _gateway(tmp_path: Path, now: list[float]) -> tuple[Gateway, list[Point]]:
    broker = cast(LocalMosquitto, SimpleNamespace(port=9))  # never connected
    influx = cast(LocalInflux, SimpleNamespace(url="http://127.0.0.1:9"))
    cfg = gateway_settings(broker, influx, session_journal=tmp_path / "sessions.jsonl",
                           device_fault_points_per_s=20.0)
    gw = Gateway(cfg, monotonic=lambda: now[0])
    stored: list[Point] = []
    gw.writer.submit = stored.append  # type: ignore[method-assign]
    return gw, stored


def test_junk_is_stored_at_a_bounded_rate_and_every_message_counted(tmp_path: Path) -> None:
    now = [1000.0]
    gw, stored = _gateway(tmp_path, now)
    junk = topic("c1", "b1", Channel.TELEMETRY)
    for _ in range(5_000):
        gw.handle_message(junk, b"not json")
    faults = [p for p in stored if p.measurement == "device_fault"]
    assert len(faults) == 200  # the burst: 10 s worth at 20/s
    assert gw.stats.rejected["not_json"] == 5_000
    assert gw.health_fields()["device_faults_unrecorded"] == 4_800
    now[0] += 1.0  # one second later, 20 more may be stored
    for _ in range(100):
        gw.handle_message(junk, b"not json")
    faults = [p for p in stored if p.measurement == "device_fault"]
    assert len(faults) == 220
    assert gw.health_fields()["device_faults_unrecorded"] == 4_880
    assert gw.stats.rejected["not_json"] == 5_100


def test_occasional_bad_messages_are_all_stored(tmp_path: Path) -> None:
    now = [1000.0]
    gw, stored = _gateway(tmp_path, now)
    for i in range(300):
        now[0] += 0.1  # 10 a second, under the rate
        gw.handle_message(topic("c1", f"b{i % 7}", Channel.STATE), b"{")
    assert sum(p.measurement == "device_fault" for p in stored) == 300
    assert gw.health_fields()["device_faults_unrecorded"] == 0
