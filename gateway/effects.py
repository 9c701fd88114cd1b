"""The effects: carry out the watchdog's decisions (vents, stops, alarms) and track commands.

One job: act on the boots. A vent is published (`publish_urgent`, no await) before anything
about it is counted, logged or recorded; then safety events, device faults and alarms follow
in the order the watchdog gave them. The storage side goes through the recorder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateway.alarms import STORAGE_FAULT, VENT_RESOLVED, AlarmBook
from gateway.commands import CommandTracker, TrackedCommand, new_id
from gateway.contract import (
    CHANNEL_QOS,
    Alarm,
    Channel,
    Command,
    CommandKind,
    Severity,
    TopicAddress,
    alarm_topic,
    topic,
)
from gateway.fleet import Boot, Fleet, SessionOutcome, SessionStatus
from gateway.mqtt_link import MqttLink, NotConnected
from gateway.ratelimit import RateLimitedLog
from gateway.recorder import Recorder
from gateway.sessions import Sessions
from gateway.settings import GatewaySettings
from gateway.stats import IngestStats
from gateway.watchdog import Outcome, Rule, VentConfirmed

# The service's logger: operators filter on it, the messages stay where they were.
log = logging.getLogger("gateway.service")


class Effects:
    """What the gateway does to boots and people: commands out, alarms raised and resolved."""

    def __init__(self, settings: GatewaySettings, *, link: MqttLink, fleet: Fleet,
                 alarms: AlarmBook, stats: IngestStats, recorder: Recorder,
                 reject_log: RateLimitedLog, clock: Callable[[], float],
                 monotonic: Callable[[], float]) -> None:
        self.settings = settings
        self.link = link
        self.fleet = fleet
        self.alarms = alarms
        self.stats = stats
        self.recorder = recorder
        self.reject_log = reject_log
        self.clock = clock
        # Built here, up front: there is always a tracker, before and after run().
        self.commands = CommandTracker(
            settings.command_ack_timeout_s, self.on_command_timeout, monotonic
        )
        self.sessions: Sessions  # set by the composition root (gateway/service.py)
        self._storage_alarm: str | None = None  # the open storage_fault alarm's id

    def apply(self, boot: Boot, actions: list[Outcome]) -> None:
        """Carry out watchdog actions: the vent goes out before anything else happens."""
        for action in actions:
            if isinstance(action, VentConfirmed):
                self.vent_confirmed(boot, action)
                continue
            if action.vent:
                if action.stop:
                    self.send(boot, CommandKind.STOP, reason=action.detail)
                self.send_vent(boot, f"{action.rule.value}: {action.detail}")
            session_id = boot.session.session_id if boot.session else boot.watch.session_id
            now_ms = self.recorder.stamp()
            if action.fault:
                boot.faults += 1
                self.stats.rejected[action.rule.value] += 1
                self.reject_log.warning(
                    f"{boot.key}:{action.rule.value}", "implausible data from boot",
                    device=boot.key, kind=action.rule.value, reason=action.detail)
                self.recorder.device_fault(
                    TopicAddress(boot.clinic, boot.device, Channel.TELEMETRY),
                    action.rule.value, action.detail, now_ms)
            if action.record:
                self.stats.safety_events += 1
                log.warning("safety event", extra={
                    "device": boot.key, "rule": action.rule.value,
                    "severity": action.severity.value, "action": action.action,
                    "chamber": action.chamber, "value": action.value, "limit": action.limit,
                    "detail": action.detail, "session_id": session_id})
                self.recorder.safety_event(boot, action, session_id, now_ms)
            if action.alarm:
                self.publish_alarm(self.alarms.raise_alarm(
                    boot.clinic, boot.device, action, session_id, self.clock()))
            if action.vent:
                self.sessions.end_session(boot, SessionOutcome.VENTED)

    def vent_confirmed(self, boot: Boot, confirmed: VentConfirmed) -> None:
        self.stats.vents_confirmed += 1
        log.info("vent confirmed", extra={
            "device": boot.key, "after_s": confirmed.after_s, "resends": confirmed.resends})
        self.recorder.vent_confirmed(boot, confirmed)
        self.resolve(boot, VENT_RESOLVED)

    def resolve(self, boot: Boot, rules: frozenset[Rule]) -> None:
        for alarm in self.alarms.resolve(boot.clinic, boot.device, rules, self.clock()):
            self.publish_alarm(alarm)

    def publish_alarm(self, alarm: Alarm) -> None:
        self.link.publish_nowait(alarm_topic(alarm.clinic, alarm.device), alarm.to_payload(),
                                 qos=1)
        self.recorder.alarm(alarm)

    def acknowledge_alarm(self, alarm_id: str, by: str) -> Alarm:
        alarm = self.alarms.acknowledge(alarm_id, by, self.clock())
        log.info("alarm acknowledged", extra={"alarm_id": alarm_id, "by": by,
                                              "state": alarm.state.value})
        self.publish_alarm(alarm)
        return alarm

    def watch_storage(self) -> None:
        """A gateway alarm (`storage_fault`) while the disk spool cannot be written.

        The writer carries on without the spool (InfluxDB if it is up, memory, counted
        drops); the alarm tells a human that the next InfluxDB outage would lose data. One
        alarm per episode, resolved when the spool works again.
        """
        writer = self.recorder.writer
        fault = writer.storage_fault
        if fault is not None and self._storage_alarm is None:
            alarm = self.alarms.raise_gateway_alarm(
                self.settings.gateway_id, STORAGE_FAULT, Severity.MEDIUM, fault, self.clock())
            self._storage_alarm = alarm.alarm_id
            log.error("storage fault: gateway alarm raised", extra={
                "alarm_id": alarm.alarm_id, "fault": fault,
                "points_dropped": writer.stats.points_dropped})
            self.publish_alarm(alarm)
        elif fault is None and self._storage_alarm is not None:
            resolved = self.alarms.resolve_alarm(self._storage_alarm, self.clock())
            log.info("storage fault over", extra={"alarm_id": self._storage_alarm})
            self._storage_alarm = None
            if resolved is not None:
                self.publish_alarm(resolved)

    def send_vent(self, boot: Boot, reason: str) -> TrackedCommand:
        # A vent never expires (a late vent is still a vent) and is sent before it is tracked.
        tracked = self.send(boot, CommandKind.VENT, reason=reason)
        boot.vents += 1
        self.stats.vents_sent += 1
        return tracked

    def send(self, boot: Boot, kind: CommandKind, reason: str | None = None) -> TrackedCommand:
        """Publish a safety command (vent, stop) now, without waiting for the broker."""
        session_id = boot.session.session_id if boot.session else None
        cmd = Command(cmd_id=new_id(kind.value[0]), kind=kind, issued_at=self.clock(),
                      session_id=session_id, reason=reason[:500] if reason else None)
        try:
            self.link.publish_urgent(topic(boot.clinic, boot.device, Channel.CMD),
                                     cmd.to_payload(), qos=CHANNEL_QOS[Channel.CMD])
        except NotConnected:
            # Tracked all the same: no ack in time counts as failed, and rule 8 re-sends.
            log.error("command not sent: no broker", extra={"device": boot.key,
                                                             "kind": kind.value})
        return self.track(boot, cmd)

    def track(self, boot: Boot, cmd: Command, timeout_s: float | None = None
              ) -> TrackedCommand:
        tracked = self.commands.track(boot.key, cmd, timeout_s)
        self.recorder.command(tracked)
        return tracked

    def on_command_timeout(self, tracked: TrackedCommand) -> None:
        log.error("command not acknowledged", extra={
            "device": tracked.key, "cmd_id": tracked.command.cmd_id,
            "kind": tracked.command.kind.value, "timeout_s": self.settings.command_ack_timeout_s})
        self.recorder.command(tracked)
        boot = self.fleet.boots.get(tracked.key)
        session = boot.session if boot else None
        if (boot is not None and session is not None and session.status is SessionStatus.STARTING
                and session.cmd_id == tracked.command.cmd_id):
            self.sessions.end_session(boot, SessionOutcome.FAILED)
