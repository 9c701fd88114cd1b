"""Every use of aiomqtt's and paho's internals, in one place.

aiomqtt exposes neither paho's client nor a hook into its read loop; the gateway needs both
for speed (no cyclic garbage per message, reading a backlog in bursts, handling a message
inside the read) and the simulator for a synchronous QoS 0 publish. An upgrade of either
library that changes what is used here breaks `tests/test_mqtt_internals.py`, which pins the
attributes and the versions this was checked against (TESTED_WITH), not the code that calls
these functions. Depends on the two libraries only, so the device side may use it.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable, Iterator

import aiomqtt
import paho.mqtt.client as paho_mqtt

# The installed versions these internals were read from (tests/test_mqtt_internals.py).
TESTED_WITH = {"aiomqtt": "2.5.1", "paho-mqtt": "2.2.0"}

# Packets read per turn of the event loop at most (see reading_in_bursts).
READ_BURST_PACKETS = 200


def paho_of(client: aiomqtt.Client) -> paho_mqtt.Client:
    """The paho client inside an aiomqtt client (its private `_client`)."""
    return client._client


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
    paho = paho_of(client)  # aiomqtt exposes no hook for this
    if hasattr(paho, "_on_message_filtered"):
        paho._on_message_filtered = _NoTopicCallbacks()  # type: ignore[assignment]
    return client


def dispatching_queue(dispatch: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue]:
    """aiomqtt's incoming queue, replaced by a call to `dispatch` as each message is read.

    Iterating `client.messages` costs a Task and an `asyncio.wait` per message, and a backlog
    queued there grows every garbage collection's work: at 1,000 msg/s that was the gateway's
    largest cost. Handling the message inside the read also means a QoS 1 PUBACK leaves only
    once the message has been handled.
    """

    class DispatchingQueue(asyncio.Queue):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            dispatch(item)

    return DispatchingQueue


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
    paho = paho_of(client)  # aiomqtt exposes no hook for this; paho's loop_read is public
    one_packet = paho.loop_read

    def loop_read(max_packets: int = 1) -> paho_mqtt.MQTTErrorCode:
        rc = one_packet(max_packets)
        for _ in range(burst - 1):
            sock = paho.socket()
            if rc != 0 or sock is None or not unread_input(sock):
                break
            rc = one_packet(max_packets)
        return rc

    paho.loop_read = loop_read  # type: ignore[method-assign]
    return client


def publish_qos0_now(client: aiomqtt.Client, topic: str, payload: bytes) -> bool:
    """Write a QoS 0 sample to the socket now; False when the fast path does not apply.

    aiomqtt's publish costs an Event, a timeout, a thread-safe wake-up and a writer
    registration per message: most of a simulator process's CPU at thousands of boots.
    Here paho queues the packet and writes it at once. Its deferred writer registration is
    suppressed (a stale registration outlives the socket and breaks the next connection),
    and made properly only if the socket could not take everything.
    """
    paho = paho_of(client)  # aiomqtt exposes no synchronous publish
    if paho._registered_write or paho._out_packet:
        return False  # a write is pending: queue behind it the usual way
    paho._registered_write = True  # no writer registration for this packet
    try:
        info = paho.publish(topic, payload, 0, False)
        rc = info.rc if info.rc != 0 else paho.loop_write()
    finally:
        paho._registered_write = False
    if rc != 0:
        raise aiomqtt.MqttCodeError(rc, "Could not publish message")
    if paho._out_packet:  # the socket buffer was full: let the event loop finish the write
        paho._call_socket_register_write()
    return True
