"""Dashboard "Boots: boot detail": what happened to one boot, and when (pressures against
targets, sessions, vents, alarms, commands and acks, connection history).
"""

from __future__ import annotations

from gateway.schema import Measurement as M  # the measurement names
from grafana.generator.common import (
    BOOT,
    MMHG,
    ONLINE_MAP,
    OUTCOME_COLORS,
    PHASE_COLORS,
    SEVERITY_COLORS,
    STATE_LOOKBACK,
    VENT_ACTIONS,
    clinic_variable,
)
from grafana.generator.dsl import (
    Dashboard,
    Expect,
    Layout,
    Target,
    annotation,
    dashboard,
    override,
    override_re,
    range_map,
    stat,
    table,
    thresholds,
    timeseries,
    value_map,
    variable,
)


def boot_detail() -> Dashboard:
    lay = Layout()
    lay.add(stat("Connection", "Latest state of the boot (online, or offline after a "
                 "disconnect or its LWT).", mappings=[ONLINE_MAP], text_mode="value",
                 steps=thresholds((None, "red"), (1, "green"))),
            [Target("A", f'SELECT last("online") AS "online" FROM "{M.BOOT_STATE}" WHERE {BOOT} '
                    f'AND time > now() - {STATE_LOOKBACK}', Expect(("online",)))], w=4, h=4)
    lay.add(stat("State now", "Phase of the latest telemetry sample (last hour).",
                 mappings=[value_map(PHASE_COLORS)], fields="/^phase$/", text_mode="value"),
            [Target("A", f'SELECT last("seq") AS "seq", "phase" FROM "{M.TELEMETRY}" WHERE {BOOT} '
                    'AND time > now() - 1h', Expect(("phase",)))], w=4, h=4)
    lay.add(stat("Max chamber pressure now", "Highest chamber pressure in the latest sample "
                 "(last hour).", unit=MMHG, text_mode="value",
                 steps=thresholds((None, "green"), (100, "orange"), (120, "red"))),
            [Target("A", f'SELECT last("max_p") AS "max_p" FROM "{M.TELEMETRY}" WHERE {BOOT} '
                    'AND time > now() - 1h', Expect(("max_p",)))], w=4, h=4)
    lay.add(stat("Last seen", "Time of the latest telemetry sample.", unit="dateTimeFromNow",
                 fields="/^Time$/", text_mode="value"),
            [Target("A", f'SELECT last("seq") AS "seq" FROM "{M.TELEMETRY}" WHERE {BOOT} AND '
                    f'time > now() - {STATE_LOOKBACK}', Expect(("seq",)))], w=4, h=4)
    lay.add(stat("Latest session", "Program and outcome of the boot's latest session "
                 "(running while it is in session).", mappings=[value_map(OUTCOME_COLORS)],
                 fields="/^(program_name|outcome)$/", text_mode="value_and_name"),
            [Target("A", f'SELECT last("session_id") AS "session", "program_name", "outcome" '
                    f'FROM "{M.SESSION}" WHERE {BOOT} AND time > now() - {STATE_LOOKBACK}',
                    Expect(("session", "program_name", "outcome")))], w=8, h=4)

    lay.add(timeseries(
        "Chamber pressures vs target",
        "Highest pressure of each chamber per interval (p1 = most distal, mmHg), with the "
        "program's target per chamber as dashed lines (telemetry fields target_p1.., written "
        "by the gateway while a session with a known program runs; see grafana/README.md). "
        "Annotations: vents, alarms, sessions and the boot's own events.",
        unit=MMHG,
        transformations=[{"id": "renameByRegex",
                          "options": {"regex": "^max_(.*)$", "renamePattern": "$1"}}],
        overrides=[override_re("^target_p.*", custom__lineStyle={"fill": "dash",
                                                                 "dash": [10, 10]},
                               custom__lineWidth=2)]),
        [Target("A", f'SELECT max(/^p[0-9]+$/) FROM "{M.TELEMETRY}" WHERE '
                f'{BOOT} AND $timeFilter GROUP BY time($__interval) fill(null)',
                Expect(("max_p1", "max_p2"))),
         Target("B", f'SELECT max(/^target_p[0-9]+$/) FROM "{M.TELEMETRY}" WHERE '
                f'{BOOT} AND $timeFilter GROUP BY time($__interval) fill(null)',
                Expect(pending=("target_p1",), empty_ok=True))],
        w=24, h=11)
    lay.add({"type": "state-timeline", "title": "Sessions, vents and connection",
             "description": "Bands: in a session (telemetry carries a session id), vented by "
             "the watchdog, and online/offline from the boot's state messages.",
             "fieldConfig": {"defaults": {"color": {"mode": "thresholds"},
                                          "thresholds": thresholds((None, "transparent")),
                                          "custom": {"fillOpacity": 80, "lineWidth": 0}},
                             "overrides": [
                                 override("in session", mappings=[
                                     value_map({"0": ("", "transparent")}),
                                     range_map(1, None, "session", "blue")]),
                                 override("vent", mappings=[
                                     value_map({"0": ("", "transparent")}),
                                     range_map(1, None, "VENT", "red")]),
                                 override("online", mappings=[ONLINE_MAP])]},
             "options": {"mergeValues": True, "showValue": "auto", "alignValue": "left",
                         "rowHeight": 0.9,
                         "legend": {"displayMode": "list", "placement": "bottom",
                                    "showLegend": False},
                         "tooltip": {"mode": "single", "sort": "none"}}},
            [Target("A", f'SELECT count("session_id") AS "in session" FROM "{M.TELEMETRY}" WHERE '
                    f'{BOOT} AND $timeFilter GROUP BY time($__interval) fill(0)',
                    Expect(("in session",))),
             Target("B", f'SELECT count("detail") AS "vent" FROM "{M.SAFETY_EVENT}" WHERE '
                    f'{BOOT} AND {VENT_ACTIONS} AND $timeFilter GROUP BY time($__interval) '
                    'fill(0)', Expect(("vent",))),
             Target("C", f'SELECT "online" FROM "{M.BOOT_STATE}" WHERE {BOOT} AND $timeFilter',
                    Expect(("online",)))],
            w=24, h=6)

    lay.add(table("Commands and acks", "Every command sent to the boot and each answer: one "
                  "row when sent, one per ack or timeout, with the latency to the first ack.",
                  sort_by="Time",
                  overrides=[override("outcome", custom__cellOptions={"type": "color-text"},
                                      mappings=[value_map({"failed": ("failed", "red"),
                                                           "rejected": ("rejected", "red"),
                                                           "done": ("done", "green"),
                                                           "accepted": ("accepted", "green")})]),
                             override("latency_ms", unit="ms")]),
            [Target("A", 'SELECT "kind", "outcome", "latency_ms", "reason", "cmd_id", '
                    f'"session_id" FROM "{M.COMMAND}" WHERE {BOOT} AND $timeFilter '
                    'ORDER BY time DESC LIMIT 500',
                    Expect(("kind", "outcome", "latency_ms", "cmd_id")), fmt="table")],
            w=12, h=9)
    lay.add(table("Safety events", "What the watchdog did to this boot and why.",
                  sort_by="Time",
                  overrides=[override("severity", mappings=[value_map(SEVERITY_COLORS)],
                                      custom__cellOptions={"type": "color-text"}),
                             override("value", unit=MMHG), override("limit", unit=MMHG)]),
            [Target("A", 'SELECT "rule", "severity", "action", "chamber", "value", "limit", '
                    f'"detail" FROM "{M.SAFETY_EVENT}" WHERE {BOOT} AND $timeFilter '
                    'ORDER BY time DESC LIMIT 500',
                    Expect(("rule", "severity", "action", "detail")), fmt="table")],
            w=12, h=9)
    lay.add(table("Sessions", "Session starts (outcome started) and ends with their outcome; "
                  "duration against the program's plan. program: the catalogue key, custom "
                  "or unknown; program_name: the program's own name.", sort_by="Time",
                  overrides=[override("outcome", mappings=[value_map(OUTCOME_COLORS)],
                                      custom__cellOptions={"type": "color-text"}),
                             override("planned_s", unit="s"), override("duration_s", unit="s")]),
            [Target("A", 'SELECT "session_id", "program", "program_name", "outcome", '
                    '"planned_s", "duration_s" '
                    f'FROM "{M.SESSION}" WHERE {BOOT} AND $timeFilter ORDER BY time DESC LIMIT 500',
                    Expect(("session_id", "program", "program_name", "outcome", "duration_s")),
                    fmt="table")],
            w=12, h=8)
    lay.add(table("Connection history", "Every state message: online/offline (a disconnect "
                  "or the LWT), firmware and chamber layout.", sort_by="Time",
                  overrides=[override("online", mappings=[ONLINE_MAP],
                                      custom__cellOptions={"type": "color-text"}),
                             override("max_pressure_mmhg", unit=MMHG)]),
            [Target("A", 'SELECT "online", "firmware", "chambers", "max_pressure_mmhg" FROM '
                    f'"{M.BOOT_STATE}" WHERE {BOOT} AND $timeFilter ORDER BY time DESC LIMIT 500',
                    Expect(("online", "firmware", "chambers")), fmt="table")],
            w=12, h=8)
    lay.add(table("Boot events", "What the boot reported itself: session started/completed/"
                  "stopped, the user's stop button, vented (with its cause), faults.",
                  sort_by="Time"),
            [Target("A", f'SELECT "kind", "detail", "session_id" FROM "{M.BOOT_EVENT}" '
                    f'WHERE {BOOT} AND $timeFilter ORDER BY time DESC LIMIT 500',
                    Expect(("kind", "session_id")), fmt="table")],
            w=12, h=8)
    lay.add(table("Bad data from the boot", "Device faults: rejected messages (not JSON, "
                  "invalid, too large), implausible readings, fault events.", sort_by="Time"),
            [Target("A", f'SELECT "kind", "reason" FROM "{M.DEVICE_FAULT}" WHERE {BOOT} AND '
                    '$timeFilter ORDER BY time DESC LIMIT 500',
                    Expect(("kind", "reason")), fmt="table")],
            w=12, h=8)

    vents = annotation(
        "Vents", "red", f'SELECT "detail", "rule", "action" FROM "{M.SAFETY_EVENT}" WHERE '
        f"{BOOT} AND {VENT_ACTIONS} AND $timeFilter", "detail", "rule,action",
        Expect(("detail", "rule", "action")))
    alarms = annotation(
        "Alarms", "orange", f'SELECT "detail", "rule", "severity", "state" FROM "{M.ALARM}" WHERE '
        f"{BOOT} AND $timeFilter", "detail", "rule,severity,state",
        Expect(("detail", "rule", "severity", "state")))
    sessions = annotation(
        "Sessions", "blue", f'SELECT "session_id", "program", "outcome" FROM "{M.SESSION}" WHERE '
        f"{BOOT} AND $timeFilter", "session_id", "program,outcome",
        Expect(("session_id", "program", "outcome")))
    events = annotation(
        "Boot events", "purple", f'SELECT "kind", "detail" FROM "{M.BOOT_EVENT}" WHERE '
        f"{BOOT} AND $timeFilter", "detail", "kind", Expect(("kind", "detail")))
    device = variable("device", "Device",
                      f'SHOW TAG VALUES FROM "{M.TELEMETRY}" WITH KEY = "device" WHERE '
                      "\"clinic\" = '$clinic'", multi=False)
    return dashboard(
        "boots-boot-detail", "Boots: boot detail", "boot-detail.json",
        "One boot: chamber pressures against the program's targets, sessions, vents, alarms, "
        "commands and acks, connection history.", lay, tags=["boot"],
        variables=[clinic_variable(multi=False), device], time_from="now-1h", refresh="10s",
        annotations=[vents, alarms, sessions, events])
