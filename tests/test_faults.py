"""Fault kinds (device_sim.faults) and the SimBoot abilities behind them.

Unit tests drive a boot that never connects (acks and events wait in its outbox); the two
integration tests use the real Mosquitto for what only a broker shows: the LWT of a dropped
connection, and what the boot really puts on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt
import pytest

from device_sim.boot import MALFORMED_KINDS, SELF_VENT_CONNECTION, SimBoot, malformed_telemetry
from device_sim.faults import (
    CHAMBER_KINDS,
    EXPECTED,
    MALFORMED_DEVICE_FAULT,
    PARAMS,
    VENT_WORTHY,
    ClockSkewParams,
    ClockStepParams,
    DisconnectParams,
    FaultKind,
    FaultNotApplied,
    FaultParams,
    IgnoreVentParams,
    MalformedParams,
    NoParams,
    PlannedFault,
    ReconnectStormParams,
    SensorDropoutParams,
    SensorSpikeParams,
    SilenceParams,
    SlowLeakParams,
    clear,
    expectation,
    inject,
    nominal_detect_s,
    run_fault,
)
from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalMosquitto
from gateway.contract import (
    ALARM_TOPIC_PREFIX,
    SENSOR_MIN_MMHG,
    AckStatus,
    Alarm,
    BootState,
    Channel,
    Command,
    CommandKind,
    EventKind,
    PayloadError,
    ProgramTiming,
    SessionProgram,
    Telemetry,
    decode,
    topic,
)
from gateway.settings import GatewaySettings, MqttSettings, WatchdogSettings
from gateway.watchdog import Rule
from tests.helpers import RunningGateway, wait_for

RULES = {r.value for r in Rule}
MAX_PAYLOAD = GatewaySettings.model_fields["max_payload_bytes"].default
PROGRAM = SessionProgram(
    name="fault_test", targets_mmhg=[60.0, 57.0, 54.0, 51.0], duration_s=600.0,
    timing=ProgramTiming(inflate_s=4.0, hold_s=6.0, deflate_s=6.0, pause_s=6.0),
)


class FakeClock:
    def __init__(self, t: float = 1_767_261_600.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def offline_boot(clock: FakeClock | None = None) -> SimBoot:
    """A boot with no broker: commands via handle_command, acks/events kept in its outbox."""
    return SimBoot("c1", "d1", MqttSettings(host="127.0.0.1", port=1), seed=1,
                   clock=clock or time.time)


def start_cmd(now: float, expires_in: float = 10.0) -> Command:
    return Command(cmd_id=f"c-{secrets.token_hex(3)}", kind=CommandKind.START, issued_at=now,
                   expires_at=now + expires_in, session_id="s-1", program=PROGRAM)


def planned(kind: FaultKind, params: FaultParams | None = None, chamber: int | None = 2
            ) -> PlannedFault:
    return PlannedFault(at_s=10.0, boot_index=0, kind=kind,
                        chamber=chamber if kind in CHAMBER_KINDS else None,
                        params=params or PARAMS[kind]())


# ------------------------------------------------------------------ the table


def test_expected_covers_every_kind_with_real_rule_names() -> None:
    assert set(EXPECTED) == set(FaultKind) == set(PARAMS)
    for kind, exp in EXPECTED.items():
        assert exp.detected_by <= RULES, kind
        assert exp.also <= RULES, kind
        assert not exp.detected_by & exp.also, kind
        assert exp.note, kind
        # A vent is only expected where some rule detects the fault (and vents).
        assert not exp.vent_expected or exp.detected_by, kind
    assert VENT_WORTHY == {k for k, e in EXPECTED.items() if e.vent_expected}
    # The benign kinds: the gateway must do nothing, and above all not vent.
    for kind in (FaultKind.SLOW_LEAK, FaultKind.CLOCK_SKEW, FaultKind.CLOCK_STEP,
                 FaultKind.MALFORMED):
        assert not EXPECTED[kind].vent_expected and not EXPECTED[kind].detected_by
    # Faults that cut the boot off are judged by its own self-vent (the gateway's vent can
    # only arrive after the reconnect); every other kind by what the gateway does.
    assert {k for k, e in EXPECTED.items() if e.self_vent} == {
        FaultKind.DISCONNECT, FaultKind.RECONNECT_STORM}
    assert EXPECTED[FaultKind.MALFORMED].device_faults == {"not_json"}
    assert EXPECTED[FaultKind.USER_STOP].detected_by == {"user_stop"}
    assert not EXPECTED[FaultKind.USER_STOP].vent_expected


def test_expectation_follows_the_parameters() -> None:
    spike = FaultKind.SENSOR_SPIKE
    assert expectation(spike, SensorSpikeParams()).detected_by == {"hard_ceiling"}
    assert expectation(spike, SensorSpikeParams(mmhg=300)).detected_by == {"implausible_data"}
    assert expectation(spike, SensorSpikeParams(mmhg=-15)).detected_by == {"implausible_data"}
    low = expectation(spike, SensorSpikeParams(mmhg=90))
    assert not low.detectable and not low.vent_expected
    # The clinic ceiling is what counts: a 110 mmHg spike is over 100, not over 115.
    assert expectation(spike, SensorSpikeParams(mmhg=110)).vent_expected
    assert not expectation(spike, SensorSpikeParams(mmhg=110), ceiling_mmhg=115).vent_expected
    dropout = FaultKind.SENSOR_DROPOUT
    assert expectation(dropout, SensorDropoutParams()).detected_by == {"implausible_data"}
    assert expectation(dropout, SensorDropoutParams(reading_mmhg=math.nan)).vent_expected
    assert not expectation(dropout, SensorDropoutParams(reading_mmhg=0.0)).detectable
    for payload in MALFORMED_KINDS:
        exp = expectation(FaultKind.MALFORMED, MalformedParams(payload=payload))
        assert exp.device_faults == {MALFORMED_DEVICE_FAULT[payload]}
        assert not exp.vent_expected
    grace = WatchdogSettings().sustained_inflation_grace_s
    skew = FaultKind.CLOCK_SKEW
    assert expectation(skew, ClockSkewParams()) == EXPECTED[skew]
    assert expectation(skew, ClockSkewParams(skew_s=-30)) == EXPECTED[skew]
    assert expectation(skew, ClockSkewParams(skew_s=grace - 1)).also == set()
    assert expectation(skew, ClockSkewParams(skew_s=grace)).also == {"sustained_inflation"}
    far = expectation(skew, ClockSkewParams(skew_s=60))
    assert "expired" in far.note and not far.vent_expected
    # A clock step must cause nothing, either way and whatever its size: unlike a skew, no
    # rule is excused (the gateway must time durations on its monotonic clock).
    step = FaultKind.CLOCK_STEP
    for params in (ClockStepParams(), ClockStepParams(step_s=-30, return_after_s=25),
                   ClockStepParams(step_s=grace + 10), ClockStepParams(step_s=3600)):
        exp = expectation(step, params)
        assert not exp.detectable and not exp.vent_expected and exp.also == set(), params
    assert "expired" in expectation(step, ClockStepParams(step_s=60)).note
    with pytest.raises(ValueError):
        ClockStepParams(step_s=0)


def test_nominal_detection_times_follow_the_gateway_defaults() -> None:
    assert nominal_detect_s(FaultKind.SILENCE, 1.0) == pytest.approx(6.1)
    assert nominal_detect_s(FaultKind.SILENCE, 0.2) == pytest.approx(3.1)  # the 3 s floor
    assert nominal_detect_s(FaultKind.IGNORE_VENT, 1.0) > nominal_detect_s(
        FaultKind.STUCK_VALVE, 1.0) + 5.0
    assert nominal_detect_s(FaultKind.DISCONNECT, 1.0) == 0.0


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_malformed_payloads_are_refused_by_the_gateway_decoder(kind: str) -> None:
    payload = malformed_telemetry(kind, 4, 7, 1.0)  # type: ignore[arg-type]
    with pytest.raises(PayloadError) as err:
        decode(Channel.TELEMETRY, payload, MAX_PAYLOAD)
    assert err.value.kind == MALFORMED_DEVICE_FAULT[kind]  # type: ignore[index]
    with pytest.raises(ValueError):
        malformed_telemetry("bogus", 4, 7, 1.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------ inject / clear, no broker


async def test_session_faults_are_refused_on_an_idle_boot() -> None:
    boot = offline_boot()
    for kind, exp in EXPECTED.items():
        if exp.session_required:
            with pytest.raises(FaultNotApplied):
                await inject(boot, planned(kind))
    assert boot.faults_injected == []
    # Broker-bound faults on a boot that is not connected are refused too, not guessed.
    for kind in (FaultKind.DISCONNECT, FaultKind.RECONNECT_STORM, FaultKind.MALFORMED):
        if not EXPECTED[kind].session_required:
            with pytest.raises(FaultNotApplied):
                await inject(boot, planned(kind))
    assert boot.faults_injected == []


async def test_model_and_firmware_faults_go_in_and_out_and_are_recorded() -> None:
    clock = FakeClock()
    boot = offline_boot(clock)
    await boot.handle_command(start_cmd(clock.t))
    assert boot.in_session
    cases: list[tuple[FaultKind, FaultParams]] = [
        (FaultKind.STUCK_VALVE, NoParams()),
        (FaultKind.SLOW_LEAK, SlowLeakParams(leak_mmhg_per_s=3.0, down_s=5.0)),
        (FaultKind.SENSOR_DROPOUT, SensorDropoutParams()),
        (FaultKind.SENSOR_SPIKE, SensorSpikeParams(mmhg=150.0)),
        (FaultKind.SILENCE, SilenceParams()),
        (FaultKind.CLOCK_SKEW, ClockSkewParams(skew_s=-4.0, down_s=5.0)),
    ]
    for n, (kind, params) in enumerate(cases):
        clock.t += 1.0
        await inject(boot, planned(kind, params, chamber=2))
        assert boot.faults_injected[-1] == (clock.t, kind.value)
        assert len(boot.faults_injected) == n + 1
    assert boot.model.stuck_chambers == {1}  # chamber 2 is index 1
    assert boot.model.leaks == {1: 3.0}
    assert boot.sensor_dropouts == {1: SENSOR_MIN_MMHG}
    assert boot.silent
    assert boot.clock_skew_s == -4.0
    assert boot.device_time() == clock.t - 4.0

    clock.t += 5.0
    for kind, params in cases:
        await clear(boot, planned(kind, params, chamber=2))
    assert boot.model.leaks == {} and boot.sensor_dropouts == {}
    assert not boot.silent and boot.clock_skew_s == 0.0
    # The stuck valve and the spike are one-off: nothing to clear, nothing recorded.
    assert boot.model.stuck_chambers == {1}
    assert [k for _, k in boot.faults_cleared] == [
        "slow_leak", "sensor_dropout", "silence", "clock_skew"]
    assert all(t == clock.t for t, _ in boot.faults_cleared)


async def test_ignore_vent_holds_the_session_until_cleared() -> None:
    clock = FakeClock()
    boot = offline_boot(clock)
    await boot.handle_command(start_cmd(clock.t))
    fault = planned(FaultKind.IGNORE_VENT, IgnoreVentParams(down_s=5.0), chamber=3)
    await inject(boot, fault)
    assert boot.model.stuck_chambers == {2}
    vent = Command(cmd_id="v-1", kind=CommandKind.VENT, issued_at=clock.t)
    await boot.handle_command(vent)
    assert boot.in_session and boot.vents_received == 1 and not boot.acks_sent[1:]
    await clear(boot, fault)
    assert boot.model.stuck_chambers == frozenset()
    await boot.handle_command(vent.model_copy(update={"cmd_id": "v-2"}))
    assert not boot.in_session and boot.model.venting


async def test_user_stop_ends_the_session_with_the_event() -> None:
    boot = offline_boot()
    await boot.handle_command(start_cmd(time.time()))
    await inject(boot, planned(FaultKind.USER_STOP))
    assert not boot.in_session
    assert boot.events_sent[-1].kind is EventKind.USER_STOP
    assert boot.events_sent[-1].session_id == "s-1"
    assert [k for _, k in boot.faults_injected] == ["user_stop"]


async def test_clock_skew_shows_in_what_the_boot_sends_and_in_its_expiry_check() -> None:
    clock = FakeClock()
    boot = offline_boot(clock)
    boot.set_clock_skew(20.0)  # ahead by more than the 10 s a start is valid
    assert BootState.model_validate_json(boot.state_payload(online=True)).ts == clock.t + 20.0
    await boot.handle_command(start_cmd(clock.t, expires_in=10.0))
    assert boot.acks_sent[-1].status is AckStatus.REJECTED
    assert boot.acks_sent[-1].reason == "expired"
    assert boot.acks_sent[-1].ts == clock.t + 20.0
    boot.set_clock_skew(3.0)
    await boot.handle_command(start_cmd(clock.t, expires_in=10.0))
    assert boot.acks_sent[-1].status is AckStatus.ACCEPTED
    assert boot.session is not None and boot.session.started_at == clock.t + 3.0
    # The session schedule runs on the true clock: the skew does not age it.
    assert boot.model.session_elapsed(clock.t) == 0.0
    with pytest.raises(ValueError):
        boot.set_clock_skew(math.inf)


class RecordingClient:
    """Stands in for the MQTT client: keeps what the boot publishes, per channel."""

    def __init__(self, clinic: str, device: str) -> None:
        self.channels = {topic(clinic, device, ch): ch for ch in Channel}
        self.sent: list[tuple[Channel, dict[str, Any]]] = []

    async def publish(self, topic_: str, payload: bytes, qos: int = 0, retain: bool = False,
                      timeout: float | None = None) -> None:
        self.sent.append((self.channels[topic_], json.loads(payload)))

    def last(self, channel: Channel) -> dict[str, Any]:
        return next(m for ch, m in reversed(self.sent) if ch is channel)


async def test_clock_step_moves_every_timestamp_but_not_the_session_clock() -> None:
    """An NTP step back and its return: ts of telemetry, acks and events follow the stepped
    wall clock; session_elapsed_s, timed on the boot's monotonic clock, never goes back."""
    clock = FakeClock()
    boot = SimBoot("c1", "d1", MqttSettings(host="127.0.0.1", port=1), seed=1, clock=clock,
                   telemetry_qos=1, self_vent=False)
    client = RecordingClient("c1", "d1")
    boot._set_client(client)  # type: ignore[arg-type]
    await boot.handle_command(start_cmd(clock.t))
    samples: list[dict[str, Any]] = []

    async def sample(dt: float = 1.0) -> dict[str, Any]:
        clock.t += dt
        await boot._sample()
        samples.append(client.last(Channel.TELEMETRY))
        return samples[-1]

    assert (await sample())["ts"] == clock.t
    fault = planned(FaultKind.CLOCK_STEP, ClockStepParams(step_s=-30, return_after_s=3))
    await inject(boot, fault)
    assert boot.faults_injected[-1] == (clock.t, "clock_step")  # recorded on true time
    assert (await sample())["ts"] == pytest.approx(clock.t - 30.0)
    await boot.handle_command(start_cmd(clock.t - 30.0))  # busy: refused, on the stepped clock
    assert client.last(Channel.ACK)["status"] == "rejected"
    assert client.last(Channel.ACK)["ts"] == pytest.approx(clock.t - 30.0)
    await sample()
    clock.t += 2.0
    await clear(boot, fault)  # the return: 30 s forward, back to true time
    assert boot.faults_cleared[-1] == (clock.t, "clock_step")
    assert (await sample())["ts"] == clock.t and boot.clock_skew_s == 0.0
    assert [round(b["ts"] - a["ts"]) for a, b in itertools.pairwise(samples)] == [-29, 1, 33]
    elapsed = [m["session_elapsed_s"] for m in samples]
    assert elapsed == pytest.approx([1.0, 2.0, 3.0, 6.0])  # the session's own clock: no steps
    # A step without a return stays; a vent's ack and event carry the stepped time.
    await inject(boot, planned(FaultKind.CLOCK_STEP, ClockStepParams(step_s=-30)))
    await sample()
    assert samples[-1]["session_elapsed_s"] == pytest.approx(7.0)
    await boot.handle_command(Command(cmd_id="v-1", kind=CommandKind.VENT, issued_at=clock.t))
    assert client.last(Channel.ACK)["ts"] == pytest.approx(clock.t - 30.0)
    assert client.last(Channel.EVENT)["kind"] == "vented"
    assert client.last(Channel.EVENT)["ts"] == pytest.approx(clock.t - 30.0)
    with pytest.raises(ValueError):
        boot.step_clock(math.nan)


