"""The link's fast read path (gateway/mqtt_internals.py `fast_publish_reading`) hands the
gateway exactly what paho's own path would, and answers the broker exactly as paho would.

Both paths read the same bytes, written by hand from the MQTT 5 specification (§3.3 PUBLISH:
topic, packet id for QoS 1, properties, payload), into a client on one end of a socket pair;
the test compares what each delivers and what each writes back (the PUBACKs). The packets mix
what a broker forwards every second (no properties, QoS 0 and 1) with what must leave the fast
path (properties such as a message expiry or user property, QoS 2, a topic that is not UTF-8,
a truncated packet) and arbitrary sizes that straddle the read buffer.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiomqtt
import paho.mqtt.client as paho_mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mqtt_internals import (
    READ_BURST_PACKETS,
    READ_CHUNK_BYTES,
    dispatching_queue,
    end_read_burst,
    fast_publish_reading,
    paho_of,
    reading_in_bursts,
    received_unread,
    without_topic_callbacks,
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (128 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, qos: int = 0, mid: int = 1,
            props: bytes = b"", retain: bool = False) -> bytes:
    """A PUBLISH packet as the specification lays it out (MQTT 5 §3.3)."""
    var = (len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
           + _varint(len(props)) + props + payload)
    return bytes([0x30 | (qos << 1) | int(retain)]) + _varint(len(var)) + var


# Properties (MQTT 5 §2.2.2.2): message expiry (0x02, four bytes), user property (0x26).
EXPIRY = b"\x02\x00\x00\x00\x3c"
USER_PROPERTY = b"\x26\x00\x01k\x00\x01v"


class _Endpoint:
    """One client of either kind on a socket pair: what it delivers, what it writes back."""

    def __init__(self, fast: bool, after_each: Callable[[], None] | None = None) -> None:
        self.after_each = after_each
        self.delivered: list[tuple[str, bytes]] = []
        self.errors: list[str] = []
        self.client = aiomqtt.Client("127.0.0.1", 1, identifier="fast-read",
                                     protocol=aiomqtt.ProtocolVersion.V5,
                                     queue_type=dispatching_queue(self._from_queue))
        without_topic_callbacks(self.client)
        if fast:
            fast_publish_reading(self.client, self._direct)
        else:
            reading_in_bursts(self.client)
        self.paho = paho_of(self.client)
        self.ours, self.broker = socket.socketpair()
        for end in (self.ours, self.broker):  # room for a backlog of several reads
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.ours.setblocking(False)
        self.broker.settimeout(2)
        self.paho._sock = self.ours

    def _from_queue(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        assert isinstance(payload, bytes)
        self.delivered.append((message.topic.value, payload))

    def _direct(self, topic: str, payload: bytes) -> None:
        self.delivered.append((topic, payload))
        if self.after_each is not None:
            self.after_each()

    async def feed(self, data: bytes) -> bytes:
        """Write `data` as a broker would, let the client read it all; what it wrote back."""
        self.broker.sendall(data)
        for _ in range(10_000):
            try:
                rc = self.paho.loop_read()
            except Exception as exc:  # aiomqtt's reader callback turns this into a disconnect
                self.errors.append(type(exc).__name__)
                break
            if rc != 0:
                self.errors.append(f"rc={int(rc)}")
                break
            await asyncio.sleep(0)  # a buffered remainder is read on the next loop turn
            if not received_unread(self.client):
                break
        self.paho.loop_write()
        self.broker.setblocking(False)
        try:
            return self.broker.recv(1 << 20)
        except BlockingIOError:
            return b""
        finally:
            self.broker.settimeout(2)

    async def close(self) -> None:
        await asyncio.sleep(0)  # aiomqtt's writer registrations for the PUBACKs run first
        self.paho._sock = None
        self.ours.close()
        self.broker.close()


topics = st.one_of(
    st.sampled_from([b"boots/v1/c1/b1/telemetry", b"boots/v1/c-2/dev_9/state", b"a",
                     "boots/v1/cl\u00e9/b/event".encode(), b"\xff\xfe/bad", b"t/\x00/nul",
                     b"boots/v1/+/b1/telemetry", b"a/#", "+\u0080".encode()]),
    st.binary(min_size=1, max_size=40),
)
packets = st.builds(
    publish, topics, st.binary(max_size=3000), st.sampled_from([0, 1, 1, 2]),
    st.integers(1, 65535), st.sampled_from([b"", b"", b"", EXPIRY, USER_PROPERTY]),
    st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets, min_size=1, max_size=30))
async def test_the_fast_path_delivers_and_acknowledges_what_paho_does(
        stream: list[bytes]) -> None:
    data = b"".join(stream)
    fast, full = _Endpoint(True), _Endpoint(False)
    try:
        answer_fast = await fast.feed(data)
        answer_full = await full.feed(data)
        assert fast.delivered == full.delivered
        assert answer_fast == answer_full  # the same PUBACKs (and PUBRECs), in order
        assert fast.errors == full.errors
    finally:
        await fast.close()
        await full.close()


async def test_a_backlog_larger_than_one_read_is_delivered_whole_and_in_order() -> None:
    """More bytes than one recv takes: the rest is read from the buffer on the next turns,
    and while it waits there the link reports input waiting (rule 5 asks that)."""
    payload = b'{"seq":1,"ts":1.0,"phase":"idle","pressures":[1.0,2.0]}'
    n = 3 * READ_CHUNK_BYTES // len(publish(b"boots/v1/c1/b1/telemetry", payload)) + 7
    stream = b"".join(publish(b"boots/v1/c1/b1/telemetry", payload + b"%d" % i, qos=i % 2,
                              mid=i % 65535 + 1) for i in range(n))
    fast = _Endpoint(True)
    try:
        first = READ_CHUNK_BYTES * 2 // 3  # one recv takes it all: the kernel holds nothing
        fast.broker.sendall(stream[:first])
        # one readable event reads one burst (200 packets); the buffer still holds the rest,
        # which the socket will not signal again
        fast.paho.loop_read()
        assert len(fast.delivered) == READ_BURST_PACKETS
        assert received_unread(fast.client)
        await fast.feed(stream[first:])
        assert [p for _, p in fast.delivered] == [payload + b"%d" % i for i in range(n)]
        assert not received_unread(fast.client)
    finally:
        await fast.close()


async def test_a_message_with_properties_takes_pahos_way_and_is_delivered() -> None:
    fast = _Endpoint(True)
    try:
        answer = await fast.feed(publish(b"t/1", b"x", qos=1, mid=7, props=EXPIRY)
                                 + publish(b"t/2", b"y", qos=1, mid=8))
        assert fast.delivered == [("t/1", b"x"), ("t/2", b"y")]
        assert answer == b"\x40\x02\x00\x07\x40\x02\x00\x08"  # PUBACK 7, PUBACK 8 (§3.4)
    finally:
        await fast.close()


async def test_a_vent_ends_the_read_burst_so_its_write_comes_next() -> None:
    """The gateway's vent is written on the loop's next turn: a burst that went on handling
    the ~200 packets behind the spike first would delay it by their handling time."""
    spike_at = 5

    def after_each() -> None:
        if len(fast.delivered) == spike_at:
            end_read_burst(fast.client)  # what MqttLink.publish_urgent does after a vent

    fast = _Endpoint(True, after_each)
    try:
        fast.broker.sendall(b"".join(publish(b"t/x", b"%d" % i) for i in range(300)))
        fast.paho.loop_read()
        assert len(fast.delivered) == spike_at
        assert received_unread(fast.client)  # the rest waits for the next turn
        await fast.feed(b"")
        assert [p for _, p in fast.delivered] == [b"%d" % i for i in range(300)]
    finally:
        await fast.close()


async def test_a_bursts_pubacks_go_out_as_one_write_after_what_the_handler_sent() -> None:
    """QoS 1: one queued packet (one `send`) for a burst's PUBACKs, not one each; a message
    the handler publishes in the burst (a vent) is queued before them, so it is written
    first."""
    vent = b"\x30\x06\x00\x04vent"  # a QoS 0 PUBLISH of "vent", empty payload, as bytes

    def after_each() -> None:
        if len(fast.delivered) == 3:
            paho = fast.paho
            paho._packet_queue(paho_mqtt.PUBLISH, vent, 9, 1)  # (as QoS 1: no callback)

    fast = _Endpoint(True, after_each)
    try:
        fast.broker.sendall(b"".join(publish(b"t/x", b"%d" % i, qos=1, mid=i + 1)
                                     for i in range(50)))
        fast.paho.loop_read()
        assert len(fast.delivered) == 50
        queued = [p["packet"] for p in fast.paho._out_packet]
        acks = b"".join(b"\x40\x02" + (i + 1).to_bytes(2, "big") for i in range(50))
        assert queued == [vent, acks]
        fast.paho.loop_write()
        fast.broker.setblocking(False)
        assert fast.broker.recv(1 << 16) == vent + acks
    finally:
        await fast.close()
