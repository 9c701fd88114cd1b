"""The gateway's one MQTT connection: reconnect with backoff, subscribe, dispatch, publish.

Incoming messages are handed to a synchronous callback in arrival order; it must not block.
Publishing never waits on the receive loop, so a vent goes out while messages keep flowing.

Every publish passes the `fence` first: with several gateways (gateway/cluster.py) a
gateway may not speak for a clinic it does not watch at this moment (it lost the clinic to
another gateway, or its lease). The same class is each watched clinic's own session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Callable
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.mqtt_internals import (
    dispatching_queue,
    end_read_burst,
    fast_publish_reading,
    paho_of,
    received_unread,
    without_topic_callbacks,
)
from gateway.mqtt_tls import client_security
from gateway.settings import MqttSettings

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
Fence = Callable[[str], bool]  # topic -> may this gateway publish it now
# Nagle's algorithm would hold a small vent packet back until the previous one is acked.
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


OUTGOING_CALLS = 16


class NotConnected(RuntimeError):
    """No broker to take the message: not connected, or no PUBACK in time."""


class Fenced(NotConnected):
    """The fence refused the message: the clinic is not this gateway's to speak for now."""


def _connect_properties(session_expiry_s: int) -> Properties:
    """Session expiry: what the broker queued for us while we were away survives a restart."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    return props


class MqttLink:
    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: list[tuple[str, SubscribeOptions]],
        on_message: MessageHandler,
        on_connect: Callable[[], None] | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.settings = settings
        self._subscriptions = subscriptions
        self.fence = fence
        self.stopping = False  # stop(): no reconnect, whatever a cancel did not reach
        self._on_message = on_message
        self._on_connect = on_connect
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.handler_errors = 0
        self._tasks: set[asyncio.Task[bool]] = set()
        # TLS context and password, built here so that an unusable file stops the gateway
        # at construction (settings validation has already loaded them once).
        self._security: dict[str, Any] = client_security(settings)

    async def _fresh_security(self) -> dict[str, Any]:
        """TLS context and password from the files as they are now, so renewed certificates
        and a rotated password are used at the next connect. A file that became unusable
        keeps the last good ones: a bad rotation must not cut the vents off the broker.
        Built in a thread: loading the system trust store takes ~40 ms, a stall of the loop."""
        try:
            self._security = await asyncio.to_thread(client_security, self.settings)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("mqtt TLS or password file unusable; reconnecting with the previous "
                      "ones", extra={"error": str(exc)})
        return self._security

    async def run(self) -> None:
        """Connect, serve, and reconnect with exponential backoff and jitter until cancelled."""
        s = self.settings
        backoff = s.reconnect_min_s
        attempt = 0
        while not self.stopping:
            security = await self._fresh_security() if attempt else self._security
            # Plain PUBLISH packets go from the socket's buffer straight to _dispatch (see
            # gateway/mqtt_internals.py); the rest through aiomqtt's queue to the same place.
            client = fast_publish_reading(without_topic_callbacks(aiomqtt.Client(
                s.host, s.port,
                **security,  # username, password, tls_context (gateway/mqtt_tls.py)
                identifier=s.client_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                keepalive=s.keepalive_s,
                timeout=10,
                socket_options=NO_DELAY,
                queue_type=dispatching_queue(self._dispatch_message),
                # paho keeps 20 QoS 1 messages in flight; ordinary publishes may fill 16, so a
                # vent (publish_urgent, straight to paho) never queues behind start commands.
                max_concurrent_outgoing_calls=OUTGOING_CALLS,
                clean_start=s.session_expiry_s == 0,
                properties=_connect_properties(s.session_expiry_s),
            )), self._dispatch)
            try:
                async with client:
                    # Publishable from the CONNACK on: retained states and queued telemetry are
                    # dispatched while the later subscriptions are still pending, and a vent
                    # they call for must go out now, not at rule 8's re-send after the ack
                    # timeout (tests/test_restart.py caught a lost vent in CI).
                    if self.stopping:
                        return  # stopped while connecting (a cancel the connect swallowed)
                    self._client = client
                    for topic, options in self._subscriptions:
                        granted = await client.subscribe(topic, options=options)
                        if any(subscription_refused(rc) for rc in granted):
                            # A gateway that cannot read its boots must not go on sending
                            # heartbeats as if it could (the boots would not vent by
                            # themselves): a refusal is a failed connect, retried.
                            log.error("mqtt subscription refused by the broker's ACL", extra={
                                "topic": topic, "reason": [str(rc) for rc in granted]})
                            raise aiomqtt.MqttError(f"subscription to {topic!r} refused")
                    self.connected.set()
                    log.info("mqtt connected", extra={
                        "broker": f"{s.host}:{s.port}", "attempt": attempt,
                        "tls": s.tls, "session_expiry_s": s.session_expiry_s})
                    backoff = s.reconnect_min_s
                    if attempt:
                        self.reconnects += 1
                    if self._on_connect:
                        self._on_connect()
                    # Messages are handled as they are read (see dispatching_queue); this only
                    # waits for the connection to end, which raises MqttError.
                    async for message in client.messages:
                        self._dispatch_message(message)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt connection lost", extra={
                    "broker": f"{s.host}:{s.port}", "error": str(exc),
                    "retry_in_s": round(backoff, 2)})
            finally:
                self._client = None
                self.connected.clear()
            attempt += 1
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(s.reconnect_max_s, backoff * 2)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """End run() for good: a clinic session let go must not reconnect and take the
        session back from its new owner. Cancelling alone is not enough: aiomqtt's connect
        can swallow a cancel, and the loop would connect again."""
        self.stopping = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
            async with asyncio.timeout(5):
                await task

    def _check_fence(self, topic: str) -> None:
        if self.fence is not None and not self.fence(topic):
            raise Fenced(f"{topic}: not this gateway's clinic now")

    def _dispatch_message(self, message: aiomqtt.Message) -> None:
        self._dispatch(message.topic.value, message.payload)

    def _dispatch(self, topic: str, payload: object) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        try:
            self._on_message(topic, bytes(payload))
        except Exception:
            # A bug in handling one message must not take the gateway down for every boot.
            self.handler_errors += 1
            log.exception("message handler failed", extra={"topic": topic[:200]})

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool = False,
        expiry_s: float | None = None,
    ) -> None:
        self._check_fence(topic)
        client = self._client
        if client is None:
            raise NotConnected("not connected to the broker")
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = max(1, int(expiry_s))
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, properties=props,
                                 timeout=expiry_s)
        except aiomqtt.MqttError as exc:
            # Mostly no PUBACK in time: a command that would arrive expired is not worth more.
            raise NotConnected(f"the broker did not take the message: {exc}") from None

    def publish_urgent(self, topic: str, payload: bytes, qos: int) -> bool:
        """Queue the packet in paho now and write it at the very next loop turn.

        For vents: publish_nowait's task, paho's write registration and a select each cost a
        loop turn, and each turn may first handle a batch of incoming messages. Here the
        bytes leave ahead of all that. The PUBACK is not awaited (the boot's ack is).
        """
        self._check_fence(topic)
        client = self._client
        if client is None:
            raise NotConnected("not connected to the broker")
        paho = paho_of(client)
        info = paho.publish(topic, payload, qos, False)
        if info.rc != 0:
            log.error("publish failed", extra={"topic": topic, "rc": info.rc})
            return False
        # Not from here: this may run inside paho's on_message, which holds a lock that a
        # write can need.
        asyncio.get_running_loop().call_soon(self._write_now, paho)
        end_read_burst(client)  # the write's turn comes before the rest of the read burst
        return True

    @staticmethod
    def _write_now(paho: object) -> None:
        with contextlib.suppress(Exception):  # a broken socket is the reader's to report
            paho.loop_write()  # type: ignore[attr-defined]

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int, retain: bool = False,
        expiry_s: float | None = None,
    ) -> asyncio.Task[bool]:
        """Hand the packet to the client now; completion (PUBACK) is awaited in the background."""
        task = asyncio.get_running_loop().create_task(
            self._publish_logged(topic, payload, qos, retain, expiry_s)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _publish_logged(
        self, topic: str, payload: bytes, qos: int, retain: bool, expiry_s: float | None
    ) -> bool:
        try:
            await self.publish(topic, payload, qos, retain, expiry_s)
        except (aiomqtt.MqttError, NotConnected) as exc:
            log.error("publish failed", extra={"topic": topic, "error": str(exc)})
            return False
        return True

    def receive_backlog(self) -> bool:
        """True when received bytes are waiting that the gateway has not read yet.

        Rule 5 asks this at each tick: after a stall of the gateway's own loop (or under a
        flood) a boot's newest samples may be in here, not missing. Asked of the kernel
        (poll with timeout 0, never blocking), of the TLS layer, which may hold a decrypted
        record the kernel no longer shows, and of the link's own read buffer. Not connected:
        False, nothing can be waiting.
        """
        client = self._client
        return client is not None and received_unread(client)


def subscription_refused(rc: object) -> bool:
    """A SUBACK reason code that refuses: MQTT 5 ReasonCode, or an MQTT 3 int of 0x80."""
    is_failure = getattr(rc, "is_failure", None)
    if is_failure is not None:
        return bool(is_failure)
    value = getattr(rc, "value", rc)
    return isinstance(value, int) and value >= 0x80


def subscribe_options(qos: int = 1) -> SubscribeOptions:
    """No Local: the gateway never receives its own commands back."""
    return SubscribeOptions(qos=qos, noLocal=True)
