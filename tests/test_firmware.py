"""The boot firmware's pure decisions (device_sim/firmware.py), driven with plain numbers for a
clock and no broker. Expectations come from docs/protocol.md: §5 "start" (refuse `expired`
past expires_at on the boot's own clock, `busy` in a session, a program that does not fit the
boot) and §7.2 (self-vent after 3 x the last heartbeat's interval_s, never under 5 s, 2 s
assumed before the first heartbeat; a session started after the last heartbeat gets the full
timeout from its start; outside a session a missing heartbeat needs no action).
"""

from __future__ import annotations

import pytest

from device_sim.firmware import heartbeat_lost, heartbeat_timeout_s, start_refusal
from gateway.contract import Command, CommandKind, ProgramTiming, SessionProgram

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
    assert reason is not None and reason not in {"expired", "busy"}


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
