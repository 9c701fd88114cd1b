"""docs/schema.md is what Grafana users and clinic managers query: it must stay true.

Every ```sql block in it runs, as written, against a real influxd filled with one realistic
clinic day made by the gateway's own point functions (gateway/points.py, encoded by
gateway/lineprotocol.py and written with the gateway writer's precision), and must return the
rows the document describes. Every measurement, tag and field those functions write, every
gateway_health field and every value of the closed vocabularies must be named in the document.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import itertools
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import httpx
import pytest

from device_sim.local_stack import LocalInflux
from gateway import points
from gateway.alarms import VENT_RESOLVED, AlarmBook
from gateway.api_users import Role
from gateway.audit import AuditAction, AuditEvent, AuditResult, audit_point
from gateway.commands import CommandOutcome, TrackedCommand
from gateway.contract import (
    Alarm,
    AlarmState,
    BootEvent,
    BootState,
    Channel,
    Command,
    CommandKind,
    EventKind,
    Mode,
    PayloadError,
    Phase,
    ProgramTiming,
    SessionProgram,
    Severity,
    Telemetry,
    TopicAddress,
)
from gateway.fleet import (
    PROGRAM_CUSTOM,
    PROGRAM_UNKNOWN,
    Boot,
    Fleet,
    Session,
    SessionOutcome,
    SessionStatus,
    catalogue_key,
)
from gateway.lineprotocol import Point, encode_batch
from gateway.programs import CATALOGUE
from gateway.schema import PRIORITY_MEASUREMENTS, SAFETY_RECORD, Measurement
from gateway.service import Gateway
from gateway.settings import GatewaySettings, InfluxSettings, ProgramLimits
from gateway.watchdog import RULE_NUMBER, Rule, SafetyAction, VentConfirmed, Watchdog
from tests.helpers import grafana_generator

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "schema.md"

# ```sql <key>: the key (ignored by Markdown renderers) names the rows the test expects.
QUERY_BLOCK = re.compile(
    r"^[ \t]*```(?:sql|influxql)[ \t]+([a-z0-9-]+)[ \t]*\n(.*?)^[ \t]*```", re.M | re.S)
ANY_QUERY_BLOCK = re.compile(r"^[ \t]*```(?:sql|influxql)\b", re.M | re.I)

CLINIC, OTHER_CLINIC = "clinic-a", "clinic-b"
# 2 June 2025 in Europe/Berlin (UTC+2): the day of "sessions today" in the document.
DAY_START_S = 1748815200  # 2025-06-02T00:00:00+02:00
H = 3600.0


# ---------------------------------------------------------------- the data


def program(name: str, duration_s: float, targets: list[float]) -> SessionProgram:
    return SessionProgram(name=name, mode=Mode.SEQUENTIAL, targets_mmhg=targets,
                          duration_s=duration_s,
                          timing=ProgramTiming(inflate_s=5, hold_s=10, deflate_s=5, pause_s=5))


LIMITS = ProgramLimits()
DOMS = CATALOGUE["doms_24_48h"].resolve(4, LIMITS)  # a catalogue program: tag doms_24_48h
RECOVERY = program("recovery-20", 1200, [70.0, 65.0, 60.0, 55.0])  # a clinic's own: custom


def new_session(session_id: str, prog: SessionProgram | None, cmd_id: str,
                requested_at: float, *args: Any) -> Session:
    """A session as the gateway makes one: its catalogue program recognised (fleet.py)."""
    return Session(session_id, prog, cmd_id, requested_at, *args,
                   catalogue=catalogue_key(prog, LIMITS))


@dataclass
class Day:
    """The points written, with what the queries must find among them."""

    now: float  # unix seconds when the data was made; "now" events are before it
    points: list[Point] = field(default_factory=list)
    alarms: dict[str, Alarm] = field(default_factory=dict)  # name -> latest state
    health: list[dict[str, Any]] = field(default_factory=list)  # (time_s, fields) per report


class Clinic:
    """Boots of a clinic and the gateway's point functions, driven by hand in time order."""

    def __init__(self, day: Day) -> None:
        self.day = day
        self.fleet = Fleet()
        self.book = AlarmBook()

    def boot(self, clinic: str, device: str, *, online: bool = True, at: float,
             firmware: str = "2.4.1") -> Boot:
        state = BootState(online=online, firmware=firmware, chambers=4,
                          zones=["foot", "calf", "knee", "thigh"], max_pressure_mmhg=150.0,
                          telemetry_period_s=1.0, ts=at)
        known = self.fleet.get(clinic, device)
        boot = self.fleet.upsert_state(clinic, device, state, at, 100.0)
        if known is not None:
            boot.watch.online = online  # the service does this through the watchdog
        self.add(points.boot_state(boot, ms(at) * 1000))
        return boot

    def add(self, point: Point) -> None:
        self.day.points.append(point)

    # sessions -----------------------------------------------------------------------------

    def start(self, boot: Boot, session_id: str, prog: SessionProgram | None, at: float
              ) -> Session:
        sess = new_session(session_id, prog, f"c-{session_id[2:]}", at - 0.4,
                           SessionStatus.RUNNING, at)
        boot.session = sess
        self.session(boot, sess, "started", at)
        return sess

    def resume(self, boot: Boot, sess: Session, at: float) -> None:
        sess.resumed = True
        boot.session = sess
        self.session(boot, sess, "resumed", at)

    def end(self, boot: Boot, sess: Session, outcome: str, at: float, *,
            duration: bool = True) -> None:
        boot.session = None
        self.session(boot, sess, outcome, at, ended_at=at if duration else None)

    def rejected(self, boot: Boot, session_id: str, prog: SessionProgram, at: float) -> None:
        sess = new_session(session_id, prog, f"c-{session_id[2:]}", at - 0.3)
        self.session(boot, sess, SessionOutcome.REJECTED.value, at)

    def session(self, boot: Boot, sess: Session, outcome: str, at: float,
                ended_at: float | None = None) -> None:
        self.add(points.session(boot.clinic, boot.device, sess, outcome, ms(at) * 1000,
                                ended_at=ended_at))

    def telemetry(self, boot: Boot, at: float, seq: int, phase: Phase,
                  pressures: list[float], sess: Session | None = None) -> None:
        sample = Telemetry(
            seq=seq, ts=at, phase=phase, pressures=pressures,
            session_id=sess.session_id if sess else None,
            session_elapsed_s=round(at - sess.started_at, 2) if sess and sess.started_at
            else None)
        targets = sess.program.targets_mmhg if sess and sess.program else None
        self.add(points.telemetry(addr(boot), sample, targets))

    def event(self, boot: Boot, kind: EventKind, at: float, session_id: str | None = None,
              detail: str | None = None) -> None:
        ev = BootEvent(kind=kind, ts=at, session_id=session_id, detail=detail)
        self.add(points.boot_event(addr(boot), ev, ms(at + 0.05)))

    # commands -----------------------------------------------------------------------------

    def command(self, boot: Boot, kind: CommandKind, cmd_id: str, at: float,
                acks: list[tuple[CommandOutcome, float]], *, reason: str | None = None,
                start: Session | None = None) -> None:
        """The command as sent, then one point per ack (or the timeout) after `at`."""
        sess = start or boot.session
        cmd = Command(cmd_id=cmd_id, kind=kind, issued_at=at, reason=reason,
                      session_id=sess.session_id if sess else None,
                      program=start.program if start else None)
        tracked = TrackedCommand(boot.key, cmd, at)
        self.add(points.command(tracked, ms(at) * 1000))
        for outcome, after in acks:
            tracked.outcome = outcome
            if outcome is CommandOutcome.FAILED:
                tracked.reason = f"no ack within {after:g} s"
            elif tracked.latency_s is None:
                tracked.latency_s = after
            self.add(points.command(tracked, ms(at + after) * 1000))

    # safety -------------------------------------------------------------------------------

    def safety(self, boot: Boot, action: SafetyAction, at: float) -> Alarm | None:
        session_id = boot.session.session_id if boot.session else None
        self.add(points.safety_event(boot, action, session_id, ms(at) * 1000))
        if not action.alarm:
            return None
        return self.publish(self.book.raise_alarm(boot.clinic, boot.device, action, session_id,
                                                  at))

    def publish(self, a: Alarm) -> Alarm:
        self.add(points.alarm(a))
        return a

    def confirmed(self, boot: Boot, after_s: float, resends: int, at: float) -> None:
        self.add(points.vent_confirmed(boot, VentConfirmed(after_s, resends), ms(at) * 1000))
        for a in self.book.resolve(boot.clinic, boot.device, VENT_RESOLVED, at):
            self.publish(a)

    def ack(self, a: Alarm, by: str, at: float) -> Alarm:
        return self.publish(self.book.acknowledge(a.alarm_id, by, at))

    def fault(self, boot: Boot, kind: str, reason: str, at: float) -> None:
        self.add(points.device_fault(addr(boot), kind, reason, ms(at) * 1000))

    def keep(self, **named: Alarm | None) -> None:
        """Alarms the queries are checked against, by name."""
        for name, a in named.items():
            assert a is not None
            self.day.alarms[name] = a


