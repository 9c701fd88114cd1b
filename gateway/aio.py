"""asyncio helpers shared by the gateway and the simulator."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], retry_s: float = 2.0,
                          attempts: int = 10) -> list[BaseException | object]:
    """Cancel tasks and wait for them, cancelling again those still running.

    On Python 3.11, `asyncio.wait_for` (used inside aiomqtt) can swallow a cancellation that
    coincides with its inner future completing, leaving a task running after `cancel()`.
    Repeating the cancel makes shutdown terminate.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    for attempt in range(attempts):
        if not pending:
            break
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
        if pending:
            log.warning("tasks survived a cancel; cancelling again", extra={
                "tasks": [t.get_name() for t in list(pending)[:5]], "attempt": attempt + 1})
    results: list[BaseException | object] = []
    for t in tasks:
        if not t.done():
            results.append(TimeoutError(f"task {t.get_name()} did not stop"))
        elif t.cancelled():
            results.append(asyncio.CancelledError())
        else:
            results.append(t.exception() or t.result())
    return results
