"""The names of the InfluxDB measurements the gateway writes, and which are the safety record.

One module, imported by what writes the points (gateway/points.py, gateway/audit.py, which
build them with `make_point`, so each point carries its priority and the storage writer never
reads a measurement name), and by what queries
them (grafana/generator/, device_sim/runner.py, device_sim/demo.py): a measurement renamed
here is renamed everywhere, and a query cannot name a measurement that is never written.
docs/schema.md §2 is the reference for each; tests/test_schema_doc.py checks the two agree.

`Measurement` is a `StrEnum`, so a member is its name wherever a string is expected
(`Point.measurement`, an f-string of InfluxQL, a comparison with a stored row's name).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from gateway.lineprotocol import FieldValue, Point


class Measurement(StrEnum):
    TELEMETRY = "telemetry"
    SAFETY_EVENT = "safety_event"
    COMMAND = "command"
    SESSION = "session"
    BOOT_STATE = "boot_state"
    BOOT_EVENT = "boot_event"
    DEVICE_FAULT = "device_fault"
    VENT_CONFIRMED = "vent_confirmed"
    ALARM = "alarm"
    GATEWAY_HEALTH = "gateway_health"
    AUDIT = "audit"


# The clinical safety record: spooled ahead of telemetry when InfluxDB is unreachable, kept by
# the spool's safety reserve (docs/storage.md); what a clinic must be able to reconstruct after
# an incident (what the watchdog did, what was commanded, by whom, what the boots reported wrong).
SAFETY_RECORD: frozenset[Measurement] = frozenset({
    Measurement.SAFETY_EVENT, Measurement.ALARM, Measurement.COMMAND, Measurement.SESSION,
    Measurement.VENT_CONFIRMED, Measurement.DEVICE_FAULT, Measurement.AUDIT,
})

# The same set as plain strings, for what compares with a stored row's name.
PRIORITY_MEASUREMENTS: frozenset[str] = frozenset(m.value for m in SAFETY_RECORD)


def make_point(measurement: Measurement, tags: Mapping[str, str],
               fields: Mapping[str, FieldValue], time_us: int) -> Point:
    """A point of the schema: its priority (safety record or not) is decided here, once, by
    its measurement, so storage (gateway/storage.py) takes it from the point."""
    return Point(measurement, tags, fields, time_us, priority=measurement in SAFETY_RECORD)