def ms(t: float) -> int:
    return round(t * 1000)


def addr(boot: Boot) -> TopicAddress:
    return TopicAddress(boot.clinic, boot.device, Channel.TELEMETRY)


def action(rule: Rule, severity: Severity, detail: str, *, vent: bool = True,
           alarm: bool = True, stop: bool = False, chamber: int | None = None,
           value: float | None = None, limit: float | None = None) -> SafetyAction:
    return SafetyAction(rule=rule, severity=severity, vent=vent, alarm=alarm, detail=detail,
                        chamber=chamber, value=value, limit=limit, stop=stop,
                        fault=rule is Rule.IMPLAUSIBLE_DATA)


def june_2nd(c: Clinic) -> None:
    """Sessions on 2 June 2025 (Berlin), and the two nights around it."""
    t = float(DAY_START_S)
    b7 = c.boot(CLINIC, "boot-007", at=t - 5 * 24 * H)
    b12 = c.boot(CLINIC, "boot-012", at=t - 5 * 24 * H)
    b101 = c.boot(OTHER_CLINIC, "boot-101", at=t - 5 * 24 * H)

    late = c.start(b7, "s-5e0c6a1f2a99", DOMS, t - 3 * H)  # 21:00 on 1 June
    c.end(b7, late, "completed", t - 2.5 * H)  # 21:30: the day before
    night = c.start(b12, "s-5e0c6a1f2b00", RECOVERY, t - 0.25 * H)  # 23:45 on 1 June
    c.end(b12, night, "stopped", t + 0.25 * H)  # 00:15 on 2 June: counts for the 2nd

    s1 = c.start(b7, "s-5e0c6a1f2b01", DOMS, t + 9 * H)
    for i, phase in enumerate((Phase.INFLATE, Phase.HOLD, Phase.DEFLATE)):
        c.telemetry(b7, t + 9 * H + 10 * i, 1000 + i, phase, [58.0 - i, 50.0, 41.0, 30.0], s1)
    c.end(b7, s1, "completed", t + 9.5 * H)

    s2 = c.start(b7, "s-5e0c6a1f2b02", DOMS, t + 11 * H)
    c.resume(b7, s2, t + 11.2 * H)  # the gateway restarted mid-session
    c.event(b7, EventKind.USER_STOP, t + 11.3 * H, s2.session_id, "tingling")
    c.safety(b7, action(Rule.USER_STOP, Severity.MEDIUM, "stopped by the user at the boot: "
                        "tingling", vent=False), t + 11.3 * H)
    c.end(b7, s2, "user_stop", t + 11.3 * H)

    s3 = c.start(b12, "s-5e0c6a1f2b03", RECOVERY, t + 10 * H)
    at = t + 10 * H
    c.telemetry(b12, at + 60, 5000, Phase.INFLATE, [61.0, 30.2, 4.0, 0.5], s3)
    c.telemetry(b12, at + 61, 5001, Phase.INFLATE, [63.5, 44.0, 6.0, 0.5], s3)
    c.telemetry(b12, at + 62, 5002, Phase.INFLATE, [64.0, math.nan, 9.0, 0.6], s3)
    c.safety(b12, action(Rule.IMPLAUSIBLE_DATA, Severity.HIGH, "chamber 2 reads nan mmHg, "
                         "outside the plausible -20..300 mmHg", chamber=2, limit=300.0),
             at + 62)
    c.fault(b12, "implausible_data", "chamber 2 reads nan mmHg", at + 62)
    c.telemetry(b12, at + 63, 5003, Phase.VENT, [20.0, 12.0, 3.0, 0.2], s3)
    c.end(b12, s3, "vented", at + 62)

    c.rejected(b12, "s-5e0c6a1f2b04", RECOVERY, t + 12 * H)
    s5 = c.start(b12, "s-5e0c6a1f2b05", RECOVERY, t + 14 * H)
    c.end(b12, s5, "lost", t + 14.2 * H, duration=False)  # the boot rebooted mid-session

    s6 = c.start(b7, "s-5e0c6a1f2b06", DOMS, t + 23.5 * H)  # 23:30
    c.end(b7, s6, "completed", t + 24.1 * H)  # 00:06 on 3 June: not the 2nd's

    other = c.start(b101, "s-77aa00bb11c0", DOMS, t + 9 * H)
    c.end(b101, other, "completed", t + 9.5 * H)


