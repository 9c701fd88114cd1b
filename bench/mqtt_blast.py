"""A raw-socket MQTT v5 publisher that is never the bottleneck of an ingest bench.

A Python MQTT client (paho, aiomqtt) spends several microseconds per message building the
packet; a bench that publishes through one measures that client as much as the subscriber
behind the broker. Here every telemetry payload and every PUBLISH packet of a trial is built
before the timed stream starts, into one contiguous buffer, and the stream is a paced series
of `sendall` calls over slices of it: the per-message cost in the timed part is a share of a
memcpy into the kernel. At QoS 1 the packet ids are baked into the frames and the PUBACKs are
counted by a reader thread, with an in-flight window of at most the broker's Receive Maximum.

The payloads are byte-for-byte what `gateway.contract.Telemetry(...).to_payload()` makes: they
come from a template (pydantic is ~4 us per message, too slow to pre-encode millions) that is
checked against `to_payload()` on a sample of messages of every stream, so the contract stays
the source of truth.

A long stream (a 10-minute soak at ~25,000 msg/s is ~15 million frames, ~2 GB) does not fit
in memory: `--segment-s S` builds it in segments of S seconds in a background thread while
the current one is sent (`SegmentBuilder`; at most two segments exist at any time), with seq,
ts and packet ids continuing across segments exactly as one pre-built buffer would have them.
The building then shares the process with the sending (a few % of one core at 25,000 msg/s);
the result reports how long the sender waited for a segment (`builder_wait_s`, 0 when the
builder kept ahead).

Run as its own process (`python -m bench.mqtt_blast ...`, as bench/peers.py does) so that its
CPU is not the orchestrator's; it prints JSON lines: `built`, `start` (when the timed stream
begins, for the caller's CPU counters) and `done` (the result).
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import struct
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.contract import BootState, Channel, Phase, Telemetry, topic

CLINIC = "bench"
ZONES = ["foot", "calf", "knee", "thigh"]
# Idle, a little above zero, different per sample: plausible readings that no rule acts on
# (all below the 10 mmHg safe level, far from any ceiling).
IDLE_PRESSURES = ([0.4, 0.6, 0.5, 0.3], [0.5, 0.7, 0.4, 0.2], [0.3, 0.5, 0.6, 0.4])
ACK_BATCH_S = 0.002  # the PUBACK reader's pause between reads while the window has room
MAX_CHUNK = 4096  # packets per sendall at most
CHECK_EVERY = 9973  # payloads compared with to_payload(): every n-th, and the first of each boot

PUBACK = 0x40
CONNACK = 0x20
DISCONNECT = 0xE0
PROP_RECEIVE_MAXIMUM = 0x21


class MqttError(RuntimeError):
    """The broker refused or closed the connection."""


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length, property length)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, keepalive_s: int = 60) -> bytes:
    """CONNECT, MQTT 5, clean start, no will, no properties: a bench client keeps no session."""
    variable = _utf8("MQTT") + bytes([5, 0x02]) + struct.pack("!H", keepalive_s) + b"\x00"
    body = variable + _utf8(client_id)
    return bytes([0x10]) + varint(len(body)) + body


def publish_frame(topic_name: str, payload: bytes, qos: int = 0, packet_id: int = 0,
                  retain: bool = False) -> bytes:
    """One PUBLISH packet, MQTT 5, with an empty property list."""
    body = _utf8(topic_name) + (struct.pack("!H", packet_id) if qos else b"") + b"\x00" + payload
    return bytes([0x30 | (qos << 1) | int(retain)]) + varint(len(body)) + body


def _read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    value, shift = 0, 0
    while pos < len(buf):
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


class MqttConnection:
    """A minimal MQTT v5 client: enough for retained states, probes and the timed stream."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.sendall(connect_packet(client_id))
        ptype, body = self._read_packet()
        if ptype != CONNACK or len(body) < 2 or body[1] != 0:
            raise MqttError(f"connect refused: packet {ptype:#x} {body[:4]!r}")
        self.receive_maximum = _receive_maximum(body)
        self._next_id = 1

    def _read_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise MqttError("connection closed by the broker")
            out += chunk
        return out

    def _read_packet(self) -> tuple[int, bytes]:
        first = self._read_exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._read_exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first & 0xF0, self._read_exact(length)

    def publish(self, topic_name: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """A single publish outside the timed stream; at QoS 1 it waits for the PUBACK."""
        packet_id = self._next_id if qos else 0
        self._next_id = self._next_id % 65535 + 1
        self.sock.sendall(publish_frame(topic_name, payload, qos, packet_id, retain))
        if qos:
            ptype, body = self._read_packet()
            if ptype != PUBACK or struct.unpack("!H", body[:2])[0] != packet_id:
                raise MqttError(f"expected PUBACK {packet_id}, got {ptype:#x} {body[:4]!r}")
            if len(body) > 2 and body[2] >= 0x80:
                raise MqttError(f"publish refused, reason {body[2]:#x}")

    def close(self) -> None:
        try:
            self.sock.sendall(bytes([DISCONNECT, 0]))
        except OSError:
            pass
        self.sock.close()


def _receive_maximum(connack: bytes) -> int:
    """The broker's Receive Maximum from CONNACK's properties (65535 when absent)."""
    parsed = _read_varint(connack, 2)
    if parsed is None:
        return 65535
    length, pos = parsed
    end = pos + length
    while pos < end:
        prop = connack[pos]
        pos += 1
        if prop == PROP_RECEIVE_MAXIMUM:
            return int(struct.unpack("!H", connack[pos:pos + 2])[0])
        # Skip the others by their type (MQTT 5 §2.2.2.2).
        if prop in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A):
            pos += 1
        elif prop in (0x13, 0x21, 0x22):
            pos += 2
        elif prop in (0x11, 0x27):
            pos += 4
        elif prop == 0x26:  # user property: two strings
            for _ in range(2):
                pos += 2 + struct.unpack("!H", connack[pos:pos + 2])[0]
        elif prop in (0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F):
            pos += 2 + struct.unpack("!H", connack[pos:pos + 2])[0]
        else:
            break
    return 65535


