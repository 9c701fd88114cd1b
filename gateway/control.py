"""The control facade: everything the HTTP API (and a CLI) may ask of the gateway.

One job: the gateway's operations for people — start, stop and vent a session, list boots,
commands and alarms, acknowledge an alarm, the stats snapshot and health, the audit trail —
so that gateway/api.py calls only this and never reaches into the fleet, the command tracker,
the alarm book, the writer or the MQTT link. Safety actions it takes (a refused program, a
manual vent) go through the same effects as the watchdog's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.audit import (
    AuditAction,
    AuditEvent,
    AuditRecord,
    AuditResult,
    AuditTrail,
    log_audit,
)
from gateway.cluster import Cluster
from gateway.commands import CommandOutcome, TrackedCommand, new_id
from gateway.contract import CHANNEL_QOS, Alarm, Channel, Command, CommandKind, SessionProgram
from gateway.contract import topic as cmd_topic
from gateway.effects import Effects
from gateway.fleet import Boot, Fleet, Session, SessionOutcome, catalogue_key
from gateway.programs import BootLimits, ProgramTemplate, check_program
from gateway.recorder import Recorder
from gateway.sessions import Sessions
from gateway.settings import GatewaySettings
from gateway.stats import GatewayStats
from gateway.watchdog import Watchdog

# The service's logger: operators filter on it, the messages stay where they were.
log = logging.getLogger("gateway.service")


class NotWatchedHere(LookupError):
    """The clinic is watched by another gateway (several gateways share the fleet)."""


class UnknownBoot(LookupError):
    pass


@dataclass
class StartResult:
    accepted: bool
    reasons: list[str]
    session_id: str | None = None
    cmd_id: str | None = None
    outcome: CommandOutcome | None = None


@dataclass(frozen=True)
class HealthView:
    """What GET /health reports: is each link of the chain up right now."""

    mqtt_connected: bool
    influx_connected: bool
    storage_fault: bool
    storage_queue: int
    spool_points: int
    boots: dict[str, int]
    gateway_id: str
    clinics: list[str] | None  # watched here; None: every clinic (a single gateway)


class Control:
    """The operations the API offers; it holds no state of its own but the audit trail."""

    def __init__(self, settings: GatewaySettings, *, fleet: Fleet, watchdog: Watchdog,
                 effects: Effects, sessions: Sessions, recorder: Recorder,
                 snapshot: Callable[[], GatewayStats], clock: Callable[[], float],
                 monotonic: Callable[[], float], cluster: Cluster) -> None:
        self.settings = settings
        self.cluster = cluster
        self.fleet = fleet
        self.watchdog = watchdog
        self.effects = effects
        self.sessions = sessions
        self.recorder = recorder
        self.snapshot = snapshot
        self.clock = clock
        self.monotonic = monotonic

    # ------------------------------------------------------------------ reading

    def boot(self, clinic: str, device: str) -> Boot:
        boot = self.fleet.get(clinic, device)
        if boot is None and not self.cluster.owns(clinic):
            raise NotWatchedHere(f"clinic {clinic} is not watched by this gateway "
                                 f"({self.settings.gateway_id}); ask the one that watches it")
        if boot is None:
            raise UnknownBoot(f"no boot {clinic}/{device} has been seen")
        return boot

    def knows(self, clinic: str, device: str) -> bool:
        """Whether the gateway has seen this boot (an audit record tags only those)."""
        return self.fleet.get(clinic, device) is not None

    def boots(self, clinic: str | None = None) -> list[Boot]:
        """Every boot seen (of one clinic), by key."""
        boots = sorted(self.fleet.boots.values(), key=lambda b: b.key)
        return [b for b in boots if clinic is None or b.clinic == clinic]

    def command(self, cmd_id: str) -> TrackedCommand | None:
        """A recent command by id (the tracker keeps a bounded history)."""
        return self.effects.commands.get(cmd_id)

    def listed_alarms(self, include_cleared: bool = False, clinic: str | None = None
                      ) -> list[Alarm]:
        """The latched alarms (of one clinic); cleared ones only with include_cleared."""
        return [a for a in self.effects.alarms.listed(include_cleared)
                if clinic is None or a.clinic == clinic]

    def resolve_program(self, template: ProgramTemplate, boot: Boot) -> SessionProgram:
        """A catalogue program for this boot's chambers, within the gateway's limits."""
        return template.resolve(boot.state.chambers, self.settings.programs)

    def health(self) -> HealthView:
        writer = self.recorder.writer
        return HealthView(
            mqtt_connected=self.effects.link.connected.is_set(),
            influx_connected=writer.stats.connected,
            storage_fault=writer.storage_fault is not None or not writer.task_alive,
            storage_queue=writer.queue_depth, spool_points=writer.spool_points,
            boots=self.fleet.counts(), gateway_id=self.settings.gateway_id,
            clinics=sorted(self.cluster.watching) if self.cluster.partitioned else None)

    # ------------------------------------------------------------------ sessions

    def check(self, boot: Boot, program: SessionProgram) -> list[str]:
        limits = BootLimits(
            clinic=boot.clinic, chambers=boot.state.chambers,
            max_pressure_mmhg=boot.state.max_pressure_mmhg, online=boot.online,
            in_session=boot.session is not None,
            gateway_ceiling_mmhg=self.settings.watchdog.hard_ceiling_mmhg,
            gateway_max_inflation_s=self.settings.watchdog.max_inflation_s,
            venting=boot.watch.venting, telemetry_period_s=boot.state.telemetry_period_s,
        )
        reasons = check_program(program, limits, self.settings.programs)
        if not self.effects.link.connected.is_set():
            reasons.append("the gateway is not connected to the broker")
        return reasons

    async def start_session(
        self, clinic: str, device: str, program: SessionProgram, *, wait: bool = True
    ) -> StartResult:
        """Check, then send a start that expires; with wait, return after the boot's first ack.

        The boot may accept until `expires_at`, so it has the expiry plus the ack timeout to
        answer; the session is watched (rules 1-6) from the moment the start is sent.
        """
        boot = self.boot(clinic, device)
        reasons = self.check(boot, program)
        if reasons:
            log.info("session refused", extra={"device": boot.key, "program": program.name,
                                               "reasons": reasons})
            self.effects.apply(boot, [self.watchdog.program_refused(reasons)])
            return StartResult(False, reasons)
        now = self.clock()
        expiry = self.settings.programs.start_expiry_s
        cmd = Command(cmd_id=new_id("c"), kind=CommandKind.START, issued_at=now,
                      expires_at=now + expiry, session_id=new_id("s"), program=program)
        assert cmd.session_id is not None
        session = boot.session = Session(cmd.session_id, program, cmd.cmd_id, now,
                                         catalogue=catalogue_key(program,
                                                                 self.settings.programs))
        self.watchdog.start_session(boot.watch, cmd.session_id, program, self.monotonic())
        journal = self.sessions.journal
        journal.opened(session.journal_entry(boot.key))
        tracked = self.effects.track(boot, cmd, expiry + self.settings.command_ack_timeout_s)
        try:
            await self.effects.link.publish(cmd_topic(clinic, device, Channel.CMD),
                                            cmd.to_payload(), qos=CHANNEL_QOS[Channel.CMD],
                                            expiry_s=expiry)
        except Exception:
            if boot.session is session:
                boot.session = None
                boot.watch.end_session()
                journal.closed(boot.key, session.session_id)
            raise
        self.effects.commands.delivered(cmd.cmd_id)
        log.info("session start sent", extra={"device": boot.key, "program": program.name,
                                              "session_id": cmd.session_id, "cmd_id": cmd.cmd_id})
        outcome = CommandOutcome.SENT
        if wait:
            outcome = await tracked.first_ack
        accepted = outcome in (CommandOutcome.SENT, CommandOutcome.ACCEPTED, CommandOutcome.DONE)
        reasons = [] if accepted else [tracked.reason or outcome.value]
        return StartResult(accepted, reasons, cmd.session_id, cmd.cmd_id, outcome)

    async def stop_session(self, clinic: str, device: str, *, wait: bool = True) -> TrackedCommand:
        boot = self.boot(clinic, device)
        cmd = Command(cmd_id=new_id("c"), kind=CommandKind.STOP, issued_at=self.clock(),
                      session_id=boot.session.session_id if boot.session else None)
        tracked = self.effects.track(boot, cmd)
        await self.effects.link.publish(cmd_topic(clinic, device, Channel.CMD), cmd.to_payload(),
                                        qos=CHANNEL_QOS[Channel.CMD])
        self.effects.commands.delivered(cmd.cmd_id)
        if wait:
            await tracked.first_ack
        return tracked

    async def vent(self, clinic: str, device: str, reason: str, *, wait: bool = True
                   ) -> TrackedCommand:
        boot = self.boot(clinic, device)
        log.warning("manual vent", extra={"device": boot.key, "reason": reason})
        tracked = self.effects.send_vent(boot, f"manual: {reason}")
        self.watchdog.vent_sent(boot.watch, self.monotonic())
        self.sessions.end_session(boot, SessionOutcome.VENTED)
        if wait:
            await tracked.first_ack
        return tracked

    def acknowledge_alarm(self, alarm_id: str, by: str) -> Alarm:
        return self.effects.acknowledge_alarm(alarm_id, by)

    # ------------------------------------------------------------------ audit trail

    @functools.cached_property
    def audit_trail(self) -> AuditTrail:
        """The newest audit records in memory (GET /api/v1/audit); all go to InfluxDB."""
        return AuditTrail(self.settings.api.audit_keep)

    def record_audit(self, event: AuditEvent) -> None:
        """Who did what through the API: to the log, the in-memory trail and InfluxDB
        (measurement `audit`), with one timestamp for all three."""
        log_audit(event)
        time_us = self.recorder.audit(event)
        self.audit_trail.append(time_us / 1e6, event)

    def audit(self, *, limit: int, actor: str | None = None, role: str | None = None,
              action: AuditAction | None = None, result: AuditResult | None = None,
              clinic: str | None = None, device: str | None = None, since: float | None = None
              ) -> list[AuditRecord]:
        """The trail's newest records, newest first, every given filter matching exactly."""
        return self.audit_trail.query(limit=limit, actor=actor, role=role, action=action,
                                      result=result, clinic=clinic, device=device, since=since)

    @property
    def audit_records(self) -> int:
        """Audit records since the start."""
        return self.audit_trail.recorded
