"""The gateway service: the composition root. Builds the parts, supervises their tasks.

The parts, one job each:
    gateway/ingest.py    topic+payload -> parse/validate -> fleet state -> watchdog
    gateway/effects.py   watchdog actions -> vent (publish now), stop, alarms; commands
    gateway/sessions.py  the session lifecycle and the restart reconcile (journal)
    gateway/recorder.py  events -> points -> storage queue
    gateway/control.py   the facade the HTTP API calls (start/stop/vent, lists, stats, audit)

Data flow of one message (all synchronous, no await on the hot path):
    topic+payload -> parse/validate -> fleet state -> watchdog -> vent (publish now)
                                                   \\-> points -> storage queue

`Gateway` keeps the parts' shared objects as attributes (`fleet`, `stats`, `writer`, `link`,
`commands`, `journal`, ...) so the tests and the CLI read them where they always did; `link`,
`writer` and `commands` are properties, so replacing one (a test's wire) replaces it for
every part.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gateway.aio import cancel_and_wait
from gateway.alarms import AlarmBook
from gateway.audit import AuditEvent, AuditTrail
from gateway.broker_admin import gateway_subscriptions
from gateway.cluster import STATE_TOPIC, Cluster
from gateway.commands import CommandTracker, TrackedCommand
from gateway.contract import Alarm, Heartbeat, SessionProgram
from gateway.control import Control, StartResult, UnknownBoot
from gateway.effects import Effects
from gateway.fleet import Boot, Fleet, SessionOutcome
from gateway.gc_tuning import GcPauses
from gateway.ingest import Ingest
from gateway.journal import SessionJournal
from gateway.lineprotocol import FieldValue
from gateway.mqtt_link import MqttLink, subscribe_options
from gateway.ratelimit import RateLimitedLog, TokenBucket
from gateway.recorder import Recorder
from gateway.redact import redact
from gateway.sessions import Sessions
from gateway.settings import GatewaySettings
from gateway.stats import GatewayStats, IngestStats
from gateway.storage import InfluxWriter
from gateway.watchdog import Watchdog

# Importable from here as before (gateway/api.py, tests, tools).
__all__ = ["STALL_MS", "Gateway", "IngestStats", "RateLimitedLog", "StartResult", "TokenBucket",
           "UnknownBoot"]

log = logging.getLogger(__name__)


# An event-loop delay beyond this is the gateway's own stall (CPU starvation, a burst).
STALL_MS = 250.0


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
        self.stats = IngestStats()
        self.recorder = Recorder(InfluxWriter(settings.influx), clock)
        self.gc_pauses = GcPauses()  # filled once the process tunes its collector (__main__)
        self.journal = SessionJournal(settings.session_journal)
        # Which clinics are this gateway's: all of them, unless several gateways share them.
        self.cluster = Cluster(settings, self.fleet, self.journal)
        link = MqttLink(
            settings.mqtt,
            # What the broker lets the gateway read (gateway/broker_admin.py), no more; with
            # several gateways the states only, and each watched clinic's topics as it comes.
            [(t, subscribe_options(1)) for t in
             ([STATE_TOPIC] if self.cluster.partitioned else gateway_subscriptions())],
            # With several gateways this connection only discovers clinics; each watched
            # clinic's messages come over a session of its own (gateway/cluster.py).
            self.cluster.discover if self.cluster.partitioned else self.handle_message,
            fence=self.cluster.may_publish,
        )
        self.cluster.link = link
        self.cluster.on_message = self.handle_message
        self.alarms = AlarmBook()
        self._reject_log = RateLimitedLog(settings.reject_log_interval_s, monotonic)
        self.effects = Effects(settings, link=link, fleet=self.fleet, alarms=self.alarms,
                               stats=self.stats, recorder=self.recorder,
                               reject_log=self._reject_log, clock=clock, monotonic=monotonic)
        self.sessions = Sessions(settings, watchdog=self.watchdog, stats=self.stats,
                                 journal=self.journal, recorder=self.recorder,
                                 apply=self.effects.apply, clock=clock, monotonic=monotonic)
        self.effects.sessions = self.sessions
        self.ingest = Ingest(settings, fleet=self.fleet, watchdog=self.watchdog,
                             stats=self.stats, effects=self.effects, sessions=self.sessions,
                             recorder=self.recorder, reject_log=self._reject_log, clock=clock,
                             monotonic=monotonic, cluster=self.cluster)
        self.control = Control(settings, fleet=self.fleet, watchdog=self.watchdog,
                               effects=self.effects, sessions=self.sessions,
                               recorder=self.recorder, snapshot=self.snapshot, clock=clock,
                               monotonic=monotonic, cluster=self.cluster)
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ the parts' objects

    @property
    def link(self) -> MqttLink:
        return self.effects.link

    @link.setter
    def link(self, link: MqttLink) -> None:
        self.effects.link = link
        self.cluster.link = link

    @property
    def writer(self) -> InfluxWriter:
        return self.recorder.writer

    @writer.setter
    def writer(self, writer: InfluxWriter) -> None:
        self.recorder.writer = writer

    @property
    def commands(self) -> CommandTracker:
        return self.effects.commands

    @commands.setter
    def commands(self, commands: CommandTracker) -> None:
        self.effects.commands = commands

    @property
    def device_faults_unrecorded(self) -> int:
        return self.ingest.device_faults_unrecorded

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
            asyncio.create_task(self.cluster.run(), name="cluster"),
        ]
        try:
            await self.link.connected.wait()
            self.begin_reconcile()
            self.ready.set()
            await asyncio.gather(*tasks)
        finally:
            # Hand the clinics over first: the other gateways take them while this one
            # writes out what storage holds.
            await self.cluster.stop()
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
            self.tick(now, backlog=self.link.receive_backlog()
                      or self.cluster.receive_backlog())

    def tick(self, now: float, backlog: bool = False) -> None:
        """Everything that is due by time: rules 4, 5 and 8, ack deadlines, session ends.

        backlog: input is waiting unread on the MQTT socket (rule 5 may wait a bounded grace).
        """
        grace = self.settings.session_end_grace_s
        for boot in list(self.fleet.boots.values()):
            actions = self.watchdog.on_tick(boot.watch, now, backlog)
            if actions:
                self.effects.apply(boot, actions)
            session = boot.session
            if session is not None and session.left_at is not None and (
                    now - session.left_at > grace):
                log.warning("boot left its session without a terminal event", extra={
                    "device": boot.key, "session_id": session.session_id})
                self.sessions.end_session(boot, SessionOutcome.LOST, by_boot=True)
        self.commands.expire_due(now)
        self.effects.watch_storage()
        self.sessions.reconcile_due(now)

    # ------------------------------------------------------------------ restart

    def recover(self) -> None:
        """Load the sessions that were open when the gateway last stopped (Sessions.recover)."""
        self.sessions.recover()

    def begin_reconcile(self) -> None:
        self.sessions.begin_reconcile()

    async def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            await self.link.connected.wait()
            hb = Heartbeat(ts=self.clock(), gateway_id=self.settings.gateway_id,
                           interval_s=interval).to_payload()
            # The fleet-wide one (protocol revision 1) and one per clinic this gateway may
            # act for now (revision 2): a boot times out on its clinic's.
            for t in self.cluster.heartbeat_topics():
                self.link.publish_nowait(t, hb, qos=0, retain=True)
            due = self.cluster.heartbeat_due
            due.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await due.wait()  # a clinic taken over: its heartbeat at once

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
            self.recorder.gateway_health(self.settings.gateway_id, fields)
            log.info("gateway health", extra=fields)

    # ------------------------------------------------------------------ the parts' entry points

    def handle_message(self, name: str, payload: bytes) -> None:
        """One MQTT message (the link's callback): gateway/ingest.py."""
        self.ingest.handle_message(name, payload)

    def boot(self, clinic: str, device: str) -> Boot:
        return self.control.boot(clinic, device)

    def check(self, boot: Boot, program: SessionProgram) -> list[str]:
        return self.control.check(boot, program)

    async def start_session(
        self, clinic: str, device: str, program: SessionProgram, *, wait: bool = True
    ) -> StartResult:
        return await self.control.start_session(clinic, device, program, wait=wait)

    async def stop_session(self, clinic: str, device: str, *, wait: bool = True) -> TrackedCommand:
        return await self.control.stop_session(clinic, device, wait=wait)

    async def vent(self, clinic: str, device: str, reason: str, *, wait: bool = True
                   ) -> TrackedCommand:
        return await self.control.vent(clinic, device, reason, wait=wait)

    def acknowledge_alarm(self, alarm_id: str, by: str) -> Alarm:
        return self.control.acknowledge_alarm(alarm_id, by)

    @property
    def audit_trail(self) -> AuditTrail:
        return self.control.audit_trail

    def record_audit(self, event: AuditEvent) -> None:
        self.control.record_audit(event)
