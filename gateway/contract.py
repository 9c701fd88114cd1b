"""The device contract: MQTT topics and payload models shared by the gateway and the boots.

Both `gateway` and `device_sim` import this module so the two sides cannot drift.
`docs/protocol.md` is the prose version for firmware teams; keep them in step
(`CONTRACT_VERSION` changes when a payload changes incompatibly).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONTRACT_VERSION = 1
TOPIC_ROOT = f"boots/v{CONTRACT_VERSION}"
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID_RE = re.compile(ID_PATTERN)

# Sensor range of the boot's pressure transducers; anything outside is physically implausible.
SENSOR_MIN_MMHG = -20.0
SENSOR_MAX_MMHG = 300.0
MAX_CHAMBERS = 12

DeviceId = Annotated[str, Field(pattern=ID_PATTERN)]
Pressure = Annotated[float, Field(allow_inf_nan=False)]
# What a boot sends is typed strictly: "150" is not a number, 1 is not true (an int is a float).
Reading = Annotated[float, Field(strict=True)]
# The boot's clock (unix s). Its telemetry and events are stored at this time, so it must fit
# InfluxDB's time range (int64 nanoseconds: up to 2262); beyond, a point would be refused.
DEVICE_TS_MAX = 9.2e9
DeviceTime = Annotated[float, Field(ge=0, le=DEVICE_TS_MAX, allow_inf_nan=False, strict=True)]


class Channel(StrEnum):
    STATE = "state"
    TELEMETRY = "telemetry"
    EVENT = "event"
    CMD = "cmd"
    ACK = "ack"


# QoS and retain flag per channel, the single source for both sides.
CHANNEL_QOS: dict[Channel, int] = {
    Channel.STATE: 1,
    Channel.TELEMETRY: 0,
    Channel.EVENT: 1,
    Channel.CMD: 1,
    Channel.ACK: 1,
}
CHANNEL_RETAIN: dict[Channel, bool] = {c: c is Channel.STATE for c in Channel}

# The topic level under the root that belongs to the gateway: never a clinic id.
RESERVED_CLINIC = "_gateway"
HEARTBEAT_TOPIC = f"{TOPIC_ROOT}/{RESERVED_CLINIC}/heartbeat"
ALARM_TOPIC_PREFIX = f"{TOPIC_ROOT}/{RESERVED_CLINIC}/alarm"


def clinic_heartbeat_topic(clinic: str) -> str:
    """The heartbeat of whichever gateway watches this clinic (protocol §5.1, revision 2):
    the one a boot times out on."""
    if not is_valid_clinic(clinic):
        raise ValueError(f"invalid clinic id: {clinic!r}")
    return f"{HEARTBEAT_TOPIC}/{clinic}"


def is_valid_id(value: str) -> bool:
    """fullmatch, not match: Python's `$` also matches before a trailing newline."""
    return _ID_RE.fullmatch(value) is not None


def is_valid_clinic(value: str) -> bool:
    return value != RESERVED_CLINIC and is_valid_id(value)


def topic(clinic: str, device: str, channel: Channel) -> str:
    if not (is_valid_clinic(clinic) and is_valid_id(device)):
        raise ValueError(f"invalid clinic or device id: {clinic!r}/{device!r}")
    return f"{TOPIC_ROOT}/{clinic}/{device}/{channel.value}"


@dataclass(frozen=True, slots=True)
class TopicAddress:
    clinic: str
    device: str
    channel: Channel
    # "clinic/device", the fleet's key: made once (parse_topic's cache keeps the address).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.clinic}/{self.device}")


class TopicError(ValueError):
    """A topic that is not part of the contract."""


