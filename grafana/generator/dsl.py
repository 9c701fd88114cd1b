"""The small Grafana DSL the dashboards and alert rules are written in.

Grafana-generic, no boot-fleet knowledge: the data source, query targets with what each must
return (`Expect`, checked by tests/test_grafana_queries.py, never written to the JSON), the
grid layout that numbers panels and collects their queries, the panel builders (stat,
timeseries, table, bargauge), variables, annotations and the dashboard envelope. One place,
so every panel gets the same data source, styling and schema version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DATASOURCE_UID = "boots-influx"
DS = {"type": "influxdb", "uid": DATASOURCE_UID}
EXPR_DS = {"type": "__expr__", "uid": "__expr__"}
SCHEMA_VERSION = 40  # what Grafana 11.4 (pinned in compose.yaml) writes
FOLDER = "Boots"  # the dashboard provider's folder; alert rules go to the same one

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
