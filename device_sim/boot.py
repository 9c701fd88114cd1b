"""One simulated boot: the physics model behind a real MQTT v5 connection, speaking the contract.

A `SimBoot` behaves like firmware would: retained state + LWT, commands in, acks/events/telemetry
out. It also records what it saw and offers awaitables (built on an asyncio.Event, never sleeps)
so integration tests can wait for "this boot got a vent" or "the session completed".

Fault switches (`inject_*`, `set_*`, `drop_connection`, `publish_malformed`) make the boot
misbehave in one specific way each, so every rule of the gateway's safety watchdog can be
exercised; `clear_faults()` undoes them all. They live in device_sim/boot_faults.py
(`BootFaults`, a mixin like the probe waits in device_sim/boot_probes.py); this module keeps
the firmware that obeys them and the MQTT link. `device_sim.faults` drives them from a
scenario's fault plan and records each one in `faults_injected`.
Like firmware, the boot also does its own safety duty (docs/protocol.md §7.2): in a session it
vents itself when the gateway's heartbeat stops or the MQTT connection drops. The pure
decisions (start refusals, the heartbeat timeout, when a session has outlived it) are in
device_sim/firmware.py; this class gathers the state they need and publishes the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TypedDict

import aiomqtt
from pydantic import ValidationError

# BootFaults is the mixin; the rest is re-exported (device_sim.faults and tests use it here).
from device_sim.boot_faults import (  # noqa: F401
    MALFORMED_KINDS,
    TOO_LARGE_BYTES,
    BootFaults,
    MalformedKind,
    malformed_telemetry,
)
from device_sim.boot_probes import BootProbes
from device_sim.firmware import (
    SELF_VENT_CONNECTION,
    SELF_VENT_HEARTBEAT,
    heartbeat_lost,
    heartbeat_timeout_s,
    start_refusal,
)
from device_sim.link_settings import NO_DELAY, BootLink
from device_sim.physics import BootModel
from gateway.boot_credentials import BootCredentials
from gateway.contract import (
    CHANNEL_QOS,
    CHANNEL_RETAIN,
    HEARTBEAT_TOPIC,
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
from gateway.mqtt_internals import publish_qos0_now, without_topic_callbacks
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


def zones_for(chambers: int) -> list[str]:
    """Zone label per chamber, distal to proximal (BootState.zones)."""
    return (_ZONES + [f"zone{i + 1}" for i in range(len(_ZONES), chambers)])[:chambers]


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
    def in_session(self) -> bool:
        return self.model.in_session

    @property
    def session(self) -> ActiveSession | None:
        """The running session as the retained state announces it."""
        return self._active

    @property
    def effective_heartbeat_timeout_s(self) -> float:
        """How long a session survives without a live heartbeat (protocol §7.2)."""
        return heartbeat_timeout_s(self.heartbeat_timeout_s, self.heartbeat_interval_s)

    def device_time(self, now: float | None = None) -> float:
        """The boot's own wall clock: true time plus the injected skew and steps."""
        return (self.clock() if now is None else now) + self.clock_skew_s


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
        if not self.self_vent:
            return False
        return heartbeat_lost(
            now, in_session=self.model.in_session,
            session_elapsed_s=self.model.session_elapsed(now),
            last_heartbeat_at=self.last_heartbeat_at,
            timeout_s=self.effective_heartbeat_timeout_s)

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
        return start_refusal(
            cmd, device_now=self.device_time(now), in_session=self.model.in_session,
            chambers=self.chambers, max_pressure_mmhg=self.max_pressure_mmhg)

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