def last_hour(c: Clinic) -> None:
    """What a clinic manager looks at now: the last hours of clinic-a (and one of clinic-b)."""
    now = c.day.now
    b7 = c.boot(CLINIC, "boot-007", at=now - 3 * 24 * H)
    b12 = c.boot(CLINIC, "boot-012", at=now - 30 * 24 * H, firmware="2.3.0")
    b13 = c.boot(CLINIC, "boot-013", at=now - 2 * 24 * H)
    b14 = c.boot(CLINIC, "boot-014", at=now - 24 * H, firmware="3.0.0-beta")
    b101 = c.boot(OTHER_CLINIC, "boot-101", at=now - 24 * H)

    # boot-007: a start nobody acknowledged, an over-target vent, a hard-ceiling vent
    failed = new_session("s-9f00aa000001", DOMS, "c-9f00aa000001", now - 3 * H)
    c.command(b7, CommandKind.START, "c-9f00aa000001", now - 3 * H,
              [(CommandOutcome.FAILED, 15.0)], start=failed)
    c.end(b7, failed, "failed", now - 3 * H + 15, duration=False)
    c.fault(b7, "not_json", "not JSON: Expecting value: line 1 column 1 (char 0)", now - 3 * H)
    c.fault(b7, "not_json", "not JSON: Expecting value: line 1 column 1 (char 0)", now - 2 * H)
    early = c.start(b7, "s-9f00aa000002", DOMS, now - 2.2 * H)
    a0 = c.safety(b7, action(Rule.OVER_TARGET, Severity.HIGH, "chamber 1 at 72.5 mmHg above "
                             "target 60 + 10 mmHg for 3 samples", chamber=1, value=72.5,
                             limit=70.0), now - 2 * H)
    c.command(b7, CommandKind.VENT, "v-9f00aa000003", now - 2 * H,
              [(CommandOutcome.ACCEPTED, 0.21), (CommandOutcome.DONE, 3.0)])
    c.end(b7, early, "vented", now - 2 * H)
    c.confirmed(b7, 3.1, 0, now - 2 * H + 3.1)
    assert a0 is not None
    c.ack(a0, "nurse", now - 1.9 * H)

    s1 = c.start(b7, "s-9f00aa000004", DOMS, now - 1.0 * H + 300)
    a1 = c.safety(b7, action(Rule.HARD_CEILING, Severity.HIGH, "chamber 2 at 131.5 mmHg above "
                             "the ceiling of 120 mmHg", chamber=2, value=131.5, limit=120.0),
                  now - 40 * 60)
    c.command(b7, CommandKind.VENT, "v-9f00aa000005", now - 40 * 60,
              [(CommandOutcome.ACCEPTED, 0.28), (CommandOutcome.DONE, 2.3)])
    c.end(b7, s1, "vented", now - 40 * 60)
    c.event(b7, EventKind.VENTED, now - 40 * 60 + 0.5, s1.session_id, "gateway vent")
    c.confirmed(b7, 2.4, 0, now - 40 * 60 + 2.4)  # a1: resolved, still not acknowledged
    c.keep(a1=a1)

    s3 = c.start(b7, "s-9f00aa000006", RECOVERY, now - 30 * 60)
    samples = ((Phase.INFLATE, [68.0, 51.2, 9.5, 1.0]), (Phase.HOLD, [70.1, 65.3, 60.2, 54.8]),
               (Phase.DEFLATE, [12.4, 30.1, 41.7, 53.9]))
    for i, (phase, pressures) in enumerate(samples):
        c.telemetry(b7, now - 60 + 20 * i, 18_000 + i, phase, pressures, s3)

    # boot-012: overrun, stop + vent, the vent not confirmed in time, re-sent, then safe
    s2 = c.start(b12, "s-9f00aa000007", RECOVERY, now - 50 * 60)
    t0 = now - 20 * 60
    a3 = c.safety(b12, action(Rule.SESSION_OVERRUN, Severity.HIGH, "session still running "
                              "after 1261 s (program 1200 s + grace 60 s)", stop=True,
                              value=1261.0, limit=1260.0), t0)
    c.command(b12, CommandKind.STOP, "s-9f00aa000008", t0, [(CommandOutcome.ACCEPTED, 0.4)],
              reason="session overrun")
    c.command(b12, CommandKind.VENT, "v-9f00aa000009", t0, [(CommandOutcome.ACCEPTED, 0.35)],
              reason="session_overrun")
    c.end(b12, s2, "vented", t0)
    assert a3 is not None
    c.ack(a3, "nurse", t0 + 5)  # acknowledged while the chambers were still emptying
    a4 = c.safety(b12, action(Rule.VENT_NOT_CONFIRMED, Severity.HIGH, "chambers not below 5 "
                              "mmHg 10.2 s after the vent; re-sent (1/3)", value=10.2,
                              limit=10.0), t0 + 10.2)
    c.command(b12, CommandKind.VENT, "v-9f00aa00000a", t0 + 10.2,
              [(CommandOutcome.ACCEPTED, 0.3), (CommandOutcome.DONE, 3.5)])
    c.confirmed(b12, 14.0, 1, t0 + 14.0)  # resolves both; the overrun alarm was acked first
    c.fault(b12, "invalid", "pressures: List should have at least 1 item (1 error(s))",
            now - 55 * 60)
    c.safety(b12, action(Rule.PROGRAM_REFUSED, Severity.LOW, "target 125 mmHg on chamber 1 is "
                         "above the clinic ceiling", vent=False, alarm=False), now - 5 * 60)
    c.keep(a4=a4)

    # boot-013: the user's stop button, then offline in the middle of the next session
    s4 = c.start(b13, "s-9f00aa00000b", DOMS, now - 55 * 60)
    c.event(b13, EventKind.USER_STOP, now - 45 * 60, s4.session_id, "pain")
    a2 = c.safety(b13, action(Rule.USER_STOP, Severity.MEDIUM, "stopped by the user at the "
                              "boot: pain", vent=False), now - 45 * 60)
    c.end(b13, s4, "user_stop", now - 45 * 60)
    assert a2 is not None
    c.keep(a2=c.ack(a2, "front desk", now - 44 * 60))  # cleared: nothing left to do
    s5 = c.start(b13, "s-9f00aa00000c", DOMS, now - 35 * 60)
    c.boot(CLINIC, "boot-013", online=False, at=now - 25 * 60)
    a5 = c.safety(b13, action(Rule.OFFLINE_IN_SESSION, Severity.HIGH, "boot went offline during "
                              "a session; it must vent by itself"), now - 25 * 60)
    c.command(b13, CommandKind.VENT, "v-9f00aa00000d", now - 25 * 60,
              [(CommandOutcome.FAILED, 5.0)])
    c.end(b13, s5, "vented", now - 25 * 60)
    assert a5 is not None
    c.keep(a5=c.ack(a5, "nurse", now - 24 * 60))  # acknowledged; still offline
    c.fault(b13, "too_large", "payload of 20000 bytes exceeds 16384", now - 6 * H)

    # boot-014: a session the gateway picked up after its restart; a newer firmware's phase
    s6 = c.start(b14, "s-9f00aa00000e", RECOVERY, now - 50 * 60)
    c.resume(b14, s6, now - 8 * 60)
    c.telemetry(b14, now - 30, 420, Phase("prime"), [22.0, 21.5, 20.9, 20.1], s6)
    c.event(b14, EventKind.FAULT, now - 6 * H, None, "pump temperature high")
    c.fault(b14, "boot_fault", "pump temperature high", now - 6 * H)

    # clinic-b: not clinic-a's business
    s7 = c.start(b101, "s-77aa00bb11c1", DOMS, now - 30 * 60)
    a6 = c.safety(b101, action(Rule.HARD_CEILING, Severity.HIGH, "chamber 1 at 125.0 mmHg above "
                               "the ceiling of 120 mmHg", chamber=1, value=125.0, limit=120.0),
                  now - 10 * 60)
    c.command(b101, CommandKind.VENT, "v-77aa00bb11c2", now - 10 * 60,
              [(CommandOutcome.ACCEPTED, 0.2)])
    c.end(b101, s7, "vented", now - 10 * 60)
    c.fault(b101, "not_json", "not JSON: Expecting value", now - 10 * 60)
    c.keep(a6=a6)

    # an alarm of last week, long cleared
    old = c.safety(b7, action(Rule.TELEMETRY_LOSS, Severity.HIGH, "no telemetry for 12.0 s in "
                              "session (limit 10 s)", value=12.0, limit=10.0),
                   now - 8 * 24 * H)
    assert old is not None
    c.ack(old, "nurse", now - 8 * 24 * H + 60)
    c.confirmed(b7, 3.0, 0, now - 8 * 24 * H + 120)


