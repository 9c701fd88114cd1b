"""The audit trail: who started, stopped or vented a boot, acknowledged an alarm, or changed
a boot's broker credentials, and whether it was done.

One record per action goes to the log (logger `gateway.audit`) and to InfluxDB (measurement
`audit`, docs/schema.md). Records are built here, in one place, so the API and the
provisioning command write the same shape. Every tag is a validated id or a closed word:
actor names are API user names or provisioning operator names (ID_PATTERN), never free text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.contract import is_valid_id
from gateway.lineprotocol import FieldValue, Point

log = logging.getLogger("gateway.audit")

MEASUREMENT = "audit"


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
    return Point(MEASUREMENT, tags, fields, time_us)


def log_audit(event: AuditEvent) -> None:
    log.info("audit", extra={
        "actor": event.actor, "role": event.role, "action": event.action.value,
        "result": event.result.value, "clinic": event.clinic, "device": event.device,
        "detail": event.detail[:500], **{k: v[:200] for k, v in event.ids.items()}})