def test_fault_switch_arguments_are_checked() -> None:
    boot = offline_boot()
    with pytest.raises(ValueError):
        boot.set_sensor_dropout(4)
    with pytest.raises(aiomqtt.MqttError):
        boot.drop_connection(1.0)  # not connected
    boot.set_sensor_dropout(0, 5.0)
    boot.set_clock_skew(2.0)
    boot.clear_faults()
    assert boot.sensor_dropouts == {} and boot.clock_skew_s == 0.0


def test_planned_fault_clear_time() -> None:
    assert planned(FaultKind.SILENCE, SilenceParams(down_s=8)).clear_at_s == 18.0
    assert planned(FaultKind.STUCK_VALVE).clear_at_s is None
    assert planned(FaultKind.SLOW_LEAK, SlowLeakParams()).clear_at_s is None  # rest of run
    assert planned(FaultKind.DISCONNECT, DisconnectParams(down_s=2)).clear_at_s == 12.0
    # A clock step is cleared by its return; without one the clock stays stepped.
    back = planned(FaultKind.CLOCK_STEP, ClockStepParams(step_s=-30, return_after_s=25))
    assert back.clear_at_s == 35.0 and back.params.return_s == 25.0
    assert back.params.clock_offset_s == 30.0
    assert planned(FaultKind.CLOCK_STEP, ClockStepParams()).clear_at_s is None


