"""One simulated boot: the physics model behind a real MQTT v5 connection, speaking the contract.

A `SimBoot` behaves like firmware would: retained state + LWT, commands in, acks/events/telemetry
out. It also records what it saw and offers awaitables (built on an asyncio.Event, never sleeps)
so integration tests can wait for "this boot got a vent" or "the session completed".

Fault switches (`inject_*`, `set_*`, `drop_connection`, `publish_malformed`) make the boot
misbehave in one specific way each, so every rule of the gateway's safety watchdog can be
exercised; `clear_faults()` undoes them all. `device_sim.faults` drives them from a scenario's
fault plan and records each one in `faults_injected`.
Like firmware, the boot also does its own safety duty (docs/protocol.md §7.2): in a session it
vents itself when the gateway's heartbeat stops or the MQTT connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Literal, TypedDict, get_args

import aiomqtt
from pydantic import ValidationError

from device_sim.boot_probes import BootProbes
from device_sim.link_settings import NO_DELAY, BootLink
from device_sim.physics import BootModel
from gateway.boot_credentials import BootCredentials
from gateway.contract import (
    CHANNEL_QOS,
    CHANNEL_RETAIN,
    HEARTBEAT_TOPIC,
    SENSOR_MIN_MMHG,
    Ack,
    AckStatus,
    ActiveSession,
    BootEvent,
    BootState,
    Channel,
    Command,
    CommandKind,
    EventKind,
    Heartbeat,
    PayloadError,
    Telemetry,
    decode,
    topic,
)
from gateway.mqtt_internals import paho_of, publish_qos0_now, without_topic_callbacks
from gateway.mqtt_tls import client_security

log = logging.getLogger(__name__)

MAX_CMD_BYTES = 65536
# Standard zone names, distal to proximal; boots with more chambers number the rest.
_ZONES = ["foot", "calf", "knee", "thigh", "hip"]
# Duplicate cmd_ids (QoS 1 redelivery) are answered from this memory instead of re-executed.
_SEEN_CMDS = 256
# Acks/events produced while offline wait here and go out after the reconnect.
_OUTBOX_MAX = 1000
_PUBLISH_TIMEOUT_S = 5.0
_OFFLINE_PUBLISH_TIMEOUT_S = 2.0
# Heartbeat-loss timeout when none is configured (protocol §7.2): this many of the gateway's
# announced intervals, never less than the floor; the gateway default interval until one is seen.
HEARTBEAT_TIMEOUT_INTERVALS = 3.0
HEARTBEAT_TIMEOUT_FLOOR_S = 5.0
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
SELF_VENT_HEARTBEAT = "gateway heartbeat lost"
SELF_VENT_CONNECTION = "mqtt connection lost"

# Garbage a boot can put on its telemetry topic (`publish_malformed`). The gateway must drop
# each one as bad input (a device_fault point), never act on it.
MalformedKind = Literal["not_json", "wrong_type", "null_pressure", "too_large"]
MALFORMED_KINDS: tuple[MalformedKind, ...] = get_args(MalformedKind)
# Above the contract's 16384-byte payload limit, below the broker's max_packet_size (1 MiB).
TOO_LARGE_BYTES = 20_000


class BootAccount(TypedDict, total=False):
    """SimBoot's broker-identity keyword arguments, typed so `**account` is checked."""

    username: str | None
    password: str | None
    client_id: str | None


def account_kwargs(own: BootCredentials | None) -> BootAccount:
    """A provisioned boot's account as SimBoot kwargs; none: SimBoot's defaults apply."""
    if own is None:
        return {}
    return {"username": own.username, "password": own.password, "client_id": own.client_id}


def malformed_telemetry(kind: MalformedKind, chambers: int, seq: int, ts: float) -> bytes:
    """Bytes that look like telemetry from a broken firmware but break the contract."""
    good = {"seq": seq, "ts": ts, "phase": "inflate", "pressures": [42.0] * chambers}
    if kind == "not_json":  # a buffer cut off mid-write, with junk behind it
        return json.dumps(good).encode()[:24] + b"\xff\xfe\x00"
    if kind == "wrong_type":
        return json.dumps({**good, "seq": "twelve", "pressures": "high"}).encode()
    if kind == "null_pressure":  # JSON null is not a number (NaN would be: rule 6's job)
        return json.dumps({**good, "pressures": [None] * chambers}).encode()
    if kind == "too_large":
        return json.dumps({**good, "debug": "x" * TOO_LARGE_BYTES}).encode()
    raise ValueError(f"unknown malformed kind {kind!r}; one of {MALFORMED_KINDS}")


