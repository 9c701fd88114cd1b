"""Tracking of commands sent to boots: ids, acks and timeouts (no I/O)."""

from __future__ import annotations

import asyncio
import heapq
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
    """Keeps commands until they are acked or time out; recent ones stay for lookups and 'done'.

    Timeouts are deadlines on the injected monotonic clock, checked by `expire_due` from the
    gateway's tick: no timer of its own, so a test can drive time and the clock is one.
    """

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
        self._deadlines: dict[str, tuple[float, float]] = {}  # cmd_id -> (deadline, timeout)
        self._heap: list[tuple[float, str]] = []
        self._keep_recent = keep_recent

    def track(self, key: str, command: Command, timeout_s: float | None = None
              ) -> TrackedCommand:
        """timeout_s: how long the boot has for its first ack (default: the ack timeout)."""
        tracked = TrackedCommand(key, command, self._monotonic())
        self._commands[command.cmd_id] = tracked
        while len(self._commands) > self._keep_recent:
            old_id, old = self._commands.popitem(last=False)
            self._deadlines.pop(old_id, None)
            if not old.first_ack.done():
                old.first_ack.cancel()
        self._arm(command.cmd_id, timeout_s or self.ack_timeout_s)
        return tracked

    def delivered(self, cmd_id: str) -> None:
        """The broker has the command: the boot's time to ack runs from now, not from when it
        was queued behind other publishes (a busy gateway must not fail commands it held)."""
        tracked = self._commands.get(cmd_id)
        armed = self._deadlines.get(cmd_id)
        if tracked is None or tracked.first_ack.done() or armed is None:
            return
        tracked.sent_at = self._monotonic()
        self._arm(cmd_id, armed[1])

    def get(self, cmd_id: str) -> TrackedCommand | None:
        return self._commands.get(cmd_id)

    def on_ack(self, key: str, ack: Ack) -> TrackedCommand | None:
        """Apply an ack; None when the ack is for no command of ours (or from another boot)."""
        tracked = self._commands.get(ack.cmd_id)
        if tracked is None or tracked.key != key:
            return None
        self._deadlines.pop(ack.cmd_id, None)
        tracked.outcome = CommandOutcome(ack.status.value)
        tracked.reason = ack.reason
        if tracked.latency_s is None:
            tracked.latency_s = self._monotonic() - tracked.sent_at
        if not tracked.first_ack.done():
            tracked.first_ack.set_result(tracked.outcome)
        return tracked

    def expire_due(self, now: float) -> None:
        """Fail every command whose first ack is overdue at `now`."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, cmd_id = heapq.heappop(heap)
            armed = self._deadlines.get(cmd_id)
            if armed is None or armed[0] != deadline:
                continue  # answered, re-armed or forgotten since
            del self._deadlines[cmd_id]
            tracked = self._commands.get(cmd_id)
            if tracked is None or tracked.first_ack.done():
                continue
            tracked.outcome = CommandOutcome.FAILED
            tracked.reason = f"no ack within {armed[1]:g} s"
            tracked.first_ack.set_result(CommandOutcome.FAILED)
            self._on_timeout(tracked)

    def _arm(self, cmd_id: str, timeout_s: float) -> None:
        deadline = self._monotonic() + timeout_s
        self._deadlines[cmd_id] = (deadline, timeout_s)
        heapq.heappush(self._heap, (deadline, cmd_id))

    def close(self) -> None:
        self._deadlines.clear()
        self._heap.clear()
