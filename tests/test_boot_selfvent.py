"""The simulated boot's own safety duty and fault switches, against a real Mosquitto.

A plain aiomqtt client plays the gateway (heartbeats, commands, a record of what the boots
sent), so these tests depend on the device side only, not on the gateway under development.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import pytest

from device_sim.boot import SELF_VENT_HEARTBEAT, SimBoot
from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalMosquitto
from gateway.contract import (
    HEARTBEAT_TOPIC,
    Ack,
    AckStatus,
    BootEvent,
    BootState,
    Channel,
    Command,
    CommandKind,
    EventKind,
    Heartbeat,
    Mode,
    Phase,
    ProgramTiming,
    SessionProgram,
    Telemetry,
    clinic_heartbeat_topic,
    decode,
    parse_topic,
    topic,
)
from gateway.settings import MqttSettings

pytestmark = pytest.mark.integration

HB_TIMEOUT_S = 1.0
HB_INTERVAL_S = 0.2
PERIOD_S = 0.05


def program(duration_s: float = 60.0) -> SessionProgram:
    return SessionProgram(
        name="selfvent_test", mode=Mode.SEQUENTIAL, targets_mmhg=[60.0, 58.0, 56.0, 54.0],
        duration_s=duration_s,
        timing=ProgramTiming(inflate_s=0.2, hold_s=0.4, deflate_s=0.4, pause_s=0.2),
    )


def command(kind: CommandKind, session_id: str | None = None,
            prog: SessionProgram | None = None) -> Command:
    now = time.time()
    return Command(
        cmd_id=f"c-{secrets.token_hex(4)}", kind=kind, issued_at=now,
        expires_at=now + 10 if kind is CommandKind.START else None,
        session_id=session_id, program=prog,
    )


@dataclass(frozen=True)
class Received:
    device: str
    channel: Channel
    payload: bytes
    at: float  # event-loop time of arrival

    def event(self) -> BootEvent:
        return BootEvent.model_validate_json(self.payload)

    def ack(self) -> Ack:
        return Ack.model_validate_json(self.payload)

    def data(self) -> Any:
        return json.loads(self.payload)  # NaN/Infinity tokens parse, as in the gateway


class FakeGateway:
    """Stand-in for the gateway: sends heartbeats and commands, records events, acks, telemetry."""

    def __init__(self, client: aiomqtt.Client, clinic: str) -> None:
        self.client = client
        # The heartbeat a boot of protocol revision 2 times out on: its clinic's (§5.1).
        self.heartbeat_topic = clinic_heartbeat_topic(clinic)
        self.received: list[Received] = []
        self.last_heartbeat_sent: float | None = None
        self._changed = asyncio.Event()
        self._beat: asyncio.Task[None] | None = None

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        async for message in self.client.messages:
            addr = parse_topic(message.topic.value)
            payload = message.payload
            assert isinstance(payload, bytes)
            self.received.append(Received(addr.device, addr.channel, payload, loop.time()))
            self._changed.set()
            self._changed = asyncio.Event()

    async def watch(self, clinic: str, device: str) -> None:
        for channel in (Channel.EVENT, Channel.ACK, Channel.TELEMETRY):
            await self.client.subscribe(topic(clinic, device, channel), qos=1)

    def start_heartbeats(self, interval_s: float = HB_INTERVAL_S, *,
                         topic_: str | None = None) -> None:
        """topic_: where to beat (default the clinic's; HEARTBEAT_TOPIC: the fleet-wide one)."""
        where = topic_ or self.heartbeat_topic

        async def beat() -> None:
            loop = asyncio.get_running_loop()
            while True:
                hb = Heartbeat(ts=time.time(), gateway_id="fake-gw", interval_s=interval_s)
                await self.client.publish(where, hb.to_payload(), qos=0, retain=True)
                self.last_heartbeat_sent = loop.time()
                await asyncio.sleep(interval_s)  # pacing, not synchronisation

        self._beat = asyncio.create_task(beat())

    async def stop_heartbeats(self) -> float:
        """Stop beating; returns the loop time the last heartbeat was sent."""
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
        assert self.last_heartbeat_sent is not None
        return self.last_heartbeat_sent

    async def send(self, boot: SimBoot, cmd: Command) -> None:
        await self.client.publish(topic(boot.clinic, boot.device, Channel.CMD),
                                  cmd.to_payload(), qos=1)

    async def wait_for(self, predicate: Callable[[Received], object], timeout: float = 5.0,
                       *, after: int = 0) -> Received:
        """First message (from index `after`) matching predicate; raises TimeoutError."""
        i = after
        async with asyncio.timeout(timeout):
            while True:
                while i < len(self.received):
                    r = self.received[i]
                    i += 1
                    if predicate(r):
                        return r
                await self._changed.wait()

    async def wait_event(self, boot: SimBoot, kind: EventKind, timeout: float = 5.0,
                         *, after: int = 0) -> Received:
        return await self.wait_for(
            lambda r: r.device == boot.device and r.channel is Channel.EVENT
            and r.event().kind is kind, timeout, after=after)

    async def wait_ack(self, boot: SimBoot, cmd_id: str, status: AckStatus,
                       timeout: float = 5.0) -> Received:
        return await self.wait_for(
            lambda r: r.device == boot.device and r.channel is Channel.ACK
            and r.ack().cmd_id == cmd_id and r.ack().status is status, timeout)

    def events(self, boot: SimBoot, kind: EventKind) -> list[BootEvent]:
        return [e for r in self.received
                if r.device == boot.device and r.channel is Channel.EVENT
                and (e := r.event()).kind is kind]


@contextlib.asynccontextmanager
async def fake_gateway(mosquitto: LocalMosquitto, clinic: str, devices: list[str]
                       ) -> AsyncIterator[FakeGateway]:
    async with aiomqtt.Client("127.0.0.1", mosquitto.port,
                              identifier=f"fake-gw-{secrets.token_hex(4)}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        gw = FakeGateway(client, clinic)
        for device in devices:
            await gw.watch(clinic, device)
        reader = asyncio.create_task(gw.read())
        try:
            yield gw
        finally:
            if gw._beat is not None:
                await gw.stop_heartbeats()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            # Leave no retained heartbeat behind for later tests' boots.
            await client.publish(HEARTBEAT_TOPIC, b"", qos=1, retain=True)
            await client.publish(gw.heartbeat_topic, b"", qos=1, retain=True)


async def read_retained_state(mosquitto: LocalMosquitto, boot: SimBoot) -> BootState:
    """What a gateway starting now would learn: the retained state, from a fresh client."""
    async with aiomqtt.Client("127.0.0.1", mosquitto.port,
                              identifier=f"reader-{secrets.token_hex(4)}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic(boot.clinic, boot.device, Channel.STATE), qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(client.messages))
        assert message.retain
        assert isinstance(message.payload, bytes)
        return BootState.model_validate_json(message.payload)


def new_clinic() -> str:
    return f"sv{secrets.token_hex(3)}"


def mqtt(mosquitto: LocalMosquitto) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=mosquitto.port)


# ------------------------------------------------------------------ heartbeat self-vent


async def test_boot_in_session_vents_itself_when_heartbeats_stop(
    mosquitto: LocalMosquitto,
) -> None:
    clinic = new_clinic()
    async with (
        fake_gateway(mosquitto, clinic, ["busy", "idle"]) as gw,
        SimFleet([(clinic, "busy"), (clinic, "idle")], mqtt(mosquitto),
                 telemetry_period_s=PERIOD_S, heartbeat_timeout_s=HB_TIMEOUT_S, seed=1) as fleet,
    ):
        busy, idle = fleet.boots[f"{clinic}/busy"], fleet.boots[f"{clinic}/idle"]
        gw.start_heartbeats()
        await fleet.wait_all(lambda b: b.heartbeats_received >= 2, timeout=5)
        start = command(CommandKind.START, "s-hb-1", program(duration_s=60.0))
        await gw.send(busy, start)
        await gw.wait_ack(busy, start.cmd_id, AckStatus.ACCEPTED)
        await busy.wait_until(lambda: max(busy.model.pressures) > 30.0, timeout=5)

        last_beat = await gw.stop_heartbeats()
        vented = await gw.wait_event(busy, EventKind.VENTED, timeout=HB_TIMEOUT_S + 3)
        ev = vented.event()
        assert ev.detail == SELF_VENT_HEARTBEAT and ev.session_id == "s-hb-1"
        # Not before the timeout, and within it plus a telemetry tick and delivery slack.
        assert HB_TIMEOUT_S - 0.05 <= vented.at - last_beat <= HB_TIMEOUT_S + 0.75
        assert busy.self_vents == 1 and not busy.in_session and busy.vents_received == 0
        # As the gateway sees it: telemetry shows the pressure down, outside any session.
        low = await gw.wait_for(
            lambda r: r.device == "busy" and r.channel is Channel.TELEMETRY
            and max(r.data()["pressures"]) < 10.0, timeout=5, after=len(gw.received))
        assert "session_id" not in low.data()
        assert low.data()["phase"] in (Phase.VENT, Phase.IDLE)

        # The idle boot lived through the same silence, twice the timeout, and did nothing.
        assert idle.last_heartbeat_at is not None
        last_seen = idle.last_heartbeat_at
        await idle.wait_until(lambda: idle.clock() - last_seen > 2 * HB_TIMEOUT_S, timeout=5)
        assert idle.self_vents == 0 and gw.events(idle, EventKind.VENTED) == []

        # The heartbeat coming back does not resume the session.
        seen = busy.heartbeats_received
        gw.start_heartbeats()
        await busy.wait_until(lambda: busy.heartbeats_received > seen, timeout=5)
        assert not busy.in_session and busy.self_vents == 1


async def test_the_fleet_wide_heartbeat_keeps_only_a_revision_1_boot_in_session(
    mosquitto: LocalMosquitto,
) -> None:
    """Protocol §5.1, revision 2: a boot times out on its clinic's heartbeat. Several
    gateways all send the fleet-wide one, which says some gateway lives, not that one
    watches this clinic; a revision-1 boot still counts it (§1, what it sees)."""
    clinic = new_clinic()
    async with (
        fake_gateway(mosquitto, clinic, ["rev2", "rev1"]) as gw,
        SimFleet([(clinic, "rev2")], mqtt(mosquitto), telemetry_period_s=PERIOD_S,
                 heartbeat_timeout_s=HB_TIMEOUT_S, seed=4) as rev2_fleet,
        SimFleet([(clinic, "rev1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S,
                 heartbeat_timeout_s=HB_TIMEOUT_S, seed=5, heartbeat="fleet") as rev1_fleet,
    ):
        rev2, rev1 = rev2_fleet.boots[f"{clinic}/rev2"], rev1_fleet.boots[f"{clinic}/rev1"]
        assert rev2.heartbeat_topic == clinic_heartbeat_topic(clinic)
        assert rev1.heartbeat_topic == HEARTBEAT_TOPIC
        gw.start_heartbeats(topic_=HEARTBEAT_TOPIC)  # nobody beats for the clinic
        await rev1.wait_until(lambda: rev1.heartbeats_received >= 2, timeout=5)
        for boot, sid in ((rev2, "s-rev2"), (rev1, "s-rev1")):
            start = command(CommandKind.START, sid, program(duration_s=60.0))
            await gw.send(boot, start)
            await gw.wait_ack(boot, start.cmd_id, AckStatus.ACCEPTED)
        vented = await gw.wait_event(rev2, EventKind.VENTED, timeout=HB_TIMEOUT_S + 3)
        assert vented.event().detail == SELF_VENT_HEARTBEAT
        assert rev2.heartbeats_received == 0
        # The revision-1 boot rode the same seconds on the fleet-wide heartbeat.
        assert rev1.in_session and rev1.self_vents == 0


async def test_boot_with_live_heartbeats_completes_without_self_vent(
    mosquitto: LocalMosquitto,
) -> None:
    clinic = new_clinic()
    async with (
        fake_gateway(mosquitto, clinic, ["b1"]) as gw,
        SimFleet([(clinic, "b1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S,
                 heartbeat_timeout_s=HB_TIMEOUT_S, seed=2) as fleet,
    ):
        boot = fleet.boots[f"{clinic}/b1"]
        gw.start_heartbeats()
        await boot.wait_until(lambda: boot.heartbeats_received >= 2, timeout=5)
        start = command(CommandKind.START, "s-live-1", program(duration_s=3 * HB_TIMEOUT_S))
        await gw.send(boot, start)
        await gw.wait_event(boot, EventKind.SESSION_COMPLETED, timeout=10)
        await gw.wait_ack(boot, start.cmd_id, AckStatus.DONE)
        assert boot.self_vents == 0 and boot.sessions_completed == 1
        assert gw.events(boot, EventKind.VENTED) == []


async def test_retained_heartbeat_is_not_proof_of_life(mosquitto: LocalMosquitto) -> None:
    """A dead gateway's last heartbeat stays retained; a boot must not take it as alive."""
    clinic = new_clinic()
    async with fake_gateway(mosquitto, clinic, ["b1"]) as gw:
        stale = Heartbeat(ts=time.time() - 3600, gateway_id="dead-gw", interval_s=0.3)
        await gw.client.publish(gw.heartbeat_topic, stale.to_payload(), qos=1, retain=True)
        async with SimFleet([(clinic, "b1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S,
                            heartbeat_timeout_s=HB_TIMEOUT_S, seed=3) as fleet:
            boot = fleet.boots[f"{clinic}/b1"]
            await boot.wait_until(lambda: boot.heartbeat_interval_s == 0.3, timeout=5)
            assert boot.last_heartbeat_at is None and boot.heartbeats_received == 0
            start = command(CommandKind.START, "s-stale-1", program())
            await gw.send(boot, start)
            accepted = await gw.wait_ack(boot, start.cmd_id, AckStatus.ACCEPTED)
            vented = await gw.wait_event(boot, EventKind.VENTED, timeout=HB_TIMEOUT_S + 3)
            assert vented.event().detail == SELF_VENT_HEARTBEAT
            # The session start counts as the reference: the full timeout, not an instant vent.
            assert vented.at - accepted.at >= HB_TIMEOUT_S - 0.05
            assert boot.self_vents == 1


async def test_self_vent_can_be_switched_off(mosquitto: LocalMosquitto) -> None:
    clinic = new_clinic()
    async with (
        fake_gateway(mosquitto, clinic, ["b1"]) as gw,
        SimFleet([(clinic, "b1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S,
                 heartbeat_timeout_s=0.3, self_vent=False, seed=4) as fleet,
    ):
        boot = fleet.boots[f"{clinic}/b1"]
        start = command(CommandKind.START, "s-off-1", program())
        await gw.send(boot, start)
        await gw.wait_ack(boot, start.cmd_id, AckStatus.ACCEPTED)
        # Telemetry reports the session time: wait for 5x the timeout of it, no heartbeat at all.
        await gw.wait_for(lambda r: r.device == "b1" and r.channel is Channel.TELEMETRY
                          and (r.data().get("session_elapsed_s") or 0) > 1.5, timeout=5)
        assert boot.in_session and boot.self_vents == 0


def test_heartbeat_timeout_derived_from_interval() -> None:
    """Protocol §7.2: 3 x interval_s of the last heartbeat, never under 5 s."""
    boot = SimBoot("c1", "d1", MqttSettings(host="127.0.0.1", port=1))
    assert boot.effective_heartbeat_timeout_s == 6.0  # gateway default 2 s until one is seen
    boot.on_heartbeat(Heartbeat(ts=1.0, gateway_id="gw", interval_s=0.2).to_payload(),
                      retained=True)
    assert boot.effective_heartbeat_timeout_s == 5.0
    assert boot.last_heartbeat_at is None and boot.heartbeats_received == 0
    boot.on_heartbeat(Heartbeat(ts=2.0, gateway_id="gw", interval_s=4.0).to_payload(),
                      retained=False)
    assert boot.effective_heartbeat_timeout_s == 12.0
    assert boot.last_heartbeat_at is not None and boot.heartbeats_received == 1
    boot.on_heartbeat(b"", retained=False)  # a cleared retained heartbeat: not a heartbeat
    boot.on_heartbeat(b'{"ts": 1, "gateway_id": "gw", "interval_s": -1}', retained=False)
    assert boot.heartbeats_received == 2 and boot.effective_heartbeat_timeout_s == 12.0
    fixed = SimBoot("c1", "d2", MqttSettings(host="127.0.0.1", port=1), heartbeat_timeout_s=1.5)
    fixed.on_heartbeat(Heartbeat(ts=1.0, gateway_id="gw", interval_s=4.0).to_payload(),
                       retained=False)
    assert fixed.effective_heartbeat_timeout_s == 1.5


# ------------------------------------------------------------------ retained state


@pytest.mark.parametrize("ending", ["completed", "stop", "vent", "user_stop", "self_vent"])
async def test_retained_state_carries_the_running_session(
    mosquitto: LocalMosquitto, ending: str
) -> None:
    clinic = new_clinic()
    duration = 2.0 if ending == "completed" else 60.0
    async with (
        fake_gateway(mosquitto, clinic, ["b1"]) as gw,
        SimFleet([(clinic, "b1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S,
                 heartbeat_timeout_s=HB_TIMEOUT_S, seed=5) as fleet,
    ):
        boot = fleet.boots[f"{clinic}/b1"]
        gw.start_heartbeats()
        before = await read_retained_state(mosquitto, boot)
        assert before.online and before.session is None

        published = boot.state_publishes
        start = command(CommandKind.START, "s-state-1", program(duration))
        sent_at = time.time()
        await gw.send(boot, start)
        await boot.wait_until(lambda: boot.state_publishes > published, timeout=5)
        running = await read_retained_state(mosquitto, boot)
        assert running.online and running.session is not None
        assert running.session.session_id == "s-state-1"
        assert running.session.cmd_id == start.cmd_id
        assert running.session.program == start.program
        assert sent_at <= running.session.started_at <= time.time()
        # The LWT stays as it was: offline, no session.
        assert BootState.model_validate_json(boot.state_payload(online=False)).session is None
        # Telemetry in the session carries the time into it.
        sample = await gw.wait_for(lambda r: r.device == "b1" and r.channel is Channel.TELEMETRY
                                   and r.data().get("session_id") == "s-state-1", timeout=5)
        assert 0 <= sample.data()["session_elapsed_s"] < duration

        published = boot.state_publishes
        if ending == "completed":
            await boot.wait_for_session_completed(timeout=10)
        elif ending == "stop":
            await gw.send(boot, command(CommandKind.STOP, "s-state-1"))
        elif ending == "vent":
            await gw.send(boot, command(CommandKind.VENT, "s-state-1"))
        elif ending == "user_stop":
            await boot.press_stop()
        else:
            await gw.stop_heartbeats()
            await boot.wait_for_self_vent(timeout=HB_TIMEOUT_S + 3)
        await boot.wait_until(lambda: not boot.in_session and boot.state_publishes > published,
                              timeout=10)
        after = await read_retained_state(mosquitto, boot)
        assert after.online and after.session is None
        idle = await gw.wait_for(lambda r: r.device == "b1" and r.channel is Channel.TELEMETRY
                                 and "session_id" not in r.data(), after=len(gw.received))
        assert "session_elapsed_s" not in idle.data()


# ------------------------------------------------------------------ fault switches


async def test_spikes_are_published_raw_and_timed(mosquitto: LocalMosquitto) -> None:
    clinic = new_clinic()
    async with (
        fake_gateway(mosquitto, clinic, ["b1"]) as gw,
        SimFleet([(clinic, "b1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S, seed=6) as fleet,
    ):
        boot = fleet.boots[f"{clinic}/b1"]
        for n, (value, token) in enumerate([(math.nan, b"NaN"), (math.inf, b"Infinity"),
                                            (-50.0, b"-50.0"), (500.0, b"500.0")], start=1):
            mark = len(gw.received)
            boot.inject_spike(1, value)
            spiked = await gw.wait_for(
                lambda r, token=token: r.device == "b1" and r.channel is Channel.TELEMETRY
                and token in r.payload, after=mark)
            p1 = spiked.data()["pressures"][1]
            assert math.isnan(p1) if math.isnan(value) else p1 == value
            assert len(boot.spikes_published_at) == n
            assert boot.spikes_published_at[-1] >= spiked.data()["ts"]
            msg = decode(Channel.TELEMETRY, spiked.payload, 16384)
            assert isinstance(msg, Telemetry) and len(msg.pressures) == 4
            # Only that one sample: the next is the model's again.
            nxt = await gw.wait_for(lambda r: r.device == "b1"
                                    and r.channel is Channel.TELEMETRY,
                                    after=gw.received.index(spiked) + 1)
            assert abs(nxt.data()["pressures"][1]) < 5.0

        # Reaction-time bookkeeping: every vent's arrival is recorded.
        await gw.send(boot, command(CommandKind.VENT))
        await boot.wait_for_vent(timeout=5)
        assert len(boot.vents_received_at) == 1
        assert boot.vents_received_at[0] > boot.spikes_published_at[-1]

        with pytest.raises(ValueError):
            boot.inject_spike(4, 1.0)


async def test_chamber_count_mismatch(mosquitto: LocalMosquitto) -> None:
    clinic = new_clinic()
    async with (
        fake_gateway(mosquitto, clinic, ["b1"]) as gw,
        SimFleet([(clinic, "b1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S, seed=7) as fleet,
    ):
        boot = fleet.boots[f"{clinic}/b1"]
        mark = len(gw.received)
        boot.inject_chamber_count_mismatch(True)
        await gw.wait_for(lambda r: r.channel is Channel.TELEMETRY
                          and len(r.data()["pressures"]) == 3, after=mark)
        mark = len(gw.received)
        boot.inject_chamber_count_mismatch(False)
        await gw.wait_for(lambda r: r.channel is Channel.TELEMETRY
                          and len(r.data()["pressures"]) == 4, after=mark)


async def test_hung_firmware_ignores_vent_silently(mosquitto: LocalMosquitto) -> None:
    clinic = new_clinic()
    async with (
        fake_gateway(mosquitto, clinic, ["b1"]) as gw,
        SimFleet([(clinic, "b1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S,
                 heartbeat_timeout_s=HB_TIMEOUT_S, seed=8) as fleet,
    ):
        boot = fleet.boots[f"{clinic}/b1"]
        gw.start_heartbeats()
        start = command(CommandKind.START, "s-hang-1", program())
        await gw.send(boot, start)
        await gw.wait_ack(boot, start.cmd_id, AckStatus.ACCEPTED)
        boot.set_ignore_vents(True)
        vent = command(CommandKind.VENT, "s-hang-1")
        await gw.send(boot, vent)
        await boot.wait_for_vent(timeout=5)
        assert boot.in_session and len(boot.vents_received_at) == 1
        assert any(c.cmd_id == vent.cmd_id for c in boot.commands_received)
        # Commands are handled in order: once the stop is acked, a vent ack would have come.
        stop = command(CommandKind.STOP, "s-hang-1")
        await gw.send(boot, stop)
        await gw.wait_ack(boot, stop.cmd_id, AckStatus.DONE)
        assert not any(r.channel is Channel.ACK and r.ack().cmd_id == vent.cmd_id
                       for r in gw.received)
        await gw.wait_event(boot, EventKind.SESSION_STOPPED)  # sent after the stop's ack
        assert gw.events(boot, EventKind.VENTED) == []


async def test_broken_vent_valve_acks_but_pressure_stays(mosquitto: LocalMosquitto) -> None:
    clinic = new_clinic()
    async with (
        fake_gateway(mosquitto, clinic, ["b1"]) as gw,
        SimFleet([(clinic, "b1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S,
                 heartbeat_timeout_s=HB_TIMEOUT_S, seed=9) as fleet,
    ):
        boot = fleet.boots[f"{clinic}/b1"]
        gw.start_heartbeats()
        boot.inject_hold_valve(0)
        boot.inject_vent_broken()
        start = command(CommandKind.START, "s-broken-1", program())
        await gw.send(boot, start)
        await boot.wait_until(lambda: boot.model.pressures[0] > 57.0, timeout=10)
        vent = command(CommandKind.VENT, "s-broken-1")
        await gw.send(boot, vent)
        await gw.wait_ack(boot, vent.cmd_id, AckStatus.DONE)
        vented = await gw.wait_event(boot, EventKind.VENTED)
        assert not boot.in_session
        # Ten samples after the vent: still the vent phase, the held chamber still at target.
        after = gw.received.index(vented) + 1
        for _ in range(10):
            r = await gw.wait_for(lambda r: r.channel is Channel.TELEMETRY, after=after)
            after = gw.received.index(r) + 1
            assert r.data()["phase"] == Phase.VENT and r.data()["pressures"][0] > 55.0
        boot.clear_faults()  # repaired: the pending vent now happens
        await boot.wait_until(lambda: max(boot.model.pressures) < 2.0, timeout=5)


async def test_overrun_session_runs_past_its_duration(mosquitto: LocalMosquitto) -> None:
    clinic = new_clinic()
    async with (
        fake_gateway(mosquitto, clinic, ["b1"]) as gw,
        SimFleet([(clinic, "b1")], mqtt(mosquitto), telemetry_period_s=PERIOD_S,
                 heartbeat_timeout_s=HB_TIMEOUT_S, seed=10) as fleet,
    ):
        boot = fleet.boots[f"{clinic}/b1"]
        gw.start_heartbeats()
        boot.inject_overrun()
        await gw.send(boot, command(CommandKind.START, "s-over-1", program(duration_s=0.5)))
        late = await gw.wait_for(lambda r: r.channel is Channel.TELEMETRY
                                 and (r.data().get("session_elapsed_s") or 0) > 1.5, timeout=5)
        assert late.data()["session_id"] == "s-over-1"
        assert boot.sessions_completed == 0 and boot.in_session
        await gw.send(boot, command(CommandKind.STOP, "s-over-1"))
        await gw.wait_event(boot, EventKind.SESSION_STOPPED)
        assert boot.sessions_completed == 0
