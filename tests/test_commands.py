"""Command tracking: the ack timeout counts from delivery to the broker, not from queueing."""

from __future__ import annotations

import asyncio
import time

from gateway.commands import CommandOutcome, CommandTracker
from gateway.contract import Command, CommandKind


def command() -> Command:
    return Command(cmd_id="c-1", kind=CommandKind.STOP, issued_at=time.time())


async def test_delivery_restarts_the_ack_timeout() -> None:
    expired: list[str] = []
    tracker = CommandTracker(0.3, lambda t: expired.append(t.command.cmd_id), time.monotonic)
    tracked = tracker.track("c1/b1", command())
    await asyncio.sleep(0.2)  # queued behind other publishes for a while: time is the subject
    delivered_at = time.monotonic()
    tracker.delivered("c-1")
    await asyncio.sleep(0.2)  # 0.4 s after tracking, 0.2 s after delivery
    assert not tracked.first_ack.done() and expired == []
    outcome = await asyncio.wait_for(tracked.first_ack, timeout=2)
    assert outcome is CommandOutcome.FAILED and expired == ["c-1"]
    assert time.monotonic() - delivered_at >= 0.3
    tracker.close()


async def test_delivery_of_an_unknown_or_answered_command_changes_nothing() -> None:
    expired: list[str] = []
    tracker = CommandTracker(0.2, lambda t: expired.append(t.command.cmd_id), time.monotonic)
    tracker.delivered("c-unknown")  # no error, nothing tracked
    tracked = tracker.track("c1/b1", command())
    tracked.first_ack.set_result(CommandOutcome.DONE)
    tracker.delivered("c-1")
    await asyncio.sleep(0.4)  # past the timeout: an answered command must not expire
    assert expired == [] and tracked.first_ack.result() is CommandOutcome.DONE
    tracker.close()
