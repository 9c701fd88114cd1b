"""The InfluxDB schema: one function per measurement, turning domain objects into points.

Points the gateway stamps itself take `time_us` from `Stamps`: unique and increasing, so two
records of one series in the same millisecond (a burst of bad payloads, a session that
starts and is vented at once) stay two points instead of the second replacing the first.

Measurements and their tags are what the Grafana dashboards query; change them together.
Tags are validated ids or closed vocabularies (low cardinality); free text goes in fields.
"""

from __future__ import annotations

import functools
import math

from gateway.commands import TrackedCommand
from gateway.contract import MAX_CHAMBERS, Alarm, BootEvent, Telemetry, TopicAddress
from gateway.fleet import Boot, Session
from gateway.lineprotocol import FieldValue, Point, _escape_str
from gateway.schema import Measurement, make_point
from gateway.watchdog import RULE_NUMBER, SafetyAction, VentConfirmed

# The `program_name` field's bound: the contract's own (SessionProgram.name), kept here too so
# that no path around the contract stores more.
PROGRAM_NAME_MAX_CHARS = 80


class Stamps:
    """Microsecond timestamps from a wall clock, never the same twice in this process."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self, wall_s: float) -> int:
        us = int(wall_s * 1_000_000)
        if us <= self._last:
            us = self._last + 1
        self._last = us
        return us


def telemetry_time_us(sample: Telemetry) -> int:
    """The boot's millisecond, with its sequence number in the microseconds below it.

    A replayed or redelivered sample keeps its time, so it overwrites itself; but two samples
    in the same millisecond of the boot's clock (a clock stepped back, as NTP may do) stay
    two points instead of the second silently replacing the first.
    """
    return round(sample.ts * 1000) * 1000 + sample.seq % 1000


def telemetry(addr: TopicAddress, sample: Telemetry,
              targets: list[float] | None = None) -> Point:
    """Stamped with the boot's own time, so a replayed sample overwrites itself.

    Non-finite readings cannot be stored as floats: they are kept as text in `bad_values`.
    `targets` (the running program's per-chamber targets) let a panel draw pressure vs target.
    """
    fields: dict[str, FieldValue] = {}
    bad = []
    for i, p in enumerate(sample.pressures, 1):
        if math.isfinite(p):
            fields[f"p{i}"] = float(p)
        else:
            bad.append(f"p{i}={p}")
    finite = [p for p in sample.pressures if math.isfinite(p)]
    if finite:
        fields["max_p"] = float(max(finite))
    if bad:
        fields["bad_values"] = ",".join(bad)
    fields["seq"] = sample.seq
    if sample.session_id:
        fields["session_id"] = sample.session_id
    if sample.session_elapsed_s is not None:
        fields["session_elapsed_s"] = float(sample.session_elapsed_s)
    for i, target in enumerate(targets or (), 1):
        fields[f"target_p{i}"] = float(target)
    return make_point(
        Measurement.TELEMETRY,
        {"clinic": addr.clinic, "device": addr.device, "phase": sample.phase.value},
        fields,
        telemetry_time_us(sample),
    )


# A telemetry point's measurement and tags, escaped once per boot and phase.
@functools.lru_cache(maxsize=65_536)
def _telemetry_head(clinic: str, device: str, phase: str) -> str:
    return Point(Measurement.TELEMETRY, {"clinic": clinic, "device": device, "phase": phase},
                 {"seq": 0}, 0).encode().rsplit(" ", 2)[0]


_PRESSURE_KEYS = tuple(f"p{i}=" for i in range(1, MAX_CHAMBERS + 1))
# The whole line of a sample with n finite readings and no session: head, p1..pn, max_p, seq,
# time. %r of a float is its repr, as Point.encode writes it.
_PLAIN_LINE = {n: "%s " + "".join(f"{key}%r," for key in _PRESSURE_KEYS[:n])
               + "max_p=%r,seq=%di %d" for n in range(1, MAX_CHAMBERS + 1)}
TELEMETRY_PRIORITY = make_point(Measurement.TELEMETRY, {}, {}, 0).priority


def telemetry_line(addr: TopicAddress, sample: Telemetry,
                   targets: list[float] | None = None) -> bytes | None:
    """`telemetry(...)` as its encoded line, built without the Point: every sample of every
    boot takes this way, and the Point's dicts, sorting and escaping were a tenth of the
    gateway's time per message. The same bytes (tests/test_points.py checks it); None when
    a value could not be encoded (a non-finite target): `telemetry(...)` is refused then,
    with its reason, by the writer.
    """
    pressures = sample.pressures
    head = _telemetry_head(addr.clinic, addr.device, sample.phase)
    time_us = telemetry_time_us(sample)
    all_finite = math.isfinite(sum(pressures))  # every reading finite (else the long way)
    if (all_finite and sample.session_id is None and sample.session_elapsed_s is None
            and not targets):
        # out of session too (the stream's common sample): one format
        return (_PLAIN_LINE[len(pressures)] % (
            head, *map(float, pressures), float(max(pressures)), sample.seq, time_us)).encode()
    if all_finite:
        parts = [key + repr(float(p)) for key, p in zip(_PRESSURE_KEYS, pressures, strict=False)]
        parts.append(f"max_p={float(max(pressures))!r}")
    else:
        parts, bad = [], []
        for key, p in zip(_PRESSURE_KEYS, pressures, strict=False):
            if math.isfinite(p):
                parts.append(key + repr(float(p)))
            else:
                bad.append(f"{key}{p}")
        finite = [p for p in pressures if math.isfinite(p)]
        if finite:
            parts.append(f"max_p={float(max(finite))!r}")
        if bad:
            parts.append(f'bad_values="{_escape_str(",".join(bad))}"')
    parts.append(f"seq={sample.seq}i")
    if sample.session_id:
        parts.append(f'session_id="{_escape_str(sample.session_id)}"')
    if sample.session_elapsed_s is not None:
        parts.append(f"session_elapsed_s={float(sample.session_elapsed_s)!r}")
    for i, target in enumerate(targets or (), 1):
        if not math.isfinite(target):
            return None
        parts.append(f"target_p{i}={float(target)!r}")
    return f"{head} {','.join(parts)} {time_us}".encode()


def safety_event(boot: Boot, action: SafetyAction, session_id: str | None, time_us: int) -> Point:
    fields: dict[str, FieldValue] = {"action": action.action, "detail": action.detail}
    if action.chamber is not None:
        fields["chamber"] = action.chamber
    if action.value is not None:
        fields["value"] = float(action.value)
    if action.limit is not None:
        fields["limit"] = float(action.limit)
    if session_id:
        fields["session_id"] = session_id
    return make_point(
        Measurement.SAFETY_EVENT,
        {"clinic": boot.clinic, "device": boot.device, "rule": action.rule.value,
         "severity": action.severity.value, "rule_no": str(RULE_NUMBER[action.rule])},
        fields,
        time_us,
    )


def command(tracked: TrackedCommand, time_us: int) -> Point:
    clinic, device = tracked.key.split("/", 1)
    fields: dict[str, FieldValue] = {"cmd_id": tracked.command.cmd_id}
    if tracked.latency_s is not None:
        fields["latency_ms"] = round(tracked.latency_s * 1000, 3)
    if tracked.reason:
        fields["reason"] = tracked.reason
    if tracked.command.session_id:
        fields["session_id"] = tracked.command.session_id
    return make_point(
        Measurement.COMMAND,
        {"clinic": clinic, "device": device, "kind": tracked.command.kind.value,
         "outcome": tracked.outcome.value},
        fields,
        time_us,
    )


def session(
    clinic: str, device: str, sess: Session, outcome: str, time_us: int,
    ended_at: float | None = None,
) -> Point:
    """`program` is a closed vocabulary (catalogue key, `custom`, `unknown`): a name is free text
    from outside, and as a tag every new name would be a new series (docs/schema.md §3)."""
    fields: dict[str, FieldValue] = {
        "session_id": sess.session_id,
    }
    if sess.program is not None:
        fields["program_name"] = sess.program.name[:PROGRAM_NAME_MAX_CHARS]
        fields["planned_s"] = float(sess.program.duration_s)
    if ended_at is not None and sess.started_at is not None:
        fields["duration_s"] = round(ended_at - sess.started_at, 3)
    return make_point(
        Measurement.SESSION,
        {"clinic": clinic, "device": device, "program": sess.program_tag,
         "outcome": outcome},
        fields,
        time_us,
    )


def boot_state(boot: Boot, time_us: int) -> Point:
    return make_point(
        Measurement.BOOT_STATE,
        {"clinic": boot.clinic, "device": boot.device},
        {"online": int(boot.online), "firmware": boot.state.firmware,
         "chambers": boot.state.chambers, "max_pressure_mmhg": boot.state.max_pressure_mmhg},
        time_us,
    )


def boot_event(addr: TopicAddress, event: BootEvent, now_ms: int) -> Point:
    """Stamped with the boot's own time: a redelivered event (QoS 1) overwrites itself."""
    fields: dict[str, FieldValue] = {"device_ts": float(event.ts), "received_ms": now_ms}
    if event.session_id:
        fields["session_id"] = event.session_id
    if event.detail:
        fields["detail"] = event.detail
    return make_point(Measurement.BOOT_EVENT, {"clinic": addr.clinic, "device": addr.device,
                                               "kind": event.kind.value},
                      fields, round(event.ts * 1e6))


def device_fault(addr: TopicAddress, kind: str, reason: str, time_us: int) -> Point:
    return make_point(Measurement.DEVICE_FAULT,
                      {"clinic": addr.clinic, "device": addr.device, "kind": kind},
                      {"reason": reason[:500]}, time_us)


def vent_confirmed(boot: Boot, confirmed: VentConfirmed, time_us: int) -> Point:
    """How long the boot took to be safe after the first vent of the episode."""
    fields: dict[str, FieldValue] = {"resends": confirmed.resends}
    if confirmed.after_s is not None:
        fields["after_s"] = round(confirmed.after_s, 3)
    return make_point(Measurement.VENT_CONFIRMED, {"clinic": boot.clinic, "device": boot.device},
                      fields, time_us)


def alarm(a: Alarm) -> Point:
    """One point per state change of an alarm; the latest per alarm_id is its state.

    `alarm_id` is a tag so that InfluxQL can GROUP BY it (current state: `last("detail"),
    "state" ... GROUP BY "alarm_id"`, docs/schema.md). Ids are random, so each alarm is its own
    series (one per state it reaches, at most three): bounded by how many alarms the
    retention keeps, which docs/schema.md discusses.
    """
    fields: dict[str, FieldValue] = {"detail": a.detail, "resolved": a.resolved,
                                     "raised_at": a.raised_at}
    if a.acked_by:
        fields["acked_by"] = a.acked_by
    if a.session_id:
        fields["session_id"] = a.session_id
    return make_point(
        Measurement.ALARM,
        {"clinic": a.clinic, "device": a.device, "alarm_id": a.alarm_id, "rule": a.rule,
         "severity": a.severity.value, "state": a.state.value},
        fields,
        round(a.updated_at * 1e6),
    )


def gateway_health(gateway_id: str, fields: dict[str, FieldValue], time_us: int) -> Point:
    """The gateway's own counters and gauges; counters are totals since the process started."""
    return make_point(Measurement.GATEWAY_HEALTH, {"gateway": gateway_id}, fields, time_us)
