"""Fleet state: what the gateway knows of each boot (pure data, updated by the service)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.contract import BootState, SessionProgram, Telemetry
from gateway.watchdog import BootWatch


class SessionStatus(StrEnum):
    STARTING = "starting"  # start sent, no ack yet
    RUNNING = "running"


class SessionOutcome(StrEnum):
    COMPLETED = "completed"
    STOPPED = "stopped"
    USER_STOP = "user_stop"
    VENTED = "vented"
    REJECTED = "rejected"
    FAILED = "failed"  # no ack in time, or the boot went away


@dataclass
class Session:
    session_id: str
    program: SessionProgram | None  # None: resumed from telemetry, program unknown
    cmd_id: str | None
    requested_at: float  # wall clock
    status: SessionStatus = SessionStatus.STARTING
    started_at: float | None = None
    resumed: bool = False

    @property
    def program_name(self) -> str:
        return self.program.name if self.program else "unknown"


@dataclass
class Boot:
    clinic: str
    device: str
    state: BootState
    watch: BootWatch
    last_seen: float  # wall clock of the last message of any kind
    last_telemetry: Telemetry | None = None
    session: Session | None = None
    last_outcome: SessionOutcome | None = None
    vents: int = 0
    faults: int = 0
    # sessions that ended here, so late telemetry carrying their id does not resume them
    ended_sessions: deque[str] = field(default_factory=lambda: deque(maxlen=8))

    @property
    def key(self) -> str:
        return f"{self.clinic}/{self.device}"

    @property
    def online(self) -> bool:
        return self.watch.online


@dataclass
class Fleet:
    boots: dict[str, Boot] = field(default_factory=dict)

    def get(self, clinic: str, device: str) -> Boot | None:
        return self.boots.get(f"{clinic}/{device}")

    def upsert_state(
        self, clinic: str, device: str, state: BootState, now: float, clinic_ceiling: float
    ) -> Boot:
        """Record a state message; a boot whose chamber layout changed gets a new watch."""
        key = f"{clinic}/{device}"
        boot = self.boots.get(key)
        if boot is None:
            boot = Boot(clinic, device, state, _watch(state, clinic_ceiling, state.online), now)
            self.boots[key] = boot
            return boot
        if boot.state.chambers != state.chambers:
            boot.watch = _watch(state, clinic_ceiling, boot.online)
        # online/offline transitions go through the watchdog (rule 7), not through here
        boot.state = state
        boot.last_seen = now
        boot.watch.device_max_mmhg = state.max_pressure_mmhg
        boot.watch.telemetry_period_s = state.telemetry_period_s
        return boot

    def counts(self) -> dict[str, int]:
        online = sum(b.online for b in self.boots.values())
        in_session = sum(b.session is not None for b in self.boots.values())
        return {"boots": len(self.boots), "online": online, "in_session": in_session}


def _watch(state: BootState, clinic_ceiling: float, online: bool) -> BootWatch:
    return BootWatch(
        chambers=state.chambers,
        device_max_mmhg=state.max_pressure_mmhg,
        clinic_ceiling_mmhg=clinic_ceiling,
        telemetry_period_s=state.telemetry_period_s,
        online=online,
    )
