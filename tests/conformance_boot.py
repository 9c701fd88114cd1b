"""A conformance boot written from docs/protocol.md only (contract v1).

It imports nothing from the gateway or from device_sim: every topic, payload and flow below is
built from the document, section by section, so that the gateway can be tested against the
contract rather than against its own model of it.

The boot is a small asyncio class over aiomqtt (MQTT 5). Its behaviour is configurable so that
tests can reproduce what a real firmware may legitimately do: a slow or missing ack, a
rejection with a reason, a clock that is off, any telemetry period, scripted pressures, a
reboot, a clean or an unclean disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

# §1 and §2
TOPIC_ROOT = "boots/v1"
HEARTBEAT_TOPIC = f"{TOPIC_ROOT}/_gateway/heartbeat"
ALARM_TOPIC_PREFIX = f"{TOPIC_ROOT}/_gateway/alarm"
MAX_PAYLOAD_BYTES = 16384
QOS = {"state": 1, "telemetry": 0, "event": 1, "cmd": 1, "ack": 1}
RETAIN = {"state": True, "telemetry": False, "event": False, "ack": False}
# §7.2: before the first heartbeat assume 2 s; timeout 3 x interval, never below 5 s
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
SAFE_LEVEL_MMHG = 1.0  # the boot's own "near atmospheric" level when deflating or venting


def dumps(obj: Any) -> bytes:
    """JSON as §4 wants it; NaN/Infinity come out as the JSON extensions allowed in pressures."""
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class Received:
    """A message the boot received, with the broker-delivered properties."""

    topic: str
    payload: dict[str, Any]
    qos: int
    retain: bool
    properties: Properties | None
    arrived: float  # time.monotonic() at arrival

    @property
    def message_expiry(self) -> int | None:
        if self.properties is None:
            return None
        return getattr(self.properties, "MessageExpiryInterval", None)


@dataclass
class BootSession:
    session_id: str
    cmd_id: str
    program: dict[str, Any]
    started_at: float  # device clock
    started_mono: float

    def elapsed(self) -> float:
        return time.monotonic() - self.started_mono


@dataclass
class Sent:
    channel: str
    payload: dict[str, Any] | bytes
    at: float  # time.monotonic()


@dataclass
class BootBehaviour:
    """What the firmware does; every field can be changed by a test while the boot runs."""

    ack_delay_s: float = 0.0
    # accept (or reject) a start only once the boot's clock reaches issued_at + this
    ack_at_issued_plus_s: float | None = None
    never_ack: bool = False
    reject_reason: str | None = None  # reject every start with this reason
    run_sessions: bool = True  # False: accept, then stay in the session without progressing
    telemetry: bool = True  # publish telemetry at all
    self_vent_on_heartbeat_loss: bool = True
    deflate_rate_mmhg_s: float = 400.0  # 0: stuck valves, a vent never brings pressure down
    # unknown fields added to every payload the boot publishes (§4: receivers ignore them)
    extra_fields: dict[str, Any] = field(default_factory=dict)


class ConformanceBoot:
    """One boot: connect (§3.1), publish (§4), obey commands (§6), own safety duties (§7)."""

    def __init__(self, host: str, port: int, clinic: str, device: str, *,
                 chambers: int = 4, zones: Sequence[str] | None = None,
                 firmware: str = "conf-1.0", max_pressure_mmhg: float = 120.0,
                 telemetry_period_s: float = 0.25, clock_offset_s: float = 0.0,
                 keepalive_s: int = 10, behaviour: BootBehaviour | None = None) -> None:
        self.host, self.port = host, port
        self.clinic, self.device = clinic, device
        self.chambers = chambers
        default_zones = ["foot", "ankle", "calf", "thigh", "hip"]
        self.zones = list(zones) if zones is not None else [
            default_zones[i] if i < len(default_zones) else f"zone{i}" for i in range(chambers)]
        self.firmware = firmware
        self.max_pressure_mmhg = max_pressure_mmhg
        self.telemetry_period_s = telemetry_period_s
        self.clock_offset_s = clock_offset_s
        self.keepalive_s = keepalive_s
        self.behaviour = behaviour or BootBehaviour()
        self.client_id = f"boot-{clinic}-{device}"

        self.seq = 0
        self.phase = "idle"
        self.pressures: list[float] = [0.0] * chambers
        self.session: BootSession | None = None
        self.last_session_ids: list[str] = []
        self._deflating_to: str | None = None  # phase after a deflate/vent: event to send
        self._pending_completion: BootSession | None = None
        self._script: list[list[float]] = []
        self._script_done: list[asyncio.Future[float]] = []
        self._acks: dict[str, dict[str, Any]] = {}  # cmd_id -> last ack sent (§6.1 duplicates)
        self._seen_cmds: set[str] = set()

        self.commands: list[Received] = []
        self.heartbeats: list[Received] = []
        self.sent: list[Sent] = []
        self.self_vents: list[str] = []
        self._changed = asyncio.Condition()
        self._last_heartbeat_mono: float | None = None
        self._heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self._session_start_mono: float | None = None

        self._client: aiomqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self.connected = False

    # ---- topics and clocks ----------------------------------------------------------------

    def topic(self, channel: str) -> str:
        return f"{TOPIC_ROOT}/{self.clinic}/{self.device}/{channel}"

    def now(self) -> float:
        """The device clock (§4: unix seconds), offset to simulate a clock that is off."""
        return time.time() + self.clock_offset_s

    # ---- payloads (§4) --------------------------------------------------------------------

    def state_payload(self, online: bool, with_session: bool = True) -> dict[str, Any]:
        state: dict[str, Any] = {
            "online": online, "firmware": self.firmware, "chambers": self.chambers,
            "zones": self.zones, "max_pressure_mmhg": self.max_pressure_mmhg,
            "telemetry_period_s": self.telemetry_period_s, "ts": self.now(),
        }
        if online and with_session and self.session is not None:
            state["session"] = {
                "session_id": self.session.session_id, "cmd_id": self.session.cmd_id,
                "program": self.session.program, "started_at": self.session.started_at,
            }
        return state

    def telemetry_payload(self, pressures: Sequence[float]) -> dict[str, Any]:
        msg: dict[str, Any] = {"seq": self.seq, "ts": self.now(), "phase": self.phase,
                               "pressures": list(pressures)}
        if self.session is not None:
            msg["session_id"] = self.session.session_id
            msg["session_elapsed_s"] = round(self.session.elapsed(), 3)
        return msg

    # ---- connection (§3.1) ----------------------------------------------------------------

    async def connect(self) -> None:
        will = aiomqtt.Will(self.topic("state"), dumps(self.state_payload(online=False)),
                            qos=1, retain=True)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        client = aiomqtt.Client(self.host, self.port, identifier=self.client_id,
                                protocol=aiomqtt.ProtocolVersion.V5, clean_start=True,
                                will=will, keepalive=self.keepalive_s, properties=props,
                                timeout=5)
        await client.__aenter__()
        self._client = client
        self.connected = True
        self._tasks = [asyncio.create_task(self._rx(client)),
                       asyncio.create_task(self._tick())]
        await client.subscribe(self.topic("cmd"), qos=1)
        await client.subscribe(HEARTBEAT_TOPIC, qos=1)  # qos 1 so the gateway's qos shows
        await self.publish("state", self.state_payload(online=True))

    async def disconnect(self) -> None:
        """Deliberate disconnect (§3.1.4): state online:false (retained), then DISCONNECT."""
        if self._client is None:
            return
        await self.publish("state", self.state_payload(online=False))
        await self._stop_tasks()
        client, self._client = self._client, None
        self.connected = False
        await client.__aexit__(None, None, None)

    async def drop(self) -> None:
        """Unclean loss of the connection (power, network): no DISCONNECT, the broker sends
        the will."""
        if self._client is None:
            return
        client, self._client = self._client, None
        self.connected = False
        sock = client._client.socket()  # the only way to lose a connection without DISCONNECT
        await self._stop_tasks()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await asyncio.shield(client._disconnected)
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)

    async def reboot(self, mode: str = "takeover") -> None:
        """A firmware reboot: volatile state is lost, seq restarts at 0 (§4.2), the boot comes
        back idle and publishes its state without a session.

        mode "takeover": the boot reconnects with the same client id while the broker still
        holds the old connection (power cycle faster than the keep-alive; §3.2: the second
        connection disconnects the first). "drop": the old connection is lost first.
        "in_place": only the application firmware restarts; the MQTT connection (kept by a
        network co-processor) survives, so no will is published."""
        if mode == "in_place":
            self._reset_volatile()
            await self.publish("state", self.state_payload(online=True))
            return
        old = self._client
        if mode == "drop":
            await self.drop()
            old = None
        else:
            await self._stop_tasks()
        self._client = None
        self.connected = False
        self._reset_volatile()
        await self.connect()
        if old is not None:
            # the broker has taken the old connection over; discard its client
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await asyncio.shield(old._disconnected)
            with contextlib.suppress(Exception):
                await old.__aexit__(None, None, None)

    def _reset_volatile(self) -> None:
        self.seq = 0
        self.phase = "idle"
        self.pressures = [0.0] * self.chambers
        self.session = None
        self._deflating_to = None
        self._pending_completion = None
        self._script.clear()
        for fut in self._script_done:
            fut.cancel()
        self._script_done.clear()
        self._acks.clear()
        self._seen_cmds.clear()
        self._last_heartbeat_mono = None
        self._heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S

    async def _stop_tasks(self) -> None:
        tasks = [*self._tasks, *self._handlers]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._handlers.clear()

    async def __aenter__(self) -> ConformanceBoot:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.disconnect()
        await self._stop_tasks()

    # ---- publishing -----------------------------------------------------------------------

    async def publish(self, channel: str, payload: dict[str, Any]) -> None:
        assert self._client is not None, "boot is not connected"
        data = dumps({**payload, **self.behaviour.extra_fields})
        assert len(data) <= MAX_PAYLOAD_BYTES
        await self._client.publish(self.topic(channel), data, qos=QOS[channel],
                                   retain=RETAIN[channel])
        self.sent.append(Sent(channel, payload, time.monotonic()))
        await self._notify()

    async def publish_raw(self, channel: str, data: bytes, qos: int | None = None) -> None:
        """Anything at all on one of the boot's topics (bad-input tests); never retained."""
        assert self._client is not None, "boot is not connected"
        await self._client.publish(self.topic(channel), data,
                                   qos=QOS[channel] if qos is None else qos, retain=False)
        self.sent.append(Sent(channel, data, time.monotonic()))
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def ack(self, cmd_id: str, status: str, reason: str | None = None) -> None:
        payload: dict[str, Any] = {"cmd_id": cmd_id, "status": status, "ts": self.now()}
        if reason is not None:
            payload["reason"] = reason
        self._acks[cmd_id] = payload
        await self.publish("ack", payload)

    async def event(self, kind: str, session_id: str | None = None,
                    detail: str | None = None) -> None:
        payload: dict[str, Any] = {"kind": kind, "ts": self.now()}
        if session_id is not None:
            payload["session_id"] = session_id
        if detail is not None:
            payload["detail"] = detail
        await self.publish("event", payload)

    # ---- receiving ------------------------------------------------------------------------

    async def _rx(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                try:
                    payload = json.loads(message.payload)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    continue  # not JSON: nothing to act on
                if not isinstance(payload, dict):
                    continue
                received = Received(str(message.topic), payload, message.qos, message.retain,
                                    message.properties, time.monotonic())
                if received.topic == HEARTBEAT_TOPIC:
                    self._on_heartbeat(received)
                elif received.topic == self.topic("cmd"):
                    self.commands.append(received)
                    task = asyncio.create_task(self._on_command(received))
                    self._handlers.add(task)
                    task.add_done_callback(self._handlers.discard)
                await self._notify()

    def _on_heartbeat(self, hb: Received) -> None:
        self.heartbeats.append(hb)
        self._last_heartbeat_mono = hb.arrived  # §5.1: arrival on the boot's monotonic clock
        interval = hb.payload.get("interval_s")
        if isinstance(interval, int | float) and interval > 0:
            self._heartbeat_interval_s = float(interval)

    async def _on_command(self, cmd: Received) -> None:
        body = cmd.payload
        cmd_id = body.get("cmd_id")
        kind = body.get("kind")
        if not isinstance(cmd_id, str):
            return
        if cmd_id in self._seen_cmds:  # §6.1 duplicates: re-send the last ack, act no more
            last = self._acks.get(cmd_id)
            if last is not None:
                await self.publish("ack", {**last, "ts": self.now()})
            return
        self._seen_cmds.add(cmd_id)
        if kind == "vent":
            await self._cmd_vent(cmd_id)
        elif kind == "stop":
            await self._cmd_stop(cmd_id)
        elif kind == "start":
            await self._cmd_start(cmd_id, body)
        # unknown kinds: §4 says ignore what the boot does not know

    async def _cmd_vent(self, cmd_id: str) -> None:
        # §6.2 vent: never expires, always obeyed, idempotent; done when the valves are open
        ending = self.session
        self._start_deflating("vent")
        await self.ack(cmd_id, "done")
        if ending is not None:
            await self._end_session("vented", f"vent command {cmd_id}", ending)

    async def _cmd_stop(self, cmd_id: str) -> None:
        # §6.2 stop: done at once, deflate, session_stopped, idle; obeyed even if late
        ending = self.session
        await self.ack(cmd_id, "done")
        if ending is not None:
            self._start_deflating("deflate")
            await self._end_session("session_stopped", f"stop command {cmd_id}", ending)

    async def _cmd_start(self, cmd_id: str, body: dict[str, Any]) -> None:
        b = self.behaviour
        if b.ack_at_issued_plus_s is not None and isinstance(body.get("issued_at"), int | float):
            wait = body["issued_at"] + b.ack_at_issued_plus_s - self.now()
            if wait > 0:
                await asyncio.sleep(wait)  # simulated slow firmware, not synchronisation
        if b.ack_delay_s > 0:
            await asyncio.sleep(b.ack_delay_s)
        if b.never_ack:
            return
        reason = self._start_refusal(body)
        if reason is not None:
            await self.ack(cmd_id, "rejected", reason)
            return
        session = BootSession(body["session_id"], cmd_id, body["program"], self.now(),
                              time.monotonic())
        self.session = session
        self.last_session_ids = [*self.last_session_ids[-1:], session.session_id]
        self._deflating_to = None
        self._session_start_mono = time.monotonic()
        await self.ack(cmd_id, "accepted")
        await self.event("session_started", session.session_id)
        await self.publish("state", self.state_payload(online=True))

    def _start_refusal(self, body: dict[str, Any]) -> str | None:
        """§6.2: expired by the boot's own clock, busy, invalid, or the configured reason."""
        expires_at = body.get("expires_at")
        if isinstance(expires_at, int | float) and self.now() > expires_at:
            return "expired"
        if self.behaviour.reject_reason is not None:
            return self.behaviour.reject_reason
        if self.session is not None:
            return "busy"
        program = body.get("program")
        session_id = body.get("session_id")
        if not isinstance(program, dict) or not isinstance(session_id, str):
            return "invalid: start without program or session_id"
        targets = program.get("targets_mmhg")
        if not isinstance(targets, list) or len(targets) != self.chambers:
            return "invalid: targets_mmhg needs one entry per chamber"
        if any(not isinstance(t, int | float) or t > self.max_pressure_mmhg for t in targets):
            return "invalid: target above max_pressure_mmhg"
        timing = program.get("timing")
        if not isinstance(timing, dict) or not isinstance(program.get("duration_s"), int | float):
            return "invalid: program without timing or duration"
        return None

    async def _end_session(self, kind: str, detail: str | None, session: BootSession) -> None:
        if self.session is session:
            self.session = None
        await self.event(kind, session.session_id, detail)
        await self.publish("state", self.state_payload(online=True))

    def _start_deflating(self, phase: str) -> None:
        self.phase = phase
        self._deflating_to = phase

    # ---- user actions ---------------------------------------------------------------------

    async def press_stop_button(self) -> None:
        """§4.3 user_stop: the user pressed the boot's stop button."""
        ending = self.session
        if ending is None:
            return
        self._start_deflating("deflate")
        await self._end_session("user_stop", "stop button", ending)

    async def play(self, samples: Sequence[Sequence[float]]) -> list[float]:
        """Publish these pressures as the next telemetry samples, one per period, verbatim.
        Returns the monotonic time each was published."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in samples]
        self._script.extend([list(s) for s in samples])
        self._script_done.extend(futures)
        return list(await asyncio.gather(*futures))

    # ---- the periodic loop: model, telemetry, self-vent -----------------------------------

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.telemetry_period_s)  # the boot's own telemetry timer
            now = time.monotonic()
            self._model(now - last)
            last = now
            await self._heartbeat_check()
            if self._script:
                sample = self._script.pop(0)
                done = self._script_done.pop(0)
                if len(sample) == self.chambers and all(math.isfinite(p) for p in sample):
                    self.pressures = list(sample)
                await self._send_telemetry(sample)
                if not done.done():
                    done.set_result(time.monotonic())
            elif self.behaviour.telemetry:
                await self._send_telemetry(self.pressures)
            await self._after_deflate()

    async def _send_telemetry(self, pressures: Sequence[float]) -> None:
        await self.publish("telemetry", self.telemetry_payload(pressures))
        self.seq += 1

    def _model(self, dt: float) -> None:
        if self._deflating_to is not None:
            drop = self.behaviour.deflate_rate_mmhg_s * dt
            self.pressures = [max(0.0, p - drop) for p in self.pressures]
            return
        s = self.session
        if s is None or not self.behaviour.run_sessions:
            if s is None:
                self.phase = "idle"
            return
        elapsed = s.elapsed()
        if elapsed >= float(s.program["duration_s"]):
            self._pending_completion = s
            self._start_deflating("deflate")
            return
        self.phase, self.pressures = cycle_state(s.program, self.chambers, elapsed)

    async def _after_deflate(self) -> None:
        if self._deflating_to is None or max(self.pressures) >= SAFE_LEVEL_MMHG:
            return
        self._deflating_to = None
        self.phase = "idle"
        done = self._pending_completion
        if done is not None and self.session is done:
            # §6.2: at the end of duration_s: deflate, session_completed, then ack done
            self._pending_completion = None
            self.session = None
            await self.event("session_completed", done.session_id)
            await self.publish("state", self.state_payload(online=True))
            await self.ack(done.cmd_id, "done")

    async def _heartbeat_check(self) -> None:
        """§7.2: in a session, vent when no new heartbeat arrived for 3 x interval (>= 5 s)."""
        s = self.session
        if s is None or not self.behaviour.self_vent_on_heartbeat_loss:
            return
        timeout = max(3 * self._heartbeat_interval_s, 5.0)
        since = self._last_heartbeat_mono
        if since is None or (self._session_start_mono or 0) > since:
            since = self._session_start_mono
        if since is not None and time.monotonic() - since > timeout:
            self._start_deflating("vent")
            self.self_vents.append(s.session_id)
            await self._end_session("vented", "gateway heartbeat lost", s)

    # ---- waiting on what the boot received ------------------------------------------------

    async def wait_command(self, predicate: Callable[[Received], bool] | str, timeout: float,
                           start: int = 0) -> Received:
        """The first command from index `start` that matches (a kind or a predicate)."""
        what = f"a {predicate} command" if isinstance(predicate, str) else "a command"
        if isinstance(predicate, str):
            kind = predicate
            predicate = lambda c: c.payload.get("kind") == kind  # noqa: E731
        found = await wait_on(self._changed, lambda: next(
            (c for c in self.commands[start:] if predicate(c)), None), timeout, what)
        assert isinstance(found, Received)
        return found

    async def wait_heartbeats(self, n: int, timeout: float) -> list[Received]:
        await wait_on(self._changed, lambda: len(self.heartbeats) >= n, timeout,
                      f"{n} heartbeats")
        return self.heartbeats[:n]

    async def wait_sent(self, predicate: Callable[[Sent], bool], timeout: float, what: str,
                        start: int = 0) -> Sent:
        """Something the boot itself published (e.g. its `done` ack at the session end)."""
        found = await wait_on(self._changed, lambda: next(
            (m for m in self.sent[start:] if predicate(m)), None), timeout, what)
        assert isinstance(found, Sent)
        return found


def cycle_state(program: dict[str, Any], chambers: int, elapsed: float
                ) -> tuple[str, list[float]]:
    """§9 cycle semantics: the phase and the pressure of each chamber at `elapsed`."""
    timing = program["timing"]
    targets = [float(t) for t in program["targets_mmhg"]]
    inflate, hold = float(timing["inflate_s"]), float(timing["hold_s"])
    deflate, pause = float(timing["deflate_s"]), float(timing["pause_s"])
    n = chambers
    cycle = n * inflate + hold + deflate + pause
    t = elapsed % cycle
    if t < n * inflate:
        pressures = [targets[i] * min(1.0, max(0.0, (t - i * inflate) / inflate))
                     for i in range(n)]
        return "inflate", pressures
    if t < n * inflate + hold:
        return "hold", targets
    if t < n * inflate + hold + deflate:
        frac = 1.0 - (t - n * inflate - hold) / deflate
        return "deflate", [p * frac for p in targets]
    return "pause", [0.0] * n


class Watcher:
    """A test-side MQTT 5 client (an operator or integration) watching some topics.

    It subscribes with Retain As Published, so the retain flag of each message is the
    publisher's, and with QoS 1, so the delivered QoS is the publisher's QoS when lower."""

    def __init__(self, host: str, port: int, topics: Sequence[str]) -> None:
        self.host, self.port, self.topics = host, port, list(topics)
        self.messages: list[Received] = []
        self._changed = asyncio.Condition()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        self._client = aiomqtt.Client(self.host, self.port,
                                      protocol=aiomqtt.ProtocolVersion.V5, clean_start=True,
                                      timeout=5)
        await self._client.__aenter__()
        self._task = asyncio.create_task(self._rx(self._client))
        for topic in self.topics:
            await self._client.subscribe(
                topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)

    async def _rx(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                try:
                    payload = json.loads(message.payload)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    payload = {"_raw": bytes(message.payload)}  # type: ignore[arg-type]
                if not isinstance(payload, dict):
                    payload = {"_value": payload}
                self.messages.append(Received(str(message.topic), payload, message.qos,
                                              message.retain, message.properties,
                                              time.monotonic()))
                async with self._changed:
                    self._changed.notify_all()

    async def publish(self, topic: str, data: bytes, qos: int = 1) -> None:
        """Publish anything anywhere (never retained): a duplicated command, a bad topic."""
        assert self._client is not None
        await self._client.publish(topic, data, qos=qos, retain=False)

    async def wait(self, predicate: Callable[[Received], bool], timeout: float, what: str,
                   start: int = 0) -> Received:
        return await wait_on(self._changed, lambda: next(
            (m for m in self.messages[start:] if predicate(m)), None), timeout, what)


async def wait_on(cond: asyncio.Condition, probe: Callable[[], Any], timeout: float,
                  what: str) -> Any:
    """Wait for `probe()` to become truthy, woken by `cond`; bounded by `timeout`."""
    try:
        async with asyncio.timeout(timeout), cond:
            while True:
                value = probe()
                if value:
                    return value
                await cond.wait()
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None
