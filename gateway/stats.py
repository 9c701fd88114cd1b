"""One snapshot of the gateway's counters and gauges, read once from the gateway's parts.

The `gateway_health` point (docs/schema.md §gateway_health) and `/api/v1/stats` both derive
from `GatewayStats`, so a counter is computed in one place and cannot mean one thing in
InfluxDB and another in the API (they once disagreed on `points_dropped`). The snapshot is a
plain frozen value: taking it does no I/O and never blocks the event loop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.contract import Channel
from gateway.fleet import SessionStatus
from gateway.lineprotocol import FieldValue

if TYPE_CHECKING:
    from gateway.service import Gateway


@dataclass
class IngestStats:
    """The counters the ingest, the effects and the session lifecycle add to as they go."""

    messages: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    vents_sent: int = 0
    safety_events: int = 0
    vents_confirmed: int = 0
    sessions_resumed: int = 0
    loop_lag_max_ms: float = 0.0  # worst event-loop delay seen: the gateway's own backlog


# The MQTT channels whose message counts `gateway_health` carries as `msgs_<channel>`.
HEALTH_CHANNELS = (Channel.TELEMETRY.value, Channel.STATE.value, Channel.EVENT.value,
                   Channel.ACK.value)


@dataclass(frozen=True, slots=True)
class GatewayStats:
    """Totals since the process started, and gauges, at one moment."""

    messages: dict[str, int]  # accepted messages by channel
    rejected: dict[str, int]  # rejected messages by kind
    vents_sent: int
    vents_confirmed: int
    sessions_resumed: int
    safety_events: int
    alarms_listed: int
    points_written: int
    points_dropped: int  # every cause: queue full without spool, spool full, spool failing
    points_dropped_spool_full: int
    points_dropped_spool_error: int
    points_refused: int
    points_spooled: int
    points_replayed: int
    write_errors: int
    write_latency_ms: float
    queue_depth: int
    queue_peak: int
    spool_points: int
    spool_bytes: int
    storage_faults: dict[str, int]  # InfluxWriter.health_counters(), docs/schema.md §2.10
    mqtt_connected: bool
    influx_connected: bool
    mqtt_reconnects: int
    loop_lag_max_ms: float
    gc_collections: int
    gc_pause_max_ms: float
    boots_online: int
    boots_in_session: int
    journal_errors: int
    device_faults_unrecorded: int

    @classmethod
    def of(cls, gw: Gateway) -> GatewayStats:
        """Read every counter from the gateway's parts, in one synchronous step."""
        w = gw.writer.stats
        boots = gw.fleet.boots.values()
        return cls(
            messages=dict(gw.stats.messages),
            rejected=dict(gw.stats.rejected),
            vents_sent=gw.stats.vents_sent,
            vents_confirmed=gw.stats.vents_confirmed,
            sessions_resumed=gw.stats.sessions_resumed,
            safety_events=gw.stats.safety_events,
            alarms_listed=len(gw.alarms.listed()),
            points_written=w.points_written,
            points_dropped=w.points_dropped,
            points_dropped_spool_full=w.points_dropped_spool_full,
            points_dropped_spool_error=w.points_dropped_spool_error,
            points_refused=w.points_refused,
            points_spooled=w.points_spooled,
            points_replayed=w.points_replayed,
            write_errors=w.write_errors,
            write_latency_ms=round(w.last_write_ms, 3),
            queue_depth=gw.writer.queue_depth,
            queue_peak=w.queue_peak,
            spool_points=gw.writer.spool_points,
            spool_bytes=gw.writer.spool_bytes,
            storage_faults=gw.writer.health_counters(),
            mqtt_connected=gw.link.connected.is_set(),
            influx_connected=w.connected,
            mqtt_reconnects=gw.link.reconnects,
            loop_lag_max_ms=gw.stats.loop_lag_max_ms,
            gc_collections=gw.gc_pauses.collections,
            gc_pause_max_ms=round(gw.gc_pauses.max_ms, 3),
            boots_online=sum(1 for b in boots if b.online),
            boots_in_session=sum(1 for b in boots if b.session is not None
                                 and b.session.status is SessionStatus.RUNNING),
            journal_errors=gw.journal.errors,
            device_faults_unrecorded=gw.device_faults_unrecorded,
        )

    def health_fields(self) -> dict[str, FieldValue]:
        """The fields of a `gateway_health` point (docs/schema.md): flat, numeric, the
        connection flags as 0/1 so a panel can average them."""
        fields: dict[str, FieldValue] = {
            f"msgs_{kind}": self.messages.get(kind, 0) for kind in HEALTH_CHANNELS
        }
        fields |= {
            "msgs_rejected": sum(self.rejected.values()),
            "points_written": self.points_written,
            "points_dropped": self.points_dropped,
            "points_spooled": self.points_spooled,
            "points_replayed": self.points_replayed,
            "points_refused": self.points_refused,
            "write_errors": self.write_errors,
            "write_latency_ms": self.write_latency_ms,
            "queue_depth": self.queue_depth,
            "spool_bytes": self.spool_bytes,
            **self.storage_faults,
            "mqtt_connected": int(self.mqtt_connected),
            "influx_connected": int(self.influx_connected),
            "mqtt_reconnects": self.mqtt_reconnects,
            "vents_sent": self.vents_sent,
            "vents_confirmed": self.vents_confirmed,
            "safety_events": self.safety_events,
            "loop_lag_max_ms": self.loop_lag_max_ms,
            "gc_collections": self.gc_collections,
            "gc_pause_max_ms": self.gc_pause_max_ms,
            "boots_online": self.boots_online,
            "boots_in_session": self.boots_in_session,
            "journal_errors": self.journal_errors,
            "device_faults_unrecorded": self.device_faults_unrecorded,
        }
        return fields