# ---------------------------------------------------------------- the stream


def boot_state(telemetry_period_s: float, online: bool = True) -> bytes:
    """A boot's retained `state`: 4 chambers, idle, the period the stream's rate implies."""
    return BootState(online=online, firmware="bench", chambers=len(ZONES), zones=ZONES,
                     max_pressure_mmhg=120, telemetry_period_s=telemetry_period_s,
                     ts=time.time()).to_payload()


def telemetry_period(boots: int, rate: float) -> float:
    """What each boot's `telemetry_period_s` is at a total rate, within the contract's 60 s."""
    return min(60.0, max(0.001, boots / rate))


def announce(conn: MqttConnection, boots: int, rate: float, clinic: str = CLINIC) -> None:
    """Retained online states first, so a subscriber that starts later knows every boot."""
    period = telemetry_period(boots, rate)
    for i in range(boots):
        conn.publish(topic(clinic, f"b{i}", Channel.STATE), boot_state(period), qos=1,
                     retain=True)


@dataclass
class Frames:
    """A trial's PUBLISH packets back to back; `ends[i]` is where packet i ends in `buf`."""

    buf: bytearray
    ends: array[int]  # array('Q')
    qos: int
    ts_first: float
    ts_last: float

    def __len__(self) -> int:
        return len(self.ends)


def _payload(seq: int, ts: float, pressures: str) -> bytes:
    return b'{"seq":%d,"ts":%b,"phase":"idle","pressures":[%b]}' % (
        seq, repr(ts).encode(), pressures.encode())


