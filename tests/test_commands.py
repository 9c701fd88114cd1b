"""Command tracking: the ack timeout counts from delivery to the broker, not from queueing.

Deadlines run on an injected clock and are checked by `expire_due` (the gateway's tick).
"""

from __future__ import annotations

import time

from gateway.commands import CommandOutcome, CommandTracker
from gateway.contract import Command, CommandKind


def command(cmd_id: str = "c-1") -> Command:
    return Command(cmd_id=cmd_id, kind=CommandKind.STOP, issued_at=time.time())


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_delivery_restarts_the_ack_timeout() -> None:
    clock, expired = Clock(), []
    tracker = CommandTracker(0.3, lambda t: expired.append(t.command.cmd_id), clock)
    tracked = tracker.track("c1/b1", command())
    clock.now += 0.2  # queued behind other publishes for a while
    tracker.delivered("c-1")
    clock.now += 0.2  # 0.4 s after tracking, 0.2 s after delivery
    tracker.expire_due(clock.now)
    assert not tracked.first_ack.done() and expired == []
    clock.now += 0.1  # exactly 0.3 s after delivery: the deadline is inclusive
    tracker.expire_due(clock.now)
    assert tracked.first_ack.result() is CommandOutcome.FAILED and expired == ["c-1"]
    assert tracked.reason == "no ack within 0.3 s"


async def test_delivery_of_an_unknown_or_answered_command_changes_nothing() -> None:
    clock, expired = Clock(), []
    tracker = CommandTracker(0.2, lambda t: expired.append(t.command.cmd_id), clock)
    tracker.delivered("c-unknown")  # no error, nothing tracked
    tracked = tracker.track("c1/b1", command())
    tracked.first_ack.set_result(CommandOutcome.DONE)
    tracker.delivered("c-1")
    clock.now += 1.0
    tracker.expire_due(clock.now)  # past the timeout: an answered command must not expire
    assert expired == [] and tracked.first_ack.result() is CommandOutcome.DONE


async def test_a_command_can_have_its_own_timeout() -> None:
    clock, expired = Clock(), []
    tracker = CommandTracker(5.0, lambda t: expired.append(t.command.cmd_id), clock)
    start = tracker.track("c1/b1", command("c-start"), timeout_s=15.0)
    stop = tracker.track("c1/b1", command("c-stop"))
    clock.now += 6.0
    tracker.expire_due(clock.now)
    assert expired == ["c-stop"] and not start.first_ack.done()
    clock.now += 9.0
    tracker.expire_due(clock.now)
    assert expired == ["c-stop", "c-start"] and stop.first_ack.result() is CommandOutcome.FAILED