def zones_for(chambers: int) -> list[str]:
    """Zone label per chamber, distal to proximal (BootState.zones)."""
    return (_ZONES + [f"zone{i + 1}" for i in range(len(_ZONES), chambers)])[:chambers]


class SimBoot(BootProbes):
    """A simulated boot with its own MQTT client `sim-{clinic}-{device}`."""

    def __init__(
        self,
        clinic: str,
        device: str,
        mqtt: BootLink,
        *,
        chambers: int = 4,
        max_pressure_mmhg: float = 120.0,
        telemetry_period_s: float = 0.5,
        telemetry_qos: int | None = None,
        firmware: str = "sim-1.0",
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
        heartbeat_timeout_s: float | None = None,
        self_vent: bool = True,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        """self_vent: in a session, vent when no live gateway heartbeat arrived for
        `heartbeat_timeout_s` (None: derived from the last heartbeat's interval_s, protocol
        §7.2) or when the MQTT connection drops. On by default, as firmware must; switch it off
        for tests that run sessions without a gateway.

        client_id, username, password: the boot's own broker account (`boot-gateway boots
        add`), which binds the client id to the username: give the one it was provisioned
        with. Defaults: client id `sim-{clinic}-{device}`; with a password and no username the
        username is the device id (protocol §3.2); with neither, `mqtt`'s username/password."""
        if heartbeat_timeout_s is not None and not heartbeat_timeout_s > 0:
            raise ValueError("heartbeat_timeout_s must be positive")
        self.clinic = clinic
        self.device = device
        self.key = f"{clinic}/{device}"
        self.client_id = client_id or f"sim-{clinic}-{device}"
        self.username = username if username is not None or password is None else device
        self._password = password  # never logged
        self.mqtt = mqtt
        self.chambers = chambers
        self.max_pressure_mmhg = max_pressure_mmhg
        self.telemetry_period_s = telemetry_period_s
        self.telemetry_qos = (
            CHANNEL_QOS[Channel.TELEMETRY] if telemetry_qos is None else telemetry_qos
        )
        self.firmware = firmware
        self.clock = clock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.self_vent = self_vent
        # Clock time of the last heartbeat that arrived live (retained ones prove nothing).
        self.last_heartbeat_at: float | None = None
        # interval_s of the last heartbeat seen, retained or not: it sizes the timeout.
        self.heartbeat_interval_s: float | None = None
        self.heartbeats_received = 0
        self.self_vents = 0
        # (clock time, cause) of every self-vent, for the report (the boot's own safety duty).
        self.self_vents_at: list[tuple[float, str]] = []
        self._rng = random.Random(seed)
        self.model = BootModel(chambers, max_pressure_mmhg, rng=self._rng)
        self._topics = {ch: topic(clinic, device, ch) for ch in Channel}

        # Session bookkeeping.
        self.session_id: str | None = None
        self._start_cmd_id: str | None = None
        self._active: ActiveSession | None = None
        self._seq = 0

        # Injected faults (see the fault switches below).
        self._silent = False
        self._ignore_vents = False
        self._count_mismatch = False
        self._spikes: dict[int, float] = {}
        self._dropouts: dict[int, float] = {}  # chamber -> what its dead sensor reads
        # Offset of the boot's wall clock (every `ts` it sends, its expiry check). Skews and
        # NTP-like steps (`set_clock_skew`, `step_clock`) move only this offset: the boot's
        # timers and its session_elapsed_s run on `clock`, which stands for the firmware's
        # monotonic clock and is never stepped.
        self.clock_skew_s = 0.0
        # After drop_connection(): no reconnect before this clock time (reconnect_now ends it).
        self._offline_until = 0.0
        self._reconnect_wake = asyncio.Event()

        # Counters and records (read by tests and the fleet runner).
        self.telemetry_sent = 0
        self.telemetry_sent_by_session: dict[str, int] = {}
        self.commands_received: list[Command] = []
        self.vents_received = 0
        self.vent_received_at: float | None = None  # the first one
        self.vents_received_at: list[float] = []
        self.spikes_published_at: list[float] = []
        self.state_publishes = 0
        self.sessions_completed = 0
        self.acks_sent: list[Ack] = []
        self.events_sent: list[BootEvent] = []
        self.malformed_commands = 0
        self.connections = 0
        self.connections_dropped = 0
        self.malformed_sent = 0
        # (true clock time, fault kind) of every fault put in / taken out by device_sim.faults.
        self.faults_injected: list[tuple[float, str]] = []
        self.faults_cleared: list[tuple[float, str]] = []

        self._client: aiomqtt.Client | None = None
        self._publish_lock = asyncio.Lock()
        self._outbox: deque[tuple[Channel, bytes]] = deque(maxlen=_OUTBOX_MAX)
        self._seen: OrderedDict[str, Ack] = OrderedDict()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ public state

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def silent(self) -> bool:
        return self._silent

    @property
    def in_session(self) -> bool:
        return self.model.in_session

    @property
    def session(self) -> ActiveSession | None:
        """The running session as the retained state announces it."""
        return self._active

    @property
    def effective_heartbeat_timeout_s(self) -> float:
        """How long a session survives without a live heartbeat (protocol §7.2)."""
        if self.heartbeat_timeout_s is not None:
            return self.heartbeat_timeout_s
        interval = self.heartbeat_interval_s or DEFAULT_HEARTBEAT_INTERVAL_S
        return max(HEARTBEAT_TIMEOUT_FLOOR_S, HEARTBEAT_TIMEOUT_INTERVALS * interval)

    def device_time(self, now: float | None = None) -> float:
        """The boot's own wall clock: true time plus the injected skew and steps."""
        return (self.clock() if now is None else now) + self.clock_skew_s

    @property
    def sensor_dropouts(self) -> dict[int, float]:
        """Chamber (0-based) -> the reading its dead sensor reports."""
        return dict(self._dropouts)

    @property
    def offline_until(self) -> float:
        """Clock time before which a dropped connection is not re-established."""
        return self._offline_until

    def state_payload(self, online: bool) -> bytes:
        """The retained state; the session only while online (the LWT never carries one)."""
        return BootState(
            online=online,
            firmware=self.firmware,
            chambers=self.chambers,
            zones=zones_for(self.chambers),
            max_pressure_mmhg=self.max_pressure_mmhg,
            telemetry_period_s=self.telemetry_period_s,
            ts=self.device_time(),
            session=self._active if online else None,
        ).to_payload()

    # ------------------------------------------------------------------ test / runner hooks

    async def press_stop(self) -> None:
        """The user's stop button (numbness, pain): the session stops and USER_STOP is sent."""
        session_id = self.session_id
        self.model.stop(self.clock())
        ended = self._end_session()
        log.info("user stop", extra={"boot": self.key, "session_id": session_id})
        await self._event(EventKind.USER_STOP, session_id=session_id, detail="stop button")
        if ended:
            await self._publish_state()

    def inject_stuck_valve(self, chamber: int) -> None:
        """Fault: one chamber keeps inflating during any session until the boot is vented."""
        self.model.stuck_valve(chamber)
        log.info("stuck valve injected", extra={"boot": self.key, "chamber": chamber})

    def inject_hold_valve(self, chamber: int) -> None:
        """Fault: one chamber stays at its target all session (only "held too long" sees it)."""
        self.model.hold_valve(chamber)
        log.info("hold valve injected", extra={"boot": self.key, "chamber": chamber})

    def inject_overrun(self) -> None:
        """Fault: sessions never complete by themselves; they cycle on until stopped or vented."""
        self.model.overrun()
        log.info("overrun injected", extra={"boot": self.key})

    def inject_vent_broken(self) -> None:
        """Fault: a vent is acked DONE and VENTED is sent, but the pressure does not fall."""
        self.model.vent_valve_broken()
        log.info("broken vent valve injected", extra={"boot": self.key})

    def set_ignore_vents(self, on: bool) -> None:
        """Fault (firmware hang): vent commands are received and counted, never executed,
        acked or answered with an event."""
        self._ignore_vents = on
        log.info("ignore vents fault", extra={"boot": self.key, "ignore_vents": on})

    def inject_spike(self, chamber: int, value: float) -> None:
        """Fault: the next published telemetry sample carries `value` (NaN, inf, -50, 500...)
        for `chamber`; its publish time goes to `spikes_published_at` for reaction timing."""
        if not 0 <= chamber < self.chambers:
            raise ValueError(f"chamber {chamber} out of range 0..{self.chambers - 1}")
        self._spikes[chamber] = float(value)
        log.info("spike injected", extra={"boot": self.key, "chamber": chamber,
                                          "value": repr(float(value))})

    def inject_chamber_count_mismatch(self, on: bool) -> None:
        """Fault: telemetry carries one pressure fewer than the announced chamber count."""
        if on and self.chambers < 2:
            raise ValueError("a one-chamber boot cannot send one pressure fewer")
        self._count_mismatch = on
        log.info("chamber count mismatch fault", extra={"boot": self.key, "on": on})

    def set_silent(self, on: bool) -> None:
        """Fault: telemetry stops (connection stays up, commands are still obeyed)."""
        self._silent = on
        log.info("silent fault", extra={"boot": self.key, "silent": on})

    def set_clock_skew(self, skew_s: float) -> None:
        """Fault: the boot's wall clock is off by `skew_s` (ahead when positive). It shows in
        every `ts` and `started_at` the boot sends and in its start-expiry check, not in its
        timers. Set from one moment to the next, as an NTP step would."""
        if not math.isfinite(skew_s):
            raise ValueError(f"clock skew must be finite, got {skew_s}")
        self.clock_skew_s = float(skew_s)
        log.info("clock skew set", extra={"boot": self.key, "skew_s": skew_s})

    def step_clock(self, step_s: float) -> None:
        """Fault: an NTP step of the boot's wall clock by `step_s` (negative: backward) from
        one sample to the next, on top of any skew; `step_clock(-step_s)` steps it back. Like
        a skew it shows in every `ts` the boot sends (telemetry, acks, events, state) and in
        its expiry check; its timers and `session_elapsed_s` run on the monotonic `clock` and
        do not move."""
        if not math.isfinite(step_s):
            raise ValueError(f"clock step must be finite, got {step_s}")
        self.clock_skew_s += float(step_s)
        log.info("clock stepped", extra={"boot": self.key, "step_s": step_s,
                                         "offset_s": self.clock_skew_s})

    def set_sensor_dropout(self, chamber: int, reading: float = SENSOR_MIN_MMHG) -> None:
        """Fault: this chamber's transducer is dead and reports `reading` on every sample
        (default the bottom of its range, what an open circuit reads) until cleared.
        The chamber's real pressure is untouched: a sensor fault is not a physics fault."""
        if not 0 <= chamber < self.chambers:
            raise ValueError(f"chamber {chamber} out of range 0..{self.chambers - 1}")
        self._dropouts[chamber] = float(reading)
        log.info("sensor dropout injected", extra={"boot": self.key, "chamber": chamber,
                                                   "reading": repr(float(reading))})

    def clear_sensor_dropout(self, chamber: int | None = None) -> None:
        """The sensor of `chamber` (None: every sensor) reads the real pressure again."""
        if chamber is None:
            self._dropouts.clear()
        else:
            self._dropouts.pop(chamber, None)

    def drop_connection(self, offline_s: float = 0.0) -> None:
        """Fault: the TCP connection dies without an MQTT DISCONNECT (cable pulled, Wi-Fi
        gone), so the broker publishes the LWT at once. The boot reacts as to any connection
        loss (self-vent in session, protocol §7.2) and reconnects no sooner than `offline_s`
        from now (nor sooner than its usual backoff); `reconnect_now()` ends that early."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError(f"{self.key} is not connected")
        if not (math.isfinite(offline_s) and offline_s >= 0):
            raise ValueError(f"offline_s must be finite and >= 0, got {offline_s}")
        # aiomqtt offers no abrupt close; paho's socket is the only handle on the TCP link.
        sock = paho_of(client).socket()
        if not isinstance(sock, socket.socket):
            raise RuntimeError(f"{self.key}: no TCP socket to drop ({type(sock).__name__})")
        self._offline_until = self.clock() + offline_s
        self._reconnect_wake.clear()
        self.connections_dropped += 1
        log.info("connection dropped", extra={"boot": self.key, "offline_s": offline_s})
        # shutdown, not close: paho still owns the descriptor and sees EOF on its next read.
        sock.shutdown(socket.SHUT_RDWR)

    def reconnect_now(self) -> None:
        """End the offline hold of `drop_connection` (no effect on a connected boot)."""
        self._offline_until = 0.0
        if self._client is None:  # waiting to reconnect: cut the wait short
            self._reconnect_wake.set()

    async def publish_malformed(self, kind: MalformedKind) -> bytes:
        """Fault: put contract-breaking bytes on the telemetry topic; returns what was sent.
        Normal telemetry goes on as before, so the gateway must not take the boot for silent."""
        payload = malformed_telemetry(kind, self.chambers, self._seq, self.device_time())
        await self.publish_raw(Channel.TELEMETRY, payload, qos=self.telemetry_qos)
        self.malformed_sent += 1
        return payload

    def record_fault(self, kind: str, *, cleared: bool = False, at: float | None = None) -> None:
        """Note a fault going in (or out) at `at` (default now, true clock), for the report."""
        record = self.faults_cleared if cleared else self.faults_injected
        record.append((self.clock() if at is None else at, kind))
        self._notify()

    def clear_faults(self) -> None:
        """Undo every injected fault (model and firmware); a pending spike is dropped."""
        self.model.clear_faults()
        self._silent = self._ignore_vents = self._count_mismatch = False
        self._spikes.clear()
        self._dropouts.clear()
        self.clock_skew_s = 0.0
        self.reconnect_now()
        log.info("faults cleared", extra={"boot": self.key})

    async def publish_raw(
        self, channel: Channel, payload: bytes, qos: int = 1, *, retain: bool = False
    ) -> None:
        """Send arbitrary bytes on one of this boot's topics (for bad-input tests)."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError(f"{self.key} is not connected")
        async with self._publish_lock:
            await client.publish(
                self._topics[channel], payload, qos=qos, retain=retain,
                timeout=_PUBLISH_TIMEOUT_S,
            )

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await self.wait_until(lambda: self.connected, timeout)

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Connect, serve until cancelled; reconnect with backoff; on cancel go offline cleanly."""
        backoff = self.mqtt.reconnect_min_s
        while True:
            try:
                async with self._make_client() as client:
                    backoff = self.mqtt.reconnect_min_s
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                was_connected = self._client is not None
                self._set_client(None)
                log.warning(
                    "mqtt connection lost" if was_connected else "mqtt connect failed",
                    extra={"boot": self.key, "error": str(exc), "retry_in_s": backoff},
                )
                if was_connected and self.self_vent and self.model.in_session:
                    # Protocol §7.2: the gateway cannot reach us any more; the event goes
                    # out from the outbox after the reconnect.
                    await self._self_vent(self.clock(), SELF_VENT_CONNECTION)
                delay = backoff * random.uniform(0.8, 1.2)
                await self._pause_before_reconnect(
                    max(delay, self._offline_until - self.clock()))
                backoff = min(backoff * 2, self.mqtt.reconnect_max_s)
            finally:
                self._set_client(None)

    async def _pause_before_reconnect(self, delay: float) -> None:
        """Back off for `delay` seconds, or less if reconnect_now() is called meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._reconnect_wake.wait()
        self._reconnect_wake.clear()

    def _heartbeat_queue(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        """aiomqtt's incoming queue, minus the gateway's heartbeats: those are handled at once.

        Every boot gets a heartbeat every couple of seconds; through aiomqtt's iterator each
        costs a Task, which at thousands of boots per process was as much as sending telemetry.
        """
        boot = self

        class HeartbeatFirst(asyncio.Queue[aiomqtt.Message]):
            def put_nowait(self, item: aiomqtt.Message) -> None:
                if item.topic.value == HEARTBEAT_TOPIC:
                    boot.on_heartbeat(item.payload, retained=bool(item.retain))
                else:
                    super().put_nowait(item)

        return HeartbeatFirst

    def _make_client(self) -> aiomqtt.Client:
        m = self.mqtt
        try:
            # One TLS context per configuration and process, shared by the fleet's boots.
            security = client_security(m, shared=True)
        except (OSError, ValueError) as exc:  # e.g. password file gone: retried like a refusal
            raise aiomqtt.MqttError(f"mqtt TLS or password file unusable: {exc}") from None
        if self.username is not None:  # the boot's own account instead of the shared one
            security = {**security, "username": self.username, "password": self._password}
        return without_topic_callbacks(aiomqtt.Client(
            m.host,
            m.port,
            **security,  # username, password, tls_context (gateway/mqtt_tls.py)
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(
                self._topics[Channel.STATE],
                self.state_payload(online=False),
                qos=CHANNEL_QOS[Channel.STATE],
                retain=True,
            ),
            keepalive=m.keepalive_s,
            timeout=_PUBLISH_TIMEOUT_S,
            socket_options=NO_DELAY,
            queue_type=self._heartbeat_queue(),
        ))

    async def _serve(self, client: aiomqtt.Client) -> None:
        ticker: asyncio.Task[None] | None = None
        try:
            # Protocol §3.1: subscribe first, then announce online (with any running session).
            await client.subscribe(self._topics[Channel.CMD], qos=CHANNEL_QOS[Channel.CMD])
            await client.subscribe(HEARTBEAT_TOPIC, qos=0)
            await client.publish(
                self._topics[Channel.STATE], self.state_payload(online=True),
                qos=CHANNEL_QOS[Channel.STATE], retain=CHANNEL_RETAIN[Channel.STATE],
            )
            self.state_publishes += 1
            self.connections += 1
            self._set_client(client)
            log.info("boot online", extra={"boot": self.key, "connections": self.connections})
            await self._flush_outbox()
            ticker = asyncio.create_task(self._telemetry_loop(), name=f"telemetry-{self.key}")
            # Heartbeats are handled as they are read (see _heartbeat_queue); commands come here.
            async for message in client.messages:
                await self._on_message(message.payload)
        except asyncio.CancelledError:
            await self._go_offline(client, ticker)
            raise
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker

    async def _go_offline(self, client: aiomqtt.Client, ticker: asyncio.Task[None] | None) -> None:
        """Retained online=false before a clean disconnect (a clean disconnect fires no LWT).

        The telemetry task is cancelled only while we hold the publish lock, so no sample is
        cut off mid-publish: `telemetry_sent` equals what the broker got.
        """
        self._set_client(None)
        try:
            async with asyncio.timeout(_OFFLINE_PUBLISH_TIMEOUT_S):
                async with self._publish_lock:
                    if ticker is not None:
                        ticker.cancel()
                    await client.publish(
                        self._topics[Channel.STATE], self.state_payload(online=False),
                        qos=CHANNEL_QOS[Channel.STATE], retain=True,
                    )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            if ticker is not None:
                ticker.cancel()
            log.warning("offline state not sent", extra={"boot": self.key, "error": str(exc)})

    def on_heartbeat(self, payload: object, *, retained: bool) -> None:
        """A message on the heartbeat topic. A retained one (delivered on subscribe) says
        nothing about the gateway being alive now: it only tells the interval."""
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        try:
            hb = Heartbeat.model_validate_json(payload)
        except ValidationError:
            log.debug("invalid heartbeat ignored", extra={"boot": self.key, "retained": retained})
            return
        if math.isfinite(hb.interval_s) and hb.interval_s > 0:
            self.heartbeat_interval_s = hb.interval_s
        if not retained:
            self.last_heartbeat_at = self.clock()
            self.heartbeats_received += 1
        self._notify()

    def _set_client(self, client: aiomqtt.Client | None) -> None:
        self._client = client
        self._notify()
    # ------------------------------------------------------------------ telemetry

    async def _telemetry_loop(self) -> None:
        loop = asyncio.get_running_loop()
        # Real boots are not in step: a random phase keeps a fleet from sampling in unison.
        await asyncio.sleep(self._rng.uniform(0, self.telemetry_period_s))
        next_at = loop.time()
        while True:
            await self._tick()
            next_at += self.telemetry_period_s
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (overloaded host): skip, don't burst
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    async def _tick(self) -> None:
        """One sample: advance the model, finish a completed session, publish telemetry."""
        try:
            await self._sample()
        finally:
            self._notify()  # pressures and counters moved: let wait_until() re-check

    async def _sample(self) -> None:
        now = self.clock()
        phase, measured = self.model.step(now)
        # A session a stop/vent command already ended is not also "completed".
        if self.model.poll_completed() and self.session_id is not None:
            await self._complete_session()
        elif self._heartbeat_lost(now):
            await self._self_vent(now, SELF_VENT_HEARTBEAT)
        session_id = self.session_id
        if self._silent:
            return
        elapsed = self.model.session_elapsed(now) if session_id is not None else None
        seq = self._seq
        self._seq += 1
        client = self._client
        if client is None:
            return  # a pending spike waits for the next sample that is really published
        pressures = [round(p, 1) for p in measured]
        for chamber, reading in self._dropouts.items():
            pressures[chamber] = reading
        spikes, self._spikes = self._spikes, {}
        for chamber, value in spikes.items():
            pressures[chamber] = value
        if self._count_mismatch:
            pressures = pressures[:-1]  # drops a spike on the last chamber, too
        msg = Telemetry(
            seq=seq,
            ts=self.device_time(now),
            session_id=session_id,
            session_elapsed_s=None if elapsed is None else round(max(0.0, elapsed), 2),
            phase=phase,
            pressures=pressures,
        )
        # json.dumps writes NaN/Infinity as the JSON tokens; pydantic's JSON would write null.
        payload = (
            json.dumps(msg.model_dump(exclude_none=True)).encode()
            if spikes or not all(math.isfinite(p) for p in pressures)
            else msg.to_payload()
        )
        spike_logged = False
        try:
            async with self._publish_lock:
                if spikes:
                    self.spikes_published_at.append(self.clock())
                    spike_logged = True
                if not (self.telemetry_qos == 0 and publish_qos0_now(
                        client, self._topics[Channel.TELEMETRY], payload)):
                    await client.publish(
                        self._topics[Channel.TELEMETRY], payload,
                        qos=self.telemetry_qos, timeout=_PUBLISH_TIMEOUT_S,
                    )
                # Counted under the lock so shutdown never sees a half-counted sample.
                self.telemetry_sent += 1
                if session_id is not None:
                    self.telemetry_sent_by_session[session_id] = (
                        self.telemetry_sent_by_session.get(session_id, 0) + 1
                    )
        except aiomqtt.MqttError as exc:
            if spike_logged:  # not published after all: the next sample carries it
                self.spikes_published_at.pop()
                self._spikes = {**spikes, **self._spikes}
            log.debug("telemetry not sent", extra={"boot": self.key, "error": str(exc)})

    def _heartbeat_lost(self, now: float) -> bool:
        """In session and neither a live heartbeat nor the session start within the timeout
        (a session started from a stale heartbeat gets the full timeout, not an instant vent)."""
        if not self.self_vent or not self.model.in_session:
            return False
        elapsed = self.model.session_elapsed(now) or 0.0
        reference = max(self.last_heartbeat_at or -math.inf, now - elapsed)
        return now - reference > self.effective_heartbeat_timeout_s

    async def _self_vent(self, now: float, cause: str) -> None:
        """The boot's own safety duty (protocol §7.2): vent, end the session, say why."""
        session_id = self.session_id
        self.model.vent(now)
        self._end_session()
        self.self_vents += 1
        self.self_vents_at.append((now, cause))
        last = self.last_heartbeat_at
        log.warning("self-vent", extra={
            "boot": self.key, "session_id": session_id, "cause": cause,
            "timeout_s": self.effective_heartbeat_timeout_s,
            "heartbeat_silence_s": None if last is None else round(now - last, 3)})
        await self._event(EventKind.VENTED, session_id=session_id, detail=cause)
        await self._publish_state()

    async def _complete_session(self) -> None:
        session_id, cmd_id = self.session_id, self._start_cmd_id
        self._end_session()
        self.sessions_completed += 1
        log.info("session completed", extra={"boot": self.key, "session_id": session_id})
        await self._event(EventKind.SESSION_COMPLETED, session_id=session_id)
        if cmd_id is not None:
            await self._ack(cmd_id, AckStatus.DONE)
        await self._publish_state()

    def _end_session(self) -> bool:
        """Forget the running session; True if there was one (its retained state must go)."""
        ended = self._active is not None
        self.session_id = None
        self._start_cmd_id = None
        self._active = None
        self._notify()
        return ended

    # ------------------------------------------------------------------ commands

    async def _on_message(self, payload: object) -> None:
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        try:
            cmd = decode(Channel.CMD, bytes(payload), max_bytes=MAX_CMD_BYTES)
        except PayloadError as exc:
            self.malformed_commands += 1
            log.warning(
                "malformed command ignored",
                extra={"boot": self.key, "kind": exc.kind, "error": str(exc)},
            )
            return
        assert isinstance(cmd, Command)
        await self.handle_command(cmd)

    async def handle_command(self, cmd: Command) -> None:
        """Execute one command as the firmware would (public so tests can skip the broker)."""
        now = self.clock()
        self.commands_received.append(cmd)
        if cmd.kind is CommandKind.VENT:
            # Safety first: count and act before any duplicate check or publishing.
            self.vents_received += 1
            self.vents_received_at.append(now)
            if self.vent_received_at is None:
                self.vent_received_at = now
        self._notify()
        log.info(
            "command received",
            extra={"boot": self.key, "cmd_id": cmd.cmd_id, "cmd": cmd.kind.value},
        )
        if cmd.kind is CommandKind.VENT and self._ignore_vents:
            log.warning("vent ignored (injected firmware hang)",
                        extra={"boot": self.key, "cmd_id": cmd.cmd_id})
            return
        previous = self._seen.get(cmd.cmd_id)
        if previous is not None and cmd.kind is not CommandKind.VENT:
            await self._ack(cmd.cmd_id, previous.status, previous.reason, remember=False)
            return
        if cmd.kind is CommandKind.START:
            await self._start(cmd, now)
        elif cmd.kind is CommandKind.STOP:
            session_id = self.session_id
            self.model.stop(now)
            ended = self._end_session()
            await self._ack(cmd.cmd_id, AckStatus.DONE)
            if session_id is not None:
                await self._event(EventKind.SESSION_STOPPED, session_id=session_id,
                                  detail=cmd.reason)
            if ended:
                await self._publish_state()
        else:
            session_id = self.session_id
            self.model.vent(now)
            ended = self._end_session()
            await self._ack(cmd.cmd_id, AckStatus.DONE)
            await self._event(EventKind.VENTED, session_id=session_id, detail=cmd.reason)
            if ended:
                await self._publish_state()

    def _start_refusal(self, cmd: Command, now: float) -> str | None:
        assert cmd.program is not None
        if cmd.expires_at is not None and self.device_time(now) > cmd.expires_at:
            return "expired"  # judged on the boot's own (possibly skewed) wall clock
        if self.model.in_session:
            return "busy"
        n = len(cmd.program.targets_mmhg)
        if n != self.chambers:
            return f"program has {n} chamber targets, boot has {self.chambers} chambers"
        for i, target in enumerate(cmd.program.targets_mmhg, start=1):
            if target > self.max_pressure_mmhg:
                return (
                    f"chamber {i} target {target:g} mmHg above boot maximum "
                    f"{self.max_pressure_mmhg:g} mmHg"
                )
        return None

    async def _start(self, cmd: Command, now: float) -> None:
        reason = self._start_refusal(cmd, now)
        if reason is not None:
            log.info(
                "start rejected",
                extra={"boot": self.key, "cmd_id": cmd.cmd_id, "reason": reason},
            )
            await self._ack(cmd.cmd_id, AckStatus.REJECTED, reason)
            return
        assert cmd.program is not None and cmd.session_id is not None
        self.model.start(cmd.program, now)
        self.session_id = cmd.session_id
        self._start_cmd_id = cmd.cmd_id
        self._active = ActiveSession(session_id=cmd.session_id, cmd_id=cmd.cmd_id,
                                     program=cmd.program, started_at=self.device_time(now))
        self._notify()
        await self._ack(cmd.cmd_id, AckStatus.ACCEPTED)
        await self._event(EventKind.SESSION_STARTED, session_id=cmd.session_id,
                          detail=cmd.program.name)
        await self._publish_state()

    # ------------------------------------------------------------------ publishing

    async def _ack(
        self, cmd_id: str, status: AckStatus, reason: str | None = None, *, remember: bool = True
    ) -> None:
        ack = Ack(cmd_id=cmd_id, status=status, ts=self.device_time(), reason=reason)
        if remember:
            self._seen[cmd_id] = ack
            self._seen.move_to_end(cmd_id)
            while len(self._seen) > _SEEN_CMDS:
                self._seen.popitem(last=False)
        self.acks_sent.append(ack)
        self._notify()
        await self._send(Channel.ACK, ack.to_payload())

    async def _event(
        self, kind: EventKind, *, session_id: str | None = None, detail: str | None = None
    ) -> None:
        ev = BootEvent(kind=kind, ts=self.device_time(), session_id=session_id,
                       detail=detail)
        self.events_sent.append(ev)
        self._notify()
        await self._send(Channel.EVENT, ev.to_payload())

    async def _send(self, channel: Channel, payload: bytes) -> None:
        """Publish an ack/event; if offline or failing, keep it for after the reconnect."""
        client = self._client
        if client is None:
            self._outbox.append((channel, payload))
            return
        try:
            async with self._publish_lock:
                await client.publish(
                    self._topics[channel], payload, qos=CHANNEL_QOS[channel],
                    retain=CHANNEL_RETAIN[channel], timeout=_PUBLISH_TIMEOUT_S,
                )
        except aiomqtt.MqttError as exc:
            log.warning(
                "publish failed, queued for reconnect",
                extra={"boot": self.key, "channel": channel.value, "error": str(exc)},
            )
            self._outbox.append((channel, payload))

    async def _publish_state(self) -> None:
        """Republish the retained online state after a session starts or ends.

        Built under the publish lock, so whichever publish comes last carries the newest
        session. Never queued while offline: the reconnect publishes the then-current state.
        """
        client = self._client
        if client is None:
            return
        try:
            async with self._publish_lock:
                if self._client is not client:
                    return  # going offline: online=false is (being) published
                await client.publish(
                    self._topics[Channel.STATE], self.state_payload(online=True),
                    qos=CHANNEL_QOS[Channel.STATE], retain=CHANNEL_RETAIN[Channel.STATE],
                    timeout=_PUBLISH_TIMEOUT_S,
                )
                self.state_publishes += 1
        except aiomqtt.MqttError as exc:
            log.warning("state not published", extra={"boot": self.key, "error": str(exc)})
        finally:
            self._notify()

    async def _flush_outbox(self) -> None:
        """Send what queued up while offline, in order; failures go back to the outbox."""
        pending = list(self._outbox)
        self._outbox.clear()
        for channel, payload in pending:
            await self._send(channel, payload)
