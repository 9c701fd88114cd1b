"""Fleet state: what the gateway knows of each boot (pure data, updated by the service)."""

from __future__ import annotations

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
    program: SessionProgram
    cmd_id: str
    requested_at: float  # wall clock
    status: SessionStatus = SessionStatus.STARTING
    started_at: float | None = None


@dataclass
class Boot:
    clinic: str
    device: str
    state: BootState
    online: bool
    watch: BootWatch
    last_seen: float  # wall clock of the last message of any kind
    last_telemetry: Telemetry | None = None
    session: Session | None = None
    last_outcome: SessionOutcome | None = None
    vents: int = 0
    faults: int = 0

    @property
    def key(self) -> str:
        return f"{self.clinic}/{self.device}"


@dataclass
class Fleet:
    boots: dict[str, Boot] = field(default_factory=dict)

    def get(self, clinic: str, device: str) -> Boot | None:
        return self.boots.get(f"{clinic}/{device}")

    def upsert_state(
        self, clinic: str, device: str, state: BootState, now: float, clinic_ceiling: float
    ) -> Boot:
        """Record a state message; a boot whose chamber layout changed loses its old watch."""
        key = f"{clinic}/{device}"
        boot = self.boots.get(key)
        if boot is None or boot.state.chambers != state.chambers:
            watch = BootWatch(
                chambers=state.chambers,
                device_max_mmhg=state.max_pressure_mmhg,
                clinic_ceiling_mmhg=clinic_ceiling,
                telemetry_period_s=state.telemetry_period_s,
            )
            boot = Boot(clinic, device, state, state.online, watch, now)
            self.boots[key] = boot
        else:
            boot.state = state
            boot.online = state.online
            boot.last_seen = now
            boot.watch.device_max_mmhg = state.max_pressure_mmhg
            boot.watch.telemetry_period_s = state.telemetry_period_s
        return boot

    def counts(self) -> dict[str, int]:
        online = sum(b.online for b in self.boots.values())
        in_session = sum(b.session is not None for b in self.boots.values())
        return {"boots": len(self.boots), "online": online, "in_session": in_session}
