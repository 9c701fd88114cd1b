"""Every use of aiomqtt's and paho's internals, in one place.

aiomqtt exposes neither paho's client nor a hook into its read loop; the gateway needs both
for speed (no cyclic garbage per message, reading a backlog in bursts, handling a message
inside the read, reading the socket in large chunks and parsing the common PUBLISH packet
itself: 54 -> 3 us per message on this machine) and the simulator for a synchronous QoS 0
publish. `tests/test_mqtt_fast_read.py` checks the fast read path against paho's own.

An upgrade of either library that changes what is used here breaks
`tests/test_mqtt_internals.py`, which pins the attributes and the versions this was checked
against (TESTED_WITH), not the code that calls these functions. Depends on the two libraries
only, so the device side may use it.
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
# Bytes asked of the socket at once by fast_publish_reading (~380 telemetry packets).
READ_CHUNK_BYTES = 65536


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


class _BufferedReceive:
    """paho's `_sock_recv`, served from one large read: paho asks for every packet in three
    or four small reads (command byte, length bytes, the rest), each a system call; here one
    `recv` of up to READ_CHUNK_BYTES serves hundreds of telemetry packets."""

    def __init__(self, paho: paho_mqtt.Client) -> None:
        self._paho = paho
        self._recv = paho._sock_recv  # the original: TLS want-read as BlockingIOError etc.
        self._buf = bytearray()
        self._sock: object = None
        self.end_burst = False  # set by end_read_burst: stop reading after this packet

    @property
    def pending(self) -> bool:
        """Bytes read from the socket that paho has not taken yet."""
        return bool(self._buf) and self._sock is self._paho._sock

    def take_plain_publish(self) -> tuple[str, bytes, int, int] | None:
        """The next packet, if it is whole in the buffer and a plain PUBLISH (QoS 0 or 1, a
        UTF-8 topic, no properties): (topic, payload, qos, packet id), consumed. Otherwise
        None and nothing consumed: paho reads it its own way."""
        buf = self._buf
        n = len(buf)
        if (n < 2 or buf[0] & 0xF6 not in (0x30, 0x32) or self._sock is not self._paho._sock
                or self._paho._protocol != paho_mqtt.MQTTv5):
            return None  # not an MQTT 5 PUBLISH of QoS 0/1 (the dup and retain bits are free)
        length = mult = 0
        pos = 1
        while True:  # the remaining length (MQTT 5 §1.5.5), at most four bytes
            if pos >= n or pos > 4:
                return None
            byte = buf[pos]
            length += (byte & 0x7F) << mult
            mult += 7
            pos += 1
            if not byte & 0x80:
                break
        end = pos + length
        if end > n:
            return None
        plain = _plain_publish(buf[0], buf, pos, end)
        if plain is not None:
            del buf[:end]
        return plain

    def __call__(self, bufsize: int) -> bytes:
        buf = self._buf
        if self._sock is not self._paho._sock:  # a new connection: nothing of the old one
            buf.clear()
            self._sock = self._paho._sock
        if not buf:
            data = self._recv(READ_CHUNK_BYTES)  # b"" (closed) or raises as paho expects
            if len(data) <= bufsize:
                return data
            buf += data
        chunk = bytes(buf[:bufsize])
        del buf[:bufsize]
        return chunk


def _plain_publish(header: int, data: bytes | bytearray, start: int, end: int
                   ) -> tuple[str, bytes, int, int] | None:
    """A plain PUBLISH's variable header and payload, `data[start:end]` (MQTT 5 §3.3): QoS 0
    or 1, a non-empty UTF-8 topic without wildcards, no properties. (topic, payload, qos,
    packet id), or None for anything else, which paho then reads its own way."""
    qos = (header & 0x06) >> 1
    if qos > 1 or end - start < 3:
        return None
    topic_end = start + 2 + ((data[start] << 8) | data[start + 1])
    props = topic_end + 2 if qos else topic_end
    if props >= end or data[props] != 0 or topic_end == start + 2:
        return None
    try:
        topic = data[start + 2:topic_end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "+" in topic or "#" in topic:
        return None  # a wildcard in a PUBLISH breaks MQTT 5 §4.7.1; paho's way drops it
    mid = (data[topic_end] << 8) | data[topic_end + 1] if qos else 0
    return topic, bytes(data[props + 1:end]), qos, mid


class _PubackBatch:
    """The PUBACKs of one read burst, written as one packet at its end (or before anything
    else paho sends), instead of one queued packet and one `send` each: at QoS 1 that was a
    third of the gateway's time per message, and each tiny segment cost the broker a read.
    The order is paho's: MQTT 5 §4.6 asks that PUBACKs go in the order of the PUBLISHes."""

    def __init__(self, paho: paho_mqtt.Client) -> None:
        self._paho = paho
        self._acks = bytearray()

    def add(self, mid: int) -> None:
        self._acks += b"\x40\x02" + mid.to_bytes(2, "big")  # PUBACK, success, no properties

    def flush(self) -> paho_mqtt.MQTTErrorCode:
        """Queue what is pending as one out packet (paho writes it as it writes a PUBACK)."""
        if not self._acks:
            return paho_mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        data = bytes(self._acks)
        self._acks.clear()
        return self._paho._packet_queue(paho_mqtt.PUBACK, data, 0, 1)


