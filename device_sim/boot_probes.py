"""The test probe of a simulated boot: what it has received and sent, and waits on those.

Tests and the fleet runner do not poll a boot with sleeps: they await a predicate over the
boot's record (commands received, acks and events sent, vents, self-vents, sessions completed)
that is re-checked on every state change the boot announces with `_notify`. This mixin holds
those waits; `SimBoot` (device_sim/boot.py) keeps the record and calls `_notify`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from gateway.contract import Ack, AckStatus, BootEvent, Command, CommandKind, EventKind

T = TypeVar("T")


class BootProbes:
    """Waits over a boot's record; the record itself is kept by the boot (declared here)."""

    _changed: asyncio.Event
    commands_received: list[Command]
    acks_sent: list[Ack]
    events_sent: list[BootEvent]
    vents_received: int
    vent_received_at: float | None

    if TYPE_CHECKING:  # SimBoot reads these from its firmware (device_sim/firmware.py)
        @property
        def self_vents(self) -> int: ...

        @property
        def sessions_completed(self) -> int: ...

    def _notify(self) -> None:
        """Wake every waiter; they re-check their predicate against the new state."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], T | None], timeout: float) -> T:
        """Wait until predicate() is truthy; return its value. Raises TimeoutError.

        Typed `T | None -> T` so a finder returning `X | None` yields an `X`: the value
        returned is truthy, hence never None.

        Re-checked on every state change: command, ack, event, (dis)connect, and every
        telemetry tick (so predicates on pressures or counters work too).
        """
        async with asyncio.timeout(timeout):
            while True:
                result = predicate()
                if result:
                    return result
                await self._changed.wait()

    async def wait_for_ack(
        self, status: AckStatus, timeout: float = 10.0, *, cmd_id: str | None = None
    ) -> Ack:
        """First ack sent with this status (and cmd_id, if given), including earlier ones."""

        def find() -> Ack | None:
            for ack in self.acks_sent:
                if ack.status is status and (cmd_id is None or ack.cmd_id == cmd_id):
                    return ack
            return None

        return await self.wait_until(find, timeout)

    async def wait_for_event(
        self, kind: EventKind, timeout: float = 10.0, *, session_id: str | None = None
    ) -> BootEvent:
        """First event sent of this kind (and session, if given), including earlier ones."""

        def find() -> BootEvent | None:
            for ev in self.events_sent:
                if ev.kind is kind and (session_id is None or ev.session_id == session_id):
                    return ev
            return None

        return await self.wait_until(find, timeout)

    async def wait_for_self_vent(self, timeout: float = 10.0, *, count: int = 1) -> BootEvent:
        """Until the boot has vented itself `count` times; returns the last VENTED event."""
        await self.wait_until(lambda: self.self_vents >= count, timeout)
        return next(e for e in reversed(self.events_sent) if e.kind is EventKind.VENTED)

    async def wait_for_vent(self, timeout: float = 10.0, *, count: int = 1) -> float:
        """Until `count` vent commands have arrived; returns the clock time of the first."""
        await self.wait_until(lambda: self.vents_received >= count, timeout)
        assert self.vent_received_at is not None
        return self.vent_received_at

    async def wait_for_session_completed(self, timeout: float = 60.0, *, count: int = 1) -> None:
        await self.wait_until(lambda: self.sessions_completed >= count, timeout)

    async def wait_for_command(self, kind: CommandKind, timeout: float = 10.0) -> Command:
        def find() -> Command | None:
            return next((c for c in self.commands_received if c.kind is kind), None)

        return await self.wait_until(find, timeout)