def build_frames(boots: int, count: int, rate: float, qos: int, seq_base: int, ts_base: float,
                 clinic: str = CLINIC, first: int = 0) -> Frames:
    """`count` telemetry messages round-robin over the boots, sample j at ts_base + j/rate.

    Each boot's seq runs seq_base, seq_base+1, ...; its ts is the sample's scheduled send time,
    so the stored time is "now" and a boot's samples never share a millisecond while each boot
    sends less than 1000 per second. At QoS 1 packet j has id j % 65535 + 1: unique within any
    window of up to 65535 unacknowledged packets.

    `first`: this is the segment of the stream's messages first .. first+count-1; every number
    (boot, seq, ts, packet id, pressures) comes from the message's index in the whole stream,
    so segments built one after the other are byte for byte the one buffer's slices.
    """
    topics = [topic(clinic, f"b{i}", Channel.TELEMETRY).encode() for i in range(boots)]
    heads = [struct.pack("!H", len(t)) + t for t in topics]
    press = [",".join(repr(p) for p in ps) for ps in IDLE_PRESSURES]
    flags = bytes([0x30 | (qos << 1)])
    buf = bytearray()
    ends = array("Q")
    step = 1.0 / rate if rate > 0 else 1e-6
    for j in range(first, first + count):
        boot, k = j % boots, j // boots
        seq, ts = seq_base + k, round(ts_base + j * step, 6)
        pressures = IDLE_PRESSURES[k % len(IDLE_PRESSURES)]
        payload = _payload(seq, ts, press[k % len(press)])
        if k == 0 or j == first or j % CHECK_EVERY == 0:
            expected = Telemetry(seq=seq, ts=ts, phase=Phase.IDLE,
                                 pressures=pressures).to_payload()
            if payload != expected:
                raise AssertionError(f"template drifted from the contract: {payload!r} "
                                     f"!= {expected!r}")
        pid = struct.pack("!H", j % 65535 + 1) if qos else b""
        head = heads[boot]
        buf += flags
        buf += varint(len(head) + len(pid) + 1 + len(payload))
        buf += head
        buf += pid
        buf += b"\x00"
        buf += payload
        ends.append(len(buf))
    return Frames(buf, ends, qos, ts_base + first * step,
                  ts_base + (first + max(0, count - 1)) * step)


