"""The recorder: turns what the gateway saw and did into points for storage.

One job: the storage side of every decision. The ingest, the effects and the session
lifecycle say *what* happened (`recorder.safety_event(...)`); the recorder stamps it and hands
the point to the writer's queue (gateway/storage.py), so the safety logic reads as decisions.
Nothing here awaits or blocks: `submit` only queues.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway import points
from gateway.audit import AuditEvent, audit_point
from gateway.commands import TrackedCommand
from gateway.contract import Alarm, BootEvent, Telemetry, TopicAddress
from gateway.fleet import Boot, Session
from gateway.lineprotocol import FieldValue
from gateway.storage import InfluxWriter
from gateway.watchdog import SafetyAction, VentConfirmed


class Recorder:
    """Named writes of the gateway's points; `writer` is the storage queue they go to."""

    def __init__(self, writer: InfluxWriter, clock: Callable[[], float]) -> None:
        self.writer = writer
        self.clock = clock
        self._stamps = points.Stamps()

    def stamp(self) -> int:
        """The time of a point the gateway stamps itself (unique, so none overwrites another)."""
        return self._stamps(self.clock())

    def telemetry(self, addr: TopicAddress, sample: Telemetry,
                  targets: list[float] | None = None) -> None:
        line = points.telemetry_line(addr, sample, targets)
        if line is None:  # a value that cannot be stored: the writer refuses it, with why
            self.writer.submit(points.telemetry(addr, sample, targets))
        else:
            self.writer.submit_line(line, priority=points.TELEMETRY_PRIORITY)

    def boot_state(self, boot: Boot) -> None:
        self.writer.submit(points.boot_state(boot, self.stamp()))

    def boot_event(self, addr: TopicAddress, event: BootEvent) -> None:
        # On the gateway's millisecond, as the boot's events always were (not a stamp).
        self.writer.submit(points.boot_event(addr, event, int(self.clock() * 1000)))

    def device_fault(self, addr: TopicAddress, kind: str, reason: str,
                     time_us: int | None = None) -> None:
        self.writer.submit(points.device_fault(
            addr, kind, reason, self.stamp() if time_us is None else time_us))

    def session(self, clinic: str, device: str, session: Session, outcome: str,
                ended_at: float | None = None) -> None:
        """A session's row: started, resumed, or its one terminal outcome (with ended_at)."""
        self.writer.submit(points.session(clinic, device, session, outcome, self.stamp(),
                                          ended_at=ended_at))

    def command(self, tracked: TrackedCommand) -> None:
        self.writer.submit(points.command(tracked, self.stamp()))

    def safety_event(self, boot: Boot, action: SafetyAction, session_id: str | None,
                     time_us: int) -> None:
        self.writer.submit(points.safety_event(boot, action, session_id, time_us))

    def vent_confirmed(self, boot: Boot, confirmed: VentConfirmed) -> None:
        self.writer.submit(points.vent_confirmed(boot, confirmed, self.stamp()))

    def alarm(self, alarm: Alarm) -> None:
        self.writer.submit(points.alarm(alarm))

    def gateway_health(self, gateway_id: str, fields: dict[str, FieldValue]) -> None:
        self.writer.submit(points.gateway_health(gateway_id, fields, self.stamp()))

    def audit(self, event: AuditEvent) -> int:
        """The audit record's point; returns its time (µs) for the log and the trail."""
        time_us = self.stamp()
        self.writer.submit(audit_point(event, time_us))
        return time_us
