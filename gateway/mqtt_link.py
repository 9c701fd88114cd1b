"""The gateway's one MQTT connection: reconnect with backoff, subscribe, dispatch, publish.

Incoming messages are handed to a synchronous callback in arrival order; it must not block.
Publishing never waits on the receive loop, so a vent goes out while messages keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.mqtt_tls import client_security
from gateway.settings import MqttSettings

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
# Nagle's algorithm would hold a small vent packet back until the previous one is acked.
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


OUTGOING_CALLS = 16


class NotConnected(RuntimeError):
    """No broker to take the message: not connected, or no PUBACK in time."""


class _NoTopicCallbacks:
    """Stands in for paho's per-topic callback matcher, which this project never uses.

    paho looks every received message up in it, and its lookup builds a self-referencing
    closure each time: about six objects of cyclic garbage per message, which only the
    cyclic collector frees. At 1,000 msg/s those collections paused the loop for ~30 ms.
    """

    def iter_match(self, topic: str) -> Iterator[object]:
        return iter(())


def without_topic_callbacks(client: aiomqtt.Client) -> aiomqtt.Client:
    """Make `client` leave no cyclic garbage per received message (see _NoTopicCallbacks)."""
    paho = client._client  # aiomqtt exposes no hook for this
    if hasattr(paho, "_on_message_filtered"):
        paho._on_message_filtered = _NoTopicCallbacks()
    return client


# Packets read per turn of the event loop at most (see reading_in_bursts).
READ_BURST_PACKETS = 200


def unread_input(sock: object) -> bool:
    """True when received bytes wait on `sock` that nobody has read yet: asked of the TLS
    layer (a decrypted record the kernel no longer shows) and of the kernel (poll, timeout 0,
    never blocking). A socket closed under us: False, the reader reports the loss."""
    pending = getattr(sock, "pending", None)  # ssl.SSLSocket
    if pending is not None and pending() > 0:
        return True
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)  # type: ignore[attr-defined]
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False


def reading_in_bursts(client: aiomqtt.Client, burst: int = READ_BURST_PACKETS
                      ) -> aiomqtt.Client:
    """Make each readable event of the socket read up to `burst` packets, not one.

    aiomqtt's reader callback calls paho's `loop_read`, which reads one packet. Each turn of
    the event loop also serves every busy HTTP connection, so under an API flood the gateway
    read 70-140 of the 400 telemetry messages/s arriving and fell seconds behind: every rule
    acted late (rule 1 took 4-8 s). Reading what is already waiting, up to `burst` packets
    (a few ms of handling), keeps ingest ahead of any other traffic on the loop.
    """
    paho = client._client  # aiomqtt exposes no hook for this; paho's loop_read is public
    one_packet = paho.loop_read

    def loop_read(max_packets: int = 1) -> object:
        rc = one_packet(max_packets)
        for _ in range(burst - 1):
            sock = paho.socket()
            if rc != 0 or sock is None or not unread_input(sock):
                break
            rc = one_packet(max_packets)
        return rc

    paho.loop_read = loop_read
    return client


def _connect_properties(session_expiry_s: int) -> Properties:
    """Session expiry: what the broker queued for us while we were away survives a restart."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    return props


def _dispatching_queue(dispatch: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue]:
    """aiomqtt's incoming queue, replaced by a call to `dispatch` as each message is read.

    Iterating `client.messages` costs a Task and an `asyncio.wait` per message, and a backlog
    queued there grows every garbage collection's work: at 1,000 msg/s that was the gateway's
    largest cost. Handling the message inside the read also means a QoS 1 PUBACK leaves only
    once the message has been handled.
    """

    class DispatchingQueue(asyncio.Queue):  # type: ignore[type-arg]
        def put_nowait(self, item: aiomqtt.Message) -> None:
            dispatch(item)

    return DispatchingQueue


class MqttLink:
    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: list[tuple[str, SubscribeOptions]],
        on_message: MessageHandler,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._subscriptions = subscriptions
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
        while True:
            security = await self._fresh_security() if attempt else self._security
            client = reading_in_bursts(without_topic_callbacks(aiomqtt.Client(
                s.host, s.port,
                **security,  # username, password, tls_context (gateway/mqtt_tls.py)
                identifier=s.client_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                keepalive=s.keepalive_s,
                timeout=10,
                socket_options=NO_DELAY,
                queue_type=_dispatching_queue(self._dispatch_message),
                # paho keeps 20 QoS 1 messages in flight; ordinary publishes may fill 16, so a
                # vent (publish_urgent, straight to paho) never queues behind start commands.
                max_concurrent_outgoing_calls=OUTGOING_CALLS,
                clean_start=s.session_expiry_s == 0,
                properties=_connect_properties(s.session_expiry_s),
            )))
            try:
                async with client:
                    for topic, options in self._subscriptions:
                        granted = await client.subscribe(topic, options=options)
                        if any(subscription_refused(rc) for rc in granted):
                            # A gateway that cannot read its boots must not go on sending
                            # heartbeats as if it could (the boots would not vent by
                            # themselves): a refusal is a failed connect, retried.
                            log.error("mqtt subscription refused by the broker's ACL", extra={
                                "topic": topic, "reason": [str(rc) for rc in granted]})
                            raise aiomqtt.MqttError(f"subscription to {topic!r} refused")
                    self._client = client
                    self.connected.set()
                    log.info("mqtt connected", extra={
                        "broker": f"{s.host}:{s.port}", "attempt": attempt,
                        "tls": s.tls, "session_expiry_s": s.session_expiry_s})
                    backoff = s.reconnect_min_s
                    if attempt:
                        self.reconnects += 1
                    if self._on_connect:
                        self._on_connect()
                    # Messages are handled as they are read (see _dispatching_queue); this only
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
        client = self._client
        if client is None:
            raise NotConnected("not connected to the broker")
        paho = client._client
        info = paho.publish(topic, payload, qos, False)
        if info.rc != 0:
            log.error("publish failed", extra={"topic": topic, "rc": info.rc})
            return False
        # Not from here: this may run inside paho's on_message, which holds a lock that a
        # write can need.
        asyncio.get_running_loop().call_soon(self._write_now, paho)
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
        (poll with timeout 0, never blocking) and of the TLS layer, which may hold a decrypted
        record the kernel no longer shows. Not connected: False, nothing can be waiting.
        """
        client = self._client
        sock = client._client.socket() if client is not None else None  # paho's socket
        return sock is not None and unread_input(sock)


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