def _publish_fast_path(paho: paho_mqtt.Client, on_publish: Callable[[str, bytes], None],
                       acks: _PubackBatch) -> None:
    """paho's PUBLISH handler, for the common packet only: MQTT 5, QoS 0 or 1, a UTF-8 topic
    and no properties. paho builds a Properties object, an MQTTMessage, a log line and
    aiomqtt a Message for each one (a third of the gateway's time per message); here the
    topic and payload go straight to `on_publish`, then the PUBACK, as paho would send it.
    Anything else (properties, QoS 2, a malformed packet) takes paho's own way."""
    full = paho._handle_publish

    def handle_publish() -> paho_mqtt.MQTTErrorCode:
        packet = paho._in_packet
        header, data = packet["command"], packet["packet"]
        plain = (_plain_publish(header, data, 0, len(data))
                 if paho._protocol == paho_mqtt.MQTTv5 else None)
        if plain is None:
            acks.flush()  # what paho sends for this packet goes after the PUBACKs before it
            return full()  # properties (or a topic alias), QoS 2, malformed: paho decides
        topic, payload, qos, mid = plain
        on_publish(topic, payload)
        if qos == 1 and not paho._manual_ack:
            acks.add(mid)
        return paho_mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    paho._handle_publish = handle_publish  # type: ignore[method-assign]


def fast_publish_reading(client: aiomqtt.Client, on_publish: Callable[[str, bytes], None],
                         burst: int = READ_BURST_PACKETS) -> aiomqtt.Client:
    """Read the socket in large chunks, hand plain PUBLISH packets to `on_publish` as they are
    parsed, and read up to `burst` packets per readable event (as `reading_in_bursts`).

    The first packet of a readable event is read by paho (through the buffer, its PUBLISH
    handler replaced); the packets after it that lie whole in the buffer are parsed here
    without paho's per-packet reading. A message handed over here never reaches aiomqtt's
    queue; one paho's own handler takes (with properties, QoS 2) still does. A burst that
    ends with bytes left in the buffer asks the event loop for another turn, since the
    socket will not signal them again.
    """
    paho = paho_of(client)  # aiomqtt exposes no hook for any of this
    recv = _BufferedReceive(paho)
    paho._sock_recv = recv  # type: ignore[method-assign]
    acks = _PubackBatch(paho)
    _publish_fast_path(paho, on_publish, acks)
    one_packet = paho.loop_read
    scheduled = False

    def loop_read(max_packets: int = 1) -> paho_mqtt.MQTTErrorCode:
        try:
            return read_burst(max_packets)
        finally:
            acks.flush()  # the burst's PUBACKs, in one write on the loop's next turn

    def read_burst(max_packets: int) -> paho_mqtt.MQTTErrorCode:
        rc = one_packet(max_packets)
        direct = 0
        for _ in range(burst - 1):
            if rc != 0:
                break
            if recv.end_burst:  # a vent waits to be written: the loop's turn comes first
                recv.end_burst = False
                break
            if paho._in_packet["command"] == 0 and recv.pending:
                plain = recv.take_plain_publish()
                if plain is not None:  # whole in the buffer: no need for paho's reading
                    topic, payload, qos, mid = plain
                    on_publish(topic, payload)
                    direct += 1
                    if qos == 1 and not paho._manual_ack:
                        acks.add(mid)
                    continue
            sock = paho.socket()
            if sock is None or not (recv.pending or unread_input(sock)):
                break
            rc = acks.flush()  # paho's next packet may send something: after these
            if rc > 0:
                rc = paho._loop_rc_handle(rc)
                break
            rc = one_packet(max_packets)
        if direct:
            with paho._msgtime_mutex:  # what paho's read does after each packet (keepalive)
                paho._last_bytes_received = paho_mqtt.time_func()
        if rc == 0 and recv.pending:
            again()
        return rc

    def again() -> None:
        nonlocal scheduled
        if not scheduled:
            scheduled = True
            asyncio.get_running_loop().call_soon(resume)

    def resume() -> None:
        nonlocal scheduled
        scheduled = False
        try:
            loop_read()
        except Exception as exc:  # as aiomqtt's own reader callback does with it
            if not client._disconnected.done():
                client._disconnected.set_exception(exc)

    paho.loop_read = loop_read  # type: ignore[method-assign]
    return client


def end_read_burst(client: aiomqtt.Client) -> None:
    """End the current read burst after the packet being handled, so that a write queued
    with `call_soon` (a vent) runs before the next ~200 packets are handled, not after."""
    recv = paho_of(client)._sock_recv
    if isinstance(recv, _BufferedReceive):
        recv.end_burst = True


def received_unread(client: aiomqtt.Client) -> bool:
    """True when bytes have arrived that nobody has handled yet: in the read buffer of
    fast_publish_reading, in the TLS layer or in the kernel (see unread_input)."""
    paho = paho_of(client)
    recv = paho._sock_recv
    if isinstance(recv, _BufferedReceive) and recv.pending:
        return True
    sock = paho.socket()
    return sock is not None and unread_input(sock)


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