def gateway_health_fields() -> dict[str, Any]:
    """What the gateway's health report holds (names and types), from the gateway itself."""
    settings = GatewaySettings(influx=InfluxSettings(spool_dir=None), session_journal=None)
    return Gateway(settings).health_fields()


def health(c: Clinic) -> None:
    """gateway_health every 10 s for ten whole minutes before the current one; a restart."""
    now = c.day.now
    end = math.floor(now / 60) * 60 - 10  # the last report is at :50 of the minute before
    start = end - 10 * 60 + 10
    restart = start + 5 * 60 + 30  # the process restarts: counters start again from 0
    base = gateway_health_fields()
    for i in range(60):
        t = start + 10 * i
        up = t - (restart if t >= restart else start - 10)
        telemetry = int(up * 10)  # ten boots, a sample a second each: 600 a minute
        report = {
            "msgs_telemetry": telemetry, "msgs_state": 12, "msgs_event": 3 + i // 20,
            "msgs_ack": 2, "msgs_rejected": 1 if t >= restart else 0,
            "points_written": telemetry + 40, "write_latency_ms": 4.2,
            "queue_depth": 3 if i < 59 else 7, "mqtt_connected": 1, "influx_connected": 1,
            "loop_lag_max_ms": 12.5, "gc_collections": 40 + i, "gc_pause_max_ms": 3.1,
            "boots_online": 10, "boots_in_session": 2,
        }
        assert set(report) <= set(base), set(report) - set(base)
        fields = {k: type(v)(report.get(k, v)) for k, v in base.items()}
        c.day.health.append({"time": t, **fields})
        c.add(points.gateway_health("gw-clinic-a", fields, ms(t) * 1000))


def legacy_alarms(now: float) -> list[Point]:
    """Alarm points as gateways before alarm_id became a tag wrote them (field, no tag)."""
    def old(alarm_id: str, state: str, resolved: bool, at: float, raised: float) -> Point:
        return Point("alarm", {"clinic": CLINIC, "device": "boot-012", "rule": "over_target",
                               "severity": "high", "state": state},
                     {"alarm_id": alarm_id, "detail": "chamber 1 above target",
                      "resolved": resolved, "raised_at": raised}, round(at * 1e6))
    return [old("a-0ld000000001", "active", False, now - 3 * 24 * H, now - 3 * 24 * H),
            old("a-0ld000000001", "cleared", True, now - 3 * 24 * H + 60, now - 3 * 24 * H),
            old("a-0ld000000002", "active", False, now - 2 * 24 * H, now - 2 * 24 * H)]


