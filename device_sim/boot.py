"""One simulated boot: its firmware behind a real MQTT v5 connection, speaking the contract.

A `SimBoot` behaves like a boot would: retained state + LWT, commands in, acks/events/telemetry
out. It also records what it saw and offers awaitables (built on an asyncio.Event, never sleeps)
so integration tests can wait for "this boot got a vent" or "the session completed".

The firmware is a pure state machine beside it, `BootFirmware` in device_sim/firmware.py
(`self.fw`): it owns the physics model, the session, `seq`, the duplicate-cmd_id memory, the
heartbeat bookkeeping and the boot's own safety duty (docs/protocol.md §7.2: a session vents
itself when the gateway's heartbeat stops or the MQTT connection drops), and answers every
command, heartbeat and tick with the messages to send. This module is the link around it:
connect and reconnect with backoff, subscribe, the retained state and LWT, the publish lock,
the outbox for acks/events produced while offline, the telemetry ticker, and the record the
probes wait on. Properties here (`session_id`, `model`, `self_vents`, ...) read the firmware.

Fault switches (`inject_*`, `set_*`, `drop_connection`, `publish_malformed`) make the boot
misbehave in one specific way each, so every rule of the gateway's safety watchdog can be
exercised; `clear_faults()` undoes them all. They live in device_sim/boot_faults.py
(`BootFaults`, a mixin like the probe waits in device_sim/boot_probes.py) and each acts where
it would on a real boot: on the model (valves, overrun), on the firmware (clock skew, a hang
that ignores vents, silence), on the sensors' readings as they go out (spikes, dead sensors,
a missing chamber) or on the link (a dropped connection, garbage on a topic).
`device_sim.faults` drives them from a scenario's fault plan and records each one in
`faults_injected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, TypedDict

import aiomqtt
from pydantic import ValidationError

# BootFaults is the mixin; the rest, like SELF_VENT_* and zones_for from the firmware, is
# re-exported (device_sim.faults and tests import it from here).
from device_sim.boot_faults import (  # noqa: F401
    MALFORMED_KINDS,
    TOO_LARGE_BYTES,
    BootFaults,
    MalformedKind,
    malformed_telemetry,
)
from device_sim.boot_probes import BootProbes
from device_sim.firmware import (  # noqa: F401
    SELF_VENT_CONNECTION,
    SELF_VENT_HEARTBEAT,
    BootFirmware,
    Outgoing,
    zones_for,
)
from device_sim.link_settings import NO_DELAY, BootLink
from device_sim.physics import BootModel
from gateway.boot_credentials import BootCredentials
from gateway.contract import (
    CHANNEL_QOS,
    CHANNEL_RETAIN,
    HEARTBEAT_TOPIC,
    Ack,
    ActiveSession,
    BootEvent,
    Channel,
    Command,
    CommandKind,
    Heartbeat,
    PayloadError,
    Telemetry,
    clinic_heartbeat_topic,
    decode,
    topic,
)
from gateway.mqtt_internals import publish_qos0_now, without_topic_callbacks
from gateway.mqtt_tls import client_security

log = logging.getLogger(__name__)

MAX_CMD_BYTES = 65536
# Acks/events produced while offline wait here and go out after the reconnect.
_OUTBOX_MAX = 1000
_PUBLISH_TIMEOUT_S = 5.0
_OFFLINE_PUBLISH_TIMEOUT_S = 2.0


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


class SimBoot(BootFaults, BootProbes):
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
        heartbeat: Literal["clinic", "fleet"] = "clinic",
    ) -> None:
        """heartbeat: which gateway heartbeat the boot times out on (protocol §5.1): its
        clinic's (revision 2, the default) or the fleet-wide one (revision 1).

        self_vent: in a session, vent when no live gateway heartbeat arrived for
        `heartbeat_timeout_s` (None: derived from the last heartbeat's interval_s, protocol
        §7.2) or when the MQTT connection drops. On by default, as firmware must; switch it off
        for tests that run sessions without a gateway.

        client_id, username, password: the boot's own broker account (`boot-gateway boots
        add`), which binds the client id to the username: give the one it was provisioned
        with. Defaults: client id `sim-{clinic}-{device}`; with a password and no username the
        username is the device id (protocol §3.2); with neither, `mqtt`'s username/password."""
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
        self.clock = clock
        # One generator for the model's noise and the ticker's phase: one seed, one trace.
        self._rng = random.Random(seed)
        self.fw = BootFirmware(
            key=self.key, chambers=chambers, max_pressure_mmhg=max_pressure_mmhg,
            telemetry_period_s=telemetry_period_s, version=firmware, rng=self._rng,
            heartbeat_timeout_s=heartbeat_timeout_s, self_vent=self_vent,
        )
        self._topics = {ch: topic(clinic, device, ch) for ch in Channel}
        self.heartbeat_topic = (clinic_heartbeat_topic(clinic) if heartbeat == "clinic"
                                else HEARTBEAT_TOPIC)

        self._init_faults()  # device_sim/boot_faults.py

        # Counters and records (read by tests and the fleet runner).
        self.telemetry_sent = 0
        self.telemetry_sent_by_session: dict[str, int] = {}
        self.commands_received: list[Command] = []
        self.vents_received = 0
        self.vent_received_at: float | None = None  # the first one
        self.vents_received_at: list[float] = []
        self.spikes_published_at: list[float] = []
        self.state_publishes = 0
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
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ public state

    @property
    def connected(self) -> bool:
        return self._client is not None

    # What the firmware knows, read through (tests and the runner look at the boot).
    @property
    def firmware(self) -> str:
        """The firmware version the state announces."""
        return self.fw.version

    @property
    def model(self) -> BootModel:
        """The physics model the firmware drives (the faults on valves act on it)."""
        return self.fw.model

    @property
    def in_session(self) -> bool:
        return self.fw.in_session

    @property
    def session_id(self) -> str | None:
        return self.fw.session_id

    @property
    def session(self) -> ActiveSession | None:
        """The running session as the retained state announces it."""
        return self.fw.session

    @property
    def heartbeat_timeout_s(self) -> float | None:
        """The configured heartbeat-loss timeout (None: derived from the interval)."""
        return self.fw.heartbeat_timeout_s

    @property
    def self_vent(self) -> bool:
        return self.fw.self_vent

    @property
    def effective_heartbeat_timeout_s(self) -> float:
        """How long a session survives without a live heartbeat (protocol §7.2)."""
        return self.fw.effective_heartbeat_timeout_s

    @property
    def last_heartbeat_at(self) -> float | None:
        """Clock time of the last heartbeat that arrived live (retained ones prove nothing)."""
        return self.fw.last_heartbeat_at

    @property
    def heartbeat_interval_s(self) -> float | None:
        """interval_s of the last heartbeat seen, retained or not: it sizes the timeout."""
        return self.fw.heartbeat_interval_s

    @property
    def heartbeats_received(self) -> int:
        return self.fw.heartbeats_received

    @property
    def self_vents(self) -> int:
        return self.fw.self_vents

    @property
    def self_vents_at(self) -> list[tuple[float, str]]:
        """(clock time, cause) of every self-vent, for the report."""
        return self.fw.self_vents_at

    @property
    def sessions_completed(self) -> int:
        return self.fw.sessions_completed

    @property
    def clock_skew_s(self) -> float:
        """Offset of the boot's wall clock (set_clock_skew, step_clock)."""
        return self.fw.clock_skew_s

    def device_time(self, now: float | None = None) -> float:
        """The boot's own wall clock: true time plus the injected skew and steps."""
        return self.fw.device_time(self.clock() if now is None else now)

    def state_payload(self, online: bool) -> bytes:
        """The retained state; the session only while online (the LWT never carries one)."""
        return self.fw.state(online, self.clock()).to_payload()

    # ------------------------------------------------------------------ test / runner hooks

    async def press_stop(self) -> None:
        """The user's stop button (numbness, pain): the session stops and USER_STOP is sent."""
        out = self.fw.press_stop(self.clock())
        self._notify()
        await self._emit(out)

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
                if was_connected:
                    # Protocol §7.2: in a session the firmware vents, the gateway cannot
                    # reach us any more; the event goes out from the outbox after the reconnect.
                    out = self.fw.connection_lost(self.clock())
                    self._notify()
                    await self._emit(out)
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
        heartbeat = self.heartbeat_topic

        class HeartbeatFirst(asyncio.Queue[aiomqtt.Message]):
            def put_nowait(self, item: aiomqtt.Message) -> None:
                if item.topic.value == heartbeat:
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
            await client.subscribe(self.heartbeat_topic, qos=0)
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
        self.fw.on_heartbeat(hb, retained=retained, now=self.clock())
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
        """The firmware's tick (completion, heartbeat-loss self-vent, the sample), sent."""
        now = self.clock()
        out = self.fw.sample(now)
        self._notify()
        await self._emit(out)

    async def _publish_telemetry(self, msg: Telemetry) -> None:
        """Put the firmware's sample on the wire, with the sensor faults applied to it."""
        client = self._client
        if client is None:
            return  # a pending spike waits for the next sample that is really published
        session_id = msg.session_id
        pressures = list(msg.pressures)
        for chamber, reading in self._dropouts.items():
            pressures[chamber] = reading
        spikes, self._spikes = self._spikes, {}
        for chamber, value in spikes.items():
            pressures[chamber] = value
        if self._count_mismatch:
            pressures = pressures[:-1]  # drops a spike on the last chamber, too
        if spikes or self._dropouts or self._count_mismatch:
            msg = Telemetry(**{**msg.model_dump(), "pressures": pressures})
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
            # Safety first: count before the firmware or any publishing sees it.
            self.vents_received += 1
            self.vents_received_at.append(now)
            if self.vent_received_at is None:
                self.vent_received_at = now
        self._notify()
        log.info(
            "command received",
            extra={"boot": self.key, "cmd_id": cmd.cmd_id, "cmd": cmd.kind.value},
        )
        out = self.fw.handle(cmd, now)
        self._notify()
        await self._emit(out)

    # ------------------------------------------------------------------ publishing

    async def _emit(self, out: list[Outgoing]) -> None:
        """Send what the firmware returned, one message after the other in its order."""
        for msg in out:
            m = msg.message
            # Acks and events are recorded before their send (also when it is queued while
            # offline), so the probes see them at once.
            if isinstance(m, Ack):
                self.acks_sent.append(m)
                self._notify()
                await self._send(msg.channel, m.to_payload())
            elif isinstance(m, BootEvent):
                self.events_sent.append(m)
                self._notify()
                await self._send(msg.channel, m.to_payload())
            elif isinstance(m, Telemetry):
                await self._publish_telemetry(m)
            else:  # the state: built afresh under the publish lock, see _publish_state
                await self._publish_state()

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