# ------------------------------------------------------------------ against a real broker


def mqtt(mosquitto: LocalMosquitto) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=mosquitto.port, reconnect_min_s=0.1)


@contextlib.asynccontextmanager
async def subscribed(mosquitto: LocalMosquitto, *topics: str
                     ) -> AsyncIterator[asyncio.Queue[aiomqtt.Message]]:
    """A plain client watching `topics`; every message it gets lands in the queue."""
    async with aiomqtt.Client("127.0.0.1", mosquitto.port,
                              identifier=f"watch-{secrets.token_hex(4)}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        for t in topics:
            await client.subscribe(t, qos=1)
        queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()

        async def pump() -> None:
            async for message in client.messages:
                queue.put_nowait(message)

        task = asyncio.create_task(pump())
        try:
            yield queue
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def next_matching(queue: asyncio.Queue[aiomqtt.Message],
                        predicate: Callable[[aiomqtt.Message], bool], timeout: float
                        ) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        while True:
            message = await queue.get()
            if predicate(message):
                return message


@pytest.mark.integration
async def test_dropped_connection_fires_the_lwt_and_comes_back_after_the_hold(
    mosquitto: LocalMosquitto,
) -> None:
    clinic = f"f{secrets.token_hex(3)}"
    boot = SimBoot(clinic, "d1", mqtt(mosquitto), telemetry_period_s=0.1, seed=3,
                   heartbeat_timeout_s=60.0)
    state_topic = topic(clinic, "d1", Channel.STATE)
    async with subscribed(mosquitto, state_topic) as queue:
        task = asyncio.create_task(boot.run())
        try:
            await boot.wait_connected(timeout=5)
            await next_matching(queue, lambda m: json.loads(m.payload)["online"], timeout=5)
            await boot.handle_command(start_cmd(time.time()))
            assert boot.in_session
            offline_s = 1.0
            dropped_at = time.monotonic()
            boot.drop_connection(offline_s=offline_s)
            # The broker saw no DISCONNECT: it publishes the will (online: false) at once.
            will = await next_matching(
                queue, lambda m: not json.loads(m.payload)["online"], timeout=3)
            assert time.monotonic() - dropped_at < 2.0
            assert BootState.model_validate_json(will.payload).session is None
            # The boot reacts as to any lost connection: it vents itself.
            await boot.wait_for_self_vent(timeout=3)
            assert boot.events_sent[-1].detail == SELF_VENT_CONNECTION
            assert not boot.in_session
            # ...and stays away for the hold, then reconnects on its own.
            back = await next_matching(queue, lambda m: json.loads(m.payload)["online"],
                                       timeout=offline_s + 5)
            assert time.monotonic() - dropped_at >= offline_s - 0.05
            assert BootState.model_validate_json(back.payload).online
            await boot.wait_until(lambda: boot.connections == 2, timeout=3)
            assert boot.connections_dropped == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.mark.integration
async def test_skew_dropout_and_garbage_on_the_wire(mosquitto: LocalMosquitto) -> None:
    clinic = f"f{secrets.token_hex(3)}"
    boot = SimBoot(clinic, "d1", mqtt(mosquitto), telemetry_period_s=0.05, seed=4)
    tele = topic(clinic, "d1", Channel.TELEMETRY)
    async with subscribed(mosquitto, tele) as queue:
        task = asyncio.create_task(boot.run())
        try:
            await boot.wait_connected(timeout=5)
            boot.set_clock_skew(-30.0)
            boot.set_sensor_dropout(3, math.nan)

            def skewed(m: aiomqtt.Message) -> bool:
                return json.loads(m.payload)["ts"] < time.time() - 25.0

            msg = await next_matching(queue, skewed, timeout=3)
            sample = decode(Channel.TELEMETRY, msg.payload, MAX_PAYLOAD)
            assert isinstance(sample, Telemetry)
            assert math.isnan(sample.pressures[3])  # NaN as the JSON token, as firmware sends
            assert time.time() - 31.0 < sample.ts < time.time() - 29.0

            sent = await boot.publish_malformed("wrong_type")
            got = await next_matching(queue, lambda m: m.payload == sent, timeout=3)
            with pytest.raises(PayloadError):
                decode(Channel.TELEMETRY, got.payload, MAX_PAYLOAD)
            assert boot.malformed_sent == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)



