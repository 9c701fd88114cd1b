"""Tracking of commands sent to boots: ids, acks and timeouts (no I/O)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.contract import Ack, Command

log = logging.getLogger(__name__)


class CommandOutcome(StrEnum):
    SENT = "sent"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DONE = "done"
    FAILED = "failed"  # no ack within the timeout


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


@dataclass
class TrackedCommand:
    key: str  # "clinic/device"
    command: Command
    sent_at: float  # monotonic
    outcome: CommandOutcome = CommandOutcome.SENT
    reason: str | None = None
    first_ack: asyncio.Future[CommandOutcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    latency_s: float | None = None


class CommandTracker:
    """Keeps commands until they are acked or time out; recent ones stay for lookups and 'done'."""

    def __init__(
        self,
        ack_timeout_s: float,
        on_timeout: Callable[[TrackedCommand], None],
        monotonic: Callable[[], float],
        keep_recent: int = 10_000,
    ) -> None:
        self.ack_timeout_s = ack_timeout_s
        self._on_timeout = on_timeout
        self._monotonic = monotonic
        self._commands: OrderedDict[str, TrackedCommand] = OrderedDict()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._keep_recent = keep_recent

    def track(self, key: str, command: Command) -> TrackedCommand:
        tracked = TrackedCommand(key, command, self._monotonic())
        self._commands[command.cmd_id] = tracked
        while len(self._commands) > self._keep_recent:
            old_id, old = self._commands.popitem(last=False)
            self._cancel_timer(old_id)
            if not old.first_ack.done():
                old.first_ack.cancel()
        loop = asyncio.get_running_loop()
        self._timers[command.cmd_id] = loop.call_later(
            self.ack_timeout_s, self._expire, command.cmd_id
        )
        return tracked

    def delivered(self, cmd_id: str) -> None:
        """The broker has the command: the boot's time to ack runs from now, not from when it
        was queued behind other publishes (a busy gateway must not fail commands it held)."""
        tracked = self._commands.get(cmd_id)
        if tracked is None or tracked.first_ack.done() or cmd_id not in self._timers:
            return
        self._cancel_timer(cmd_id)
        tracked.sent_at = self._monotonic()
        self._timers[cmd_id] = asyncio.get_running_loop().call_later(
            self.ack_timeout_s, self._expire, cmd_id
        )

    def get(self, cmd_id: str) -> TrackedCommand | None:
        return self._commands.get(cmd_id)

    def on_ack(self, key: str, ack: Ack) -> TrackedCommand | None:
        """Apply an ack; None when the ack is for no command of ours (or from another boot)."""
        tracked = self._commands.get(ack.cmd_id)
        if tracked is None or tracked.key != key:
            return None
        self._cancel_timer(ack.cmd_id)
        tracked.outcome = CommandOutcome(ack.status.value)
        tracked.reason = ack.reason
        if tracked.latency_s is None:
            tracked.latency_s = self._monotonic() - tracked.sent_at
        if not tracked.first_ack.done():
            tracked.first_ack.set_result(tracked.outcome)
        return tracked

    def _expire(self, cmd_id: str) -> None:
        self._timers.pop(cmd_id, None)
        tracked = self._commands.get(cmd_id)
        if tracked is None or tracked.first_ack.done():
            return
        tracked.outcome = CommandOutcome.FAILED
        tracked.reason = f"no ack within {self.ack_timeout_s:g} s"
        tracked.first_ack.set_result(CommandOutcome.FAILED)
        self._on_timeout(tracked)

    def _cancel_timer(self, cmd_id: str) -> None:
        timer = self._timers.pop(cmd_id, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


