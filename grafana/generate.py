"""Generates the Grafana dashboards and alert rules of the boot fleet: the one source of truth.

    .venv/bin/python grafana/generate.py          # rewrite dashboards/*.json and alert rules
    .venv/bin/python grafana/generate.py --check  # exit 1 if committed files differ from the code

The panels are repetitive (same data source, same clinic filter, same table styling), so they
are built here instead of edited by hand. tests/test_grafana.py proves the committed files are
what this module generates; tests/test_grafana_queries.py runs every query against a real
influxd. Queries are InfluxQL over the schema in gateway/points.py (InfluxDB 1.x natively, 2.x
through its v1 API); grafana/README.md says what each dashboard and alert rule is for.

Each query carries an `Expect` (never written to the JSON): the columns it must return with
data after a short simulated fleet run, and `pending` fields the gateway does not write yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
DASHBOARDS_DIR = ROOT / "dashboards"
ALERTING_FILE = ROOT / "provisioning" / "alerting" / "boots-alerts.yaml"

DATASOURCE_UID = "boots-influx"
DS = {"type": "influxdb", "uid": DATASOURCE_UID}
EXPR_DS = {"type": "__expr__", "uid": "__expr__"}
SCHEMA_VERSION = 40  # what Grafana 11.4 (pinned in compose.yaml) writes
FOLDER = "Boots"  # the dashboard provider's folder; alert rules go to the same one

# Boot state is written on changes only (connect, session start/end, gateway restart): look far
# enough back that an idle boot online for weeks still counts. Live panels use telemetry, which
# every connected boot sends at least once a minute (docs/protocol.md §4.2).
STATE_LOOKBACK = "90d"
# Sessions last at most 40 min (ProgramLimits.max_duration_s); an older "started" record without
# an end (the gateway died) is not a running session any more.
SESSION_LOOKBACK = "1h"
# "resumed": a session the gateway picked up after a restart (asked of gateway/service.py).
RUNNING = "\"outcome\" =~ /^(started|resumed)$/"
# Every other outcome ends a session: one such row per session (docs/schema.md).
ENDED = "\"outcome\" !~ /^(started|resumed)$/"
VENT_ACTIONS = "(\"action\" = 'vent' OR \"action\" = 'stop+vent')"
CLINICS = '"clinic" =~ /^$clinic$/'
BOOT = "\"clinic\" = '$clinic' AND \"device\" = '$device'"
MMHG = "suffix: mmHg"

Json = dict[str, Any]


@dataclass(frozen=True)
class Expect:
    """What a query must return after the test fleet run (tests/test_grafana_queries.py)."""

    columns: tuple[str, ...] = ()  # non-time columns with at least one non-null value
    pending: tuple[str, ...] = ()  # fields the panel reads that the gateway does not write yet
    empty_ok: bool = False  # the run produces no data for it (e.g. a fault that did not occur)


@dataclass(frozen=True)
class Target:
    ref: str
    query: str
    expect: Expect = Expect()
    fmt: str = "time_series"
    alias: str | None = None

    def json(self) -> Json:
        out: Json = {"refId": self.ref, "datasource": DS, "query": self.query,
                     "rawQuery": True, "resultFormat": self.fmt}
        if self.fmt == "time_series":
            # Without an alias Grafana names series "measurement.column {tags}", which is
            # unreadable and matches no override, field filter or rename by column name.
            out["alias"] = self.alias or "$col"
        return out


@dataclass(frozen=True)
class QueryCheck:
    """One query of a dashboard (panel, variable or annotation), for the tests."""

    where: str
    query: str
    expect: Expect
    interval: str | None = None  # the panel's minimum interval, if it sets one


@dataclass
class Dashboard:
    uid: str
    title: str
    filename: str
    body: Json
    checks: list[QueryCheck] = field(default_factory=list)


# ---------------------------------------------------------------- layout and panel helpers


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping into new rows."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1
        self.panels: list[Json] = []
        self.checks: list[QueryCheck] = []

    def row(self, title: str) -> None:
        self._wrap()
        self.panels.append({"id": self._id(), "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def add(self, panel: Json, targets: list[Target], w: int, h: int) -> Json:
        if self.x + w > 24:
            self._wrap()
        panel_id = self._id()
        body: Json = {"id": panel_id, "type": panel.pop("type"), "title": panel.pop("title"),
                      "description": panel.pop("description"), "datasource": DS,
                      "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
                      "targets": [t.json() for t in targets]}
        body.update(panel)
        self.panels.append(body)
        for t in targets:
            self.checks.append(QueryCheck(f"panel {panel_id} {body['title']!r} {t.ref}",
                                          t.query, t.expect, body.get("interval")))
        self.x += w
        self.row_h = max(self.row_h, h)
        return body

    def _wrap(self) -> None:
        if self.x:
            self.y += self.row_h
        self.x = 0
        self.row_h = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def value_map(values: dict[str, tuple[str, str]]) -> Json:
    return {"type": "value", "options": {
        k: {"text": text, "color": color, "index": i}
        for i, (k, (text, color)) in enumerate(values.items())}}


def range_map(low: float, high: float | None, text: str, color: str) -> Json:
    return {"type": "range", "options": {"from": low, "to": high,
                                         "result": {"text": text, "color": color, "index": 0}}}


def override(name: str, **props: Any) -> Json:
    return {"matcher": {"id": "byName", "options": name},
            "properties": [{"id": k.replace("__", "."), "value": v} for k, v in props.items()]}


def override_re(pattern: str, **props: Any) -> Json:
    return {"matcher": {"id": "byRegexp", "options": pattern},
            "properties": [{"id": k.replace("__", "."), "value": v} for k, v in props.items()]}


ONLINE_MAP = value_map({"1": ("online", "green"), "0": ("offline", "red")})
LINK_MAP = value_map({"1": ("connected", "green"), "0": ("LOST", "red")})
OUTCOME_COLORS = {"started": ("running", "blue"), "resumed": ("running (resumed)", "blue"),
                  "completed": ("completed", "green"), "stopped": ("stopped", "text"),
                  "user_stop": ("stopped by user", "orange"), "vented": ("vented", "red"),
                  "rejected": ("rejected", "purple"), "failed": ("failed", "purple"),
                  "lost": ("lost", "purple")}
SEVERITY_COLORS = {"high": ("high", "red"), "medium": ("medium", "orange"),
                   "low": ("low", "yellow")}
PHASE_COLORS = {"idle": ("idle", "text"), "inflate": ("inflate", "blue"),
                "hold": ("hold", "blue"), "deflate": ("deflate", "green"),
                "pause": ("pause", "green"), "vent": ("VENT", "red"),
                "unknown": ("unknown", "purple")}
BOOT_LINK = [{"title": "Boot detail",
              "url": "/d/boots-boot-detail/boots-boot-detail?var-clinic=${__data.fields.clinic}"
                     "&var-device=${__data.fields.device}&${__url_time_range}"}]



def safety_event_overrides() -> list[dict[str, Any]]:
    """Safety-event tables: severity in its colour, device linked, values in mmHg."""
    return [override("severity", mappings=[value_map(SEVERITY_COLORS)],
                     custom__cellOptions={"type": "color-text"}),
            override("device", links=BOOT_LINK),
            override("value", unit=MMHG), override("limit", unit=MMHG)]

def stat(title: str, description: str, *, unit: str = "none", no_value: str | None = None,
         mappings: list[Json] | None = None, steps: Json | None = None,
         fields: str = "", text_mode: str = "value_and_name", color_mode: str = "value") -> Json:
    defaults: Json = {"unit": unit, "mappings": mappings or [],
                      "thresholds": steps or thresholds((None, "green")),
                      "color": {"mode": "thresholds"}}
    if no_value is not None:
        defaults["noValue"] = no_value
    return {"type": "stat", "title": title, "description": description,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": fields,
                                          "values": False},
                        "colorMode": color_mode, "graphMode": "none", "justifyMode": "auto",
                        "orientation": "auto", "textMode": text_mode, "wideLayout": True,
                        "showPercentChange": False}}


def timeseries(title: str, description: str, *, unit: str = "none", draw: str = "line",
               stack: bool = False, steps: Json | None = None, min_: float | None = 0,
               overrides: list[Json] | None = None, interval: str | None = None,
               transformations: list[Json] | None = None) -> Json:
    custom: Json = {"drawStyle": draw, "lineWidth": 1, "fillOpacity": 80 if draw == "bars" else 0,
                    "showPoints": "always" if draw == "points" else "never", "pointSize": 6,
                    "spanNulls": False, "lineInterpolation": "linear", "axisLabel": "",
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    "thresholdsStyle": {"mode": "line" if steps else "off"}}
    defaults: Json = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"},
                      "thresholds": steps or thresholds((None, "green"))}
    if min_ is not None:
        defaults["min"] = min_
    panel: Json = {"type": "timeseries", "title": title, "description": description,
                   "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
                   "options": {"legend": {"displayMode": "list", "placement": "bottom",
                                          "showLegend": True, "calcs": []},
                               "tooltip": {"mode": "multi", "sort": "desc"}}}
    if interval:
        panel["interval"] = interval
    if transformations:
        panel["transformations"] = transformations
    return panel


def table(title: str, description: str, *, overrides: list[Json] | None = None,
          transformations: list[Json] | None = None, sort_by: str | None = None,
          desc: bool = True) -> Json:
    panel: Json = {"type": "table", "title": title, "description": description,
                   "fieldConfig": {"defaults": {"custom": {"align": "auto", "filterable": True,
                                                           "cellOptions": {"type": "auto"}},
                                                "mappings": [],
                                                "thresholds": thresholds((None, "green"))},
                                   "overrides": overrides or []},
                   "options": {"showHeader": True, "cellHeight": "sm",
                               "footer": {"show": False, "reducer": ["sum"], "fields": ""}}}
    if sort_by:
        panel["options"]["sortBy"] = [{"displayName": sort_by, "desc": desc}]
    if transformations:
        panel["transformations"] = transformations
    return panel


def bargauge(title: str, description: str, *, unit: str = "none",
             steps: Json | None = None) -> Json:
    return {"type": "bargauge", "title": title, "description": description,
            "fieldConfig": {"defaults": {"unit": unit, "min": 0, "color": {"mode": "thresholds"},
                                         "thresholds": steps or thresholds((None, "blue"))},
                            "overrides": []},
            "options": {"displayMode": "basic", "orientation": "horizontal",
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "showUnfilled": True, "valueMode": "color", "namePlacement": "auto",
                        "sizing": "auto", "minVizHeight": 16, "minVizWidth": 8,
                        "maxVizHeight": 300}}


def organize(ref: str | None = None, **options: Any) -> Json:
    step: Json = {"id": "organize", "options": {"excludeByName": {}, "indexByName": {},
                                                "renameByName": {}, **options}}
    if ref:
        step["filter"] = {"id": "byRefId", "options": ref}
    return step


def variable(name: str, label: str, query: str, *, multi: bool) -> Json:
    var: Json = {"name": name, "label": label, "type": "query", "datasource": DS,
                 "definition": query, "query": query, "refresh": 1, "sort": 1,
                 "multi": multi, "includeAll": multi, "options": [], "hide": 0,
                 "regex": "", "skipUrlSync": False}
    if multi:
        var["allValue"] = ".*"
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    else:
        var["current"] = {}
    return var


def annotation(name: str, color: str, query: str, text: str, tags: str,
               expect: Expect) -> tuple[Json, QueryCheck]:
    """An InfluxQL annotation, in both the current (target) and the legacy (top-level) form."""
    target = {"refId": "Anno", "query": query, "fromAnnotations": True, "queryType": "tags",
              "textColumn": text, "tagsColumn": tags, "titleColumn": "", "timeEndColumn": ""}
    anno: Json = {"name": name, "datasource": DS, "enable": True, "hide": False,
                  "iconColor": color, "query": query, "textColumn": text, "tagsColumn": tags,
                  "target": target}
    return anno, QueryCheck(f"annotation {name!r}", query, expect)


BUILTIN_ANNOTATION = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                      "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                      "name": "Annotations & Alerts", "type": "dashboard"}


def dashboard(uid: str, title: str, filename: str, description: str, layout: Layout, *,
              tags: list[str], variables: list[Json], time_from: str, refresh: str,
              annotations: list[tuple[Json, QueryCheck]] | None = None) -> Dashboard:
    annotations = annotations or []
    body: Json = {
        "uid": uid, "title": title, "description": description, "tags": ["boots", *tags],
        "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": True, "graphTooltip": 1,
        "timezone": "browser", "refresh": refresh, "time": {"from": time_from, "to": "now"},
        "timepicker": {}, "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "",
        "links": [{"title": "Boot dashboards", "type": "dashboards", "tags": ["boots"],
                   "asDropdown": True, "includeVars": True, "keepTime": True,
                   "icon": "external link", "targetBlank": False, "tooltip": "", "url": ""}],
        "annotations": {"list": [BUILTIN_ANNOTATION, *(a for a, _ in annotations)]},
        "templating": {"list": variables},
        "panels": layout.panels,
    }
    checks = [*(c for _, c in annotations), *layout.checks]
    for var in variables:
        checks.append(QueryCheck(f"variable {var['name']}", var["query"],
                                 Expect(columns=("value",))))
    return Dashboard(uid, title, filename, body, checks)


def clinic_variable(*, multi: bool) -> Json:
    return variable("clinic", "Clinic", 'SHOW TAG VALUES FROM "telemetry" WITH KEY = "clinic"',
                    multi=multi)


# ---------------------------------------------------------------- fleet overview


def _last_per_boot(select: str, measurement: str, where: str, lookback: str) -> str:
    return (f'SELECT {select} FROM "{measurement}" WHERE {where} AND time > now() - {lookback} '
            'GROUP BY "clinic", "device"')


def fleet_overview() -> Dashboard:
    lay = Layout()
    lay.row("Fleet now")
    state = _last_per_boot('last("online") AS "online"', "boot_state", CLINICS, STATE_LOOKBACK)
    lay.add(stat("Boots online", "Boots whose latest state (MQTT retained state, LWT) is online, "
                 "per clinic.", no_value="0", steps=thresholds((None, "green"))),
            [Target("A", f'SELECT sum("online") AS "online" FROM ({state}) GROUP BY "clinic"',
                    Expect(("online",)), alias="$tag_clinic")], w=5, h=4)
    lay.add(stat("Boots offline", "Known boots whose latest state is offline (they disconnected "
                 "or their LWT fired), per clinic.", no_value="0",
                 steps=thresholds((None, "green"), (1, "orange"))),
            [Target("A", f'SELECT count("online") - sum("online") AS "offline" FROM ({state}) '
                    'GROUP BY "clinic"', Expect(("offline",)), alias="$tag_clinic")], w=5, h=4)
    latest = _last_per_boot('last("session_id") AS "session", "outcome"', "session", CLINICS,
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
            [Target("A", f'SELECT count("detail") AS "vents" FROM "safety_event" WHERE {CLINICS} '
                    f'AND {VENT_ACTIONS} AND time > now() - 24h GROUP BY "clinic"',
                    Expect(("vents",)), alias="$tag_clinic")], w=4, h=4)
    lay.add(stat("Alarms raised, last 24 h", "Alarms raised in the last 24 h by priority "
                 "(IEC 60601-1-8: high, medium, low).", no_value="0",
                 mappings=[], steps=thresholds((None, "orange"))),
            [Target("A", 'SELECT count("raised_at") AS "alarms" FROM (SELECT first("raised_at") '
                    f'AS "raised_at" FROM "alarm" WHERE {CLINICS} AND time > now() - 24h '
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
                                    '"session_elapsed_s"', "telemetry", CLINICS, "1h"),
                Expect(("seq", "phase", "session_id", "max_p"), pending=("session_elapsed_s",)),
                fmt="table"),
         Target("B", _last_per_boot('last("online") AS "online", "firmware"', "boot_state",
                                    CLINICS, STATE_LOOKBACK),
                Expect(("online", "firmware")), fmt="table"),
         Target("C", _last_per_boot('last("session_id") AS "session", "program_name", '
                                    '"outcome", "planned_s"', "session", CLINICS,
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
                '"value", "limit", "detail" FROM "safety_event" WHERE '
                f'{CLINICS} AND time > now() - 24h ORDER BY time DESC LIMIT 500',
                Expect(("clinic", "device", "rule", "severity", "action", "detail")),
                fmt="table")],
        w=16, h=9)
    lay.add(bargauge("Safety events by rule, last 24 h",
                     "How often each safety rule acted in the last 24 h.",
                     steps=thresholds((None, "orange"))),
            [Target("A", 'SELECT count("detail") AS "events" FROM "safety_event" WHERE '
                    f'{CLINICS} AND time > now() - 24h GROUP BY "rule"',
                    Expect(("events",)), alias="$tag_rule")], w=8, h=9)

    lay.row("Pressures")
    lay.add(timeseries(
        "Max chamber pressure per boot",
        "Highest chamber pressure of each boot per interval (telemetry max_p), mmHg. Lines: "
        "the default clinic ceiling (100) and the gateway's hard ceiling (120).",
        unit=MMHG, steps=thresholds((None, "green"), (100, "orange"), (120, "red"))),
        [Target("A", f'SELECT max("max_p") FROM "telemetry" WHERE {CLINICS} AND $timeFilter '
                'GROUP BY time($__interval), "clinic", "device" fill(null)',
                Expect(("max",)), alias="$tag_clinic/$tag_device")], w=24, h=9)

    lay.row("Gateway health")
    health = '"gateway_health" WHERE $timeFilter'
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


# ---------------------------------------------------------------- boot detail


def boot_detail() -> Dashboard:
    lay = Layout()
    lay.add(stat("Connection", "Latest state of the boot (online, or offline after a "
                 "disconnect or its LWT).", mappings=[ONLINE_MAP], text_mode="value",
                 steps=thresholds((None, "red"), (1, "green"))),
            [Target("A", f'SELECT last("online") AS "online" FROM "boot_state" WHERE {BOOT} '
                    f'AND time > now() - {STATE_LOOKBACK}', Expect(("online",)))], w=4, h=4)
    lay.add(stat("State now", "Phase of the latest telemetry sample (last hour).",
                 mappings=[value_map(PHASE_COLORS)], fields="/^phase$/", text_mode="value"),
            [Target("A", f'SELECT last("seq") AS "seq", "phase" FROM "telemetry" WHERE {BOOT} '
                    'AND time > now() - 1h', Expect(("phase",)))], w=4, h=4)
    lay.add(stat("Max chamber pressure now", "Highest chamber pressure in the latest sample "
                 "(last hour).", unit=MMHG, text_mode="value",
                 steps=thresholds((None, "green"), (100, "orange"), (120, "red"))),
            [Target("A", f'SELECT last("max_p") AS "max_p" FROM "telemetry" WHERE {BOOT} '
                    'AND time > now() - 1h', Expect(("max_p",)))], w=4, h=4)
    lay.add(stat("Last seen", "Time of the latest telemetry sample.", unit="dateTimeFromNow",
                 fields="/^Time$/", text_mode="value"),
            [Target("A", f'SELECT last("seq") AS "seq" FROM "telemetry" WHERE {BOOT} AND '
                    f'time > now() - {STATE_LOOKBACK}', Expect(("seq",)))], w=4, h=4)
    lay.add(stat("Latest session", "Program and outcome of the boot's latest session "
                 "(running while it is in session).", mappings=[value_map(OUTCOME_COLORS)],
                 fields="/^(program_name|outcome)$/", text_mode="value_and_name"),
            [Target("A", f'SELECT last("session_id") AS "session", "program_name", "outcome" '
                    f'FROM "session" WHERE {BOOT} AND time > now() - {STATE_LOOKBACK}',
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
        [Target("A", 'SELECT max(/^p[0-9]+$/) FROM "telemetry" WHERE '
                f'{BOOT} AND $timeFilter GROUP BY time($__interval) fill(null)',
                Expect(("max_p1", "max_p2"))),
         Target("B", 'SELECT max(/^target_p[0-9]+$/) FROM "telemetry" WHERE '
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
            [Target("A", 'SELECT count("session_id") AS "in session" FROM "telemetry" WHERE '
                    f'{BOOT} AND $timeFilter GROUP BY time($__interval) fill(0)',
                    Expect(("in session",))),
             Target("B", 'SELECT count("detail") AS "vent" FROM "safety_event" WHERE '
                    f'{BOOT} AND {VENT_ACTIONS} AND $timeFilter GROUP BY time($__interval) '
                    'fill(0)', Expect(("vent",))),
             Target("C", f'SELECT "online" FROM "boot_state" WHERE {BOOT} AND $timeFilter',
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
                    f'"session_id" FROM "command" WHERE {BOOT} AND $timeFilter '
                    'ORDER BY time DESC LIMIT 500',
                    Expect(("kind", "outcome", "latency_ms", "cmd_id")), fmt="table")],
            w=12, h=9)
    lay.add(table("Safety events", "What the watchdog did to this boot and why.",
                  sort_by="Time",
                  overrides=[override("severity", mappings=[value_map(SEVERITY_COLORS)],
                                      custom__cellOptions={"type": "color-text"}),
                             override("value", unit=MMHG), override("limit", unit=MMHG)]),
            [Target("A", 'SELECT "rule", "severity", "action", "chamber", "value", "limit", '
                    f'"detail" FROM "safety_event" WHERE {BOOT} AND $timeFilter '
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
                    f'FROM "session" WHERE {BOOT} AND $timeFilter ORDER BY time DESC LIMIT 500',
                    Expect(("session_id", "program", "program_name", "outcome", "duration_s")),
                    fmt="table")],
            w=12, h=8)
    lay.add(table("Connection history", "Every state message: online/offline (a disconnect "
                  "or the LWT), firmware and chamber layout.", sort_by="Time",
                  overrides=[override("online", mappings=[ONLINE_MAP],
                                      custom__cellOptions={"type": "color-text"}),
                             override("max_pressure_mmhg", unit=MMHG)]),
            [Target("A", 'SELECT "online", "firmware", "chambers", "max_pressure_mmhg" FROM '
                    f'"boot_state" WHERE {BOOT} AND $timeFilter ORDER BY time DESC LIMIT 500',
                    Expect(("online", "firmware", "chambers")), fmt="table")],
            w=12, h=8)
    lay.add(table("Boot events", "What the boot reported itself: session started/completed/"
                  "stopped, the user's stop button, vented (with its cause), faults.",
                  sort_by="Time"),
            [Target("A", f'SELECT "kind", "detail", "session_id" FROM "boot_event" WHERE {BOOT} '
                    'AND $timeFilter ORDER BY time DESC LIMIT 500',
                    Expect(("kind", "session_id")), fmt="table")],
            w=12, h=8)
    lay.add(table("Bad data from the boot", "Device faults: rejected messages (not JSON, "
                  "invalid, too large), implausible readings, fault events.", sort_by="Time"),
            [Target("A", f'SELECT "kind", "reason" FROM "device_fault" WHERE {BOOT} AND '
                    '$timeFilter ORDER BY time DESC LIMIT 500',
                    Expect(("kind", "reason")), fmt="table")],
            w=12, h=8)

    vents = annotation(
        "Vents", "red", 'SELECT "detail", "rule", "action" FROM "safety_event" WHERE '
        f"{BOOT} AND {VENT_ACTIONS} AND $timeFilter", "detail", "rule,action",
        Expect(("detail", "rule", "action")))
    alarms = annotation(
        "Alarms", "orange", 'SELECT "detail", "rule", "severity", "state" FROM "alarm" WHERE '
        f"{BOOT} AND $timeFilter", "detail", "rule,severity,state",
        Expect(("detail", "rule", "severity", "state")))
    sessions = annotation(
        "Sessions", "blue", 'SELECT "session_id", "program", "outcome" FROM "session" WHERE '
        f"{BOOT} AND $timeFilter", "session_id", "program,outcome",
        Expect(("session_id", "program", "outcome")))
    events = annotation(
        "Boot events", "purple", 'SELECT "kind", "detail" FROM "boot_event" WHERE '
        f"{BOOT} AND $timeFilter", "detail", "kind", Expect(("kind", "detail")))
    device = variable("device", "Device",
                      'SHOW TAG VALUES FROM "telemetry" WITH KEY = "device" WHERE '
                      "\"clinic\" = '$clinic'", multi=False)
    return dashboard(
        "boots-boot-detail", "Boots: boot detail", "boot-detail.json",
        "One boot: chamber pressures against the program's targets, sessions, vents, alarms, "
        "commands and acks, connection history.", lay, tags=["boot"],
        variables=[clinic_variable(multi=False), device], time_from="now-1h", refresh="10s",
        annotations=[vents, alarms, sessions, events])


# ---------------------------------------------------------------- safety and sessions


def safety_sessions() -> Dashboard:
    lay = Layout()
    lay.row("Safety events")
    lay.add(bargauge("Safety events by rule and severity", "How often each of the ten safety "
                     "rules acted in the time range (docs/safety.md), by severity.",
                     steps=thresholds((None, "orange"))),
            [Target("A", 'SELECT count("detail") AS "events" FROM "safety_event" WHERE '
                    f'{CLINICS} AND $timeFilter GROUP BY "rule_no", "rule", "severity"',
                    Expect(("events",)), alias="$tag_rule_no $tag_rule ($tag_severity)")],
            w=12, h=9)
    lay.add(timeseries("Safety events over time", "Safety events per interval by severity.",
                       draw="bars", stack=True, interval="1m",
                       overrides=[override(k, color={"mode": "fixed", "fixedColor": c})
                                  for k, (_, c) in SEVERITY_COLORS.items()]),
            [Target("A", 'SELECT count("detail") FROM "safety_event" WHERE '
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
                f'"raised_at" FROM "alarm" WHERE {CLINICS} AND "alarm_id"::tag != \'\' AND '
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
                    'AS "p95", max("after_s") AS "max" FROM "vent_confirmed" WHERE '
                    f'{CLINICS} AND $timeFilter', Expect(("p50", "p95", "max")))], w=8, h=6)
    lay.add(stat("Vent command ack latency", "Milliseconds from sending a vent command to "
                 "the boot's first ack (command.latency_ms, kind vent).", unit="ms",
                 steps=thresholds((None, "green"), (500, "orange"), (2000, "red"))),
            [Target("A", 'SELECT percentile("latency_ms", 50) AS "p50", '
                    'percentile("latency_ms", 95) AS "p95", max("latency_ms") AS "max" FROM '
                    f"\"command\" WHERE {CLINICS} AND \"kind\" = 'vent' AND $timeFilter",
                    Expect(("p50", "p95", "max")))], w=8, h=6)
    lay.add(table("Vent episodes", "Each confirmed vent: how long the boot took to be safe "
                  "and how often the vent had to be re-sent (rule 8).", sort_by="Time",
                  overrides=[override("after_s", unit="s"), override("device", links=BOOT_LINK)]),
            [Target("A", 'SELECT "clinic", "device", "after_s", "resends" FROM "vent_confirmed" '
                    f'WHERE {CLINICS} AND $timeFilter ORDER BY time DESC LIMIT 500',
                    Expect(("clinic", "device", "after_s", "resends")), fmt="table")],
            w=8, h=6)
    lay.add(timeseries("Reaction time per vent", "Each vent: time to the boot's ack and time "
                       "until the boot was confirmed safe, in ms.", unit="ms", draw="points"),
            [Target("A", "SELECT \"latency_ms\" AS \"ack latency\" FROM \"command\" WHERE "
                    f"{CLINICS} AND \"kind\" = 'vent' AND $timeFilter GROUP BY \"clinic\", "
                    '"device"', Expect(("ack latency",)), alias="$tag_device $col"),
             Target("B", 'SELECT "after_s" * 1000 AS "confirmed after" FROM "vent_confirmed" '
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
            [Target("A", f'SELECT count("session_id") AS "sessions" FROM "session" WHERE {ended} '
                    'GROUP BY "program", "outcome"', Expect(("sessions", "program", "outcome")),
                    fmt="table")],
            w=12, h=8)
    pie = bargauge("Session outcomes", "All sessions that ended in the time range, by outcome.")
    pie["fieldConfig"]["overrides"] = [
        override(k, color={"mode": "fixed", "fixedColor": c}, displayName=text)
        for k, (text, c) in OUTCOME_COLORS.items() if k not in ("started", "resumed")]
    pie["fieldConfig"]["defaults"]["color"] = {"mode": "fixed", "fixedColor": "blue"}
    lay.add(pie, [Target("A", f'SELECT count("session_id") AS "sessions" FROM "session" WHERE '
                          f'{ended} GROUP BY "outcome"', Expect(("sessions",)),
                          alias="$tag_outcome")], w=6, h=8)
    lay.add(bargauge("Sessions started per program", "Sessions that started running in the "
                     "time range, by program (catalogue key, custom or unknown)."),
            [Target("A", 'SELECT count("session_id") AS "sessions" FROM "session" WHERE '
                    f"{CLINICS} AND \"outcome\" = 'started' AND $timeFilter GROUP BY \"program\"",
                    Expect(("sessions",)), alias="$tag_program")], w=6, h=8)
    lay.add(timeseries("Sessions ended over time", "Sessions ending per interval, by outcome.",
                       draw="bars", stack=True, interval="1m",
                       overrides=[override(k, color={"mode": "fixed", "fixedColor": c})
                                  for k, (_, c) in OUTCOME_COLORS.items()]),
            [Target("A", f'SELECT count("session_id") FROM "session" WHERE {ended} '
                    'GROUP BY time($__interval), "outcome" fill(0)', Expect(("count",)),
                    alias="$tag_outcome")], w=12, h=8)
    lay.add(table("Session durations", "Per program (catalogue key, custom or unknown) and "
                  "outcome: sessions, mean and longest duration, and the planned duration.",
                  overrides=[override_re("duration|planned", unit="s", decimals=0)]),
            [Target("A", 'SELECT count("duration_s") AS "sessions", mean("duration_s") AS '
                    '"mean duration", max("duration_s") AS "longest duration", '
                    f'mean("planned_s") AS "planned" FROM "session" WHERE {ended} '
                    'GROUP BY "program", "outcome"',
                    Expect(("sessions", "mean duration", "longest duration")), fmt="table")],
            w=12, h=8)
    lay.add(table("Safety events", "Every safety event in the time range, newest first.",
                  sort_by="Time",
                  overrides=safety_event_overrides()),
            [Target("A", 'SELECT "clinic", "device", "rule_no", "rule", "severity", "action", '
                    '"chamber", "value", "limit", "detail", "session_id" FROM "safety_event" '
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
                    '"detail", "cmd_id", "session_id", "alarm_id" FROM "audit" WHERE '
                    f'{CLINICS} AND $timeFilter ORDER BY time DESC LIMIT 1000',
                    Expect(("actor", "role", "action", "result", "clinic", "detail")),
                    fmt="table")],
            w=24, h=8)

    return dashboard(
        "boots-safety-sessions", "Boots: safety and sessions", "safety-sessions.json",
        "Safety events by rule and severity, reaction times, unacknowledged alarms, "
        "sessions per program with their outcomes, and the audit trail.", lay, tags=["safety"],
        variables=[clinic_variable(multi=True)], time_from="now-7d", refresh="1m")


def dashboards() -> list[Dashboard]:
    return [fleet_overview(), boot_detail(), safety_sessions()]


# ---------------------------------------------------------------- alert rules


@dataclass(frozen=True)
class Rule:
    uid: str
    title: str
    queries: dict[str, str]  # refId -> InfluxQL (with $timeFilter)
    lookback_s: int
    expressions: list[Json]  # server-side expressions after the queries
    condition: str
    for_: str
    no_data: str
    labels: dict[str, str]
    summary: str
    description: str

    def json(self) -> Json:
        data: list[Json] = [
            {"refId": ref, "relativeTimeRange": {"from": self.lookback_s, "to": 0},
             "datasourceUid": DATASOURCE_UID,
             "model": {"refId": ref, "datasource": DS, "query": q, "rawQuery": True,
                       "resultFormat": "time_series", "intervalMs": 1000,
                       "maxDataPoints": 43200}}
            for ref, q in self.queries.items()]
        for expr in self.expressions:
            data.append({"refId": expr["refId"], "relativeTimeRange": {"from": 0, "to": 0},
                         "datasourceUid": "__expr__",
                         "model": {**expr, "datasource": EXPR_DS, "intervalMs": 1000,
                                   "maxDataPoints": 43200}})
        return {"uid": self.uid, "title": self.title, "condition": self.condition,
                "data": data, "noDataState": self.no_data, "execErrState": "Error",
                "for": self.for_, "labels": self.labels,
                "annotations": {"summary": self.summary, "description": self.description},
                "isPaused": False}


def reduce_(ref: str, of: str, reducer: str) -> Json:
    """Reduce a series to one number; missing values count as 0 so no event means OK."""
    return {"refId": ref, "type": "reduce", "expression": of, "reducer": reducer,
            "settings": {"mode": "replaceNN", "replaceWithValue": 0}}


def threshold(ref: str, of: str, op: str, value: float) -> Json:
    return {"refId": ref, "type": "threshold", "expression": of,
            "conditions": [{"evaluator": {"type": op, "params": [value]}}]}


def math(ref: str, expression: str) -> Json:
    return {"refId": ref, "type": "math", "expression": expression}


def _safety_rules() -> list[Rule]:
    boot = "{{ $labels.clinic }}/{{ $labels.device }}"
    link = "Boot detail: /d/boots-boot-detail/boots-boot-detail?var-clinic={{ $labels.clinic }}" \
           "&var-device={{ $labels.device }}"
    return [
        Rule("boots-vent", "Boot vented by the safety watchdog",
             {"A": 'SELECT count("detail") AS "vents" FROM "safety_event" WHERE '
                   f"{VENT_ACTIONS} AND \"rule\" != 'vent_not_confirmed' AND "
                   "\"rule\" != 'offline_in_session' AND $timeFilter GROUP BY \"clinic\", "
                   '"device"'},
             300, [reduce_("B", "A", "sum"), threshold("C", "B", "gt", 0)], "C", "0s", "OK",
             {"severity": "critical", "component": "boot"},
             f"Boot {boot} was vented by the safety watchdog",
             "The gateway commanded a vent in the last 5 minutes (rules 1-6: over-pressure, "
             "over target, sustained inflation, overrun, telemetry loss, implausible data). "
             f"Check the patient and the boot. {link}"),
        Rule("boots-vent-not-confirmed", "Vent not confirmed",
             {"A": 'SELECT count("detail") AS "resends" FROM "safety_event" WHERE '
                   "\"rule\" = 'vent_not_confirmed' AND $timeFilter GROUP BY \"clinic\", "
                   '"device"'},
             300, [reduce_("B", "A", "sum"), threshold("C", "B", "gt", 0)], "C", "0s", "OK",
             {"severity": "critical", "component": "boot"},
             f"Vent of boot {boot} not confirmed: chambers still pressurised",
             "After a vent the boot's chambers did not fall below the safe level within the "
             "deadline; the gateway re-sends the vent (rule 8). Go to the boot and release the "
             f"pressure by hand if needed. {link}"),
        Rule("boots-offline-in-session", "Boot offline during a session",
             {"A": 'SELECT count("detail") AS "events" FROM "safety_event" WHERE '
                   "\"rule\" = 'offline_in_session' AND $timeFilter GROUP BY \"clinic\", "
                   '"device"',
              "B": 'SELECT last("online") AS "online" FROM "boot_state" WHERE $timeFilter '
                   'GROUP BY "clinic", "device"'},
             3600, [reduce_("C", "A", "sum"), reduce_("D", "B", "last"),
                    math("E", "$C > 0 && $D == 0")], "E", "0s", "OK",
             {"severity": "critical", "component": "boot"},
             f"Boot {boot} went offline during a session and is still offline",
             "The boot disconnected (or its LWT fired) mid-session within the last hour and has "
             "not come back. The gateway cannot vent it; the boot must vent itself. Check the "
             f"patient. {link}"),
    ]


def _gateway_rules() -> list[Rule]:
    gw = "{{ $labels.gateway }}"
    return [
        Rule("boots-gateway-broker-lost", "Gateway lost the MQTT broker",
             {"A": 'SELECT last("mqtt_connected") AS "mqtt_connected" FROM "gateway_health" '
                   'WHERE $timeFilter GROUP BY "gateway"'},
             300, [reduce_("B", "A", "last"), threshold("C", "B", "lt", 1)], "C", "1m", "OK",
             {"severity": "critical", "component": "gateway"},
             f"Gateway {gw} is not connected to the MQTT broker",
             "The gateway reports mqtt_connected = 0 for over a minute: it receives no "
             "telemetry and cannot send vents. Boots in session vent themselves when the "
             "heartbeat stops. Check the broker and the network."),
        Rule("boots-gateway-influx-lost", "Gateway lost InfluxDB",
             {"A": 'SELECT min("influx_connected") AS "influx_connected" FROM "gateway_health" '
                   'WHERE $timeFilter GROUP BY "gateway"'},
             600, [reduce_("B", "A", "last"), threshold("C", "B", "lt", 1)], "C", "0s", "OK",
             {"severity": "warning", "component": "gateway"},
             f"Gateway {gw} could not write to InfluxDB in the last 10 minutes",
             "A health report says influx_connected = 0. While InfluxDB is unreachable these "
             "reports cannot arrive (the rule 'No gateway health data' fires instead); this one "
             "fires when they are written late or the connection flaps. Safety is not "
             "affected; dashboards show gaps until the queue and spool are written."),
        Rule("boots-gateway-no-health", "No gateway health data",
             {"A": 'SELECT count("queue_depth") AS "reports" FROM "gateway_health" '
                   "WHERE $timeFilter"},
             180, [reduce_("B", "A", "last"), threshold("C", "B", "lt", 1)], "C", "0s",
             "Alerting", {"severity": "critical", "component": "gateway"},
             "No gateway has written gateway_health for 3 minutes",
             "The gateway writes its health every health_interval_s (10 s by default). None "
             "arrived for 3 minutes: the gateway is down, or it cannot write to InfluxDB "
             "(check its log and /health on port 8080). The safety watchdog runs in the "
             "gateway: without it boots rely on their own self-vent."),
        Rule("boots-gateway-points-lost", "Gateway losing data points",
             {"A": 'SELECT non_negative_difference("points_dropped") AS "dropped" FROM '
                   '"gateway_health" WHERE $timeFilter GROUP BY "gateway"',
              "B": 'SELECT non_negative_difference("points_refused") AS "refused" FROM '
                   '"gateway_health" WHERE $timeFilter GROUP BY "gateway"'},
             900, [reduce_("C", "A", "sum"), reduce_("D", "B", "sum"),
                   math("E", "$C > 0 || $D > 0")], "E", "0s", "OK",
             {"severity": "warning", "component": "gateway"},
             f"Gateway {gw} dropped or had points refused in the last 15 minutes",
             "points_dropped (queue full) or points_refused (InfluxDB rejected the data) "
             "increased: telemetry, safety events or session records are missing from "
             "InfluxDB. Check InfluxDB's capacity and the gateway log."),
        Rule("boots-gateway-storage-fault", "Gateway disk spool failing",
             {"A": 'SELECT last("spool_fault") AS "spool_fault" FROM "gateway_health" '
                   'WHERE $timeFilter GROUP BY "gateway"'},
             300, [reduce_("B", "A", "last"), threshold("C", "B", "gt", 0)], "C", "0s", "OK",
             {"severity": "warning", "component": "gateway"},
             f"Gateway {gw} cannot write its disk spool",
             "The latest health report says spool_fault = 1: the disk under the spool "
             "(BOOTGW_INFLUX__SPOOL_DIR) is full, read-only or failing; the gateway's "
             "storage_fault alarm and its log ('spool write failed', with the errno) say "
             "which. Writes to InfluxDB go on while it is up, but an InfluxDB outage now "
             "loses data (counted in points_dropped). Free space or repair the disk: the "
             "gateway resumes by itself, no restart needed."),
    ]


def alert_groups() -> list[tuple[str, str, list[Rule]]]:
    """(group name, evaluation interval, rules)."""
    return [("boot-safety", "10s", _safety_rules()), ("gateway", "1m", _gateway_rules())]


def alerting_document() -> Json:
    return {"apiVersion": 1, "groups": [
        {"orgId": 1, "name": name, "folder": FOLDER, "interval": interval,
         "rules": [r.json() for r in rules]}
        for name, interval, rules in alert_groups()]}


# ---------------------------------------------------------------- files


class _PlainDumper(yaml.SafeDumper):
    """No &anchors for repeated objects, which a reader of the file would have to chase."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def rendered_files() -> dict[Path, str]:
    """Every generated file and its exact text."""
    files = {DASHBOARDS_DIR / d.filename: json.dumps(d.body, indent=2, ensure_ascii=False) + "\n"
             for d in dashboards()}
    header = ("# Generated by grafana/generate.py from the same code as the dashboards: edit that "
              "file,\n# then run `python grafana/generate.py`. Grafana file provisioning format "
              "(apiVersion 1).\n")
    files[ALERTING_FILE] = header + yaml.dump(alerting_document(), Dumper=_PlainDumper,
                                              sort_keys=False, allow_unicode=True, width=1000)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare; exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered_files().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        shown = path.relative_to(ROOT.parent) if path.is_relative_to(ROOT.parent) else path
        print(f"{'stale' if args.check else 'wrote'} {shown}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