# ------------------------------------------------------------------ EXPECTED, end to end

E2E_PROGRAM = SessionProgram(
    name="fault_e2e", targets_mmhg=[60.0, 58.0, 56.0, 54.0], duration_s=300.0,
    timing=ProgramTiming(inflate_s=1.0, hold_s=2.0, deflate_s=2.0, pause_s=1.0),
)
E2E_PARAMS: dict[FaultKind, FaultParams] = {
    FaultKind.SILENCE: SilenceParams(down_s=3.0),
    FaultKind.SENSOR_DROPOUT: SensorDropoutParams(down_s=2.0),
    FaultKind.DISCONNECT: DisconnectParams(down_s=1.0),
    FaultKind.RECONNECT_STORM: ReconnectStormParams(down_s=1.0),
    FaultKind.IGNORE_VENT: IgnoreVentParams(down_s=12.0),
    # A step back without its return (the default). The return is a forward step, which
    # today's gateway may answer with a false sustained_inflation vent (rule 3 on the boot's
    # clock); the fault drill judges it, and fails on it until the gateway is fixed.
    FaultKind.CLOCK_STEP: ClockStepParams(step_s=-30),
}


def by_device(series: list[dict[str, Any]], tag: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in series:
        out.setdefault(s["tags"]["device"], set()).add(s["tags"][tag])
    return out


@pytest.mark.integration
async def test_the_gateway_answers_every_fault_kind_as_expected(
    mosquitto: LocalMosquitto, gateway: RunningGateway,
) -> None:
    """EXPECTED checked against the real gateway: every kind at once, each on its own boot in
    session (the storm on two), then what the gateway stored per boot."""
    clinic = gateway.clinic()
    faults: dict[str, PlannedFault] = {}
    for kind in FaultKind:
        for n in range(2 if kind is FaultKind.RECONNECT_STORM else 1):
            params = E2E_PARAMS.get(kind) or PARAMS[kind]()
            faults[f"{kind.value.replace('_', '-')}-{n}"] = planned(kind, params)
    alarm_topic = f"{ALARM_TOPIC_PREFIX}/{clinic}/+"
    async with (
        subscribed(mosquitto, alarm_topic) as alarm_queue,
        SimFleet([(clinic, d) for d in faults], mqtt(mosquitto), telemetry_period_s=0.2,
                 seed=9) as fleet,
    ):
        boots = {d: fleet.boots[f"{clinic}/{d}"] for d in faults}
        await wait_for(lambda: all(gateway.gw.fleet.get(clinic, d) for d in faults), 10,
                       "the gateway to know every boot")
        results = await asyncio.gather(*(gateway.gw.start_session(clinic, d, E2E_PROGRAM)
                                         for d in faults))
        assert all(r.accepted for r in results), [r.reasons for r in results]
        await fleet.wait_all(lambda b: b.in_session and max(b.model.pressures) > 20, 10)

        runs = [asyncio.create_task(run_fault(boots[d], f)) for d, f in faults.items()]
        raised: dict[str, set[str]] = {}

        def detected() -> bool:
            return all(raised.get(d, set()) & f.expectation.detected_by
                       for d, f in faults.items() if f.expectation.detected_by)

        async with asyncio.timeout(25):
            while not detected():
                alarm = Alarm.model_validate_json((await alarm_queue.get()).payload)
                raised.setdefault(alarm.device, set()).add(alarm.rule)
        await asyncio.gather(*runs)
        for d, f in faults.items():  # a dropped boot gets its vent once it is back
            if f.expectation.vent_expected:
                await boots[d].wait_for_vent(timeout=10)
        await gateway.flush()
        events = by_device(gateway.query(
            f"SELECT detail FROM safety_event WHERE clinic = '{clinic}' GROUP BY device, rule"),
            "rule")
        device_faults = by_device(gateway.query(
            f"SELECT reason FROM device_fault WHERE clinic = '{clinic}' GROUP BY device, kind"),
            "kind")
        for d, f in faults.items():
            exp = f.expectation
            rules = events.get(d, set())
            assert rules <= exp.detected_by | exp.also, (d, rules)
            assert bool(rules & exp.detected_by) == bool(exp.detected_by), (d, rules)
            assert device_faults.get(d, set()) == set(exp.device_faults), d
            assert (boots[d].vents_received > 0) == exp.vent_expected, d
            assert [k for _, k in boots[d].faults_injected] == [f.kind.value], d