AUDIT: list[tuple[float, AuditEvent]] = [  # (seconds before now, record)
    (2 * 24 * H, AuditEvent("ops-anna", "ops", AuditAction.BOOT_ADD, AuditResult.DONE,
                            CLINIC, "boot-014", "broker account added")),
    (30 * 60, AuditEvent("desk-1", "front_desk", AuditAction.SESSION_START, AuditResult.DONE,
                         CLINIC, "boot-007", "program doms_24_48h: accepted",
                         {"cmd_id": "c-9f00aa0000a1", "session_id": "s-9f00aa0000a1"})),
    (20 * 60, AuditEvent("mgr-1", "manager", AuditAction.SESSION_START, AuditResult.REFUSED,
                         CLINIC, "boot-012", "role manager may not session_start")),
    (15 * 60, AuditEvent("desk-1", "front_desk", AuditAction.VENT, AuditResult.DONE, CLINIC,
                         "boot-012", "patient asked: accepted",
                         {"cmd_id": "v-9f00aa0000a2", "session_id": "s-9f00aa000007"})),
    (12 * 60, AuditEvent("desk-1", "front_desk", AuditAction.ALARM_ACK, AuditResult.REFUSED,
                         None, None, "role front_desk may not alarm_ack",
                         {"alarm_id": "a-9f00aa0000a3"})),
    (10 * 60, AuditEvent("mgr-1", "manager", AuditAction.ALARM_ACK, AuditResult.DONE, CLINIC,
                         "boot-013", "offline_in_session acknowledged; note: nurse",
                         {"alarm_id": "a-9f00aa0000a3"})),
    (5 * 60, AuditEvent("desk-2", "front_desk", AuditAction.SESSION_START, AuditResult.REFUSED,
                        OTHER_CLINIC, "boot-101", "program doms_24_48h: device offline")),
    (4 * 60, AuditEvent("desk-2", "front_desk", AuditAction.SESSION_STOP, AuditResult.FAILED,
                        OTHER_CLINIC, "boot-101", "the gateway is not connected to the broker")),
]


def audit_trail(c: Clinic) -> None:
    """What the API and the provisioning command recorded (gateway/audit.py)."""
    for before, event in AUDIT:
        c.add(audit_point(event, ms(c.day.now - before) * 1000))


def _audit_clinic_day(day: Day) -> list[dict[str, Any]]:
    out = []
    for before, e in sorted(AUDIT, key=lambda a: a[0]):
        if e.clinic == CLINIC and before < 24 * H:
            out.append({"time": ms(day.now - before), "actor": e.actor, "role": e.role,
                        "action": e.action.value, "result": e.result.value, "device": e.device,
                        "cmd_id": e.ids.get("cmd_id"), "session_id": e.ids.get("session_id"),
                        "alarm_id": e.ids.get("alarm_id"), "detail": e.detail})
    return out


async def build_day(now: float) -> Day:
    """Async only because a TrackedCommand holds a future of the running loop."""
    day = Day(now)
    june_2nd(Clinic(day))
    c = Clinic(day)
    last_hour(c)
    for name, a in list(day.alarms.items()):
        day.alarms[name] = c.book.get(a.alarm_id) or a  # the latest state
    health(c)
    audit_trail(c)
    return day


# ---------------------------------------------------------------- the database


@dataclass
class Stored:
    influx: LocalInflux
    day: Day
    db: str  # the day
    upgraded: str  # the day plus alarm points of the old kind

    def query(self, q: str, db: str | None = None) -> list[dict[str, Any]]:
        return self.influx.query(db or self.db, q)


def write(influx: LocalInflux, db: str, pts: list[Point]) -> None:
    """Into a fresh database, as the gateway's writer does: encode_batch, precision u."""
    httpx.post(f"{influx.url}/query", params={"q": f'CREATE DATABASE "{db}"'},
               timeout=10).raise_for_status()
    body, refused = encode_batch(pts)
    assert not refused, refused
    resp = httpx.post(f"{influx.url}/write", params={"db": db, "precision": "u"},
                      content=body, timeout=30)
    assert resp.status_code == 204, resp.text


@pytest.fixture(scope="module")
def stored(influx: LocalInflux) -> Iterator[Stored]:
    day = asyncio.run(build_day(time.time()))
    db = f"schema_{secrets.token_hex(4)}"
    write(influx, db, day.points)
    write(influx, f"{db}_upgraded", [*legacy_alarms(day.now), *day.points])
    yield Stored(influx, day, db, f"{db}_upgraded")


def doc_queries() -> dict[str, str]:
    text = DOC.read_text()
    found = QUERY_BLOCK.findall(text)
    assert len(found) == len(ANY_QUERY_BLOCK.findall(text)), "a query block without a name"
    queries = dict(found)
    assert len(queries) == len(found), "two query blocks with the same name"
    return queries


