"""This gateway's share of the fleet: the clinics it watches, and what follows from that.

One gateway alone (no etcd configured) watches every clinic, as it always has. With
`coordination.etcd_endpoints` set, gateway/coordination.py decides which clinics are this
gateway's, and this module makes the rest of the gateway follow:

- **An MQTT session per clinic.** Every gateway's own connection reads every boot's
  retained `state`, only to discover clinics. A watched clinic's topics (`state`,
  `telemetry`, `event`, `ack`) come over a connection of the clinic's own, client id
  `coordination.clinic_client_prefix` + clinic, with a persistent session: whoever watches
  the clinic takes that session over, with what the broker queued for it meanwhile (nothing
  is lost between two owners), and the broker disconnects a previous owner still holding it.
  Its subscription re-sends the retained states, which rebuild the clinic's boots and resume
  their sessions (the restart path, gateway/sessions.py).
- **Heartbeats.** The clinic heartbeat (`boots/v1/_gateway/heartbeat/{clinic}`, protocol
  §5.1) goes out for the clinics this gateway may act for, and for no other: a boot vents
  itself when nobody watches its clinic (§7.2).
- **The fence.** Everything published for a clinic (commands, vents, alarms, heartbeats)
  passes `may_publish`: only while the clinic is watched and the lease holds.
- **Letting go.** A clinic handed over or lost is unsubscribed and its boots are forgotten
  here without ending their sessions: the new owner resumes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.contract import (
    ALARM_TOPIC_PREFIX,
    HEARTBEAT_TOPIC,
    TOPIC_ROOT,
    Channel,
    clinic_heartbeat_topic,
    is_valid_clinic,
)
from gateway.coordination import Coordinator
from gateway.etcd_client import EtcdError
from gateway.fleet import Fleet
from gateway.journal import SessionJournal
from gateway.mqtt_link import MessageHandler, MqttLink, subscribe_options
from gateway.settings import GatewaySettings, MqttSettings

log = logging.getLogger(__name__)

WATCHED_CHANNELS = (Channel.TELEMETRY, Channel.EVENT, Channel.ACK)
_CLINIC_HEARTBEAT_PREFIX = f"{HEARTBEAT_TOPIC}/"
_ALARM_PREFIX = f"{ALARM_TOPIC_PREFIX}/"
_BOOT_PREFIX = f"{TOPIC_ROOT}/"


def clinic_of(topic: str) -> str | None:
    """The clinic an outgoing topic speaks for; None: the gateway's own (fleet heartbeat,
    the gateway's alarms)."""
    if topic.startswith(_CLINIC_HEARTBEAT_PREFIX):
        return topic[len(_CLINIC_HEARTBEAT_PREFIX):]
    if topic.startswith(_ALARM_PREFIX):
        clinic = topic[len(_ALARM_PREFIX):].split("/", 1)[0]
        return None if clinic == "_gateway" else clinic
    if topic.startswith(_BOOT_PREFIX):
        parts = topic.split("/")
        return parts[2] if len(parts) == 5 else None
    return None


def clinic_topics(clinic: str) -> list[str]:
    """What a clinic's own session subscribes to: the retained states first (the rebuild)."""
    return [f"{TOPIC_ROOT}/{clinic}/+/{ch.value}" for ch in (Channel.STATE, *WATCHED_CHANNELS)]


STATE_TOPIC = f"{TOPIC_ROOT}/+/+/{Channel.STATE.value}"


