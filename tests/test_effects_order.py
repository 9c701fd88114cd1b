"""The order of a watchdog vent's effects, as docs/safety.md §1 states it: the vent command
is handed to the MQTT client first, then the log line, the stored points and the alarm.

In-process (no broker, no database: the MQTT link and the writer are stand-ins that only
note the order of the calls); the same telemetry path as a real message (`handle_message`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.contract import ALARM_TOPIC_PREFIX, Channel, topic
from gateway.service import Gateway
from gateway.settings import GatewaySettings, InfluxSettings


class Trace(logging.Handler):
    """One list of everything the gateway did, in the order it did it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.calls.append(f"log:{record.getMessage()}")


class Wire:
    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def publish_urgent(self, name: str, payload: bytes, **_: Any) -> None:
        self.trace.calls.append(f"urgent:{json.loads(payload)['kind']}")

    def publish_nowait(self, name: str, payload: bytes, **_: Any) -> None:
        self.trace.calls.append("alarm_published" if name.startswith(ALARM_TOPIC_PREFIX)
                                else f"publish:{name}")


class Writer:
    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def submit(self, point: Any) -> None:
        self.trace.calls.append(f"point:{point.measurement}")

    def submit_line(self, line: bytes, *, priority: bool) -> None:
        self.trace.calls.append(f"point:{line.split(b',', 1)[0].decode()}")


def test_a_ceiling_vent_is_sent_before_it_is_logged_stored_or_alarmed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trace = Trace()
    gw = Gateway(GatewaySettings(influx=InfluxSettings(spool_dir=None),
                                 session_journal=tmp_path / "sessions.jsonl"))
    gw.link = Wire(trace)  # type: ignore[assignment]
    gw.writer = Writer(trace)  # type: ignore[assignment]
    service_log = logging.getLogger("gateway.service")
    service_log.addHandler(trace)
    caplog.set_level(logging.INFO, logger="gateway.service")

    async def feed() -> None:  # a tracked command awaits its ack on the running loop
        gw.handle_message(topic("c1", "b1", Channel.STATE), json.dumps({
            "online": True, "firmware": "f", "chambers": 1, "zones": ["calf"],
            "max_pressure_mmhg": 120, "telemetry_period_s": 0.5, "ts": 0}).encode())
        trace.calls.clear()
        gw.handle_message(topic("c1", "b1", Channel.TELEMETRY), json.dumps({
            "seq": 1, "ts": 1, "phase": "inflate", "pressures": [130.0]}).encode())
        gw.commands.close()

    try:
        asyncio.run(feed())
    finally:
        service_log.removeHandler(trace)
    calls = trace.calls
    assert calls and calls[0] == "urgent:vent", calls
    assert gw.stats.vents_sent == 1 and gw.stats.safety_events == 1
    assert [str(a.rule) for a in gw.alarms.listed()] == ["hard_ceiling"]
    for later in ("log:safety event", "point:safety_event", "alarm_published", "point:alarm",
                  "point:telemetry"):
        assert later in calls, (later, calls)
    assert calls.index("log:safety event") < calls.index("point:safety_event") < (
        calls.index("alarm_published")) < calls.index("point:telemetry")