def rows(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per returned row: the series' tags and its columns."""
    return [{**(s.get("tags") or {}), **dict(zip(s["columns"], row, strict=True))}
            for s in series for row in s["values"]]


# ---------------------------------------------------------------- what each query returns


def _us_ms(t: float) -> int:
    """A time stored in microseconds (alarm, boot_event) as InfluxDB returns it in ms."""
    return round(t * 1e6) // 1000


def _alarm_row(a: Alarm, *cols: str) -> dict[str, Any]:
    values = {"time": _us_ms(a.updated_at), "alarm_id": a.alarm_id, "detail": a.detail,
              "state": a.state.value, "device": a.device, "rule": a.rule,
              "severity": a.severity.value, "resolved": a.resolved, "raised_at": a.raised_at,
              "session_id": a.session_id, "acked_by": a.acked_by}
    return {k: values[k] for k in ("time", "alarm_id", *cols)}


def _message_rate(day: Day) -> list[dict[str, Any]]:
    """non_negative_derivative(last(msgs_telemetry), 1m) per minute, worked out by hand."""
    last: dict[int, int] = {}
    for report in day.health:  # in time order: the last of each minute wins
        last[int(report["time"]) // 60 * 60] = report["msgs_telemetry"]
    minutes = sorted(last)
    out = []
    for before, minute in itertools.pairwise(minutes):
        per_min = (last[minute] - last[before]) * 60 / (minute - before)
        if per_min >= 0:
            out.append({"gateway": "gw-clinic-a", "time": minute * 1000,
                        "telemetry_per_min": per_min})
    return out


UNACKED = ("detail", "state", "device", "rule", "severity", "resolved", "raised_at",
           "session_id")
OPEN = ("detail", "state", "device", "rule", "severity", "resolved", "acked_by")
UPGRADED = ("detail", "state", "device", "rule", "severity")


@dataclass(frozen=True)
class Expect:
    rows: Callable[[Day], list[dict[str, Any]]]
    ordered: bool = True  # rows in time order; False: the set of rows (GROUP BY series)
    timeless: bool = False  # aggregates: the time column is the window's start, ignored
    db: str = "day"  # or "upgraded"
    also: Callable[[Stored], None] | None = None  # a further check of what the text says


def _vents(day: Day) -> list[dict[str, Any]]:
    t0 = day.now - 20 * 60
    return [
        {"time": ms(day.now - 40 * 60), "device": "boot-007", "rule": "hard_ceiling",
         "action": "vent", "chamber": 2, "value": 131.5, "limit": 120.0,
         "session_id": "s-9f00aa000004",
         "detail": "chamber 2 at 131.5 mmHg above the ceiling of 120 mmHg"},
        {"time": ms(day.now - 25 * 60), "device": "boot-013", "rule": "offline_in_session",
         "action": "vent", "chamber": None, "value": None, "limit": None,
         "session_id": "s-9f00aa00000c",
         "detail": "boot went offline during a session; it must vent by itself"},
        {"time": ms(t0), "device": "boot-012", "rule": "session_overrun", "action": "stop+vent",
         "chamber": None, "value": 1261.0, "limit": 1260.0, "session_id": "s-9f00aa000007",
         "detail": "session still running after 1261 s (program 1200 s + grace 60 s)"},
        {"time": ms(t0 + 10.2), "device": "boot-012", "rule": "vent_not_confirmed",
         "action": "vent", "chamber": None, "value": 10.2, "limit": 10.0, "session_id": None,
         "detail": "chambers not below 5 mmHg 10.2 s after the vent; re-sent (1/3)"},
    ]


def _sessions_today(day: Day) -> list[dict[str, Any]]:
    t = DAY_START_S * 1000
    h = 3_600_000
    def row(at: int, device: str, sid: str, name: str, outcome: str, duration: float | None,
            planned: float) -> dict[str, Any]:
        prog = name if name in CATALOGUE else PROGRAM_CUSTOM
        return {"time": at, "device": device, "session_id": sid, "program": prog,
                "program_name": name, "outcome": outcome, "duration_s": duration,
                "planned_s": planned}
    return [
        row(t + h // 4, "boot-012", "s-5e0c6a1f2b00", "recovery-20", "stopped", 1800, 1200),
        row(t + 19 * h // 2, "boot-007", "s-5e0c6a1f2b01", "doms_24_48h", "completed", 1800,
            1800),
        row(t + 10 * h + 62_000, "boot-012", "s-5e0c6a1f2b03", "recovery-20", "vented", 62,
            1200),
        row(t + 113 * h // 10, "boot-007", "s-5e0c6a1f2b02", "doms_24_48h", "user_stop", 1080,
            1800),
        row(t + 12 * h, "boot-012", "s-5e0c6a1f2b04", "recovery-20", "rejected", None, 1200),
        row(t + 142 * h // 10, "boot-012", "s-5e0c6a1f2b05", "recovery-20", "lost", None, 1200),
    ]


def _session_telemetry(day: Day) -> list[dict[str, Any]]:
    at = (DAY_START_S + 10 * 3600) * 1000
    samples = [("inflate", [61.0, 30.2, 4.0, 0.5]), ("inflate", [63.5, 44.0, 6.0, 0.5]),
               ("inflate", [64.0, None, 9.0, 0.6]), ("vent", [20.0, 12.0, 3.0, 0.2])]
    out = []
    for i, (phase, ps) in enumerate(samples):
        out.append({"time": at + (60 + i) * 1000, "phase": phase,
                    "session_elapsed_s": 60.0 + i,
                    **{f"p{n}": p for n, p in enumerate(ps, 1)},
                    **{f"target_p{n}": t for n, t in enumerate((70.0, 65.0, 60.0, 55.0), 1)},
                    "bad_values": "p2=nan" if ps[1] is None else None})
    return out


def _unacked_upgraded(stored: Stored) -> None:
    """Without the tag condition, the old points show as one more row with an empty id."""
    q = doc_queries()["alarms-unacknowledged"]
    got = rows(stored.query(q, stored.upgraded))
    assert sorted(r["alarm_id"] for r in got) == sorted(
        ["", stored.day.alarms["a1"].alarm_id, stored.day.alarms["a4"].alarm_id])


def _sessions_today_ids_are_terminal(stored: Stored) -> None:
    """Exactly one terminal point per session id."""
    got = rows(stored.query(doc_queries()["sessions-today"]))
    ids = [r["session_id"] for r in got]
    assert len(ids) == len(set(ids))


def _one_id_per_alarm(stored: Stored) -> None:
    """The ten: every alarm of the day, whatever its clinic or age."""
    ids = {p.tags["alarm_id"] for p in stored.day.points if p.measurement == "alarm"}
    assert len(ids) == 10


EXPECTED: dict[str, Expect] = {
    "last-pressure": Expect(lambda d: [
        {"time": ms(d.now - 20), "phase": "deflate", "session_id": "s-9f00aa000006",
         "p1": 12.4, "p2": 30.1, "p3": 41.7, "p4": 53.9, "bad_values": None}]),
    "latest-per-boot": Expect(lambda d: [
        {"device": "boot-007", "time": ms(d.now - 20), "seq": 18002, "phase": "deflate",
         "max_p": 53.9, "p1": 12.4, "p2": 30.1, "p3": 41.7, "p4": 53.9},
        {"device": "boot-014", "time": ms(d.now - 30), "seq": 420, "phase": "unknown",
         "max_p": 22.0, "p1": 22.0, "p2": 21.5, "p3": 20.9, "p4": 20.1}], ordered=False),
    "session-telemetry": Expect(_session_telemetry),
    "vents-last-hour": Expect(_vents),
    "vent-commands": Expect(lambda d: [
        {"device": "boot-007", "vents_sent": 1}, {"device": "boot-012", "vents_sent": 2},
        {"device": "boot-013", "vents_sent": 1}], ordered=False, timeless=True),
    "safety-events-per-rule": Expect(lambda d: [
        {"rule_no": str(RULE_NUMBER[r]), "rule": r.value, "severity": sev, "events": 1}
        for r, sev in ((Rule.HARD_CEILING, "high"), (Rule.OVER_TARGET, "high"),
                       (Rule.SESSION_OVERRUN, "high"), (Rule.OFFLINE_IN_SESSION, "high"),
                       (Rule.VENT_NOT_CONFIRMED, "high"), (Rule.PROGRAM_REFUSED, "low"),
                       (Rule.USER_STOP, "medium"))], ordered=False, timeless=True),
    "vent-reaction": Expect(lambda d: [
        {"episodes": 3, "p95_s": 14.0, "worst_s": 14.0, "resends": 1}], timeless=True),
    "failed-commands": Expect(lambda d: [
        {"time": ms(d.now - 3 * H + 15), "device": "boot-007", "kind": "start",
         "cmd_id": "c-9f00aa000001", "session_id": "s-9f00aa000001",
         "reason": "no ack within 15 s"},
        {"time": ms(d.now - 25 * 60 + 5), "device": "boot-013", "kind": "vent",
         "cmd_id": "v-9f00aa00000d", "session_id": "s-9f00aa00000c",
         "reason": "no ack within 5 s"}]),
    "sessions-today": Expect(_sessions_today, also=_sessions_today_ids_are_terminal),
    "running-sessions": Expect(lambda d: [
        {"time": ms(d.now - 30 * 60), "device": "boot-007", "outcome": "started",
         "program": "custom", "program_name": "recovery-20", "session_id": "s-9f00aa000006"},
        {"time": ms(d.now - 8 * 60), "device": "boot-014", "outcome": "resumed",
         "program": "custom", "program_name": "recovery-20", "session_id": "s-9f00aa00000e"}]),
    "outcomes-per-program": Expect(lambda d: [
        {"program": p, "outcome": o, "sessions": n}
        for p, o, n in (("doms_24_48h", "completed", 3), ("doms_24_48h", "user_stop", 1),
                        ("custom", "stopped", 1), ("custom", "vented", 1),
                        ("custom", "rejected", 1), ("custom", "lost", 1))],
        ordered=False, timeless=True),
    "alarms-unacknowledged": Expect(lambda d: [
        _alarm_row(d.alarms[n], *UNACKED) for n in ("a1", "a4")], ordered=False),
    "alarms-open": Expect(lambda d: [
        _alarm_row(d.alarms[n], *OPEN) for n in ("a1", "a4", "a5")], ordered=False),
    "alarms-unacknowledged-upgraded": Expect(lambda d: [
        _alarm_row(d.alarms[n], *UPGRADED) for n in ("a1", "a4")], ordered=False,
        db="upgraded", also=_unacked_upgraded),
    "boots-online": Expect(lambda d: [
        {"device": dev, "online": on, "firmware": fw}
        for dev, on, fw in (("boot-007", 1, "2.4.1"), ("boot-012", 1, "2.3.0"),
                            ("boot-013", 0, "2.4.1"), ("boot-014", 1, "3.0.0-beta"))],
        ordered=False, timeless=True),
    "faults-by-kind": Expect(lambda d: [
        {"device": dev, "kind": kind, "faults": n}
        for dev, kind, n in (("boot-007", "not_json", 2), ("boot-012", "invalid", 1),
                             ("boot-013", "too_large", 1), ("boot-014", "boot_fault", 1))],
        ordered=False, timeless=True),
    "gateway-health": Expect(lambda d: [
        {"gateway": "gw-clinic-a", "time": ms(d.health[-1]["time"]),
         **{k: d.health[-1][k] for k in (
             "mqtt_connected", "influx_connected", "boots_online", "boots_in_session",
             "queue_depth", "spool_bytes", "points_dropped", "points_refused",
             "write_errors")}}]),
    "gateway-message-rate": Expect(_message_rate),
    "alarm-cardinality": Expect(lambda d: [{"count": 10}], also=_one_id_per_alarm),
    "audit-clinic-day": Expect(_audit_clinic_day),
    "audit-refused-per-actor": Expect(lambda d: [
        {"actor": "mgr-1", "action": "session_start", "refused": 1},
        {"actor": "desk-1", "action": "alarm_ack", "refused": 1},
        {"actor": "desk-2", "action": "session_start", "refused": 1}],
        ordered=False, timeless=True),
}


# ---------------------------------------------------------------- tests


def test_every_query_of_the_document_has_its_expected_rows() -> None:
    assert set(doc_queries()) == set(EXPECTED)


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_query_returns_what_the_document_says(stored: Stored, name: str) -> None:
    query = doc_queries()[name]
    expect = EXPECTED[name]
    got = rows(stored.query(query, stored.upgraded if expect.db == "upgraded" else None))
    want = expect.rows(stored.day)
    if expect.timeless:
        got = [{k: v for k, v in r.items() if k != "time"} for r in got]
    if not expect.ordered:
        got, want = (sorted(x, key=lambda r: json.dumps(r, sort_keys=True)) for x in (got, want))
    assert got == want, f"{name}:\n{query}"
    if expect.also is not None:
        expect.also(stored)


def test_message_rate_skips_only_the_restart_minute() -> None:
    day = asyncio.run(build_day(1_800_000_000.0))
    assert [r["telemetry_per_min"] for r in _message_rate(day)] == [600.0] * 8


# ---------------------------------------------------------------- the names


def _documented(name: str, doc: str) -> bool:
    numbered = re.fullmatch(r"(target_)?p\d+", name)
    if numbered:
        name = f"{numbered.group(1) or ''}pN"
    return f"`{name}`" in doc


def _point_functions() -> list[str]:
    return [name for name, fn in inspect.getmembers(points, inspect.isfunction)
            if fn.__module__ == points.__name__ and get_type_hints(fn).get("return") is Point]


def _schema_literals() -> set[str]:
    """Every identifier-like string literal of gateway/points.py outside docstrings and
    f-strings: the measurement, tag and field names it writes."""
    tree = ast.parse(Path(points.__file__).read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in skip and re.fullmatch(r"[a-z][a-z0-9_]*", node.value)}


def test_the_day_uses_every_point_function() -> None:
    day = asyncio.run(build_day(1_800_000_000.0))
    assert {p.measurement for p in day.points} == set(_point_functions()) | {"audit"}


def test_every_name_the_gateway_writes_is_documented() -> None:
    doc = DOC.read_text()
    day = asyncio.run(build_day(1_800_000_000.0))
    names = {p.measurement for p in day.points}
    names |= {k for p in day.points for k in (*p.tags, *p.fields)}
    names |= _schema_literals() | set(gateway_health_fields()) | set(Measurement)
    assert {"telemetry", "alarm_id", "session_elapsed_s", "journal_errors"} <= names
    missing = sorted(n for n in names if not _documented(n, doc))
    assert not missing, f"not in docs/schema.md: {missing}"


def _measurement_table(doc: str) -> set[str]:
    """The first column of the table under "## 2. Measurements"."""
    section = doc.split("## 2. Measurements", 1)[1].split("\n### ", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", section, re.M))


def test_every_measurement_written_is_in_the_schema_module_and_documented() -> None:
    """gateway/schema.py names every measurement the point functions and the audit trail
    write, no more (a member nothing writes would let a query name an empty measurement),
    and docs/schema.md's measurement table lists exactly those."""
    day = asyncio.run(build_day(1_800_000_000.0))
    written = {p.measurement for p in day.points}
    assert written == set(Measurement)
    assert all(type(p.measurement) is Measurement for p in day.points), "a literal name"
    assert _measurement_table(DOC.read_text()) == set(Measurement)


def test_the_safety_record_is_one_set_in_code_and_doc() -> None:
    """What storage spools first is the schema module's safety record, and the document's
    list of the clinical safety record says the same."""
    assert PRIORITY_MEASUREMENTS == {m.value for m in SAFETY_RECORD}
    assert SAFETY_RECORD < set(Measurement) and Measurement.TELEMETRY not in SAFETY_RECORD
    doc = DOC.read_text()
    sentence = re.search(r"\n((?:`\w+`(?:, | and )?)+) are the\s+clinical safety record", doc)
    assert sentence, "docs/schema.md: the safety record sentence"
    assert set(re.findall(r"`(\w+)`", sentence.group(1))) == {m.value for m in SAFETY_RECORD}


def test_every_point_built_carries_the_priority_of_its_measurement() -> None:
    """Storage takes a point's priority from the point (it never reads a measurement name):
    every point the schema's builders make, across a whole simulated day, says it is part of
    the safety record exactly when its measurement is; a bare Point is telemetry."""
    day = asyncio.run(build_day(1_800_000_000.0))
    wrong = {p.measurement for p in day.points if p.priority != (p.measurement in SAFETY_RECORD)}
    assert not wrong, wrong
    assert {p.measurement for p in day.points if p.priority} == SAFETY_RECORD
    assert not Point(Measurement.SAFETY_EVENT, {}, {"v": 1}, 1).priority


def test_the_dashboards_query_only_measurements_of_the_schema_module() -> None:
    """Every `FROM "name"` of the generated dashboards and alert rules names a measurement
    the gateway writes (the generator takes the names from gateway/schema.py)."""
    rendered = "\n".join(grafana_generator().rendered_files().values())
    queried = set(re.findall(r'FROM \\?"(\w+)\\?"', rendered))
    assert len(queried) >= 8, queried
    assert queried <= set(Measurement), queried - set(Measurement)


def test_alarm_id_is_a_tag() -> None:
    day = asyncio.run(build_day(1_800_000_000.0))
    alarms = [p for p in day.points if p.measurement == "alarm"]
    assert alarms and all("alarm_id" in p.tags and "alarm_id" not in p.fields for p in alarms)


def test_every_value_of_the_closed_vocabularies_is_documented() -> None:
    doc = DOC.read_text()
    payload_kinds = get_type_hints(PayloadError.__init__)["kind"].__args__
    vocabularies: dict[str, set[str]] = {
        "phase": {p.value for p in Phase},
        "rule": {r.value for r in Rule},
        "rule_no": {str(n) for n in RULE_NUMBER.values()},
        "severity": {s.value for s in Severity},
        "action": {"vent", "stop+vent", "alarm", "refuse"},
        "command kind": {k.value for k in CommandKind},
        "command outcome": {o.value for o in CommandOutcome},
        "alarm state": {s.value for s in AlarmState},
        "session outcome": {o.value for o in SessionOutcome} | {"started", "resumed"},
        "session program": set(CATALOGUE) | {PROGRAM_CUSTOM, PROGRAM_UNKNOWN},
        "boot_event kind": {k.value for k in EventKind},
        "device_fault kind": {*payload_kinds, "unknown_ack", "boot_fault", "implausible_data"},
        "audit action": {a.value for a in AuditAction},
        "audit result": {r.value for r in AuditResult},
        "audit role": {r.value for r in Role},
    }
    # the sets the document promises, whether or not this version writes them all yet
    assert vocabularies["phase"] >= {"idle", "inflate", "hold", "deflate", "pause", "vent"}
    vocabularies["phase"].add("unknown")
    vocabularies["session outcome"] |= {"completed", "stopped", "user_stop", "vented",
                                        "rejected", "failed", "lost"}
    missing = {what: sorted(v for v in values if f"`{v}`" not in doc)
               for what, values in vocabularies.items()}
    assert not any(missing.values()), missing
    day = asyncio.run(build_day(1_800_000_000.0))
    for p in day.points:  # and the day's tag values are among them
        for key in ("phase", "rule", "severity", "state", "program"):
            if key in p.tags:
                assert f"`{p.tags[key]}`" in doc, (p.measurement, key, p.tags[key])
    assert {a.action for a in (
        SafetyAction(Rule.SESSION_OVERRUN, Severity.HIGH, True, True, "", stop=True),
        SafetyAction(Rule.HARD_CEILING, Severity.HIGH, True, True, ""),
        SafetyAction(Rule.USER_STOP, Severity.MEDIUM, False, True, ""),
        Watchdog.program_refused(["duration 180 min is outside 10..40 min"]))
    } == vocabularies["action"]