# Every message's topic is parsed, and a fleet has a few topics per boot: each is parsed once.
# Bounded (an outsider's stream of new topic names costs at most this many entries, ~20 MB);
# a refused topic raises, and is not kept.
@functools.lru_cache(maxsize=65_536)
def parse_topic(name: str) -> TopicAddress:
    parts = name.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise TopicError(f"not a boot topic: {name[:200]!r}")
    clinic, device, channel = parts[2], parts[3], parts[4]
    if clinic == RESERVED_CLINIC:
        raise TopicError(f"clinic id {RESERVED_CLINIC!r} is reserved: {name[:200]!r}")
    if not is_valid_id(clinic) or not is_valid_id(device):
        raise TopicError(f"invalid clinic or device id in topic: {name[:200]!r}")
    try:
        return TopicAddress(clinic, device, Channel(channel))
    except ValueError:
        raise TopicError(f"unknown channel {channel[:40]!r}") from None


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_payload(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# ---------------------------------------------------------------- boot -> gateway


class Phase(StrEnum):
    """Closed for senders, open for the receiver: a boot sends one of the first six; a phase
    this gateway does not know (a newer firmware's) is read as UNKNOWN, never a dropped sample
    (a dropped sample in a session would count as silence and vent)."""

    IDLE = "idle"
    INFLATE = "inflate"
    HOLD = "hold"
    DEFLATE = "deflate"
    PAUSE = "pause"
    VENT = "vent"
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> Phase | None:
        return cls.UNKNOWN if isinstance(value, str) else None


class Telemetry(_Msg):
    """Pressures are taken as the boot sent them, NaN included: judging them is rule 6's job."""

    seq: int = Field(ge=0, lt=2**63, strict=True)
    ts: DeviceTime = Field(description="device clock, unix seconds")
    session_id: str | None = Field(default=None, pattern=ID_PATTERN)
    session_elapsed_s: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, strict=True,
        description="time into the running session (the boot's monotonic clock)",
    )
    phase: Phase
    pressures: list[Reading] = Field(min_length=1, max_length=MAX_CHAMBERS)


class EventKind(StrEnum):
    SESSION_STARTED = "session_started"
    SESSION_COMPLETED = "session_completed"
    SESSION_STOPPED = "session_stopped"
    USER_STOP = "user_stop"
    VENTED = "vented"
    FAULT = "fault"


class BootEvent(_Msg):
    kind: EventKind
    ts: DeviceTime
    session_id: str | None = Field(default=None, pattern=ID_PATTERN)
    detail: str | None = Field(default=None, max_length=500)