class Cluster:
    """Which clinics this gateway acts for; the single gateway acts for all."""

    def __init__(self, settings: GatewaySettings, fleet: Fleet, journal: SessionJournal, *,
                 coordinator_factory: Callable[..., Coordinator] = Coordinator) -> None:
        self.settings = settings
        self.fleet = fleet
        self.journal = journal
        self.link: MqttLink | None = None  # set by the service once the link exists
        self.on_message: MessageHandler | None = None  # the gateway's, for clinic sessions
        self.coordinator: Coordinator | None = None
        self.watching: set[str] = set()
        self.links: dict[str, tuple[MqttLink, asyncio.Task[None]]] = {}  # clinic sessions
        self._known: set[str] = set()  # clinics registered in etcd by this gateway
        self._tasks: set[asyncio.Task[None]] = set()
        # Set when a clinic is taken over: its first heartbeat goes out now, not at the next
        # interval, which could come after the boots' timeout (protocol §7.2).
        self.heartbeat_due = asyncio.Event()
        if settings.coordination.enabled:
            self.coordinator = coordinator_factory(
                settings.coordination, settings.gateway_id,
                on_watch=self._on_watch, on_unwatch=self._on_unwatch)

    @property
    def partitioned(self) -> bool:
        return self.coordinator is not None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Join the other gateways; until etcd answers, watch no clinic (and say so)."""
        if self.coordinator is None:
            return
        delay = 0.2
        while True:
            try:
                await self.coordinator.start()
                return
            except EtcdError as exc:
                log.error("etcd not reachable; this gateway watches no clinic until it is",
                          extra={"reason": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def stop(self) -> None:
        """SIGTERM: hand every clinic over at once."""
        if self.coordinator is not None:
            await self.coordinator.stop()
        for link, task in list(self.links.values()):
            await link.stop(task)
        self.links.clear()
        if self._tasks:  # the clinics let go just now, their sessions disconnecting
            await asyncio.wait(list(self._tasks), timeout=5)

    def discover(self, topic: str, payload: bytes) -> None:
        """The gateway's own connection, with several gateways: a boot's state names its
        clinic; the clinic's messages themselves come over its own session."""
        parts = topic.split("/")
        if len(parts) == 5 and is_valid_clinic(parts[2]) and parts[2] not in self.watching:
            self.seen(parts[2])

    def receive_backlog(self) -> bool:
        """Whether any clinic session has input waiting unread (rule 5's grace)."""
        return any(link.receive_backlog() for link, _task in self.links.values())

    # ------------------------------------------------------------------ the gate

    def owns(self, clinic: str) -> bool:
        """Whether this gateway handles the clinic's messages (ingest's filter)."""
        return self.coordinator is None or clinic in self.watching

    def may_publish(self, topic: str) -> bool:
        """The fence, for every outgoing message (gateway/mqtt_link.py)."""
        if self.coordinator is None:
            return True
        clinic = clinic_of(topic)
        return clinic is None or self.coordinator.may_command(clinic)

    def seen(self, clinic: str) -> None:
        """A state message of a clinic not watched here: make sure every gateway knows it."""
        if self.coordinator is None or clinic in self._known:
            return
        self._known.add(clinic)
        self._spawn(self.coordinator.discovered(clinic))

    def heartbeat_clinics(self) -> list[str]:
        """The clinics whose heartbeat this gateway sends now."""
        if self.coordinator is None:
            return sorted({b.clinic for b in self.fleet.boots.values()})
        return sorted(c for c in self.watching if self.coordinator.may_command(c))

    def heartbeat_topics(self) -> list[str]:
        topics = [clinic_heartbeat_topic(c) for c in self.heartbeat_clinics()]
        if self.settings.heartbeat_fleet_topic:
            topics.append(HEARTBEAT_TOPIC)
        return topics

    # ------------------------------------------------------------------ coordinator callbacks

    def _on_watch(self, clinic: str) -> None:
        self.watching.add(clinic)
        self._known.add(clinic)
        self.heartbeat_due.set()
        if self.on_message is not None and clinic not in self.links:
            link = MqttLink(self._clinic_mqtt(clinic),
                            [(t, subscribe_options(1)) for t in clinic_topics(clinic)],
                            self.on_message, fence=self.may_publish)
            task = asyncio.get_running_loop().create_task(link.run(), name=f"mqtt-{clinic}")
            self.links[clinic] = (link, task)

    def _clinic_mqtt(self, clinic: str) -> MqttSettings:
        """The clinic session's connection: the gateway's own settings but for the client id,
        which is the clinic's (the same on every gateway) and a persistent session."""
        s = self.settings.mqtt
        return s.model_copy(update={
            "client_id": f"{self.settings.coordination.clinic_client_prefix}{clinic}",
            "session_expiry_s": max(s.session_expiry_s, 60)})

    def _on_unwatch(self, clinic: str, reason: str) -> None:
        # The fence closed already (the coordinator's); the clinic's session is disconnected
        # first and its boots forgotten after: what it delivered until then was acknowledged
        # to the broker and must still be stored, not dropped as another gateway's.
        held = self.links.pop(clinic, None)
        if held is None:
            self._forget(clinic, reason)
        else:
            self._spawn(self._let_go(clinic, reason, *held))

    async def _let_go(self, clinic: str, reason: str, link: MqttLink,
                      task: asyncio.Task[None]) -> None:
        # Disconnect: the broker keeps the session, and queues for the next owner.
        await link.stop(task)
        if clinic not in self.links:  # not taken back meanwhile
            self._forget(clinic, reason)

    def _forget(self, clinic: str, reason: str) -> None:
        self.watching.discard(clinic)
        forgotten = [b for b in self.fleet.boots.values() if b.clinic == clinic]
        for boot in forgotten:
            del self.fleet.boots[boot.key]
            if boot.session is not None:
                # Not ended: handed over. The new owner resumes it from the boot's retained
                # state; this gateway's next start must not reconcile it as its own.
                self.journal.closed(boot.key, boot.session.session_id)
        log.info("clinic let go", extra={"clinic": clinic, "reason": reason,
                                         "boots": len(forgotten)})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
