"""The ingest: one MQTT message in → parse the topic, decode → fleet state → watchdog.

One job: the hot path from the broker (all synchronous, no await). A bad message is a
counted, rate-limited, logged rejection (`_reject`), never an exception out of here. What the
watchdog decides is carried out by the effects (a vent is published before anything is
recorded); the session's bookkeeping is the session lifecycle's; points go to the recorder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateway.cluster import Cluster
from gateway.commands import CommandTracker
from gateway.contract import (
    ALARM_TOPIC_PREFIX,
    HEARTBEAT_TOPIC,
    Ack,
    AckStatus,
    BootEvent,
    BootState,
    Channel,
    CommandKind,
    EventKind,
    PayloadError,
    Telemetry,
    TopicAddress,
    TopicError,
    decode,
    parse_topic,
)
from gateway.effects import Effects
from gateway.fleet import Fleet, SessionOutcome, SessionStatus
from gateway.ratelimit import RateLimitedLog, TokenBucket
from gateway.recorder import Recorder
from gateway.sessions import Sessions
from gateway.settings import GatewaySettings
from gateway.stats import IngestStats
from gateway.watchdog import CYCLE_PHASES, Rule, Watchdog

# The service's logger: operators filter on it, the messages stay where they were.
log = logging.getLogger("gateway.service")

_SESSION_END = {
    EventKind.SESSION_COMPLETED: SessionOutcome.COMPLETED,
    EventKind.SESSION_STOPPED: SessionOutcome.STOPPED,
    EventKind.USER_STOP: SessionOutcome.USER_STOP,
    EventKind.VENTED: SessionOutcome.VENTED,
}

# The gateways' own topics under `_gateway` (protocol §5): clinic heartbeats and alarms.
_OWN_PREFIXES = (f"{HEARTBEAT_TOPIC}/", f"{ALARM_TOPIC_PREFIX}/")

# A channel's name by member: an enum's `.value` is a property lookup, on every message.
_CHANNEL_NAMES = {channel: channel.value for channel in Channel}


class Ingest:
    """The broker's messages, one at a time, into fleet state and watchdog decisions."""

    def __init__(self, settings: GatewaySettings, *, fleet: Fleet, watchdog: Watchdog,
                 stats: IngestStats, effects: Effects, sessions: Sessions, recorder: Recorder,
                 reject_log: RateLimitedLog, clock: Callable[[], float],
                 monotonic: Callable[[], float], cluster: Cluster | None = None) -> None:
        self.settings = settings
        self.cluster = cluster
        # The clinics this gateway watches, when several gateways share them (the cluster's
        # own set, changed in place); None: every clinic is this gateway's.
        self._watching = cluster.watching if cluster is not None and cluster.partitioned \
            else None
        self.fleet = fleet
        self.watchdog = watchdog
        self.stats = stats
        self.effects = effects
        self.sessions = sessions
        self.recorder = recorder
        self.reject_log = reject_log
        self.clock = clock
        self.monotonic = monotonic
        rate = settings.device_fault_points_per_s
        self._fault_points = TokenBucket(rate, max(1.0, rate * 10), monotonic)
        self.device_faults_unrecorded = 0

    @property
    def commands(self) -> CommandTracker:
        return self.effects.commands

    def handle_message(self, name: str, payload: bytes) -> None:
        try:
            addr = parse_topic(name)
        except TopicError as exc:
            if name == HEARTBEAT_TOPIC or name.startswith(_OWN_PREFIXES):
                # Ours or another gateway's (a clinic heartbeat of a clinic named `state`
                # matches the state filter).
                return
            self._reject(None, "bad_topic", str(exc), topic=name[:200])
            return
        if addr.channel is Channel.CMD:
            return  # another gateway's command; not ours to act on
        watching = self._watching
        if watching is not None and addr.clinic not in watching:
            # Another gateway's clinic (every gateway reads every state, to find clinics).
            assert self.cluster is not None
            self.cluster.seen(addr.clinic)
            return
        if addr.channel is Channel.STATE and not payload:
            self._forget(addr)  # retained state cleared: the boot was taken out of service
            return
        try:
            msg = decode(addr.channel, payload, self.settings.max_payload_bytes)
        except PayloadError as exc:
            self._reject(addr, exc.kind, str(exc))
            return
        self.stats.messages[_CHANNEL_NAMES[addr.channel]] += 1
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
        self.reject_log.warning(
            f"{key}:{kind}", "message rejected",
            device=key, kind=kind, reason=reason,
            rejected_total=self.stats.rejected[kind], **fields,
        )
        if addr is not None:
            boot = self.fleet.boots.get(addr.key)
            if boot is not None:
                boot.faults += 1
            if self._fault_points.take():
                self.recorder.device_fault(addr, kind, reason)
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
                    self.effects.send_vent(boot, "re-sent: the boot reconnected before the "
                                           "vent was confirmed")
                self.effects.resolve(boot, frozenset({Rule.OFFLINE_IN_SESSION}))
            else:
                self.effects.apply(boot, self.watchdog.on_offline(boot.watch, self.monotonic()))
        elif not known:
            log.info("boot discovered", extra={
                "device": boot.key, "online": state.online, "firmware": state.firmware,
                "chambers": state.chambers})
        if state.online:
            self.watchdog.on_announce(boot.watch)
        if state.session is not None:
            self.sessions.in_session(boot, state.session.session_id)
        elif state.online:
            self.sessions.out_of_session(boot)
        self.recorder.boot_state(boot)

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
        boot = self.fleet.boots.get(addr.key)
        if boot is None:
            # Stored (the data is real) but not watched: we do not know its limits yet.
            self.stats.rejected["unknown_boot_telemetry"] += 1
            self.reject_log.warning(f"{addr.key}:nostate", "telemetry from a boot without state",
                                    device=addr.key)
            self.recorder.telemetry(addr, sample)
            return
        boot.last_seen = self.clock()
        boot.last_telemetry = sample
        session = boot.session
        if not self.watchdog.is_newer(boot.watch, sample.seq):
            pass  # a duplicate or late sample says nothing about the session now
        elif sample.session_id is not None and sample.phase in CYCLE_PHASES:
            if session is None or session.session_id != sample.session_id or (
                    session.status is not SessionStatus.RUNNING or session.left_at is not None):
                self.sessions.in_session(boot, sample.session_id, sample.session_elapsed_s)
        elif session is not None and session.left_at is None:
            self.sessions.out_of_session(boot)
        actions = self.watchdog.on_telemetry(boot.watch, sample, self.monotonic())
        if actions:
            self.effects.apply(boot, actions)
        session = boot.session
        targets = (session.program.targets_mmhg if session is not None
                   and session.program is not None and sample.session_id == session.session_id
                   else None)
        self.recorder.telemetry(addr, sample, targets)

    def _on_event(self, addr: TopicAddress, event: BootEvent) -> None:
        boot = self.fleet.boots.get(addr.key)
        self.recorder.boot_event(addr, event)
        if event.kind in _SESSION_END and event.session_id is not None:
            # after a restart the broker's queued events may come before the retained state
            entry = self.sessions.unreconciled_for(addr.key, event.session_id)
            if entry is not None:
                self.sessions.close_unreconciled(entry, _SESSION_END[event.kind])
                return
        if boot is None:
            return
        boot.last_seen = self.clock()
        actions = self.watchdog.on_event(boot.watch, event, self.monotonic())
        if actions:
            self.effects.apply(boot, actions)
        if event.kind is EventKind.SESSION_STARTED:
            if event.session_id is not None:
                self.sessions.in_session(boot, event.session_id)
            elif boot.session is not None:
                self.sessions.in_session(boot, boot.session.session_id)
        elif event.kind in _SESSION_END:
            if boot.session is not None and event.session_id in (None, boot.session.session_id):
                self.sessions.end_session(boot, _SESSION_END[event.kind], by_boot=True)
            elif event.session_id is not None:
                ended = boot.ended_sessions.get(event.session_id)
                if ended is not None and not ended.by_boot:
                    boot.remember_ended(ended.session, True, ended.outcome)  # over for good
        elif event.kind is EventKind.FAULT:
            boot.faults += 1
            self.recorder.device_fault(addr, "boot_fault", event.detail or "")

    def _on_ack(self, addr: TopicAddress, ack: Ack) -> None:
        tracked = self.commands.on_ack(addr.key, ack)
        if tracked is None:
            entry = self.sessions.unreconciled_start(addr.key, ack.cmd_id)
            if entry is not None:
                # the answer to a start sent before the restart
                if ack.status is AckStatus.REJECTED:
                    self.sessions.close_unreconciled(entry, SessionOutcome.REJECTED)
                return
            self._reject(addr, "unknown_ack", f"ack for unknown command {ack.cmd_id}")
            return
        boot = self.fleet.boots.get(addr.key)
        self.recorder.command(tracked)
        cmd = tracked.command
        if boot is None or cmd.kind is not CommandKind.START or cmd.session_id is None:
            return
        session = boot.session
        ours = session is not None and session.session_id == cmd.session_id
        if ack.status is AckStatus.ACCEPTED:
            self.sessions.in_session(boot, cmd.session_id)  # late or not: the boot runs it
        elif not ours:
            return
        elif ack.status is AckStatus.REJECTED:
            log.warning("boot rejected session start", extra={
                "device": boot.key, "reason": ack.reason, "cmd_id": ack.cmd_id})
            self.sessions.end_session(boot, SessionOutcome.REJECTED, by_boot=True)
        elif ack.status is AckStatus.DONE:
            self.sessions.end_session(boot, SessionOutcome.COMPLETED, by_boot=True)
