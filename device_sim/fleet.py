"""Many simulated boots in one process, one asyncio task (and one MQTT connection) each."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from device_sim.boot import SimBoot, account_kwargs
from device_sim.link_settings import BootLink
from gateway.aio import cancel_and_wait
from gateway.boot_credentials import BootCredentials

log = logging.getLogger(__name__)

# A paho client holds a socket plus a wake-up socket pair: budget a few descriptors per boot.
_FDS_PER_BOOT = 4


def _raise_fd_limit(needed: int) -> None:
    """Thousands of connections exceed the common soft limit of 1024; raise it up to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning("file descriptor limit may be too low",
                    extra={"needed": needed, "hard_limit": hard})


class SimFleet:
    """Runs a SimBoot per (clinic, device); `async with` starts them all and stops them all."""

    def __init__(
        self,
        members: Iterable[tuple[str, str]],
        mqtt: BootLink,
        *,
        connect_timeout_s: float | None = None,
        credentials: Mapping[str, BootCredentials] | None = None,
        **boot_kwargs: Any,
    ) -> None:
        """boot_kwargs go to every SimBoot; an int `seed` becomes seed + index per boot.
        credentials: per-boot broker accounts by "clinic/device" (gateway/boot_credentials.py);
        a boot without an entry uses `mqtt`'s username and password."""
        seed = boot_kwargs.pop("seed", None)
        self.mqtt = mqtt
        self.boots: dict[str, SimBoot] = {}
        credentials = credentials or {}
        for index, (clinic, device) in enumerate(members):
            account = account_kwargs(credentials.get(f"{clinic}/{device}"))
            boot = SimBoot(
                clinic, device, mqtt,
                seed=None if seed is None else seed + index,
                **boot_kwargs, **account,
            )
            if boot.key in self.boots:
                raise ValueError(f"duplicate boot {boot.key}")
            self.boots[boot.key] = boot
        # Connecting is bounded by the broker's CONNACK rate; allow more time for big fleets.
        self.connect_timeout_s = (
            connect_timeout_s if connect_timeout_s is not None
            else 10.0 + len(self.boots) / 100.0
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @classmethod
    def make(
        cls, n_boots: int, clinics: int, mqtt: BootLink, *, clinic_prefix: str = "clinic-",
        **boot_kwargs: Any,
    ) -> SimFleet:
        """`n_boots` named boot-001.. spread round-robin over {clinic_prefix}1..{clinics}
        (a prefix per process keeps several simulator processes apart)."""
        if n_boots < 1 or clinics < 1:
            raise ValueError("need at least one boot and one clinic")
        width = max(3, len(str(n_boots)))
        members = [
            (f"{clinic_prefix}{i % clinics + 1}", f"boot-{i + 1:0{width}d}")
            for i in range(n_boots)
        ]
        return cls(members, mqtt, **boot_kwargs)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        _raise_fd_limit(len(self.boots) * _FDS_PER_BOOT + 256)
        for key, boot in self.boots.items():
            self._tasks[key] = asyncio.create_task(boot.run(), name=f"simboot-{key}")
        try:
            await self.wait_connected(self.connect_timeout_s)
        except TimeoutError:
            missing = [k for k, b in self.boots.items() if not b.connected]
            log.error(
                "fleet did not connect in time",
                extra={"missing": len(missing), "examples": missing[:5],
                       "timeout_s": self.connect_timeout_s},
            )
            await self.stop()
            raise

    async def stop(self) -> None:
        """Cancel every boot (each publishes online=false and disconnects) and await them."""
        results = await cancel_and_wait(self._tasks.values())
        for key, result in zip(self._tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                log.error("boot task failed", extra={"boot": key, "error": repr(result)})
        self._tasks.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ waiting

    async def wait_connected(self, timeout: float) -> None:
        await self.wait_all(lambda b: b.connected, timeout)

    async def wait_all(self, predicate: Callable[[SimBoot], object], timeout: float) -> None:
        """Until predicate(boot) holds for every boot; raises TimeoutError."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(
                *(b.wait_until(functools.partial(predicate, b), timeout)
                  for b in self.boots.values())
            )

    # ------------------------------------------------------------------ aggregates

    def __len__(self) -> int:
        return len(self.boots)

    @property
    def connected_count(self) -> int:
        return sum(b.connected for b in self.boots.values())

    @property
    def telemetry_sent(self) -> int:
        return sum(b.telemetry_sent for b in self.boots.values())

    @property
    def sessions_completed(self) -> int:
        return sum(b.sessions_completed for b in self.boots.values())

    @property
    def vents_received(self) -> int:
        return sum(b.vents_received for b in self.boots.values())

    @property
    def commands_received(self) -> int:
        return sum(len(b.commands_received) for b in self.boots.values())

    @property
    def self_vents(self) -> int:
        """Self-vents (heartbeat or connection lost): each one means the gateway link failed."""
        return sum(b.self_vents for b in self.boots.values())

    @property
    def in_session_count(self) -> int:
        return sum(b.in_session for b in self.boots.values())

    def stats(self) -> dict[str, int]:
        """Aggregate counters for progress lines and the simulation report."""
        return {
            "boots": len(self.boots),
            "connected": self.connected_count,
            "in_session": self.in_session_count,
            "telemetry_sent": self.telemetry_sent,
            "commands_received": self.commands_received,
            "sessions_completed": self.sessions_completed,
            "vents_received": self.vents_received,
            "self_vents": self.self_vents,
            "malformed_commands": sum(b.malformed_commands for b in self.boots.values()),
        }
