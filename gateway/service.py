"""The gateway service: wires MQTT in/out, fleet state, watchdog, commands and storage.

Data flow of one message (all synchronous, no await on the hot path):
    topic+payload -> parse/validate -> fleet state -> watchdog -> vent (publish now)
                                                   \\-> points -> storage queue
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway import points
from gateway.aio import cancel_and_wait
from gateway.alarms import STORAGE_FAULT, VENT_RESOLVED, AlarmBook
from gateway.audit import AuditEvent, AuditTrail, audit_point, log_audit
from gateway.broker_admin import gateway_subscriptions
from gateway.commands import CommandOutcome, CommandTracker, TrackedCommand, new_id
from gateway.contract import (
    ALARM_TOPIC_PREFIX,
    CHANNEL_QOS,
    HEARTBEAT_TOPIC,
    Ack,
    AckStatus,
    Alarm,
    BootEvent,
    BootState,
    Channel,
    Command,
    CommandKind,
    EventKind,
    Heartbeat,
    PayloadError,
    SessionProgram,
    Severity,
    Telemetry,
    TopicAddress,
    TopicError,
    alarm_topic,
    decode,
    parse_topic,
    topic,
)
from gateway.fleet import Boot, Fleet, Session, SessionOutcome, SessionStatus, catalogue_key
from gateway.gc_tuning import GcPauses
from gateway.journal import OpenSession, SessionJournal
from gateway.lineprotocol import FieldValue
from gateway.mqtt_link import MqttLink, NotConnected, subscribe_options
from gateway.programs import BootLimits, check_program
from gateway.redact import redact
from gateway.settings import GatewaySettings
from gateway.stats import GatewayStats
from gateway.storage import InfluxWriter
from gateway.watchdog import CYCLE_PHASES, Outcome, Rule, VentConfirmed, Watchdog

log = logging.getLogger(__name__)

_SESSION_END = {
    EventKind.SESSION_COMPLETED: SessionOutcome.COMPLETED,
    EventKind.SESSION_STOPPED: SessionOutcome.STOPPED,
    EventKind.USER_STOP: SessionOutcome.USER_STOP,
    EventKind.VENTED: SessionOutcome.VENTED,
}


# An event-loop delay beyond this is the gateway's own stall (CPU starvation, a burst).
STALL_MS = 250.0


class UnknownBoot(LookupError):
    pass


@dataclass
class StartResult:
    accepted: bool
    reasons: list[str]
    session_id: str | None = None
    cmd_id: str | None = None
    outcome: CommandOutcome | None = None


@dataclass
class IngestStats:
    messages: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    vents_sent: int = 0
    safety_events: int = 0
    vents_confirmed: int = 0
    sessions_resumed: int = 0
    loop_lag_max_ms: float = 0.0  # worst event-loop delay seen: the gateway's own backlog


class RateLimitedLog:
    """Logs a given key at most once per interval, counting what it held back."""

    def __init__(self, interval_s: float, monotonic: Callable[[], float]) -> None:
        self.interval_s = interval_s
        self._monotonic = monotonic
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, **fields: object) -> None:
        now = self._monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] += 1
            return
        if len(self._last) > 100_000:
            self._last.clear()
        self._last[key] = now
        fields["suppressed_since_last"] = self._suppressed.pop(key, 0)
        log.warning(msg, extra=fields)


class TokenBucket:
    """At most `rate` per second on average, with bursts of `burst`."""

    def __init__(self, rate: float, burst: float, monotonic: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self._monotonic = monotonic
        self._tokens = burst
        self._at = monotonic()

    def take(self) -> bool:
        now = self._monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.monotonic = monotonic
        self.fleet = Fleet()
        self.watchdog = Watchdog(settings.watchdog)
        self.writer = InfluxWriter(settings.influx)
        self.stats = IngestStats()
        self._stamps = points.Stamps()
        self.gc_pauses = GcPauses()  # filled once the process tunes its collector (__main__)
        self.link = MqttLink(
            settings.mqtt,
            # What the broker lets the gateway read (gateway/broker_admin.py), no more.
            [(t, subscribe_options(1)) for t in gateway_subscriptions()],
            self.handle_message,
        )
        self.commands = CommandTracker(
            settings.command_ack_timeout_s, self._on_command_timeout, monotonic
        )
        self.journal = SessionJournal(settings.session_journal)
        # sessions open at the last stop, not yet seen running or ended (see recover), by id
        self._unreconciled: dict[str, OpenSession] = {}
        self._reconcile_until: float | None = None
        self.alarms = AlarmBook()
        self._storage_alarm: str | None = None  # the open storage_fault alarm's id
        self._reject_log = RateLimitedLog(settings.reject_log_interval_s, monotonic)
        rate = settings.device_fault_points_per_s
        self._fault_points = TokenBucket(rate, max(1.0, rate * 10), monotonic)
        self.device_faults_unrecorded = 0
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Run until cancelled; on the way out, write what storage still holds."""
        self.recover()
        self.writer.start()
        tasks = [
            asyncio.create_task(self.link.run(), name="mqtt"),
            asyncio.create_task(self._ticker(), name="watchdog-tick"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._prepare_storage(), name="storage-setup"),
            asyncio.create_task(self._report_health(), name="health"),
        ]
        try:
            await self.link.connected.wait()
            self.begin_reconcile()
            self.ready.set()
            await asyncio.gather(*tasks)
        finally:
            await cancel_and_wait(tasks)
            self.commands.close()
            self.journal.close()
            await self.writer.close(timeout=10.0)
            log.info("gateway stopped", extra={"points_written": self.writer.stats.points_written})

    async def _prepare_storage(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.writer.ensure_database()
                return
            except Exception as exc:
                log.warning("influxdb not ready", extra={"error": redact(str(exc)),
                                                         "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)

    async def _ticker(self) -> None:
        interval = self.settings.watchdog.tick_interval_s
        due = self.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, due - self.monotonic()))
            now = self.monotonic()
            lag_ms = (now - due) * 1000
            due = now + interval
            if lag_ms > self.stats.loop_lag_max_ms:
                self.stats.loop_lag_max_ms = round(lag_ms, 1)
            if lag_ms > STALL_MS:
                # Logged only: what piled up in the socket meanwhile is the backlog that rule 5
                # allows its bounded grace for (Watchdog._silence); nothing is switched off.
                self._reject_log.warning("loop-lag", "gateway event loop stalled",
                                         lag_ms=round(lag_ms, 1))
            self.tick(now, backlog=self.link.receive_backlog())

    def tick(self, now: float, backlog: bool = False) -> None:
        """Everything that is due by time: rules 4, 5 and 8, ack deadlines, session ends.

        backlog: input is waiting unread on the MQTT socket (rule 5 may wait a bounded grace).
        """
        grace = self.settings.session_end_grace_s
        for boot in list(self.fleet.boots.values()):
            actions = self.watchdog.on_tick(boot.watch, now, backlog)
            if actions:
                self._apply(boot, actions)
            session = boot.session
            if session is not None and session.left_at is not None and (
                    now - session.left_at > grace):
                log.warning("boot left its session without a terminal event", extra={
                    "device": boot.key, "session_id": session.session_id})
                self._end_session(boot, SessionOutcome.LOST, by_boot=True)
        self.commands.expire_due(now)
        self._watch_storage()
        if self._reconcile_until is not None and now >= self._reconcile_until:
            self._reconcile_until = None
            for entry in list(self._unreconciled.values()):
                self._close_unreconciled(entry, SessionOutcome.LOST)

    # ------------------------------------------------------------------ restart

    def recover(self) -> None:
        """Load the sessions that were open when the gateway last stopped.

        Each is then resumed when the boot's retained state or telemetry shows it still
        running, closed with the outcome of a queued terminal event, or recorded `lost` when
        neither came within `reconcile_window_s` of the broker connection.
        """
        self._unreconciled = self.journal.load()
        if self._unreconciled:
            log.info("open sessions from the last run", extra={
                "sessions": len(self._unreconciled)})

    def begin_reconcile(self) -> None:
        if self._unreconciled and self._reconcile_until is None:
            self._reconcile_until = self.monotonic() + self.settings.reconcile_window_s

    def _close_unreconciled(self, entry: OpenSession, outcome: SessionOutcome) -> None:
        """A session of the last run that ended while the gateway was away: its one outcome."""
        del self._unreconciled[entry.session_id]
        clinic, device = entry.key.split("/", 1)
        log.warning("session ended while the gateway was away", extra={
            "device": entry.key, "session_id": entry.session_id, "outcome": outcome.value})
        self.writer.submit(points.session(clinic, device, Session.from_journal(
                                              entry, self.settings.programs),
                                          outcome.value, self._stamp()))
        self.journal.closed(entry.key, entry.session_id)

    def _watch_storage(self) -> None:
        """A gateway alarm (`storage_fault`) while the disk spool cannot be written.

        The writer carries on without the spool (InfluxDB if it is up, memory, counted
        drops); the alarm tells a human that the next InfluxDB outage would lose data. One
        alarm per episode, resolved when the spool works again.
        """
        fault = self.writer.storage_fault
        if fault is not None and self._storage_alarm is None:
            alarm = self.alarms.raise_gateway_alarm(
                self.settings.gateway_id, STORAGE_FAULT, Severity.MEDIUM, fault, self.clock())
            self._storage_alarm = alarm.alarm_id
            log.error("storage fault: gateway alarm raised", extra={
                "alarm_id": alarm.alarm_id, "fault": fault,
                "points_dropped": self.writer.stats.points_dropped})
            self._publish_alarm(alarm)
        elif fault is None and self._storage_alarm is not None:
            resolved = self.alarms.resolve_alarm(self._storage_alarm, self.clock())
            log.info("storage fault over", extra={"alarm_id": self._storage_alarm})
            self._storage_alarm = None
            if resolved is not None:
                self._publish_alarm(resolved)

    async def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            await self.link.connected.wait()
            hb = Heartbeat(ts=self.clock(), gateway_id=self.settings.gateway_id,
                           interval_s=interval)
            self.link.publish_nowait(HEARTBEAT_TOPIC, hb.to_payload(), qos=0, retain=True)
            await asyncio.sleep(interval)

    def snapshot(self) -> GatewayStats:
        """Every counter and gauge at this moment: what gateway_health and /api/v1/stats
        both derive from (gateway/stats.py), so the two cannot disagree."""
        return GatewayStats.of(self)

    def health_fields(self) -> dict[str, FieldValue]:
        """Counters (totals since start) and gauges that say whether the chain is healthy."""
        return self.snapshot().health_fields()

    async def _report_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            fields = self.health_fields()
            self.writer.submit(points.gateway_health(self.settings.gateway_id, fields,
                                                     self._stamp()))
            log.info("gateway health", extra=fields)

    # ------------------------------------------------------------------ ingress (hot path)

    def handle_message(self, name: str, payload: bytes) -> None:
        try:
            addr = parse_topic(name)
        except TopicError as exc:
            if name == HEARTBEAT_TOPIC or name.startswith(f"{ALARM_TOPIC_PREFIX}/"):
                return  # our own
            self._reject(None, "bad_topic", str(exc), topic=name[:200])
            return
        if addr.channel is Channel.CMD:
            return  # another gateway's command; not ours to act on
        if addr.channel is Channel.STATE and not payload:
            self._forget(addr)  # retained state cleared: the boot was taken out of service
            return
        try:
            msg = decode(addr.channel, payload, self.settings.max_payload_bytes)
        except PayloadError as exc:
            self._reject(addr, exc.kind, str(exc))
            return
        self.stats.messages[addr.channel.value] += 1
        if isinstance(msg, Telemetry):
            self._on_telemetry(addr, msg)
        elif isinstance(msg, BootState):
            self._on_state(addr, msg)
        elif isinstance(msg, BootEvent):
            self._on_event(addr, msg)
        elif isinstance(msg, Ack):
            self._on_ack(addr, msg)

    def _reject(self, addr: TopicAddress | None, kind: str, reason: str, **fields: object) -> None:
        self.stats.rejected[kind] += 1
        key = addr.key if addr else "unknown"
        self._reject_log.warning(
            f"{key}:{kind}", "message rejected",
            device=key, kind=kind, reason=reason,
            rejected_total=self.stats.rejected[kind], **fields,
        )
        if addr is not None:
            boot = self.fleet.get(addr.clinic, addr.device)
            if boot is not None:
                boot.faults += 1
            if self._fault_points.take():
                self.writer.submit(points.device_fault(addr, kind, reason, self._stamp()))
            else:
                self.device_faults_unrecorded += 1

    def _on_state(self, addr: TopicAddress, state: BootState) -> None:
        ceiling = self.settings.programs.ceiling_for(addr.clinic)
        known = addr.key in self.fleet.boots
        boot = self.fleet.upsert_state(addr.clinic, addr.device, state, self.clock(), ceiling)
        if known and boot.online != state.online:
            log.info("boot online" if state.online else "boot offline", extra={
                "device": boot.key, "firmware": state.firmware, "chambers": state.chambers,
                "in_session": boot.session is not None})
            if state.online:
                if self.watchdog.on_online(boot.watch, self.monotonic()):
                    log.warning("boot back online with a vent unconfirmed; vent re-sent",
                                extra={"device": boot.key})
                    self._send_vent(boot, "re-sent: the boot reconnected before the vent "
                                    "was confirmed")
                self._resolve(boot, frozenset({Rule.OFFLINE_IN_SESSION}))
            else:
                self._apply(boot, self.watchdog.on_offline(boot.watch, self.monotonic()))
        elif not known:
            log.info("boot discovered", extra={
                "device": boot.key, "online": state.online, "firmware": state.firmware,
                "chambers": state.chambers})
        if state.online:
            self.watchdog.on_announce(boot.watch)
        if state.session is not None:
            self._in_session(boot, state.session.session_id)
        elif state.online:
            self._out_of_session(boot)
        self.writer.submit(points.boot_state(boot, self._stamp()))

    def _in_session(self, boot: Boot, session_id: str, elapsed_s: float | None = None) -> None:
        """The boot says, by any of its messages, that it runs `session_id`: watch it.

        Whatever the order and timing of ack, event, state and telemetry, a boot in a session
        by its own word is watched by every rule, even one the gateway had given up on.
        """
        session = boot.session
        if session is not None and session.session_id == session_id:
            session.left_at = None
            if session.status is SessionStatus.STARTING:
                self._session_running(boot)
            return
        ended = boot.ended_sessions.get(session_id)
        if ended is not None:
            if not (ended.by_boot or boot.watch.venting):
                # The gateway closed it (a vent, a start it gave up on): the boot has not
                # obeyed. Vent again; the session keeps its one recorded outcome.
                self._apply(boot, [self.watchdog.session_not_ended(
                    boot.watch, session_id, ended.outcome.value, self.monotonic())])
            return  # else a late message of a session the boot ended, or rule 8 has it
        if session is not None:
            log.warning("boot runs another session than the gateway's", extra={
                "device": boot.key, "gateway_session": session.session_id,
                "boot_session": session_id})
            self._end_session(boot, SessionOutcome.FAILED if session.status is
                              SessionStatus.STARTING else SessionOutcome.LOST, by_boot=True)
        self._resume(boot, session_id, elapsed_s)

    def _out_of_session(self, boot: Boot) -> None:
        """The boot's message shows no session: it may have ended it, or rebooted.

        The terminal event may still be on its way (QoS 1 behind QoS 0, or a reordering), so
        the session ends `lost` only when none came within `session_end_grace_s`.
        """
        session = boot.session
        if session is not None and session.status is SessionStatus.RUNNING and (
                session.left_at is None):
            session.left_at = self.monotonic()

    def _resume(self, boot: Boot, session_id: str, elapsed_s: float | None = None) -> None:
        """Watch a session this gateway did not see start (a restart): the program comes
        from the boot's retained state, else from the journal, else it is unknown."""
        active = boot.state.session if (boot.state.session is not None and
                                        boot.state.session.session_id == session_id) else None
        journalled = self._unreconciled.get(session_id)
        if journalled is not None and journalled.key == boot.key:
            del self._unreconciled[session_id]
        else:
            journalled = None
        known = Session.from_journal(journalled) if journalled is not None else None
        program = active.program if active else known.program if known else None
        cmd_id = active.cmd_id if active else known.cmd_id if known else None
        now = self.clock()
        provisional = False
        if elapsed_s is None:
            # a guess on the boot's (or our) wall clock, until its session_elapsed_s says
            started = (active.started_at if active else
                       known.started_at or known.requested_at if known else now)
            elapsed_s, provisional = max(0.0, now - started), True
        boot.session = Session(session_id, program, cmd_id,
                               known.requested_at if known else now, SessionStatus.RUNNING,
                               now - elapsed_s, resumed=True,
                               catalogue=catalogue_key(program, self.settings.programs))
        self.watchdog.start_session(boot.watch, session_id, program, self.monotonic(),
                                    elapsed_s, provisional)
        self.stats.sessions_resumed += 1
        self.journal.opened(boot.session.journal_entry(boot.key))
        self.writer.submit(points.session(boot.clinic, boot.device, boot.session, "resumed",
                                          self._stamp()))
        log.warning("session resumed", extra={
            "device": boot.key, "session_id": session_id,
            "program": program.name if program else None, "elapsed_s": elapsed_s})

    def _forget(self, addr: TopicAddress) -> None:
        boot = self.fleet.boots.get(addr.key)
        if boot is None:
            return
        if boot.session is not None:
            # Never stop watching a session; the boot is removed once the session ends.
            log.warning("retained state cleared during a session; still watching", extra={
                "device": addr.key, "session_id": boot.session.session_id})
            return
        del self.fleet.boots[addr.key]
        log.info("boot removed (retained state cleared)", extra={"device": addr.key})

    def _on_telemetry(self, addr: TopicAddress, sample: Telemetry) -> None:
        boot = self.fleet.get(addr.clinic, addr.device)
        if boot is None:
            # Stored (the data is real) but not watched: we do not know its limits yet.
            self.stats.rejected["unknown_boot_telemetry"] += 1
            self._reject_log.warning(f"{addr.key}:nostate", "telemetry from a boot without state",
                                     device=addr.key)
            self.writer.submit(points.telemetry(addr, sample))
            return
        boot.last_seen = self.clock()
        boot.last_telemetry = sample
        session = boot.session
        if not self.watchdog.is_newer(boot.watch, sample.seq):
            pass  # a duplicate or late sample says nothing about the session now
        elif sample.session_id is not None and sample.phase in CYCLE_PHASES:
            if session is None or session.session_id != sample.session_id or (
                    session.status is not SessionStatus.RUNNING or session.left_at is not None):
                self._in_session(boot, sample.session_id, sample.session_elapsed_s)
        elif session is not None and session.left_at is None:
            self._out_of_session(boot)
        actions = self.watchdog.on_telemetry(boot.watch, sample, self.monotonic())
        if actions:
            self._apply(boot, actions)
        session = boot.session
        targets = (session.program.targets_mmhg if session is not None
                   and session.program is not None and sample.session_id == session.session_id
                   else None)
        self.writer.submit(points.telemetry(addr, sample, targets))

    def _on_event(self, addr: TopicAddress, event: BootEvent) -> None:
        boot = self.fleet.get(addr.clinic, addr.device)
        self.writer.submit(points.boot_event(addr, event, int(self.clock() * 1000)))
        if event.kind in _SESSION_END and event.session_id is not None:
            # after a restart the broker's queued events may come before the retained state
            entry = self._unreconciled.get(event.session_id)
            if entry is not None and entry.key == addr.key:
                self._close_unreconciled(entry, _SESSION_END[event.kind])
                return
        if boot is None:
            return
        boot.last_seen = self.clock()
        actions = self.watchdog.on_event(boot.watch, event, self.monotonic())
        if actions:
            self._apply(boot, actions)
        if event.kind is EventKind.SESSION_STARTED:
            if event.session_id is not None:
                self._in_session(boot, event.session_id)
            elif boot.session is not None:
                self._in_session(boot, boot.session.session_id)
        elif event.kind in _SESSION_END:
            if boot.session is not None and event.session_id in (None, boot.session.session_id):
                self._end_session(boot, _SESSION_END[event.kind], by_boot=True)
            elif event.session_id is not None:
                ended = boot.ended_sessions.get(event.session_id)
                if ended is not None and not ended.by_boot:
                    boot.remember_ended(ended.session, True, ended.outcome)  # over for good
        elif event.kind is EventKind.FAULT:
            boot.faults += 1
            self.writer.submit(points.device_fault(addr, "boot_fault", event.detail or "",
                                                   self._stamp()))

    def _on_ack(self, addr: TopicAddress, ack: Ack) -> None:
        tracked = self.commands.on_ack(addr.key, ack)
        if tracked is None:
            entry = next((e for e in self._unreconciled.values()
                          if e.cmd_id == ack.cmd_id and e.key == addr.key), None)
            if entry is not None:
                # the answer to a start sent before the restart
                if ack.status is AckStatus.REJECTED:
                    self._close_unreconciled(entry, SessionOutcome.REJECTED)
                return
            self._reject(addr, "unknown_ack", f"ack for unknown command {ack.cmd_id}")
            return
        boot = self.fleet.get(addr.clinic, addr.device)
        self.writer.submit(points.command(tracked, self._stamp()))
        cmd = tracked.command
        if boot is None or cmd.kind is not CommandKind.START or cmd.session_id is None:
            return
        session = boot.session
        ours = session is not None and session.session_id == cmd.session_id
        if ack.status is AckStatus.ACCEPTED:
            self._in_session(boot, cmd.session_id)  # late or not: the boot runs it
        elif not ours:
            return
        elif ack.status is AckStatus.REJECTED:
            log.warning("boot rejected session start", extra={
                "device": boot.key, "reason": ack.reason, "cmd_id": ack.cmd_id})
            self._end_session(boot, SessionOutcome.REJECTED, by_boot=True)
        elif ack.status is AckStatus.DONE:
            self._end_session(boot, SessionOutcome.COMPLETED, by_boot=True)

    # ------------------------------------------------------------------ sessions and actions

    def _session_running(self, boot: Boot) -> None:
        """The boot confirmed a start: it has been watched since the start was sent."""
        session = boot.session
        assert session is not None
        if session.status is SessionStatus.RUNNING:
            return
        session.status = SessionStatus.RUNNING
        session.started_at = self.clock()
        if boot.watch.session_id != session.session_id:
            self.watchdog.start_session(boot.watch, session.session_id, session.program,
                                        self.monotonic())
        log.info("session running", extra={"device": boot.key, "session_id": session.session_id,
                                           "program": session.program_name})
        self.journal.opened(session.journal_entry(boot.key))
        self.writer.submit(points.session(boot.clinic, boot.device, session, "started",
                                          self._stamp()))

    def _end_session(self, boot: Boot, outcome: SessionOutcome, *, by_boot: bool = False
                     ) -> None:
        """The session's one terminal outcome. by_boot: the boot's own message ended it."""
        session = boot.session
        if session is None:
            return
        boot.session = None
        boot.last_outcome = outcome
        boot.remember_ended(session, by_boot, outcome)
        boot.watch.end_session()
        log.info("session ended", extra={"device": boot.key, "session_id": session.session_id,
                                         "outcome": outcome.value})
        self.journal.closed(boot.key, session.session_id)
        self.writer.submit(points.session(boot.clinic, boot.device, session, outcome.value,
                                          self._stamp(), ended_at=self.clock()))

    def _apply(self, boot: Boot, actions: list[Outcome]) -> None:
        """Carry out watchdog actions: the vent goes out before anything else happens."""
        for action in actions:
            if isinstance(action, VentConfirmed):
                self._vent_confirmed(boot, action)
                continue
            if action.vent:
                if action.stop:
                    self._send(boot, CommandKind.STOP, reason=action.detail)
                self._send_vent(boot, f"{action.rule.value}: {action.detail}")
            session_id = boot.session.session_id if boot.session else boot.watch.session_id
            now_ms = self._stamp()
            if action.fault:
                boot.faults += 1
                self.stats.rejected[action.rule.value] += 1
                self._reject_log.warning(
                    f"{boot.key}:{action.rule.value}", "implausible data from boot",
                    device=boot.key, kind=action.rule.value, reason=action.detail)
                self.writer.submit(points.device_fault(
                    TopicAddress(boot.clinic, boot.device, Channel.TELEMETRY),
                    action.rule.value, action.detail, now_ms))
            if action.record:
                self.stats.safety_events += 1
                log.warning("safety event", extra={
                    "device": boot.key, "rule": action.rule.value,
                    "severity": action.severity.value, "action": action.action,
                    "chamber": action.chamber, "value": action.value, "limit": action.limit,
                    "detail": action.detail, "session_id": session_id})
                self.writer.submit(points.safety_event(boot, action, session_id, now_ms))
            if action.alarm:
                self._publish_alarm(self.alarms.raise_alarm(
                    boot.clinic, boot.device, action, session_id, self.clock()))
            if action.vent:
                self._end_session(boot, SessionOutcome.VENTED)

    def _vent_confirmed(self, boot: Boot, confirmed: VentConfirmed) -> None:
        self.stats.vents_confirmed += 1
        log.info("vent confirmed", extra={
            "device": boot.key, "after_s": confirmed.after_s, "resends": confirmed.resends})
        self.writer.submit(points.vent_confirmed(boot, confirmed, self._stamp()))
        self._resolve(boot, VENT_RESOLVED)

    def _resolve(self, boot: Boot, rules: frozenset[Rule]) -> None:
        for alarm in self.alarms.resolve(boot.clinic, boot.device, rules, self.clock()):
            self._publish_alarm(alarm)

    def _publish_alarm(self, alarm: Alarm) -> None:
        self.link.publish_nowait(alarm_topic(alarm.clinic, alarm.device), alarm.to_payload(),
                                 qos=1)
        self.writer.submit(points.alarm(alarm))

    def acknowledge_alarm(self, alarm_id: str, by: str) -> Alarm:
        alarm = self.alarms.acknowledge(alarm_id, by, self.clock())
        log.info("alarm acknowledged", extra={"alarm_id": alarm_id, "by": by,
                                              "state": alarm.state.value})
        self._publish_alarm(alarm)
        return alarm

    def _send_vent(self, boot: Boot, reason: str) -> TrackedCommand:
        # A vent never expires (a late vent is still a vent) and is sent before it is tracked.
        tracked = self._send(boot, CommandKind.VENT, reason=reason)
        boot.vents += 1
        self.stats.vents_sent += 1
        return tracked

    def _send(self, boot: Boot, kind: CommandKind, reason: str | None = None) -> TrackedCommand:
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
        return self._track(boot, cmd)

    def _track(self, boot: Boot, cmd: Command, timeout_s: float | None = None
               ) -> TrackedCommand:
        tracked = self.commands.track(boot.key, cmd, timeout_s)
        self.writer.submit(points.command(tracked, self._stamp()))
        return tracked

    def _on_command_timeout(self, tracked: TrackedCommand) -> None:
        log.error("command not acknowledged", extra={
            "device": tracked.key, "cmd_id": tracked.command.cmd_id,
            "kind": tracked.command.kind.value, "timeout_s": self.settings.command_ack_timeout_s})
        self.writer.submit(points.command(tracked, self._stamp()))
        boot = self.fleet.boots.get(tracked.key)
        session = boot.session if boot else None
        if (boot is not None and session is not None and session.status is SessionStatus.STARTING
                and session.cmd_id == tracked.command.cmd_id):
            self._end_session(boot, SessionOutcome.FAILED)

    # ------------------------------------------------------------------ control (API, CLI)

    def boot(self, clinic: str, device: str) -> Boot:
        boot = self.fleet.get(clinic, device)
        if boot is None:
            raise UnknownBoot(f"no boot {clinic}/{device} has been seen")
        return boot

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
        if not self.link.connected.is_set():
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
            self._apply(boot, [self.watchdog.program_refused(reasons)])
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
        self.journal.opened(session.journal_entry(boot.key))
        tracked = self._track(boot, cmd, expiry + self.settings.command_ack_timeout_s)
        try:
            await self.link.publish(topic(clinic, device, Channel.CMD), cmd.to_payload(),
                                    qos=CHANNEL_QOS[Channel.CMD], expiry_s=expiry)
        except Exception:
            if boot.session is session:
                boot.session = None
                boot.watch.end_session()
                self.journal.closed(boot.key, session.session_id)
            raise
        self.commands.delivered(cmd.cmd_id)
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
        tracked = self._track(boot, cmd)
        await self.link.publish(topic(clinic, device, Channel.CMD), cmd.to_payload(),
                                qos=CHANNEL_QOS[Channel.CMD])
        self.commands.delivered(cmd.cmd_id)
        if wait:
            await tracked.first_ack
        return tracked

    async def vent(self, clinic: str, device: str, reason: str, *, wait: bool = True
                   ) -> TrackedCommand:
        boot = self.boot(clinic, device)
        log.warning("manual vent", extra={"device": boot.key, "reason": reason})
        tracked = self._send_vent(boot, f"manual: {reason}")
        self.watchdog.vent_sent(boot.watch, self.monotonic())
        self._end_session(boot, SessionOutcome.VENTED)
        if wait:
            await tracked.first_ack
        return tracked

    def _stamp(self) -> int:
        """The time of a point the gateway stamps itself (unique, so none overwrites another)."""
        return self._stamps(self.clock())

    # ------------------------------------------------------------------ audit trail (API)

    @functools.cached_property
    def audit_trail(self) -> AuditTrail:
        """The newest audit records in memory (GET /api/v1/audit); all go to InfluxDB."""
        return AuditTrail(self.settings.api.audit_keep)

    def record_audit(self, event: AuditEvent) -> None:
        """Who did what through the API: to the log, the in-memory trail and InfluxDB
        (measurement `audit`), with one timestamp for all three."""
        log_audit(event)
        time_us = self._stamp()
        self.audit_trail.append(time_us / 1e6, event)
        self.writer.submit(audit_point(event, time_us))
