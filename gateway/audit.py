"""The audit trail: who started, stopped or vented a boot, acknowledged an alarm, or changed
a boot's broker credentials, and whether it was done.

One record per action goes to the log (logger `gateway.audit`) and to InfluxDB (measurement
`audit`, docs/schema.md). Records are built here, in one place, so the API and the
provisioning command write the same shape. Every tag is a validated id or a closed word:
actor names are API user names or provisioning operator names (ID_PATTERN), never free text.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.contract import is_valid_id
from gateway.lineprotocol import FieldValue, Point
from gateway.schema import Measurement, make_point

log = logging.getLogger("gateway.audit")

MEASUREMENT = Measurement.AUDIT  # gateway/schema.py


class AuditAction(StrEnum):
    SESSION_START = "session_start"
    SESSION_STOP = "session_stop"
    VENT = "vent"
    ALARM_ACK = "alarm_ack"
    BOOT_ADD = "boot_add"
    BOOT_REMOVE = "boot_remove"


class AuditResult(StrEnum):
    DONE = "done"  # carried out (a command sent, an alarm acknowledged, credentials changed)
    REFUSED = "refused"  # refused before anything happened (rule 9, unknown boot, role)
    FAILED = "failed"  # tried and did not happen (no broker, no ack)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    actor: str
    role: str
    action: AuditAction
    result: AuditResult
    clinic: str | None = None
    device: str | None = None
    detail: str = ""
    ids: dict[str, str] = field(default_factory=dict)  # cmd_id, session_id, alarm_id

    def __post_init__(self) -> None:
        # Tags must be ids: a caller passing free text is a bug, caught here, not in a panel.
        for name, value in (("actor", self.actor), ("role", self.role),
                            ("clinic", self.clinic), ("device", self.device)):
            if value is not None and not is_valid_id(value):
                raise ValueError(f"audit {name} is not an id: {value!r}")


def audit_point(event: AuditEvent, time_us: int) -> Point:
    tags = {"action": event.action.value, "actor": event.actor, "role": event.role,
            "result": event.result.value}
    if event.clinic is not None:
        tags["clinic"] = event.clinic
    if event.device is not None:
        tags["device"] = event.device
    fields: dict[str, FieldValue] = {"detail": event.detail[:500]}
    for key, value in sorted(event.ids.items()):
        fields[key] = value[:200]
    return make_point(MEASUREMENT, tags, fields, time_us)


def log_audit(event: AuditEvent) -> None:
    log.info("audit", extra={
        "actor": event.actor, "role": event.role, "action": event.action.value,
        "result": event.result.value, "clinic": event.clinic, "device": event.device,
        "detail": event.detail[:500], **{k: v[:200] for k, v in event.ids.items()}})


@dataclass(frozen=True, slots=True)
class AuditRecord:
    time: float  # unix s on the gateway's clock: the time of its InfluxDB point too
    event: AuditEvent


class AuditTrail:
    """The newest audit records in memory, for `GET /api/v1/audit` without a database.

    Bounded (`api.audit_keep`): the oldest go first. The log and InfluxDB hold every record;
    this is the quick look, not the archive.
    """

    def __init__(self, keep: int) -> None:
        self._ring: deque[AuditRecord] = deque(maxlen=keep)
        self.recorded = 0  # since the start, including those the ring no longer holds

    def append(self, time: float, event: AuditEvent) -> AuditRecord:
        record = AuditRecord(time, event)
        self._ring.append(record)
        self.recorded += 1
        return record

    def __iter__(self) -> Iterator[AuditRecord]:
        return iter(self._ring)

    def __len__(self) -> int:
        return len(self._ring)

    def query(self, *, limit: int, actor: str | None = None, role: str | None = None,
              action: AuditAction | None = None, result: AuditResult | None = None,
              clinic: str | None = None, device: str | None = None, since: float | None = None
              ) -> list[AuditRecord]:
        """Newest first, at most `limit`, every given filter matching exactly."""
        found: list[AuditRecord] = []
        for record in reversed(self._ring):
            if len(found) >= limit or (since is not None and record.time < since):
                break
            e = record.event
            if ((actor is None or e.actor == actor) and (role is None or e.role == role)
                    and (action is None or e.action is action)
                    and (result is None or e.result is result)
                    and (clinic is None or e.clinic == clinic)
                    and (device is None or e.device == device)):
                found.append(record)
        return found
