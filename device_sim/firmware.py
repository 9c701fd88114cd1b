"""A simulated boot's firmware as a pure state machine: no MQTT, no asyncio, no clock of its own.

`BootFirmware` is what a boot's firmware decides, the way device_sim/physics.py keeps the
chambers and gateway/watchdog.py the gateway's rules: every method takes `now` (the boot's
monotonic clock, seconds) and returns the messages to send, in the order the contract wants
them (docs/protocol.md §4.1, §6.2, §7.2), as `Outgoing` values. It owns the physics model, the
running session, the telemetry `seq`, the duplicate-`cmd_id` memory, the heartbeat bookkeeping
and the record of self-vents and completed sessions, plus the fault switches that act on the
firmware itself (a skewed wall clock, a hang that ignores vents, silence). Sending is not its
business: device_sim/boot.py (`SimBoot`) is the link around it (connection, outbox while
offline, publish lock, telemetry ticker, the faults that act on the wire) and feeds commands,
heartbeats and ticks in. So hours of firmware behaviour are unit-tested with a fake clock in
microseconds (tests/test_firmware.py), and the decisions below it (`start_refusal`,
`heartbeat_timeout_s`, `heartbeat_lost`) are plain functions of plain values.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass

from device_sim.physics import BootModel
from gateway.contract import (
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
    Telemetry,
)

log = logging.getLogger(__name__)

# Heartbeat-loss timeout when none is configured (protocol §7.2): this many of the gateway's
# announced intervals, never less than the floor; the gateway default interval until one is seen.
HEARTBEAT_TIMEOUT_INTERVALS = 3.0
HEARTBEAT_TIMEOUT_FLOOR_S = 5.0
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
SELF_VENT_HEARTBEAT = "gateway heartbeat lost"
SELF_VENT_CONNECTION = "mqtt connection lost"
# Duplicate cmd_ids (QoS 1 redelivery) are answered from this memory instead of re-executed
# (protocol §6.1 asks for at least the current and the previous session's).
SEEN_CMDS = 256
# Standard zone names, distal to proximal; boots with more chambers number the rest.
_ZONES = ["foot", "calf", "knee", "thigh", "hip"]


def zones_for(chambers: int) -> list[str]:
    """Zone label per chamber, distal to proximal (BootState.zones)."""
    return (_ZONES + [f"zone{i + 1}" for i in range(len(_ZONES), chambers)])[:chambers]


def heartbeat_timeout_s(configured_s: float | None, interval_s: float | None) -> float:
    """How long a session survives without a live heartbeat (protocol §7.2): the configured
    timeout, else 3 times the last heartbeat's interval_s (the gateway default 2 s before one was
    seen), never less than 5 s."""
    if configured_s is not None:
        return configured_s
    interval = interval_s or DEFAULT_HEARTBEAT_INTERVAL_S
    return max(HEARTBEAT_TIMEOUT_FLOOR_S, HEARTBEAT_TIMEOUT_INTERVALS * interval)


def heartbeat_lost(
    now: float, *, in_session: bool, session_elapsed_s: float | None,
    last_heartbeat_at: float | None, timeout_s: float,
) -> bool:
    """In session and neither a live heartbeat nor the session start within the timeout
    (a session started from a stale heartbeat gets the full timeout, not an instant vent)."""
    if not in_session:
        return False
    elapsed = session_elapsed_s or 0.0
    reference = max(last_heartbeat_at or -math.inf, now - elapsed)
    return now - reference > timeout_s


def start_refusal(
    cmd: Command, *, device_now: float, in_session: bool, chambers: int,
    max_pressure_mmhg: float,
) -> str | None:
    """Why this start must not run (the ack's `reason`, starting with the protocol's stable
    word, §6.3: `expired`, `busy`, `invalid: ...`), or None to start it. `device_now` is the
    boot's own wall clock (skew included): the expiry is judged on it, as a boot would."""
    assert cmd.program is not None
    if cmd.expires_at is not None and device_now > cmd.expires_at:
        return "expired"  # judged on the boot's own (possibly skewed) wall clock
    if in_session:
        return "busy"
    n = len(cmd.program.targets_mmhg)
    if n != chambers:
        return f"invalid: program has {n} chamber targets, boot has {chambers} chambers"
    for i, target in enumerate(cmd.program.targets_mmhg, start=1):
        if target > max_pressure_mmhg:
            return (
                f"invalid: chamber {i} target {target:g} mmHg above boot maximum "
                f"{max_pressure_mmhg:g} mmHg"
            )
    return None


