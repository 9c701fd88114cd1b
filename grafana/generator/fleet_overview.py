"""Dashboard "Boots: fleet overview" (the home dashboard): is every boot working, is anything
wrong right now, and is the gateway healthy? grafana/README.md says what each panel shows.
"""

from __future__ import annotations

from gateway.schema import Measurement as M  # the measurement names
from grafana.generator.common import (
    BOOT_LINK,
    CLINICS,
    LINK_MAP,
    MMHG,
    ONLINE_MAP,
    OUTCOME_COLORS,
    PHASE_COLORS,
    RUNNING,
    SESSION_LOOKBACK,
    STATE_LOOKBACK,
    VENT_ACTIONS,
    clinic_variable,
    safety_event_overrides,
)
from grafana.generator.dsl import (
    Dashboard,
    Expect,
    Layout,
    Target,
    bargauge,
    dashboard,
    organize,
    override,
    override_re,
    stat,
    table,
    thresholds,
    timeseries,
    value_map,
)


def _last_per_boot(select: str, measurement: M, where: str, lookback: str) -> str:
    return (f'SELECT {select} FROM "{measurement}" WHERE {where} AND time > now() - {lookback} '
            'GROUP BY "clinic", "device"')


def fleet_overview() -> Dashboard:
    lay = Layout()
    lay.row("Fleet now")
    state = _last_per_boot('last("online") AS "online"', M.BOOT_STATE, CLINICS,
                           STATE_LOOKBACK)
    lay.add(stat("Boots online", "Boots whose latest state (MQTT retained state, LWT) is online, "
                 "per clinic.", no_value="0", steps=thresholds((None, "green"))),
            [Target("A", f'SELECT sum("online") AS "online" FROM ({state}) GROUP BY "clinic"',
                    Expect(("online",)), alias="$tag_clinic")], w=5, h=4)
    lay.add(stat("Boots offline", "Known boots whose latest state is offline (they disconnected "
                 "or their LWT fired), per clinic.", no_value="0",
                 steps=thresholds((None, "green"), (1, "orange"))),
            [Target("A", f'SELECT count("online") - sum("online") AS "offline" FROM ({state}) '
                    'GROUP BY "clinic"', Expect(("offline",)), alias="$tag_clinic")], w=5, h=4)
    latest = _last_per_boot('last("session_id") AS "session", "outcome"', M.SESSION, CLINICS,
                            SESSION_LOOKBACK)
    lay.add(stat("Boots in session", "Boots whose latest session record says the session is "
                 "running (the gateway writes one when a session starts and one when it ends), "
                 "per clinic.", no_value="0", steps=thresholds((None, "blue"))),
            [Target("A", f'SELECT count("session") AS "in session" FROM ({latest}) WHERE '
                    f'{RUNNING} GROUP BY "clinic"', Expect(("in session",)),
                    alias="$tag_clinic")],
            w=5, h=4)
    lay.add(stat("Vents, last 24 h", "Vents commanded by the safety watchdog in the last 24 h "
                 "(safety events with action vent or stop+vent), per clinic.", no_value="0",
                 steps=thresholds((None, "green"), (1, "red"))),
            [Target("A", f'SELECT count("detail") AS "vents" FROM "{M.SAFETY_EVENT}" '
                    f'WHERE {CLINICS} AND {VENT_ACTIONS} AND time > now() - 24h GROUP BY "clinic"',
                    Expect(("vents",)), alias="$tag_clinic")], w=4, h=4)
    lay.add(stat("Alarms raised, last 24 h", "Alarms raised in the last 24 h by priority "
                 "(IEC 60601-1-8: high, medium, low).", no_value="0",
                 mappings=[], steps=thresholds((None, "orange"))),
            [Target("A", 'SELECT count("raised_at") AS "alarms" FROM (SELECT first("raised_at") '
                    f'AS "raised_at" FROM "{M.ALARM}" WHERE {CLINICS} AND time > now() - 24h '
                    'GROUP BY "alarm_id", "severity") GROUP BY "severity"',
                    Expect(("alarms",)), alias="$tag_severity")], w=5, h=4)

    lay.row("Every boot")
    lay.add(table(
        "Boot status",
        "One row per boot: connection, what it is doing now (latest telemetry, last hour), its "
        "latest session and the highest chamber pressure in its latest sample. Click a device "
        "for its detail dashboard. Elapsed/remaining need the telemetry field "
        "session_elapsed_s (see grafana/README.md).",
        transformations=[
            organize("A", renameByName={"Time": "Last seen"}),
            organize("B", excludeByName={"Time": True}),
            organize("C", renameByName={"Time": "Last session event"}),
            {"id": "merge", "options": {}},
            {"id": "calculateField", "options": {
                "mode": "binary", "alias": "remaining_s", "replaceFields": False,
                "timeSeries": False,
                "binary": {"left": {"matcher": {"id": "byName", "options": "planned_s"}},
                           "operator": "-",
                           "right": {"matcher": {"id": "byName",
                                                 "options": "session_elapsed_s"}}}}},
            organize(excludeByName={"seq": True, "session": True, "planned_s": True},
                     indexByName={"clinic": 0, "device": 1, "online": 2, "phase": 3,
                                  "program_name": 4, "outcome": 5, "Last session event": 6,
                                  "session_elapsed_s": 7, "remaining_s": 8, "max_p": 9,
                                  "Last seen": 10, "session_id": 11, "firmware": 12}),
        ],
        sort_by="Device", desc=False,
        overrides=[
            override("clinic", displayName="Clinic"),
            override("device", displayName="Device", links=BOOT_LINK),
            override("online", displayName="Connection", mappings=[ONLINE_MAP],
                     custom__cellOptions={"type": "color-text"}),
            override("phase", displayName="State", mappings=[value_map(PHASE_COLORS)],
                     custom__cellOptions={"type": "color-text"}),
            override("program_name", displayName="Program (latest session)"),
            override("outcome", displayName="Session", mappings=[value_map(OUTCOME_COLORS)],
                     custom__cellOptions={"type": "color-text"}),
            override("Last session event", unit="dateTimeFromNow"),
            override("session_elapsed_s", displayName="Elapsed", unit="s"),
            override("remaining_s", displayName="Remaining", unit="s"),
            override("max_p", displayName="Max chamber pressure now", unit=MMHG, decimals=1,
                     thresholds=thresholds((None, "green"), (100, "orange"), (120, "red")),
                     custom__cellOptions={"type": "color-text"}),
            override("Last seen", unit="dateTimeFromNow"),
            override("session_id", displayName="Session id"),
            override("firmware", displayName="Firmware"),
        ]),
        [Target("A", _last_per_boot('last("seq") AS "seq", "phase", "session_id", "max_p", '
                                    '"session_elapsed_s"', M.TELEMETRY, CLINICS, "1h"),
                Expect(("seq", "phase", "session_id", "max_p"), pending=("session_elapsed_s",)),
                fmt="table"),
         Target("B", _last_per_boot('last("online") AS "online", "firmware"', M.BOOT_STATE,
                                    CLINICS, STATE_LOOKBACK),
                Expect(("online", "firmware")), fmt="table"),
         Target("C", _last_per_boot('last("session_id") AS "session", "program_name", '
                                    '"outcome", "planned_s"', M.SESSION, CLINICS,
                                    STATE_LOOKBACK),
                Expect(("session", "program_name", "outcome", "planned_s")), fmt="table")],
        w=24, h=11)

    lay.row("Vents and alarms, last 24 h")
    lay.add(table(
        "Safety events, last 24 h",
        "Every action of the safety watchdog (vent, stop+vent, alarm, refuse) in the last 24 h, "
        "newest first: which rule, the chamber, the value and the limit it crossed.",
        sort_by="Time",
        overrides=safety_event_overrides()),
        [Target("A", 'SELECT "clinic", "device", "rule", "severity", "action", "chamber", '
                f'"value", "limit", "detail" FROM "{M.SAFETY_EVENT}" WHERE '
                f'{CLINICS} AND time > now() - 24h ORDER BY time DESC LIMIT 500',
                Expect(("clinic", "device", "rule", "severity", "action", "detail")),
                fmt="table")],
        w=16, h=9)
    lay.add(bargauge("Safety events by rule, last 24 h",
                     "How often each safety rule acted in the last 24 h.",
                     steps=thresholds((None, "orange"))),
            [Target("A", f'SELECT count("detail") AS "events" FROM "{M.SAFETY_EVENT}" WHERE '
                    f'{CLINICS} AND time > now() - 24h GROUP BY "rule"',
                    Expect(("events",)), alias="$tag_rule")], w=8, h=9)

    lay.row("Pressures")
    lay.add(timeseries(
        "Max chamber pressure per boot",
        "Highest chamber pressure of each boot per interval (telemetry max_p), mmHg. Lines: "
        "the default clinic ceiling (100) and the gateway's hard ceiling (120).",
        unit=MMHG, steps=thresholds((None, "green"), (100, "orange"), (120, "red"))),
        [Target("A", f'SELECT max("max_p") FROM "{M.TELEMETRY}" WHERE {CLINICS} AND $timeFilter '
                'GROUP BY time($__interval), "clinic", "device" fill(null)',
                Expect(("max",)), alias="$tag_clinic/$tag_device")], w=24, h=9)

    lay.row("Gateway health")
    health = f'"{M.GATEWAY_HEALTH}" WHERE $timeFilter'
    lay.add(stat("Gateway links", "Whether each gateway is connected to the MQTT broker and "
                 "can write to InfluxDB (latest health report).",
                 mappings=[LINK_MAP], steps=thresholds((None, "red"), (1, "green"))),
            [Target("A", 'SELECT last("mqtt_connected") AS "broker", last("influx_connected") '
                    f'AS "InfluxDB" FROM {health} GROUP BY "gateway"',
                    Expect(("broker", "InfluxDB")), alias="$tag_gateway $col")], w=6, h=5)
    lay.add(stat("Last health report", "When each gateway last wrote gateway_health (every "
                 "health_interval_s, 10 s by default). Older than a minute: the gateway is down "
                 "or cannot write to InfluxDB.", unit="dateTimeFromNow", fields="/^Time$/",
                 text_mode="value_and_name"),
            [Target("A", f'SELECT last("queue_depth") AS "queue_depth" FROM {health} '
                    'GROUP BY "gateway"', Expect(("queue_depth",)), alias="$tag_gateway")],
            w=6, h=5)
    lay.add(stat("Boots seen by the gateway", "Online boots and boots in a running session as "
                 "the gateway counts them.", steps=thresholds((None, "blue"))),
            [Target("A", 'SELECT last("boots_online") AS "online", last("boots_in_session") AS '
                    f'"in session" FROM {health} GROUP BY "gateway"',
                    Expect(("online", "in session")), alias="$tag_gateway $col")], w=12, h=5)

    def rates(fields: dict[str, str], per: str) -> str:
        cols = ", ".join(f'non_negative_derivative(last("{f}"), {per}) AS "{name}"'
                         for f, name in fields.items())
        return f'SELECT {cols} FROM {health} GROUP BY time($__interval), "gateway"'

    msgs = {"msgs_telemetry": "telemetry", "msgs_state": "state", "msgs_event": "event",
            "msgs_ack": "ack", "msgs_rejected": "rejected"}
    lay.add(timeseries("Message rate", "Messages per second the gateway received from boots, "
                       "by channel, and rejected (bad input).", unit="suffix: msg/s"),
            [Target("A", rates(msgs, "1s"), Expect(tuple(msgs.values())),
                    alias="$tag_gateway $col")], w=12, h=8)
    writes = {"points_written": "written", "points_dropped": "dropped",
              "points_refused": "refused", "write_errors": "write errors"}
    lay.add(timeseries("Storage throughput", "Points per second written to InfluxDB; dropped "
                       "(queue full), refused (rejected by InfluxDB) and failed writes should "
                       "stay at zero.", unit="suffix: /s",
                       overrides=[override_re("dropped|refused|write errors",
                                              color={"mode": "fixed", "fixedColor": "red"})]),
            [Target("A", rates(writes, "1s"), Expect(("written",)), alias="$tag_gateway $col")],
            w=12, h=8)
    lay.add(timeseries("Latency and backlog", "Duration of the last write to InfluxDB (ms), "
                       "points waiting in the queue, bytes in the disk spool, the worst "
                       "event-loop delay of the gateway (ms) and its longest garbage-collection "
                       "pause (ms).", unit="short"),
            [Target("A", 'SELECT last("write_latency_ms") AS "write latency ms", '
                    'last("queue_depth") AS "queue depth", last("spool_bytes") AS "spool bytes", '
                    'max("loop_lag_max_ms") AS "loop lag ms", max("gc_pause_max_ms") AS '
                    f'"gc_pause_max_ms" FROM {health} GROUP BY time($__interval), "gateway"',
                    Expect(("write latency ms", "queue depth", "loop lag ms"),
                           pending=("gc_pause_max_ms",)),
                    alias="$tag_gateway $col")], w=12, h=8)
    safety = {"vents_sent": "vents sent", "vents_confirmed": "vents confirmed",
              "safety_events": "safety events", "mqtt_reconnects": "broker reconnects"}
    lay.add(timeseries("Safety actions and reconnects", "Per minute: vents sent and confirmed, "
                       "safety events, and reconnects to the broker.", unit="suffix: /min"),
            [Target("A", rates(safety, "1m"), Expect(("vents sent", "safety events")),
                    alias="$tag_gateway $col")], w=12, h=8)

    return dashboard(
        "boots-fleet-overview", "Boots: fleet overview", "fleet-overview.json",
        "Every boot's state per clinic, vents and alarms of the last 24 h, and the gateway's "
        "own health.", lay, tags=["fleet"], variables=[clinic_variable(multi=True)],
        time_from="now-6h", refresh="10s")