class SegmentBuilder(threading.Thread):
    """Builds a long stream segment by segment, ahead of the sender, at most two at a time.

    A slot (semaphore of 2) is taken before a segment is built and given back when the sender
    has written it all: while segment k is sent, k+1 is built (or waits, built), and k+2 not
    before k is gone. Iterating yields the segments in order; a failed build (the template
    check) is raised in the sender's thread.
    """

    def __init__(self, boots: int, count: int, rate: float, qos: int, seq_base: int,
                 ts_base: float, segment: int, clinic: str = CLINIC) -> None:
        super().__init__(daemon=True, name="segment-builder")
        self.boots, self.count, self.rate, self.qos = boots, count, rate, qos
        self.seq_base, self.ts_base, self.clinic = seq_base, ts_base, clinic
        self.segment = max(1, segment)
        self.segments = -(-count // self.segment)
        self._slots = threading.Semaphore(2)
        self._ready: queue.Queue[Frames | BaseException] = queue.Queue()
        self.waited_s = 0.0  # the sender's time blocked on a segment not yet built (after #0)
        self.build_s = 0.0  # this thread's time building

    def run(self) -> None:
        try:
            for first in range(0, self.count, self.segment):
                self._slots.acquire()
                t = time.perf_counter()
                frames = build_frames(self.boots, min(self.segment, self.count - first),
                                      self.rate, self.qos, self.seq_base, self.ts_base,
                                      self.clinic, first=first)
                self.build_s += time.perf_counter() - t
                self._ready.put(frames)
                del frames
        except BaseException as exc:  # surfaced in the sender, which otherwise waits forever
            self._ready.put(exc)

    def __iter__(self) -> Iterator[Frames]:
        for i in range(self.segments):
            t = time.perf_counter()
            item = self._ready.get()
            if i:
                self.waited_s += time.perf_counter() - t
            if isinstance(item, BaseException):
                raise item
            yield item
            del item  # the sender has dropped its references too: the segment is freed
            self._slots.release()


@dataclass
class BlastResult:
    sent: int
    seconds: float  # first write to last write
    achieved_rate: float  # sent / seconds (QoS 1: / ack_seconds); report this, not the target
    target_rate: float
    acked: int  # QoS 1: PUBACKs received (== sent when all were acknowledged)
    ack_seconds: float  # QoS 1: first write to last PUBACK
    refused: int  # QoS 1: PUBACKs with a failure reason code
    window: int  # QoS 1: the in-flight limit used
    ts_lag_s: float  # how late the first write was against the first sample's ts
    segments: int = 1  # > 1: streamed, built while sending (--segment-s)
    builder_wait_s: float = 0.0  # streamed: the sender's time waiting for a segment


class _AckCounter(threading.Thread):
    """Counts PUBACKs as they come; the sender reads `acked` to keep its in-flight window."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.acked = 0
        self.refused = 0
        self.last_at = 0.0
        self.error: str | None = None
        self.wake = threading.Event()
        self.waiting = False  # the sender is blocked on a full window: wake it at once

    def run(self) -> None:
        pending = b""
        try:
            while True:
                data = self.sock.recv(1 << 18)
                if not data:
                    self.error = "connection closed by the broker"
                    return
                data = pending + data
                # Fast path: mosquitto's success PUBACKs are 4 bytes (0x40 0x02 id id).
                whole = len(data) - len(data) % 4
                if data[0:whole:4].count(PUBACK) == whole // 4 and \
                        data[1:whole:4].count(2) == whole // 4:
                    self.acked += whole // 4
                    pending = data[whole:]
                else:
                    pending = self._parse(data)
                self.last_at = time.perf_counter()
                if self.waiting:
                    self.wake.set()
                else:
                    # Let PUBACKs pile up in the socket: a few big reads instead of one per
                    # ack, so the publisher's CPU stays off the cores the contenders need.
                    time.sleep(ACK_BATCH_S)
        except OSError as exc:
            self.error = str(exc)

    def _parse(self, data: bytes) -> bytes:
        pos = 0
        while pos < len(data):
            parsed = _read_varint(data, pos + 1)
            if parsed is None:
                break
            length, body = parsed
            if body + length > len(data):
                break
            ptype = data[pos] & 0xF0
            if ptype == PUBACK:
                self.acked += 1
                if length > 2 and data[body + 2] >= 0x80:
                    self.refused += 1
            elif ptype == DISCONNECT:
                self.error = f"broker sent DISCONNECT {data[body:body + 1]!r}"
            pos = body + length
        return data[pos:]


def blast(conn: MqttConnection, frames: Frames, rate: float, window: int = 65535,
          start_at: float | None = None) -> BlastResult:
    """Write the frames paced at `rate` msg/s (0: as fast as the socket takes them).

    Chunks are about a millisecond of the stream (at least one packet, at most MAX_CHUNK), so the
    pacing is smooth at any rate without a syscall per message. At QoS 1 no more than
    `window` packets are unacknowledged at any time.
    """
    return blast_segments(conn, [frames], len(frames), frames.qos, rate, window, start_at)


def blast_segments(conn: MqttConnection, segments: Iterable[Frames], total: int, qos: int,
                   rate: float, window: int = 65535,
                   start_at: float | None = None) -> BlastResult:
    """`blast` over a stream that comes in segments (a list, or a SegmentBuilder): the pacing,
    the QoS 1 window and the counts run over the whole stream's message index, so a segment
    boundary is invisible on the wire. The first segment is taken before the timed start."""
    window = max(1, min(window, conn.receive_maximum, 65535))
    conn.sock.settimeout(None)
    acks = _AckCounter(conn.sock) if qos else None
    if acks is not None:
        acks.start()
    source = iter(segments)
    pending: Frames | None = next(source, None)
    ts_first = pending.ts_first if pending is not None else time.time()
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    chunk = max(1, min(MAX_CHUNK, int(rate / 1000))) if rate > 0 else MAX_CHUNK
    wall0 = time.time()
    t0 = time.perf_counter()
    sent = 0  # over the whole stream
    n_segments = 0
    while pending is not None:
        n_segments += 1
        view = memoryview(pending.buf)
        ends = pending.ends
        base = sent
        seg_end = base + len(ends)
        pending = None  # the segment lives in `view` and `ends` only: freed after its send
        while sent < seg_end:
            upto = min(seg_end, sent + MAX_CHUNK)
            if rate > 0:
                due = min(upto, int((time.perf_counter() - t0) * rate) + 1)
                if due < min(seg_end, sent + chunk):  # less than a chunk due: wait for one
                    time.sleep(max(0.0, t0 + (sent + chunk) / rate - time.perf_counter()))
                    continue
                upto = due
            if acks is not None:
                if acks.error:
                    raise MqttError(acks.error)
                upto = min(upto, acks.acked + window)
                if upto <= sent:
                    acks.wake.clear()
                    acks.waiting = True
                    acks.wake.wait(0.001)
                    acks.waiting = False
                    continue
            start = ends[sent - base - 1] if sent > base else 0
            conn.sock.sendall(view[start:ends[upto - base - 1]])
            sent = upto
        view.release()
        del view, ends
        pending = next(source, None)
    n = sent
    if n != total:
        raise AssertionError(f"the segments held {n} messages, not {total}")
    t_end = time.perf_counter()
    acked, refused, ack_end = n, 0, t_end
    if acks is not None:
        deadline = time.perf_counter() + 30
        acks.waiting = True
        while acks.acked < n and acks.error is None and time.perf_counter() < deadline:
            acks.wake.clear()
            acks.wake.wait(0.05)
        acked, refused, ack_end = acks.acked, acks.refused, max(acks.last_at, t_end)
    seconds = max(t_end - t0, 1e-9)
    # At QoS 1 the last write may be a whole window ahead of what the broker has taken: the
    # rate counts until the last PUBACK, or a short unpaced burst would look far too fast.
    taken_s = max(ack_end - t0, 1e-9) if qos else seconds
    waited = segments.waited_s if isinstance(segments, SegmentBuilder) else 0.0
    return BlastResult(sent=n, seconds=round(seconds, 4), achieved_rate=round(n / taken_s, 1),
                       target_rate=rate, acked=acked, ack_seconds=round(ack_end - t0, 4),
                       refused=refused, window=window if qos else 0,
                       ts_lag_s=round(wall0 - ts_first, 4), segments=n_segments,
                       builder_wait_s=round(waited, 3))


# ---------------------------------------------------------------- the process


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Pre-encoded MQTT v5 telemetry stream, paced.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--boots", type=int, default=500)
    p.add_argument("--rate", type=float, required=True, help="msg/s in total; 0 = unpaced")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--count", type=int, help="messages to send (default: rate x seconds)")
    p.add_argument("--qos", type=int, choices=(0, 1), default=0)
    p.add_argument("--seq-base", type=int, default=0)
    p.add_argument("--window", type=int, default=65535, help="QoS 1 in-flight limit")
    p.add_argument("--announce", action="store_true", help="publish the retained states first")
    p.add_argument("--segment-s", type=float, default=0.0,
                   help="stream mode: build the frames in segments of this many seconds while "
                        "sending (at most two in memory); 0 = build all before the start")
    args = p.parse_args(argv)
    count = args.count or int(args.rate * args.seconds)
    conn = MqttConnection(args.host, args.port, f"bench-blast-{time.monotonic_ns()}")
    if args.announce:
        announce(conn, args.boots, args.rate or 1e6)
    segment = count
    if args.segment_s > 0:
        segment = max(1, min(count, int(args.rate * args.segment_s) if args.rate > 0
                             else 200_000))
    # The samples carry their scheduled send time: estimate how long building takes from a
    # small trial build, so the stream starts right when its first sample's ts says (streamed:
    # once its first segment is built).
    t = time.perf_counter()
    build_frames(args.boots, min(count, 20_000), args.rate, args.qos, 0, time.time())
    per_msg = (time.perf_counter() - t) / max(1, min(count, 20_000))
    ts_base = time.time() + per_msg * segment * 1.2 + 0.3
    if segment < count:
        # The builder thread holds the GIL while it builds: a short switch interval lets the
        # sender's wake-ups through within half a millisecond (the default is 5 ms), so the
        # pacing stays about as smooth as with one pre-built buffer.
        sys.setswitchinterval(0.0005)
        builder = SegmentBuilder(args.boots, count, args.rate, args.qos, args.seq_base, ts_base,
                                 segment)
        builder.start()
        _emit("built", messages=count, segments=builder.segments, segment_messages=segment,
              receive_maximum=conn.receive_maximum, ts_base=ts_base)
        start_at = max(ts_base, time.time())
        _emit("start", at=start_at)
        result = blast_segments(conn, builder, count, args.qos, args.rate, args.window,
                                start_at=start_at)
    else:
        frames = build_frames(args.boots, count, args.rate, args.qos, args.seq_base, ts_base)
        _emit("built", messages=len(frames), bytes=len(frames.buf),
              receive_maximum=conn.receive_maximum, ts_base=ts_base)
        start_at = max(ts_base, time.time())
        _emit("start", at=start_at)
        result = blast(conn, frames, args.rate, args.window, start_at=start_at)
    conn.close()
    _emit("done", **asdict(result))

if __name__ == "__main__":
    main()