class AckStatus(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DONE = "done"


class Ack(_Msg):
    cmd_id: str = Field(pattern=ID_PATTERN)
    status: AckStatus
    ts: DeviceTime
    reason: str | None = Field(default=None, max_length=500)


# ---------------------------------------------------------------- gateway -> boot


class Mode(StrEnum):
    SEQUENTIAL = "sequential"
    WAVE = "wave"
    FLOW = "flow"


class ProgramTiming(BaseModel):
    """One cycle: chambers inflate one after another (inflate_s each), hold, deflate, pause."""

    model_config = ConfigDict(frozen=True)

    inflate_s: float = Field(gt=0, le=120, allow_inf_nan=False)
    hold_s: float = Field(ge=0, le=120, allow_inf_nan=False)
    deflate_s: float = Field(gt=0, le=120, allow_inf_nan=False)
    pause_s: float = Field(ge=0, le=120, allow_inf_nan=False)

    def cycle_s(self, chambers: int) -> float:
        return chambers * self.inflate_s + self.hold_s + self.deflate_s + self.pause_s


class SessionProgram(BaseModel):
    """What a boot runs: per-chamber targets (distal to proximal), timing and total duration."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=80)
    mode: Mode = Mode.SEQUENTIAL
    targets_mmhg: list[Pressure] = Field(min_length=1, max_length=MAX_CHAMBERS)
    duration_s: float = Field(gt=0, le=4 * 3600, allow_inf_nan=False)
    timing: ProgramTiming
    max_inflation_s: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="longest a chamber may stay inflated in one cycle",
    )

    def longest_inflation_s(self) -> float:
        """The one model of "inflated" that rule 9 checks and rule 3 enforces.

        A chamber counts as inflated from the moment it starts inflating until the end of the
        deflate phase: a boot may take all of `deflate_s` to bring it down. The most distal
        chamber starts first, so it is inflated longest: n * inflate_s + hold_s + deflate_s.
        """
        n = len(self.targets_mmhg)
        return n * self.timing.inflate_s + self.timing.hold_s + self.timing.deflate_s


class ActiveSession(BaseModel):
    """The session a boot is running, in its retained state so a restarted gateway resumes it."""

    model_config = ConfigDict(frozen=True)

    session_id: str = Field(pattern=ID_PATTERN)
    cmd_id: str | None = Field(default=None, pattern=ID_PATTERN)
    program: SessionProgram
    started_at: float = Field(description="device clock, unix seconds", allow_inf_nan=False)


class BootState(_Msg):
    """Retained on `.../state`; the same payload with online=false is the boot's LWT.

    The boot republishes it when a session starts or ends, with `session` set while one runs.
    """

    online: bool = Field(strict=True)
    firmware: str = Field(max_length=64)
    chambers: int = Field(ge=1, le=MAX_CHAMBERS, strict=True)
    # Bounded like every string a boot sends; the bound also makes pydantic check that each
    # is valid Unicode (a bare list[str] lets a lone surrogate through, which then cannot be
    # serialised: GET /api/v1/boots answered 500 for the whole fleet).
    zones: list[Annotated[str, Field(max_length=64)]] = Field(
        description="zone of each chamber, distal to proximal")
    max_pressure_mmhg: float = Field(gt=0, le=SENSOR_MAX_MMHG, allow_inf_nan=False, strict=True)
    telemetry_period_s: float = Field(gt=0, le=60, allow_inf_nan=False, strict=True)
    ts: DeviceTime = Field(description="device clock, unix seconds")
    session: ActiveSession | None = None

    @model_validator(mode="after")
    def _zones_match(self) -> BootState:
        if len(self.zones) != self.chambers:
            raise ValueError(f"zones has {len(self.zones)} entries for {self.chambers} chambers")
        # A program is only ever sent to a boot with one target per chamber; a state claiming
        # otherwise cannot be watched chamber by chamber (rule 2), so it is refused whole.
        if self.session is not None and len(self.session.program.targets_mmhg) != self.chambers:
            raise ValueError(
                f"session program has {len(self.session.program.targets_mmhg)} targets for "
                f"{self.chambers} chambers")
        return self


class CommandKind(StrEnum):
    START = "start"
    STOP = "stop"
    VENT = "vent"


class Command(_Msg):
    cmd_id: str = Field(pattern=ID_PATTERN)
    kind: CommandKind
    issued_at: float = Field(allow_inf_nan=False)
    expires_at: float | None = Field(
        default=None, allow_inf_nan=False,
        description="unix seconds; the boot must reject the command after this",
    )
    session_id: str | None = Field(default=None, pattern=ID_PATTERN)
    program: SessionProgram | None = None
    reason: str | None = Field(default=None, max_length=500)

    @model_validator(mode="after")
    def _start_has_program(self) -> Command:
        if self.kind is CommandKind.START and (self.program is None or self.session_id is None):
            raise ValueError("a start command needs a program and a session_id")
        return self


class Heartbeat(_Msg):
    ts: float
    gateway_id: str
    interval_s: float


class Severity(StrEnum):
    """Alarm priorities after IEC 60601-1-8."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


class AlarmState(StrEnum):
    """Alarms latch: an alarm is cleared only once it is acknowledged and its cause is over."""

    ACTIVE = "active"  # not yet acknowledged
    ACKNOWLEDGED = "acknowledged"  # seen by someone; the cause may still be there
    CLEARED = "cleared"  # acknowledged and resolved


class Alarm(_Msg):
    """Published (QoS 1) on `boots/v1/_gateway/alarm/{clinic}/{device}` at every state change."""

    alarm_id: str = Field(pattern=ID_PATTERN)
    clinic: str = Field(pattern=ID_PATTERN)
    device: str = Field(pattern=ID_PATTERN)
    rule: str
    severity: Severity
    state: AlarmState
    detail: str = Field(max_length=500)
    raised_at: float
    updated_at: float
    session_id: str | None = None
    resolved: bool = Field(False, description="the cause is over (e.g. the vent was confirmed)")
    acked_by: str | None = Field(default=None, max_length=80)


def alarm_topic(clinic: str, device: str) -> str:
    if not (is_valid_id(clinic) and is_valid_id(device)):
        raise ValueError(f"invalid clinic or device id: {clinic!r}/{device!r}")
    return f"{ALARM_TOPIC_PREFIX}/{clinic}/{device}"


# ---------------------------------------------------------------- decoding

PAYLOAD_MODELS: dict[Channel, type[_Msg]] = {
    Channel.STATE: BootState,
    Channel.TELEMETRY: Telemetry,
    Channel.EVENT: BootEvent,
    Channel.CMD: Command,
    Channel.ACK: Ack,
}


class PayloadError(ValueError):
    """A payload that does not follow the contract; `kind` is a short stable label for counters."""

    def __init__(self, kind: Literal["too_large", "not_json", "invalid"], message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A key twice in one object: parsers disagree on which one counts (Python's keeps the
    last, others the first), so a payload could mean one thing here and another elsewhere."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return data


# The model's own validator, called as `model_validate_json` calls it (its wrapper's checks
# of arguments this path never passes cost a third of the call).
_validate_telemetry_json = Telemetry.__pydantic_validator__.validate_json


def telemetry_fast(payload: bytes) -> Telemetry | None:
    """The common telemetry payload decoded in one pass (pydantic's JSON parser, ~3 us instead
    of ~10), or None: then `decode`'s full path decides, with its reasons.

    The full path parses with the standard library first, to refuse what that parser would
    let through silently (a key given twice, text that is not strictly UTF-8). Here the
    payload is taken only when that cannot arise: ASCII without a single backslash (no
    escape, so every string is its plain bytes between two quotes), and exactly as many
    quotes as the sample's keys and string values need (the keys given, the phase and a
    session id): a key given twice, or one this contract does not know, adds quotes and sends
    the payload to the full path. `tests/test_contract.py` checks that what this takes, the
    full path takes with the same result.
    """
    if not payload.isascii() or b"\\" in payload:
        return None
    try:
        sample: Telemetry = _validate_telemetry_json(payload)
    except ValidationError:
        return None
    strings = len(sample.model_fields_set) + 1 + (sample.session_id is not None)
    return sample if payload.count(b'"') == 2 * strings else None


def decode(channel: Channel, payload: bytes, max_bytes: int) -> _Msg:
    """Decode and validate one payload; raises PayloadError with a reason fit for a log line.

    Strictly UTF-8 (§4): json.loads(bytes) would also take UTF-16/32 and encoded surrogates,
    and skip a byte-order mark; the text is decoded first so none of them passes.
    """
    if len(payload) > max_bytes:
        raise PayloadError("too_large", f"payload of {len(payload)} bytes exceeds {max_bytes}")
    if channel is Channel.TELEMETRY:
        sample = telemetry_fast(payload)
        if sample is not None:
            return sample
    return decode_full(channel, payload)


def decode_full(channel: Channel, payload: bytes) -> _Msg:
    """`decode` without the size check and the telemetry fast path: every payload's way."""
    try:
        # NaN/Infinity parse; the models say where they may stand
        data = json.loads(payload.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise PayloadError("invalid", f"duplicate key {str(exc)[:40]!r}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError("not_json", f"not JSON: {str(exc)[:120]}") from None
    except RecursionError:
        raise PayloadError("not_json", "not JSON: nested too deeply") from None
    try:
        return PAYLOAD_MODELS[channel].model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise PayloadError(
            "invalid", f"{where}: {first['msg']} ({exc.error_count()} error(s))"
        ) from None
