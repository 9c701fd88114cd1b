"""Fleet state: what the gateway knows of each boot (pure data, updated by the service)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.contract import BootState, SessionProgram, Telemetry
from gateway.journal import OpenSession
from gateway.programs import CATALOGUE
from gateway.settings import ProgramLimits
from gateway.watchdog import BootWatch

# Ended sessions remembered per boot, so a late message of one does not resume it.
ENDED_KEPT = 8

# The `program` tag of a session (docs/schema.md §2.4) besides the catalogue keys.
PROGRAM_CUSTOM = "custom"  # a program the gateway knows, not (exactly) a catalogue one
PROGRAM_UNKNOWN = "unknown"  # resumed from telemetry alone: the gateway has no program


def catalogue_key(program: SessionProgram | None, limits: ProgramLimits) -> str | None:
    """The catalogue key of `program` if it is that catalogue program, else None.

    A name is free text: a custom program (from the API, or a boot's retained state) may be
    called `post_workout_recovery` and squeeze harder. So the program must equal, field for
    field, what the catalogue resolves for its chamber count under these limits (the
    intensity words' mmHg). A boot's retained state carries the program it was sent, which a
    JSON round trip keeps exact; a session resumed after the clinic changed its intensity
    mapping no longer matches and counts as custom (docs/schema.md §2.4).
    """
    if program is None:
        return None
    template = CATALOGUE.get(program.name)
    if template is None or program != template.resolve(len(program.targets_mmhg), limits):
        return None
    return template.key


class SessionStatus(StrEnum):
    STARTING = "starting"  # start sent; no word from the boot yet (watched all the same)
    RUNNING = "running"  # the boot said so: ack, event, state or telemetry


class SessionOutcome(StrEnum):
    COMPLETED = "completed"
    STOPPED = "stopped"
    USER_STOP = "user_stop"
    VENTED = "vented"
    REJECTED = "rejected"
    FAILED = "failed"  # no word from the boot before the start's deadline
    LOST = "lost"  # the boot left the session without a terminal event (reboot, or it ended
    # while the gateway was down and no queued event says how)


@dataclass
class Session:
    session_id: str
    program: SessionProgram | None  # None: resumed from telemetry, program unknown
    cmd_id: str | None
    requested_at: float  # wall clock
    status: SessionStatus = SessionStatus.STARTING
    started_at: float | None = None
    resumed: bool = False
    left_at: float | None = None  # monotonic: when the boot's messages stopped showing it
    catalogue: str | None = None  # catalogue_key(program): set by whoever made the session

    @property
    def program_name(self) -> str:
        return self.program.name if self.program else "unknown"

    @property
    def program_tag(self) -> str:
        """A closed vocabulary, never free text: a catalogue key, `custom` or `unknown`."""
        if self.program is None:
            return PROGRAM_UNKNOWN
        return self.catalogue if self.catalogue in CATALOGUE else PROGRAM_CUSTOM

    def journal_entry(self, key: str) -> OpenSession:
        return OpenSession(key=key, session_id=self.session_id, cmd_id=self.cmd_id,
                           program=self.program, requested_at=self.requested_at,
                           started_at=self.started_at)

    @classmethod
    def from_journal(cls, entry: OpenSession, limits: ProgramLimits | None = None) -> Session:
        """With `limits`, a journalled catalogue program is recognised (catalogue_key)."""
        status = SessionStatus.STARTING if entry.started_at is None else SessionStatus.RUNNING
        return cls(entry.session_id, entry.program, entry.cmd_id, entry.requested_at, status,
                   entry.started_at, catalogue=catalogue_key(entry.program, limits)
                   if limits is not None else None)


@dataclass(frozen=True, slots=True)
class EndedSession:
    session: Session
    by_boot: bool  # the boot's own message ended it (event, ack), not a gateway decision
    outcome: SessionOutcome


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
    ended_sessions: OrderedDict[str, EndedSession] = field(default_factory=OrderedDict)

    @property
    def key(self) -> str:
        return f"{self.clinic}/{self.device}"

    def remember_ended(self, session: Session, by_boot: bool, outcome: SessionOutcome
                       ) -> None:
        self.ended_sessions[session.session_id] = EndedSession(session, by_boot, outcome)
        while len(self.ended_sessions) > ENDED_KEPT:
            self.ended_sessions.popitem(last=False)

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
