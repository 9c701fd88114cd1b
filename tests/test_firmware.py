"""The boot firmware (device_sim/firmware.py) driven with plain numbers for a clock and no
broker. Expectations come from docs/protocol.md, not from the code:

* §6.2 "start" (refuse `expired` past expires_at on the boot's own clock, `busy` in a session,
  `invalid: ...` for a program that does not fit the boot) and §7.2 (self-vent after 3 x the
  last heartbeat's interval_s, never under 5 s, 2 s assumed before the first heartbeat; a
  session started after the last heartbeat gets the full timeout from its start; outside a
  session a missing heartbeat needs no action): the pure decisions, function by function.
* `BootFirmware`, the whole firmware as a state machine: the flows of §6.2 (`accepted` ->
  `session_started` -> `state` with the session; the terminal event before the `state`
  without it; `done` for a completed start only), duplicates answered with the last ack and
  not executed again (§6.1, a vent excepted), vents always obeyed (§6.2), telemetry with
  `seq` +1 per message and the `session_id` exactly in a session (§4.2), the LWT without a
  session (§3.1), and a hypothesis state machine over random commands, redeliveries,
  heartbeats, connection losses, stop-button presses and time steps that checks these rules
  on every step against its own reading of the contract.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import device_sim.firmware
from device_sim.firmware import (
    SELF_VENT_CONNECTION,
    SELF_VENT_HEARTBEAT,
    BootFirmware,
    Outgoing,
    heartbeat_lost,
    heartbeat_timeout_s,
    start_refusal,
)
from gateway.contract import (
    Ack,
    AckStatus,
    BootEvent,
    BootState,
    Channel,
    Command,
    CommandKind,
    EventKind,
    Heartbeat,
    Phase,
    ProgramTiming,
    SessionProgram,
    Telemetry,
)

T0 = 1_767_261_700.0


def start(targets: list[float], *, expires_at: float | None = T0 + 10.0) -> Command:
    return Command(
        cmd_id="c-1", kind=CommandKind.START, issued_at=T0, expires_at=expires_at,
        session_id="s-1",
        program=SessionProgram(
            name="p", targets_mmhg=targets, duration_s=600.0,
            timing=ProgramTiming(inflate_s=5, hold_s=5, deflate_s=5, pause_s=5)),
    )


def refusal(cmd: Command, *, device_now: float = T0 + 1.0, in_session: bool = False,
            chambers: int = 4, max_pressure_mmhg: float = 120.0) -> str | None:
    return start_refusal(cmd, device_now=device_now, in_session=in_session,
                         chambers=chambers, max_pressure_mmhg=max_pressure_mmhg)


def test_a_fitting_start_in_time_on_an_idle_boot_is_not_refused() -> None:
    assert refusal(start([40, 50, 60, 70])) is None
    assert refusal(start([40, 50, 60, 70], expires_at=None)) is None


def test_a_start_past_expires_at_on_the_boots_own_clock_is_refused_expired() -> None:
    cmd = start([40, 50, 60, 70])
    assert refusal(cmd, device_now=T0 + 10.5) == "expired"
    assert refusal(cmd, device_now=T0 + 10.0) is None  # "past" expires_at, not at it
    # expired wins over busy: the command is void whatever the boot is doing
    assert refusal(cmd, device_now=T0 + 11.0, in_session=True) == "expired"


def test_a_start_during_a_session_is_refused_busy() -> None:
    assert refusal(start([40, 50, 60, 70]), in_session=True) == "busy"


@pytest.mark.parametrize("targets", [[40, 50, 60], [40, 50, 60, 70, 80], [40, 50, 60, 121]])
def test_a_program_that_does_not_fit_the_boot_is_refused_with_a_reason(
    targets: list[float],
) -> None:
    reason = refusal(start(targets))
    # Protocol §6.2/§6.3: a start that does not fit the boot is refused `invalid: <what>`.
    assert reason is not None and reason.startswith("invalid: ")


def test_heartbeat_timeout_is_three_intervals_floored_at_five_and_two_s_assumed_at_first(
) -> None:
    assert heartbeat_timeout_s(None, None) == 6.0
    assert heartbeat_timeout_s(None, 1.0) == 5.0
    assert heartbeat_timeout_s(None, 4.0) == 12.0
    assert heartbeat_timeout_s(1.5, 4.0) == 1.5  # a configured timeout is taken as is


def lost(now: float, *, in_session: bool = True, started_at: float = T0,
         last_heartbeat_at: float | None = T0, timeout_s: float = 6.0) -> bool:
    return heartbeat_lost(now, in_session=in_session, session_elapsed_s=now - started_at,
                          last_heartbeat_at=last_heartbeat_at, timeout_s=timeout_s)


def test_a_session_outlives_the_heartbeat_only_up_to_the_timeout() -> None:
    assert not lost(T0 + 6.0)
    assert lost(T0 + 6.1)
    assert not lost(T0 + 9.0, last_heartbeat_at=T0 + 5.0)  # a new heartbeat restarts it


def test_a_session_started_after_the_last_heartbeat_gets_the_full_timeout_from_its_start(
) -> None:
    assert not lost(T0 + 105.0, started_at=T0 + 100.0)
    assert lost(T0 + 106.5, started_at=T0 + 100.0)
    assert not lost(T0 + 5.0, started_at=T0, last_heartbeat_at=None)  # none seen yet
    assert lost(T0 + 6.5, started_at=T0, last_heartbeat_at=None)


def test_outside_a_session_a_missing_heartbeat_needs_no_action() -> None:
    assert not lost(T0 + 1000.0, in_session=False)


# ---------------------------------------------------------------------- BootFirmware

CHAMBERS = 2
# A short program: cycle 2 x 1 + 1 + 1 + 1 = 5 s, 20 s in all, so a session completes in a
# few ticks. Times are multiples of 0.25 s near T0, exact in binary floating point.
PROGRAM = SessionProgram(
    name="short", targets_mmhg=[50.0, 45.0], duration_s=20.0,
    timing=ProgramTiming(inflate_s=1, hold_s=1, deflate_s=1, pause_s=1))


def firmware(*, max_pressure_mmhg: float = 120.0, self_vent: bool = True) -> BootFirmware:
    return BootFirmware(key="c1/d1", chambers=CHAMBERS, max_pressure_mmhg=max_pressure_mmhg,
                        telemetry_period_s=0.5, version="fw-test", rng=random.Random(1),
                        self_vent=self_vent)


_ids = iter(range(10**9))


def cmd(kind: CommandKind, now: float, *, session_id: str | None = None,
        program: SessionProgram | None = None, expires_in: float | None = 10.0,
        reason: str | None = None) -> Command:
    if kind is CommandKind.START:
        session_id = session_id or f"s-{next(_ids)}"
        program = program or PROGRAM
    return Command(cmd_id=f"c-{next(_ids)}", kind=kind, issued_at=now,
                   expires_at=None if expires_in is None else now + expires_in,
                   session_id=session_id, program=program, reason=reason)


def kinds(out: list[Outgoing]) -> list[str]:
    """What was sent, in order: `ack:accepted`, `event:session_started`, `state:s-1`, ..."""
    names = []
    for o in out:
        m = o.message
        if isinstance(m, Ack):
            names.append(f"ack:{m.status.value}")
        elif isinstance(m, BootEvent):
            names.append(f"event:{m.kind.value}")
        elif isinstance(m, BootState):
            names.append("state:" + (m.session.session_id if m.session else "-"))
        else:
            names.append("telemetry")
    return names


def live(fw: BootFirmware, now: float, interval_s: float = 2.0) -> None:
    fw.on_heartbeat(Heartbeat(ts=now, gateway_id="gw-1", interval_s=interval_s),
                    retained=False, now=now)


def test_the_firmware_module_is_pure() -> None:
    """No network, no event loop, no clock of its own, no sleeping: the time is passed in."""
    tree = ast.parse(Path(device_sim.firmware.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"asyncio", "aiomqtt", "paho", "socket", "time", "threading"}


def test_a_start_in_idle_is_accepted_then_started_then_announced_in_the_state() -> None:
    fw = firmware()
    start_cmd = cmd(CommandKind.START, T0, session_id="s-a")
    out = fw.handle(start_cmd, T0)
    assert kinds(out) == ["ack:accepted", "event:session_started", "state:s-a"]
    assert [o.channel for o in out] == [Channel.ACK, Channel.EVENT, Channel.STATE]
    ack, event, state = (o.message for o in out)
    assert isinstance(ack, Ack) and ack.cmd_id == start_cmd.cmd_id and ack.ts == T0
    assert isinstance(event, BootEvent) and event.session_id == "s-a"
    assert isinstance(state, BootState) and state.online and state.session is not None
    assert state.session.cmd_id == start_cmd.cmd_id and state.session.program == PROGRAM
    assert state.session.started_at == T0 and state.chambers == CHAMBERS
    assert len(state.zones) == CHAMBERS
    assert fw.in_session and fw.session_id == "s-a"
    # The LWT (and the clean-disconnect state) never carries the session (§4.1).
    assert fw.state(online=False, now=T0).session is None


def test_a_duplicate_cmd_id_gets_the_same_ack_again_and_is_not_executed_again() -> None:
    fw = firmware()
    first = cmd(CommandKind.START, T0, session_id="s-a")
    fw.handle(first, T0)
    again = fw.handle(first, T0 + 0.25)
    assert kinds(again) == ["ack:accepted"]  # no second session_started, no state
    assert isinstance(again[0].message, Ack) and again[0].message.cmd_id == first.cmd_id
    assert fw.session_id == "s-a"
    # A refused start stays refused with the same reason, also once the boot is idle again.
    busy = cmd(CommandKind.START, T0 + 0.5)
    (refused,) = fw.handle(busy, T0 + 0.5)
    assert isinstance(refused.message, Ack) and refused.message.reason == "busy"
    fw.handle(cmd(CommandKind.STOP, T0 + 1), T0 + 1)
    (repeat,) = fw.handle(busy, T0 + 1.25)
    assert isinstance(repeat.message, Ack)
    assert (repeat.message.status, repeat.message.reason) == (AckStatus.REJECTED, "busy")
    assert not fw.in_session
    # A stop delivered twice: acked twice, the second time without a second stop event.
    stop = cmd(CommandKind.STOP, T0 + 2)
    fw.handle(cmd(CommandKind.START, T0 + 2, session_id="s-b"), T0 + 2)
    assert kinds(fw.handle(stop, T0 + 2.5)) == ["ack:done", "event:session_stopped", "state:-"]
    assert kinds(fw.handle(stop, T0 + 2.75)) == ["ack:done"]


def test_a_vent_in_session_ends_it_with_the_ack_the_event_and_a_state_without_session(
) -> None:
    fw = firmware()
    fw.handle(cmd(CommandKind.START, T0, session_id="s-a"), T0)
    vent = cmd(CommandKind.VENT, T0 + 3, session_id="s-a", expires_in=-60.0,
               reason="hard_ceiling")  # an expired vent is still obeyed (§6.2)
    out = fw.handle(vent, T0 + 3)
    assert kinds(out) == ["ack:done", "event:vented", "state:-"]
    event = out[1].message
    assert isinstance(event, BootEvent)
    assert (event.session_id, event.detail) == ("s-a", "hard_ceiling")
    assert not fw.in_session and fw.session is None
    # Idle, already venting, a redelivery: still obeyed and acked, never rejected.
    assert kinds(fw.handle(vent, T0 + 3.25)) == ["ack:done", "event:vented"]
    assert kinds(fw.handle(cmd(CommandKind.VENT, T0 + 4), T0 + 4)) == ["ack:done", "event:vented"]
    (tick,) = fw.sample(T0 + 3.5)
    assert isinstance(tick.message, Telemetry) and tick.message.session_id is None
    assert tick.message.phase is Phase.VENT


def test_a_stop_when_idle_is_acked_done_and_an_expired_stop_is_still_obeyed() -> None:
    fw = firmware()
    assert kinds(fw.handle(cmd(CommandKind.STOP, T0), T0)) == ["ack:done"]
    fw.handle(cmd(CommandKind.START, T0, session_id="s-a"), T0)
    late = cmd(CommandKind.STOP, T0 + 1, expires_in=-30.0, reason="front desk")
    out = fw.handle(late, T0 + 1)
    assert kinds(out) == ["ack:done", "event:session_stopped", "state:-"]
    assert isinstance(out[1].message, BootEvent) and out[1].message.detail == "front desk"


@pytest.mark.parametrize(("targets", "max_pressure"), [([50.0], 120.0), ([50.0] * 3, 120.0),
                                                       ([50.0, 101.0], 100.0)])
def test_a_start_that_does_not_fit_the_boot_is_refused_invalid_and_not_run(
    targets: list[float], max_pressure: float,
) -> None:
    fw = firmware(max_pressure_mmhg=max_pressure)
    program = PROGRAM.model_copy(update={"targets_mmhg": targets})
    out = fw.handle(cmd(CommandKind.START, T0, program=program), T0)
    assert kinds(out) == ["ack:rejected"]
    assert isinstance(out[0].message, Ack) and out[0].message.reason is not None
    assert out[0].message.reason.startswith("invalid: ")
    assert not fw.in_session


def test_expiry_is_judged_on_the_boots_wall_clock_and_every_ts_carries_it() -> None:
    fw = firmware()
    fw.clock_skew_s = 11.0  # the wall clock runs 11 s ahead: a 10 s start has expired
    out = fw.handle(cmd(CommandKind.START, T0), T0)
    assert isinstance(out[0].message, Ack)
    assert (out[0].message.reason, out[0].message.ts) == ("expired", T0 + 11.0)
    fw.clock_skew_s = -30.0  # behind: in time; session_elapsed_s stays on the monotonic clock
    fw.handle(cmd(CommandKind.START, T0 + 1, session_id="s-a", expires_in=10.0), T0 + 1)
    assert fw.session is not None and fw.session.started_at == T0 + 1 - 30.0
    (tick,) = fw.sample(T0 + 3)
    assert isinstance(tick.message, Telemetry)
    assert (tick.message.ts, tick.message.session_elapsed_s) == (T0 + 3 - 30.0, 2.0)


def test_telemetry_seq_counts_up_by_one_and_carries_the_session_only_in_it() -> None:
    fw = firmware()
    samples: list[Telemetry] = []
    for i in range(4):
        if i == 2:
            fw.handle(cmd(CommandKind.START, T0 + i, session_id="s-a"), T0 + i)
        for o in fw.sample(T0 + i + 0.5):
            if isinstance(o.message, Telemetry):
                samples.append(o.message)
    assert [t.seq for t in samples] == [0, 1, 2, 3]
    assert [t.session_id for t in samples] == [None, None, "s-a", "s-a"]
    assert [t.session_elapsed_s for t in samples] == [None, None, 0.5, 1.5]
    assert all(len(t.pressures) == CHAMBERS for t in samples)


def test_completion_at_the_program_end_sends_the_event_then_done_and_the_idle_state() -> None:
    fw = firmware(self_vent=False)
    start_cmd = cmd(CommandKind.START, T0, session_id="s-a")
    fw.handle(start_cmd, T0)
    before = fw.sample(T0 + 19.75)
    assert kinds(before) == ["telemetry"]
    assert isinstance(before[0].message, Telemetry) and before[0].message.session_id == "s-a"
    out = fw.sample(T0 + 20.0)
    # §4.1: the terminal event first; then the state without session and the `done` ack.
    assert kinds(out) == ["event:session_completed", "ack:done", "state:-", "telemetry"]
    assert isinstance(out[1].message, Ack) and out[1].message.cmd_id == start_cmd.cmd_id
    assert isinstance(out[3].message, Telemetry) and out[3].message.session_id is None
    assert fw.sessions_completed == 1 and not fw.in_session
    assert "event:session_completed" not in kinds(fw.sample(T0 + 21))  # once
    # The start's last ack is now `done`: that is what a redelivery of it gets (§6.1).
    assert kinds(fw.handle(start_cmd, T0 + 22)) == ["ack:done"]


def test_a_session_without_live_heartbeats_self_vents_once_after_the_timeout() -> None:
    fw = firmware()
    live(fw, T0, interval_s=2.0)  # 3 x 2 s = 6 s timeout
    fw.handle(cmd(CommandKind.START, T0, session_id="s-a"), T0)
    # A retained heartbeat (delivered on subscribe) proves nothing, whatever its ts says.
    fw.on_heartbeat(Heartbeat(ts=T0 + 5, gateway_id="gw-1", interval_s=2.0),
                    retained=True, now=T0 + 5)
    assert kinds(fw.sample(T0 + 6)) == ["telemetry"]
    out = fw.sample(T0 + 6.25)
    assert kinds(out) == ["event:vented", "state:-", "telemetry"]
    assert isinstance(out[0].message, BootEvent)
    assert (out[0].message.session_id, out[0].message.detail) == ("s-a", SELF_VENT_HEARTBEAT)
    assert fw.self_vents == 1 and fw.self_vents_at == [(T0 + 6.25, SELF_VENT_HEARTBEAT)]
    # The heartbeat comes back: the session is not resumed, and nothing vents again.
    live(fw, T0 + 7)
    assert kinds(fw.sample(T0 + 20)) == ["telemetry"] and not fw.in_session
    assert fw.self_vents == 1


def test_live_heartbeats_keep_a_session_running_and_idle_needs_none() -> None:
    fw = firmware()
    assert kinds(fw.sample(T0 + 100)) == ["telemetry"]  # idle, no heartbeat ever: nothing
    fw.handle(cmd(CommandKind.START, T0 + 100, session_id="s-a"), T0 + 100)
    for t in range(101, 119):
        live(fw, T0 + t)
        assert "event:vented" not in kinds(fw.sample(T0 + t + 0.5))
    assert fw.in_session and fw.self_vents == 0


def test_self_vent_switched_off_lets_the_session_run_without_heartbeats() -> None:
    fw = firmware(self_vent=False)
    fw.handle(cmd(CommandKind.START, T0, session_id="s-a"), T0)
    assert kinds(fw.sample(T0 + 15)) == ["telemetry"] and fw.in_session
    assert fw.connection_lost(T0 + 15) == [] and fw.in_session


def test_a_lost_connection_in_session_self_vents_and_when_idle_does_nothing() -> None:
    fw = firmware()
    assert fw.connection_lost(T0) == []
    fw.handle(cmd(CommandKind.START, T0, session_id="s-a"), T0)
    out = fw.connection_lost(T0 + 1)
    assert kinds(out) == ["event:vented", "state:-"]
    assert isinstance(out[0].message, BootEvent)
    assert out[0].message.detail == SELF_VENT_CONNECTION and fw.self_vents == 1


def test_the_stop_button_ends_the_session_with_user_stop_and_no_done_for_the_start() -> None:
    fw = firmware()
    fw.handle(cmd(CommandKind.START, T0, session_id="s-a"), T0)
    out = fw.press_stop(T0 + 2)
    assert kinds(out) == ["event:user_stop", "state:-"]
    assert isinstance(out[0].message, BootEvent) and out[0].message.session_id == "s-a"
    assert "ack:done" not in kinds(fw.sample(T0 + 30))


def test_the_injected_firmware_faults_act_on_the_firmware() -> None:
    fw = firmware()
    fw.handle(cmd(CommandKind.START, T0, session_id="s-a"), T0)
    fw.ignore_vents = True  # a hang: no ack, no event, the session runs on
    assert fw.handle(cmd(CommandKind.VENT, T0 + 1), T0 + 1) == [] and fw.in_session
    fw.silent = True  # no telemetry and no seq used; the boot's own safety still works
    seq = fw.seq
    assert kinds(fw.sample(T0 + 8)) == ["event:vented", "state:-"] and fw.seq == seq


# ---------------------------------------------------------------------- the state machine


# Shorter than the longest heartbeat timeout (12 s), so completions and self-vents both happen.
MACHINE_PROGRAM = PROGRAM.model_copy(update={"duration_s": 8.0})


class FirmwareMachine(RuleBasedStateMachine):
    """Random inputs; after each, the messages are checked against the contract's rules and
    against this machine's own, simpler account of what the boot must be doing."""

    def __init__(self) -> None:
        super().__init__()
        self.fw = firmware()
        self.now = T0
        self.delivered: list[Command] = []
        self.last_ack: dict[str, Ack] = {}
        self.session: str | None = None  # what the contract says is running
        self.started_at = 0.0
        self.last_live = -1e18
        self.interval_s = 2.0
        self.next_seq = 0
        self.started: set[str] = set()
        self.ended: set[str] = set()

    # ---------------------------------------------------------------- the checks per step

    def _terminal(self, ev: BootEvent) -> None:
        assert ev.session_id is not None and ev.session_id == self.session
        assert ev.session_id not in self.ended  # one terminal event per session
        self.ended.add(ev.session_id)
        self.session = None

    def _check(self, out: list[Outgoing], *, answering: Command | None = None) -> None:
        acks = [o.message for o in out if isinstance(o.message, Ack)]
        if answering is not None:  # exactly one ack per delivery, first, with its cmd_id
            assert len(acks) == 1 and out[0].message is acks[0]
            assert acks[0].cmd_id == answering.cmd_id
        session_before = self.session
        for i, o in enumerate(out):
            m = o.message
            assert o.channel is {Ack: Channel.ACK, BootEvent: Channel.EVENT,
                                 BootState: Channel.STATE, Telemetry: Channel.TELEMETRY}[type(m)]
            if isinstance(m, Ack):
                self.last_ack[m.cmd_id] = m
            elif isinstance(m, BootEvent):
                if m.kind is EventKind.SESSION_STARTED:
                    assert self.session is None and m.session_id not in self.started
                    assert m.session_id is not None
                    self.started.add(m.session_id)
                    self.session, self.started_at = m.session_id, self.now
                elif m.kind is EventKind.VENTED and m.session_id is None:
                    assert self.session is None  # a vent while idle ends nothing
                elif m.kind in {EventKind.SESSION_COMPLETED, EventKind.SESSION_STOPPED,
                                EventKind.VENTED}:
                    self._terminal(m)
                elif m.kind is EventKind.USER_STOP and m.session_id is not None:
                    self._terminal(m)
            elif isinstance(m, BootState):
                # Every state sent shows what runs at that point; events come before it.
                assert (m.session.session_id if m.session else None) == self.session
                assert all(not isinstance(x.message, BootEvent) for x in out[i + 1:])
            else:
                assert m.seq == self.next_seq  # strictly +1 per message
                self.next_seq += 1
                assert m.session_id == self.session
                assert (m.session_elapsed_s is None) == (m.session_id is None)
                assert m.session_id is None or m.phase not in {Phase.IDLE, Phase.VENT}
                assert o is out[-1]  # the sample goes last, after the decisions
        if self.session != session_before:  # a start or an end is announced in the state
            assert any(isinstance(o.message, BootState) for o in out)

    @invariant()
    def the_firmware_agrees_with_the_contract(self) -> None:
        assert self.fw.session_id == self.session
        assert self.fw.in_session == (self.session is not None)
        assert (self.fw.session.session_id if self.fw.session else None) == self.session
        state = self.fw.state(online=True, now=self.now)
        assert (state.session.session_id if state.session else None) == self.session
        assert self.fw.state(online=False, now=self.now).session is None

    # ---------------------------------------------------------------- the inputs

    def _deliver(self, c: Command) -> list[Outgoing]:
        self.delivered.append(c)
        return self.fw.handle(c, self.now)

    # Starts mostly fit and are in time, so sessions run long enough for the timers to matter.
    @rule(fits=st.sampled_from([True, True, True, False]),
          expires_in=st.sampled_from([10.0, 10.0, 10.0, -1.0]))
    def start(self, fits: bool, expires_in: float) -> None:
        targets = PROGRAM.targets_mmhg if fits else [50.0] * (CHAMBERS + 1)
        c = cmd(CommandKind.START, self.now, expires_in=expires_in,
                program=MACHINE_PROGRAM.model_copy(update={"targets_mmhg": targets}))
        was = self.session
        out = self._deliver(c)
        self._check(out, answering=c)
        ack = out[0].message
        assert isinstance(ack, Ack)
        if expires_in < 0:
            assert ack.reason == "expired"
        elif was is not None:
            assert ack.reason == "busy"
        elif not fits:
            assert ack.status is AckStatus.REJECTED and ack.reason is not None
            assert ack.reason.startswith("invalid: ")
        else:
            assert kinds(out) == ["ack:accepted", "event:session_started",
                                  f"state:{c.session_id}"]
        assert ack.status is AckStatus.ACCEPTED or self.session == was

    # Everything that ends a session early is one rule, so they do not crowd out the ticks.
    @rule(how=st.sampled_from(["stop", "vent", "connection_lost", "stop_button"]))
    def end(self, how: str) -> None:
        was = self.session
        if how in {"stop", "vent"}:
            c = cmd(CommandKind(how), self.now, session_id=self.session)
            out = self._deliver(c)
            self._check(out, answering=c)
            assert kinds(out)[0] == "ack:done"
        elif how == "connection_lost":
            out = self.fw.connection_lost(self.now)
            self._check(out)
            assert kinds(out) == ([] if was is None else ["event:vented", "state:-"])
        else:
            out = self.fw.press_stop(self.now)
            self._check(out)
            assert kinds(out)[0] == "event:user_stop"
        assert self.session is None

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """QoS 1: a command arrives again. The last ack again; never executed twice."""
        c = data.draw(st.sampled_from(self.delivered))
        previous = self.last_ack[c.cmd_id]
        was = self.session
        out = self._deliver(c)
        self._check(out, answering=c)
        if c.kind is CommandKind.VENT:  # always obeyed
            assert self.session is None
        else:
            assert len(out) == 1 and self.session == was
            ack = out[0].message
            assert isinstance(ack, Ack)
            assert (ack.status, ack.reason) == (previous.status, previous.reason)

    @initialize(heartbeat=st.booleans())
    def begin_in_a_session(self, heartbeat: bool) -> None:
        """Most runs are short: start each in a session, so its timers get exercised."""
        if heartbeat:
            self._heartbeat("live", 2.0)
        c = cmd(CommandKind.START, self.now, program=MACHINE_PROGRAM)
        self._check(self._deliver(c), answering=c)
        assert self.session == c.session_id

    def _heartbeat(self, kind: str | None, interval_s: float) -> None:
        if kind is None:
            return
        self.fw.on_heartbeat(Heartbeat(ts=self.now, gateway_id="gw-1", interval_s=interval_s),
                             retained=kind == "retained", now=self.now)
        self.interval_s = interval_s
        if kind == "live":
            self.last_live = self.now

    # A tick, after a heartbeat (live, or retained: no proof of life) or none.
    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 4.75, 5.0, 5.25, 6.0, 6.25]),
          heartbeat=st.sampled_from([None, "live", "live", "retained"]),
          interval_s=st.sampled_from([1.0, 2.0, 4.0]))
    def tick(self, dt: float, heartbeat: str | None, interval_s: float) -> None:
        self._heartbeat(heartbeat, interval_s)
        self.now += dt
        was = self.session
        out = self.fw.sample(self.now)
        self._check(out)
        timeout = max(5.0, 3 * self.interval_s)  # protocol §7.2
        events = [o.message for o in out if isinstance(o.message, BootEvent)]
        if was is not None and self.now >= self.started_at + MACHINE_PROGRAM.duration_s:
            assert [e.kind for e in events] == [EventKind.SESSION_COMPLETED]
            assert "ack:done" in kinds(out)
        elif was is not None and self.now - max(self.last_live, self.started_at) > timeout:
            assert [(e.kind, e.detail) for e in events] == [
                (EventKind.VENTED, SELF_VENT_HEARTBEAT)]
        else:
            assert events == [] and self.session == was


FirmwareMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30,
                                             deadline=None, database=None)
test_the_firmware_state_machine = FirmwareMachine.TestCase