Message = Ack | BootEvent | BootState | Telemetry


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message the firmware wants sent on one of its channels, as the model (not bytes):
    the link encodes it. A `state` is the firmware's state when it was decided; the link may
    send a fresher one (the retained state is last-writer-wins, so the newest is the right one)."""

    channel: Channel
    message: Message


class BootFirmware:
    """The firmware of one simulated boot: commands, heartbeats and ticks in, messages out.

    Nothing here waits or talks to a network; `now` is always passed in (the boot's monotonic
    clock), and the boot's wall clock, which every `ts` and the start-expiry check use, is
    `now + clock_skew_s`. Each method returns the messages in contract order; the caller sends
    them in that order (or queues them while offline) and must not reorder them.
    """

    def __init__(
        self,
        *,
        key: str,
        chambers: int,
        max_pressure_mmhg: float,
        telemetry_period_s: float,
        version: str,
        rng: random.Random,
        heartbeat_timeout_s: float | None = None,
        self_vent: bool = True,
    ) -> None:
        """key: the boot's `clinic/device`, for log lines only. heartbeat_timeout_s None:
        derived from the last heartbeat's interval_s (protocol §7.2). self_vent: the boot's
        own safety duty; off only for tests that run sessions without a gateway."""
        if heartbeat_timeout_s is not None and not heartbeat_timeout_s > 0:
            raise ValueError("heartbeat_timeout_s must be positive")
        self.key = key
        self.chambers = chambers
        self.max_pressure_mmhg = max_pressure_mmhg
        self.telemetry_period_s = telemetry_period_s
        self.version = version
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.self_vent = self_vent
        self.model = BootModel(chambers, max_pressure_mmhg, rng=rng)

        # The running session: its id, the start command that began it (acked `done` at the
        # end), and the retained state's view of it.
        self.session_id: str | None = None
        self._start_cmd_id: str | None = None
        self._active: ActiveSession | None = None
        self.seq = 0  # the next telemetry message's seq
        self._seen: OrderedDict[str, Ack] = OrderedDict()  # cmd_id -> its last ack

        # Monotonic time of the last heartbeat that arrived live (retained ones prove nothing).
        self.last_heartbeat_at: float | None = None
        # interval_s of the last heartbeat seen, retained or not: it sizes the timeout.
        self.heartbeat_interval_s: float | None = None
        self.heartbeats_received = 0
        self.self_vents = 0
        # (clock time, cause) of every self-vent, for the report (the boot's own safety duty).
        self.self_vents_at: list[tuple[float, str]] = []
        self.sessions_completed = 0

        # Fault switches that act on the firmware (set through SimBoot's BootFaults).
        # Offset of the wall clock: skews and NTP-like steps move only this; the timers and
        # session_elapsed_s run on `now`, the monotonic clock, which is never stepped.
        self.clock_skew_s = 0.0
        self.ignore_vents = False  # a hang: vents are received and never executed or acked
        self.silent = False  # no telemetry; commands are still obeyed, self-vent still runs

    # ------------------------------------------------------------------ what it is doing

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

    def device_time(self, now: float) -> float:
        """The boot's own wall clock: `now` plus the injected skew and steps."""
        return now + self.clock_skew_s

    def state(self, online: bool, now: float) -> BootState:
        """The retained state; the session only while online (the LWT never carries one)."""
        return BootState(
            online=online,
            firmware=self.version,
            chambers=self.chambers,
            zones=zones_for(self.chambers),
            max_pressure_mmhg=self.max_pressure_mmhg,
            telemetry_period_s=self.telemetry_period_s,
            ts=self.device_time(now),
            session=self._active if online else None,
        )

    # ------------------------------------------------------------------ inputs

    def handle(self, cmd: Command, now: float) -> list[Outgoing]:
        """One command (protocol §6): what to send in answer, in order. A repeated cmd_id gets
        its last ack again and is not executed again, except a vent, which is always obeyed."""
        if cmd.kind is CommandKind.VENT and self.ignore_vents:
            log.warning("vent ignored (injected firmware hang)",
                        extra={"boot": self.key, "cmd_id": cmd.cmd_id})
            return []
        previous = self._seen.get(cmd.cmd_id)
        if previous is not None and cmd.kind is not CommandKind.VENT:
            return [self._ack(cmd.cmd_id, previous.status, previous.reason, now,
                              remember=False)]
        if cmd.kind is CommandKind.START:
            return self._start(cmd, now)
        session_id = self.session_id
        if cmd.kind is CommandKind.STOP:
            self.model.stop(now)
            ended = self._end_session()
            out = [self._ack(cmd.cmd_id, AckStatus.DONE, None, now)]
            if session_id is not None:
                out.append(self._event(EventKind.SESSION_STOPPED, now, session_id=session_id,
                                       detail=cmd.reason))
        else:
            self.model.vent(now)
            ended = self._end_session()
            out = [self._ack(cmd.cmd_id, AckStatus.DONE, None, now),
                   self._event(EventKind.VENTED, now, session_id=session_id,
                               detail=cmd.reason)]
        if ended:
            out.append(self._state(now))
        return out

    def on_heartbeat(self, hb: Heartbeat, *, retained: bool, now: float) -> None:
        """A heartbeat arrived. A retained one (delivered on subscribe) says nothing about the
        gateway being alive now: it only tells the interval. Nothing is sent: whether a
        session has outlived the heartbeat is `sample`'s decision."""
        if math.isfinite(hb.interval_s) and hb.interval_s > 0:
            self.heartbeat_interval_s = hb.interval_s
        if not retained:
            self.last_heartbeat_at = now
            self.heartbeats_received += 1

    def sample(self, now: float) -> list[Outgoing]:
        """One telemetry period: advance the model; a session that ran its full duration is
        completed (event, `done` for its start, state), else one that outlived the heartbeat
        is self-vented (event, state); then the telemetry sample, unless silent.

        The sample consumes a `seq` whether or not the link can send it (a QoS 0 sample lost
        offline shows as a gap); a silent boot takes none."""
        phase, measured = self.model.step(now)
        out: list[Outgoing] = []
        # A session a stop/vent command already ended is not also "completed".
        if self.model.poll_completed() and self.session_id is not None:
            out += self._complete_session(now)
        elif self._heartbeat_lost(now):
            out += self._self_vent(now, SELF_VENT_HEARTBEAT)
        if self.silent:
            return out
        session_id = self.session_id
        elapsed = self.model.session_elapsed(now) if session_id is not None else None
        out.append(Outgoing(Channel.TELEMETRY, Telemetry(
            seq=self.seq,
            ts=self.device_time(now),
            session_id=session_id,
            session_elapsed_s=None if elapsed is None else round(max(0.0, elapsed), 2),
            phase=phase,
            pressures=[round(p, 1) for p in measured],
        )))
        self.seq += 1
        return out

    def connection_lost(self, now: float) -> list[Outgoing]:
        """The MQTT connection dropped: in a session, vent (protocol §7.2); the link sends the
        event once it is back."""
        if not (self.self_vent and self.model.in_session):
            return []
        return self._self_vent(now, SELF_VENT_CONNECTION)

    def press_stop(self, now: float) -> list[Outgoing]:
        """The user's stop button (numbness, pain): the session stops, USER_STOP is sent
        (also when idle: the press is what the gateway records as a safety event)."""
        session_id = self.session_id
        self.model.stop(now)
        ended = self._end_session()
        log.info("user stop", extra={"boot": self.key, "session_id": session_id})
        out = [self._event(EventKind.USER_STOP, now, session_id=session_id,
                           detail="stop button")]
        if ended:
            out.append(self._state(now))
        return out

    # ------------------------------------------------------------------ the steps

    def _start(self, cmd: Command, now: float) -> list[Outgoing]:
        """Flow of protocol §6.2: `accepted`, `session_started`, state with the session; or
        `rejected` with the reason and nothing else."""
        reason = start_refusal(
            cmd, device_now=self.device_time(now), in_session=self.model.in_session,
            chambers=self.chambers, max_pressure_mmhg=self.max_pressure_mmhg)
        if reason is not None:
            log.info("start rejected",
                     extra={"boot": self.key, "cmd_id": cmd.cmd_id, "reason": reason})
            return [self._ack(cmd.cmd_id, AckStatus.REJECTED, reason, now)]
        assert cmd.program is not None and cmd.session_id is not None
        self.model.start(cmd.program, now)
        self.session_id = cmd.session_id
        self._start_cmd_id = cmd.cmd_id
        self._active = ActiveSession(session_id=cmd.session_id, cmd_id=cmd.cmd_id,
                                     program=cmd.program, started_at=self.device_time(now))
        return [self._ack(cmd.cmd_id, AckStatus.ACCEPTED, None, now),
                self._event(EventKind.SESSION_STARTED, now, session_id=cmd.session_id,
                            detail=cmd.program.name),
                self._state(now)]

    def _heartbeat_lost(self, now: float) -> bool:
        if not self.self_vent:
            return False
        return heartbeat_lost(
            now, in_session=self.model.in_session,
            session_elapsed_s=self.model.session_elapsed(now),
            last_heartbeat_at=self.last_heartbeat_at,
            timeout_s=self.effective_heartbeat_timeout_s)

    def _self_vent(self, now: float, cause: str) -> list[Outgoing]:
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
        return [self._event(EventKind.VENTED, now, session_id=session_id, detail=cause),
                self._state(now)]

    def _complete_session(self, now: float) -> list[Outgoing]:
        """Protocol §4.1/§6.2: `session_completed` first, then `done` for the start, then state."""
        session_id, cmd_id = self.session_id, self._start_cmd_id
        self._end_session()
        self.sessions_completed += 1
        log.info("session completed", extra={"boot": self.key, "session_id": session_id})
        out = [self._event(EventKind.SESSION_COMPLETED, now, session_id=session_id)]
        if cmd_id is not None:
            out.append(self._ack(cmd_id, AckStatus.DONE, None, now))
        out.append(self._state(now))
        return out

    def _end_session(self) -> bool:
        """Forget the running session; True if there was one (its retained state must go)."""
        ended = self._active is not None
        self.session_id = None
        self._start_cmd_id = None
        self._active = None
        return ended

    def _ack(self, cmd_id: str, status: AckStatus, reason: str | None, now: float, *,
             remember: bool = True) -> Outgoing:
        ack = Ack(cmd_id=cmd_id, status=status, ts=self.device_time(now), reason=reason)
        if remember:
            self._seen[cmd_id] = ack
            self._seen.move_to_end(cmd_id)
            while len(self._seen) > SEEN_CMDS:
                self._seen.popitem(last=False)
        return Outgoing(Channel.ACK, ack)

    def _event(self, kind: EventKind, now: float, *, session_id: str | None = None,
               detail: str | None = None) -> Outgoing:
        return Outgoing(Channel.EVENT, BootEvent(kind=kind, ts=self.device_time(now),
                                                 session_id=session_id, detail=detail))

    def _state(self, now: float) -> Outgoing:
        return Outgoing(Channel.STATE, self.state(online=True, now=now))
