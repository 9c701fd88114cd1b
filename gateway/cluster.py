"""This gateway's share of the fleet: the clinics it watches, and what follows from that.

One gateway alone (no etcd configured) watches every clinic, as it always has. With
`coordination.etcd_endpoints` set, gateway/coordination.py decides which clinics are this
gateway's, and this module makes the rest of the gateway follow:

- **Subscriptions.** Every gateway reads every boot's retained `state` (how clinics are
  discovered; a state message of a clinic it does not watch only registers the clinic). A
  watched clinic's `telemetry`, `event` and `ack` are subscribed while it is watched; taking
  a clinic over subscribes `state` again, so the broker re-sends the retained states that
  rebuild the clinic's boots and resume their sessions (the restart path, gateway/sessions).
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
)
from gateway.coordination import Coordinator
from gateway.etcd_client import EtcdError
from gateway.fleet import Fleet
from gateway.journal import SessionJournal
from gateway.mqtt_link import MqttLink, subscribe_options
from gateway.settings import GatewaySettings

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
    return [f"{TOPIC_ROOT}/{clinic}/+/{ch.value}" for ch in WATCHED_CHANNELS]


STATE_TOPIC = f"{TOPIC_ROOT}/+/+/{Channel.STATE.value}"


class Cluster:
    """Which clinics this gateway acts for; the single gateway acts for all."""

    def __init__(self, settings: GatewaySettings, fleet: Fleet, journal: SessionJournal, *,
                 coordinator_factory: Callable[..., Coordinator] = Coordinator) -> None:
        self.settings = settings
        self.fleet = fleet
        self.journal = journal
        self.link: MqttLink | None = None  # set by the service once the link exists
        self.coordinator: Coordinator | None = None
        self.watching: set[str] = set()
        self._known: set[str] = set()  # clinics registered in etcd by this gateway
        self._tasks: set[asyncio.Task[None]] = set()
        self.clinics_taken = 0
        self.clinics_let_go = 0
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
        self.clinics_taken += 1
        self.heartbeat_due.set()
        if self.link is not None:
            # Telemetry first, then the states again: the retained states rebuild the boots.
            self._spawn(self._follow(clinic))

    async def _follow(self, clinic: str) -> None:
        assert self.link is not None
        await self.link.follow(clinic_topics(clinic), subscribe_options(1))
        await self.link.follow([STATE_TOPIC], subscribe_options(1), keep=False)

    def _on_unwatch(self, clinic: str, reason: str) -> None:
        self.watching.discard(clinic)
        self.clinics_let_go += 1
        forgotten = [b for b in self.fleet.boots.values() if b.clinic == clinic]
        for boot in forgotten:
            del self.fleet.boots[boot.key]
            if boot.session is not None:
                # Not ended: handed over. The new owner resumes it from the boot's retained
                # state; this gateway's next start must not reconcile it as its own.
                self.journal.closed(boot.key, boot.session.session_id)
        log.info("clinic let go", extra={"clinic": clinic, "reason": reason,
                                         "boots": len(forgotten)})
        if self.link is not None:
            self._spawn(self.link.unfollow(clinic_topics(clinic)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
