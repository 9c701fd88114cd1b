"""Dashboard "Boots: safety and sessions": are we safe, how fast does the system react, how do
sessions end, and who did what through the API (the audit trail)?
"""

from __future__ import annotations

from gateway.schema import Measurement as M  # the measurement names
from grafana.generator.common import (
    BOOT_LINK,
    CLINICS,
    ENDED,
    OUTCOME_COLORS,
    SEVERITY_COLORS,
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


def safety_sessions() -> Dashboard:
    lay = Layout()
    lay.row("Safety events")
    lay.add(bargauge("Safety events by rule and severity", "How often each of the ten safety "
                     "rules acted in the time range (docs/safety.md), by severity.",
                     steps=thresholds((None, "orange"))),
            [Target("A", f'SELECT count("detail") AS "events" FROM "{M.SAFETY_EVENT}" WHERE '
                    f'{CLINICS} AND $timeFilter GROUP BY "rule_no", "rule", "severity"',
                    Expect(("events",)), alias="$tag_rule_no $tag_rule ($tag_severity)")],
            w=12, h=9)
    lay.add(timeseries("Safety events over time", "Safety events per interval by severity.",
                       draw="bars", stack=True, interval="1m",
                       overrides=[override(k, color={"mode": "fixed", "fixedColor": c})
                                  for k, (_, c) in SEVERITY_COLORS.items()]),
            [Target("A", f'SELECT count("detail") FROM "{M.SAFETY_EVENT}" WHERE '
                    f'{CLINICS} AND $timeFilter GROUP BY time($__interval), "severity" fill(0)',
                    Expect(("count",)), alias="$tag_severity")], w=12, h=9)
    lay.add(table(
        "Unacknowledged alarms",
        "Alarms whose latest state is active: nobody has acknowledged them yet (alarms with a "
        "change in the last 7 days; the query of docs/schema.md §5, which also leaves out "
        "alarm points written before alarm_id became a tag). Acknowledge them through the "
        "gateway API: POST /api/v1/alarms/{alarm_id}/ack.",
        sort_by="Raised",
        transformations=[organize(
            indexByName={"raised_ms": 0, "clinic": 1, "device": 2, "rule": 3, "severity": 4,
                         "state": 5, "resolved": 6, "detail": 7, "Time": 8, "alarm_id": 9},
            renameByName={"raised_ms": "Raised", "resolved": "cause over",
                          "Time": "Last change"})],
        overrides=[override("severity", mappings=[value_map(SEVERITY_COLORS)],
                            custom__cellOptions={"type": "color-background"}),
                   override("device", links=BOOT_LINK),
                   override("Raised", unit="dateTimeAsIso"),
                   override("Last change", unit="dateTimeFromNow")]),
        [Target("A", 'SELECT "raised_at" * 1000 AS "raised_ms", "alarm_id", "clinic", "device", '
                '"rule", "severity", "state", "resolved", "detail" FROM (SELECT last("detail") '
                'AS "detail", "state", "clinic", "device", "rule", "severity", "resolved", '
                f'"raised_at" FROM "{M.ALARM}" WHERE {CLINICS} AND "alarm_id"::tag != \'\' AND '
                "time > now() - 7d GROUP BY \"alarm_id\") WHERE \"state\" = 'active'",
                Expect(("raised_ms", "alarm_id", "clinic", "device", "rule", "severity",
                        "state")),
                fmt="table")],
        w=24, h=8)

    lay.row("Reaction times")
    lay.add(stat("Vent confirmed after", "Seconds from the first vent of an episode until "
                 "every chamber was below the safe level (vent_confirmed.after_s).", unit="s",
                 steps=thresholds((None, "green"), (5, "orange"), (10, "red"))),
            [Target("A", 'SELECT percentile("after_s", 50) AS "p50", percentile("after_s", 95) '
                    f'AS "p95", max("after_s") AS "max" FROM "{M.VENT_CONFIRMED}" WHERE '
                    f'{CLINICS} AND $timeFilter', Expect(("p50", "p95", "max")))], w=8, h=6)
    lay.add(stat("Vent command ack latency", "Milliseconds from sending a vent command to "
                 "the boot's first ack (command.latency_ms, kind vent).", unit="ms",
                 steps=thresholds((None, "green"), (500, "orange"), (2000, "red"))),
            [Target("A", 'SELECT percentile("latency_ms", 50) AS "p50", '
                    'percentile("latency_ms", 95) AS "p95", max("latency_ms") AS "max" FROM '
                    f"\"{M.COMMAND}\" WHERE {CLINICS} AND \"kind\" = 'vent' AND $timeFilter",
                    Expect(("p50", "p95", "max")))], w=8, h=6)
    lay.add(table("Vent episodes", "Each confirmed vent: how long the boot took to be safe "
                  "and how often the vent had to be re-sent (rule 8).", sort_by="Time",
                  overrides=[override("after_s", unit="s"), override("device", links=BOOT_LINK)]),
            [Target("A", 'SELECT "clinic", "device", "after_s", "resends" '
                    f'FROM "{M.VENT_CONFIRMED}" WHERE {CLINICS} AND $timeFilter '
                    'ORDER BY time DESC LIMIT 500',
                    Expect(("clinic", "device", "after_s", "resends")), fmt="table")],
            w=8, h=6)
    lay.add(timeseries("Reaction time per vent", "Each vent: time to the boot's ack and time "
                       "until the boot was confirmed safe, in ms.", unit="ms", draw="points"),
            [Target("A", f"SELECT \"latency_ms\" AS \"ack latency\" FROM \"{M.COMMAND}\" WHERE "
                    f"{CLINICS} AND \"kind\" = 'vent' AND $timeFilter GROUP BY \"clinic\", "
                    '"device"', Expect(("ack latency",)), alias="$tag_device $col"),
             Target("B", f'SELECT "after_s" * 1000 AS "confirmed after" FROM "{M.VENT_CONFIRMED}" '
                    f'WHERE {CLINICS} AND $timeFilter GROUP BY "clinic", "device"',
                    Expect(("confirmed after",)), alias="$tag_device $col")],
            w=24, h=7)

    lay.row("Sessions")
    ended = f"{CLINICS} AND {ENDED} AND $timeFilter"
    lay.add(table("Sessions per program and outcome", "Sessions that ended in the time range, "
                  "per program (catalogue key; custom for a clinic's own programs, unknown "
                  "when the gateway did not know it): completed, stopped (front desk), "
                  "stopped by the user (stop "
                  "button), vented by the watchdog, rejected or failed at start, or lost "
                  "(the boot left the session without saying how it ended).",
                  transformations=[{"id": "groupingToMatrix", "options": {
                      "columnField": "outcome", "rowField": "program",
                      "valueField": "sessions", "emptyValue": "null"}}]),
            [Target("A", f'SELECT count("session_id") AS "sessions" FROM "{M.SESSION}" '
                    f'WHERE {ended} GROUP BY "program", "outcome"',
                    Expect(("sessions", "program", "outcome")), fmt="table")],
            w=12, h=8)
    pie = bargauge("Session outcomes", "All sessions that ended in the time range, by outcome.")
    pie["fieldConfig"]["overrides"] = [
        override(k, color={"mode": "fixed", "fixedColor": c}, displayName=text)
        for k, (text, c) in OUTCOME_COLORS.items() if k not in ("started", "resumed")]
    pie["fieldConfig"]["defaults"]["color"] = {"mode": "fixed", "fixedColor": "blue"}
    lay.add(pie, [Target("A", f'SELECT count("session_id") AS "sessions" FROM "{M.SESSION}" WHERE '
                          f'{ended} GROUP BY "outcome"', Expect(("sessions",)),
                          alias="$tag_outcome")], w=6, h=8)
    lay.add(bargauge("Sessions started per program", "Sessions that started running in the "
                     "time range, by program (catalogue key, custom or unknown)."),
            [Target("A", f'SELECT count("session_id") AS "sessions" FROM "{M.SESSION}" WHERE '
                    f"{CLINICS} AND \"outcome\" = 'started' AND $timeFilter GROUP BY \"program\"",
                    Expect(("sessions",)), alias="$tag_program")], w=6, h=8)
    lay.add(timeseries("Sessions ended over time", "Sessions ending per interval, by outcome.",
                       draw="bars", stack=True, interval="1m",
                       overrides=[override(k, color={"mode": "fixed", "fixedColor": c})
                                  for k, (_, c) in OUTCOME_COLORS.items()]),
            [Target("A", f'SELECT count("session_id") FROM "{M.SESSION}" WHERE {ended} '
                    'GROUP BY time($__interval), "outcome" fill(0)', Expect(("count",)),
                    alias="$tag_outcome")], w=12, h=8)
    lay.add(table("Session durations", "Per program (catalogue key, custom or unknown) and "
                  "outcome: sessions, mean and longest duration, and the planned duration.",
                  overrides=[override_re("duration|planned", unit="s", decimals=0)]),
            [Target("A", 'SELECT count("duration_s") AS "sessions", mean("duration_s") AS '
                    '"mean duration", max("duration_s") AS "longest duration", '
                    f'mean("planned_s") AS "planned" FROM "{M.SESSION}" WHERE {ended} '
                    'GROUP BY "program", "outcome"',
                    Expect(("sessions", "mean duration", "longest duration")), fmt="table")],
            w=12, h=8)
    lay.add(table("Safety events", "Every safety event in the time range, newest first.",
                  sort_by="Time",
                  overrides=safety_event_overrides()),
            [Target("A", 'SELECT "clinic", "device", "rule_no", "rule", "severity", "action", '
                    f'"chamber", "value", "limit", "detail", "session_id" FROM "{M.SAFETY_EVENT}" '
                    f'WHERE {CLINICS} AND $timeFilter ORDER BY time DESC LIMIT 1000',
                    Expect(("clinic", "device", "rule", "severity", "action", "detail")),
                    fmt="table")],
            w=24, h=9)

    lay.row("Audit trail")
    lay.add(table("Audit trail", "Who started, stopped or vented a boot or acknowledged an "
                  "alarm through the API (the token's user and role), and whether it was done, "
                  "refused (the role may not, an unknown boot or alarm, a program refused "
                  "before sending) or failed (no broker, no ack); docs/schema.md §2.11. Calls "
                  "without a valid token are nobody's: the gateway counts them (stats).",
                  sort_by="Time",
                  overrides=[override("result", custom__cellOptions={"type": "color-text"},
                                      mappings=[value_map({"done": ("done", "green"),
                                                           "refused": ("refused", "orange"),
                                                           "failed": ("failed", "red")})]),
                             override("device", links=BOOT_LINK)]),
            [Target("A", 'SELECT "actor", "role", "action", "result", "clinic", "device", '
                    f'"detail", "cmd_id", "session_id", "alarm_id" FROM "{M.AUDIT}" WHERE '
                    f'{CLINICS} AND $timeFilter ORDER BY time DESC LIMIT 1000',
                    Expect(("actor", "role", "action", "result", "clinic", "detail")),
                    fmt="table")],
            w=24, h=8)

    return dashboard(
        "boots-safety-sessions", "Boots: safety and sessions", "safety-sessions.json",
        "Safety events by rule and severity, reaction times, unacknowledged alarms, "
        "sessions per program with their outcomes, and the audit trail.", lay, tags=["safety"],
        variables=[clinic_variable(multi=True)], time_from="now-7d", refresh="1m")
