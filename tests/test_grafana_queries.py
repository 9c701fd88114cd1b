"""Every Grafana query against a real influxd filled by a short run of gateway + simulated boots.

One module-scoped run (about 10 s): seven boots in two clinics, sessions started through the
API, and one of each thing the dashboards and alerts must show: a completed session, a stuck
valve (vent, vent confirmed, alarm), a broken vent valve (vent not confirmed), the user's stop
button, a stop from the front desk, a boot dropping off mid-session, bad data, a boot going
offline when idle, an acknowledged alarm. Then the event loop is not run again until teardown,
so the database is a fixed snapshot while the queries run: every panel, variable, annotation and
alert query is rendered as Grafana renders it ($timeFilter, $__interval, template variables)
and must return the columns its panel shows, with data. Key panels are checked against what the
gateway itself knows (boots online, in session, unacknowledged alarms), with their Grafana
transformations applied.
"""

from __future__ import annotations

import asyncio
import operator
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio

from device_sim.boot import SimBoot
from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port
from gateway.aio import cancel_and_wait
from gateway.contract import AlarmState, Channel
from gateway.settings import WatchdogSettings
from tests.helpers import (
    RunningGateway,
    gateway_settings,
    grafana_generator,
    mqtt_of,
    running_gateway,
    short_program,
    wait_for,
)

pytestmark = pytest.mark.integration



gen = grafana_generator()


# ---------------------------------------------------------------- the simulated run


@dataclass
class Snapshot:
    gw: RunningGateway
    influx: LocalInflux
    db: str
    c1: str
    c2: str
    start_ms: int
    end_ms: int
    online: Counter[str] = field(default_factory=Counter)  # clinic -> boots online
    offline: Counter[str] = field(default_factory=Counter)
    in_session: Counter[str] = field(default_factory=Counter)
    boots: dict[tuple[str, str], bool] = field(default_factory=dict)  # -> online
    unacked: set[str] = field(default_factory=set)

    def query(self, q: str, db: str | None = None) -> list[dict[str, Any]]:
        return self.influx.query(db or self.db, q)


async def _start(gw: RunningGateway, clinic: str, device: str, duration_s: float) -> None:
    program = short_program(duration_s=duration_s)
    resp = await gw.api.post(f"/api/v1/boots/{clinic}/{device}/session",
                             json={"custom": program.model_dump(mode="json")})
    assert resp.status_code == 202, resp.text


async def _run_alone(boot: SimBoot) -> asyncio.Task[None]:
    """A boot outside the fleet, so it can leave on its own."""
    task = asyncio.create_task(boot.run(), name=f"lone-{boot.key}")
    await boot.wait_connected(10)
    return task


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMosquitto]:
    """A broker of the run's own: the shared one holds other tests' retained boots, which the
    gateway would discover and the fleet-wide panels would rightly show."""
    server = LocalMosquitto("mosquitto", tmp_path_factory.mktemp("grafana-mqtt"), free_port())
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(broker: LocalMosquitto, influx: LocalInflux) -> AsyncIterator[Snapshot]:
    mosquitto = broker
    settings = gateway_settings(
        mosquitto, influx, health_interval_s=0.5,
        watchdog=WatchdogSettings(telemetry_loss_floor_s=1.0, vent_confirm_deadline_s=2.5,
                                  vent_resend_max=2))
    async with running_gateway(settings, influx) as gw:
        c1, c2 = gw.clinic(1), gw.clinic(2)
        mqtt = mqtt_of(mosquitto)
        start_ms = int(time.time() * 1000)
        fleet = SimFleet([(c1, "b1"), (c1, "b3"), (c2, "b4"), (c2, "b6"), (c2, "b7")], mqtt,
                         telemetry_period_s=0.2, seed=11)
        stuck = SimBoot(c1, "b2", mqtt, telemetry_period_s=0.2, seed=21)
        leaver = SimBoot(c2, "b5", mqtt, telemetry_period_s=0.2, seed=22)
        async with fleet:
            stuck_task = await _run_alone(stuck)
            leaver_task = await _run_alone(leaver)
            keys = [*fleet.boots, stuck.key, leaver.key]
            try:
                await wait_for(lambda: all(k in gw.gw.fleet.boots and gw.gw.fleet.boots[k].online
                                           for k in keys), 10, "boots known online")
                stuck.inject_stuck_valve(1)
                broken = fleet.boots[f"{c2}/b6"]
                broken.inject_vent_broken()
                broken.inject_stuck_valve(1)
                await asyncio.gather(
                    _start(gw, c1, "b1", 3.0), _start(gw, c1, "b2", 20.0),
                    _start(gw, c1, "b3", 20.0), _start(gw, c2, "b4", 60.0),
                    _start(gw, c2, "b5", 20.0), _start(gw, c2, "b6", 20.0),
                    _start(gw, c2, "b7", 20.0))
                stopper = fleet.boots[f"{c1}/b3"]
                await stopper.wait_until(lambda: stopper.telemetry_sent > 5, timeout=5)
                await stopper.press_stop()
                resp = await gw.api.post(f"/api/v1/boots/{c2}/b7/stop")
                assert resp.status_code == 200, resp.text
                await leaver.wait_until(lambda: leaver.telemetry_sent > 5, timeout=5)
                await cancel_and_wait([leaver_task])  # offline mid-session: rule 7

                await fleet.boots[f"{c1}/b1"].wait_for_session_completed(timeout=15)
                await wait_for(lambda: gw.gw.stats.vents_confirmed >= 1, 15, "b2 vent confirmed")
                await wait_for(lambda: any(a.rule == "vent_not_confirmed"
                                           for a in gw.gw.alarms.listed()), 15,
                               "b6 vent not confirmed")
                await stuck.publish_raw(Channel.TELEMETRY, b"not json", qos=1)
                await wait_for(lambda: gw.gw.fleet.boots[stuck.key].faults >= 1, 5, "bad data")
                await cancel_and_wait([stuck_task])  # offline while idle: no alarm
                await wait_for(lambda: not gw.gw.fleet.boots[stuck.key].online, 5, "b2 offline")

                user_stop = next(a for a in gw.gw.alarms.listed() if a.rule == "user_stop")
                resp = await gw.api.post(f"/api/v1/alarms/{user_stop.alarm_id}/ack",
                                         json={"by": "nurse"})
                assert resp.status_code == 200, resp.text
                await gw.flush()
                await wait_for(lambda: gw.count("SELECT count(queue_depth) FROM gateway_health")
                               >= 6, 10, "health reports")
                await gw.flush()

                snap = Snapshot(gw, influx, gw.db, c1, c2, start_ms, int(time.time() * 1000))
                for boot in gw.gw.fleet.boots.values():
                    snap.boots[(boot.clinic, boot.device)] = boot.online
                    (snap.online if boot.online else snap.offline)[boot.clinic] += 1
                    if boot.session is not None:
                        snap.in_session[boot.clinic] += 1
                snap.unacked = {a.alarm_id for a in gw.gw.alarms.listed()
                                if a.state is AlarmState.ACTIVE}
                assert snap.in_session == {c2: 1} and snap.offline == {c1: 1, c2: 1}
                yield snap
            finally:
                await cancel_and_wait([stuck_task, leaver_task])


# ---------------------------------------------------------------- rendering as Grafana does


def _regex_escape(value: str) -> str:
    """Grafana's escapeRegex for values inside /.../."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(0), value)


def _format_var(var: dict[str, Any], value: str | list[str]) -> str:
    """The InfluxDB data source's interpolateQueryExpr."""
    if value == "$__all":
        return var["allValue"]
    if not var.get("multi") and not var.get("includeAll"):
        return value if isinstance(value, str) else value[0]
    values = [value] if isinstance(value, str) else value
    escaped = [_regex_escape(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def render(query: str, dashboard: dict[str, Any], values: dict[str, str | list[str]],
           time_range: tuple[int, int], interval: str | None = None) -> str:
    q = query.replace("$timeFilter", f"time >= {time_range[0]}ms and time <= {time_range[1]}ms")
    step = interval or "1s"  # the data source's minimum interval (jsonData.timeInterval)
    step_ms = int(float(step[:-1]) * {"s": 1000, "m": 60_000, "h": 3_600_000}[step[-1]])
    q = q.replace("$__interval_ms", str(step_ms)).replace("$__interval", step)
    q = q.replace("$interval", step)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in sorted(variables, key=len, reverse=True):
        if f"${name}" in q or f"${{{name}}}" in q:
            text = _format_var(variables[name], values[name])
            q = q.replace(f"${{{name}}}", text).replace(f"${name}", text)
    assert not re.search(r"\$[{A-Za-z_]", q), f"unrendered variable in {q}"
    return q


def columns(series: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every column of every series (tags included), values concatenated."""
    out: dict[str, list[Any]] = {}
    for s in series:
        n = len(s.get("values", []))
        for tag, value in (s.get("tags") or {}).items():
            out.setdefault(tag, []).extend([value] * n)
        for i, col in enumerate(s["columns"]):
            out.setdefault(col, []).extend(row[i] for row in s["values"])
    return out


def _measurement(query: str) -> str:
    m = re.search(r'FROM "(\w+)"', query)
    assert m, query
    return m.group(1)


def _field_keys(snap: Snapshot, measurement: str) -> set[str]:
    return {row[0] for s in snap.query(f'SHOW FIELD KEYS FROM "{measurement}"')
            for row in s["values"]}


def check_query(snap: Snapshot, where: str, rendered: str, expect: Any) -> list[str]:
    """Problems with one rendered query's result; [] if it returns what its panel shows."""
    series = snap.query(rendered)
    cols = columns(series)
    problems = []
    if not series and not expect.empty_ok:
        problems.append(f"{where}: no data from {rendered}")
    for col in expect.columns:
        if not any(v is not None for v in cols.get(col, [])):
            problems.append(f"{where}: column {col!r} missing or empty in {sorted(cols)} "
                            f"from {rendered}")
    for pending in expect.pending:
        if pending in _field_keys(snap, _measurement(rendered)):
            # The gateway writes it now: the panel must show it.
            if not any(v is not None for name, vals in cols.items()
                       if name == pending or name.endswith("_" + pending) for v in vals):
                problems.append(f"{where}: field {pending!r} exists but {rendered} returns none")
    return problems


def _dashboard(uid: str) -> Any:
    return next(d for d in gen.dashboards() if d.uid == uid)


def _check_all(snap: Snapshot, uid: str, values: dict[str, str | list[str]]) -> int:
    dash = _dashboard(uid)
    time_range = (snap.start_ms - 60_000, snap.end_ms + 60_000)
    problems = []
    for check in dash.checks:
        rendered = render(check.query, dash.body, values, time_range, check.interval)
        problems += check_query(snap, check.where, rendered, check.expect)
    assert not problems, "\n".join(problems)
    return len(dash.checks)


def _series_by(series: list[dict[str, Any]], tag: str, col: str) -> dict[str, Any]:
    return {s["tags"][tag]: s["values"][-1][s["columns"].index(col)] for s in series}


def _panel(uid: str, title: str) -> dict[str, Any]:
    return next(p for p in _dashboard(uid).body["panels"] if p["title"] == title)


def _panel_query(snap: Snapshot, uid: str, title: str, values: dict[str, str | list[str]],
                 ref: str = "A") -> list[dict[str, Any]]:
    dash = _dashboard(uid)
    panel = _panel(uid, title)
    target = next(t for t in panel["targets"] if t["refId"] == ref)
    rendered = render(target["query"], dash.body, values,
                      (snap.start_ms - 60_000, snap.end_ms + 60_000), panel.get("interval"))
    return snap.query(rendered)


# ---------------------------------------------------------------- Grafana transformations


Frame = dict[str, list[Any]]


def table_frame(series: list[dict[str, Any]]) -> Frame:
    """What the InfluxDB data source makes of a table-format result: Time, tags, values."""
    frame: Frame = {}
    if not series:
        return frame
    tags = list((series[0].get("tags") or {}).keys())
    names = ["Time", *tags, *series[0]["columns"][1:]]
    for name in names:
        frame[name] = []
    for s in series:
        for row in s["values"]:
            frame["Time"].append(row[0])
            for tag in tags:
                frame[tag].append(s["tags"][tag])
            for col, value in zip(s["columns"][1:], row[1:], strict=True):
                frame[col].append(value)
    return frame


def _rows(frame: Frame) -> list[dict[str, Any]]:
    n = len(next(iter(frame.values()), []))
    return [{k: v[i] for k, v in frame.items()} for i in range(n)]


def _from_rows(rows: list[dict[str, Any]], names: list[str]) -> Frame:
    return {name: [r.get(name) for r in rows] for name in names}


def _organize(frame: Frame, options: dict[str, Any]) -> Frame:
    out = {}
    for name, values in frame.items():
        if options.get("excludeByName", {}).get(name):
            continue
        out[options.get("renameByName", {}).get(name) or name] = values
    return out


def _merge(frames: list[Frame]) -> Frame:
    """Grafana's merge: rows with equal values in the fields all frames share become one."""
    frames = [f for f in frames if f]
    names: list[str] = []
    for f in frames:
        names += [n for n in f if n not in names]
    keys = [n for n in names if all(n in f for f in frames)]
    merged: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    order: list[dict[str, Any]] = []
    for f in frames:
        for row in _rows(f):
            key = tuple(row[k] for k in keys)
            for existing in merged.get(key, []):
                if all(existing.get(k) is None or existing[k] == v
                       for k, v in row.items() if k in existing):
                    existing.update(row)
                    break
            else:
                merged.setdefault(key, []).append(row)
                order.append(row)
    return _from_rows(order, names)


def _calculate(frame: Frame, options: dict[str, Any]) -> Frame:
    binary = options["binary"]
    ops: dict[str, Callable[[float, float], float]] = {
        "-": operator.sub, "+": operator.add, "*": operator.mul, "/": operator.truediv}
    n = len(next(iter(frame.values())))
    left, right = ([None] * n if frame.get(name) is None else frame[name]
                   for name in (binary[side]["matcher"]["options"] for side in ("left", "right")))
    result = [None if a is None or b is None else ops[binary["operator"]](a, b)
              for a, b in zip(left, right, strict=True)]
    return {**frame, options["alias"]: result}


def transform(panel: dict[str, Any], frames: dict[str, Frame]) -> list[Frame]:
    """Apply a panel's transformations (the kinds the generated dashboards use)."""
    current = [(ref, f) for ref, f in frames.items()]
    for step in panel.get("transformations", []):
        only = (step.get("filter") or {}).get("options")
        kind, options = step["id"], step["options"]
        if kind == "merge":
            current = [("", _merge([f for _, f in current]))]
            continue
        apply = {"organize": _organize, "calculateField": _calculate}[kind]
        current = [(ref, apply(f, options) if only in (None, ref) else f) for ref, f in current]
    return [f for _, f in current]


# ---------------------------------------------------------------- alert rule evaluation


@dataclass
class Series:
    labels: frozenset[tuple[str, str]]
    values: list[float | None]


def _reduce(values: list[float | None], model: dict[str, Any]) -> float:
    settings = model.get("settings", {})
    if settings.get("mode") == "replaceNN":
        values = [settings["replaceWithValue"] if v is None else v for v in values]
    else:
        values = [v for v in values if v is not None]
    nums = [float(v) for v in values if v is not None]
    calc = {"sum": sum, "last": lambda v: v[-1], "max": max, "min": min,
            "mean": lambda v: sum(v) / len(v), "count": len}[model["reducer"]]
    return float(calc(nums)) if nums else float("nan")


def _math(expression: str, inputs: dict[str, list[Series]]) -> list[Series]:
    refs = re.findall(r"\$([A-Z])", expression)
    combos: list[tuple[frozenset[tuple[str, str]], dict[str, float]]] = [(frozenset(), {})]
    for ref in dict.fromkeys(refs):
        nxt = []
        for labels, vals in combos:
            for s in inputs.get(ref, []):
                if labels <= s.labels or s.labels <= labels:
                    assert s.values[0] is not None
                    nxt.append((labels | s.labels, {**vals, ref: s.values[0]}))
        combos = nxt
    py = expression.replace("&&", " and ").replace("||", " or ")
    out = []
    for labels, vals in combos:
        expr = re.sub(r"\$([A-Z])", lambda m, v=vals: repr(v[m.group(1)]), py)
        out.append(Series(labels, [float(eval(expr, {"__builtins__": {}}))]))
    return out


def evaluate(rule: dict[str, Any], run_query: Callable[[str, int], list[dict[str, Any]]]
             ) -> set[frozenset[tuple[str, str]]]:
    """Label sets for which the rule fires (state Alerting; `for` not waited)."""
    results: dict[str, list[Series]] = {}
    for item in rule["data"]:
        model = item["model"]
        if item["datasourceUid"] != "__expr__":
            series = run_query(model["query"], item["relativeTimeRange"]["from"])
            results[item["refId"]] = [
                Series(frozenset((s.get("tags") or {}).items()), [row[1] for row in s["values"]])
                for s in series]
        elif model["type"] == "reduce":
            results[item["refId"]] = [Series(s.labels, [_reduce(s.values, model)])
                                      for s in results[model["expression"]]]
        elif model["type"] == "threshold":
            ev = model["conditions"][0]["evaluator"]
            op = {"gt": operator.gt, "lt": operator.lt}[ev["type"]]
            results[item["refId"]] = [
                Series(s.labels, [float(op(s.values[0], ev["params"][0]))])
                for s in results[model["expression"]]]
        elif model["type"] == "math":
            results[item["refId"]] = _math(model["expression"], results)
        else:
            raise AssertionError(f"expression type {model['type']} not emulated")
    condition = results[rule["condition"]]
    if not condition:
        return {frozenset()} if rule["noDataState"] == "Alerting" else set()
    return {s.labels for s in condition if s.values[0]}


def _rules() -> dict[str, dict[str, Any]]:
    return {r["uid"]: r for g in gen.alerting_document()["groups"] for r in g["rules"]}


def _alert_query(snap: Snapshot, db: str | None = None
                 ) -> Callable[[str, int], list[dict[str, Any]]]:
    def run_query(query: str, lookback_s: int) -> list[dict[str, Any]]:
        now = int(time.time() * 1000)
        q = query.replace("$timeFilter", f"time >= {now - lookback_s * 1000}ms and "
                                         f"time <= {now}ms")
        return snap.query(q, db)
    return run_query


def _boot(clinic: str, device: str) -> frozenset[tuple[str, str]]:
    return frozenset({("clinic", clinic), ("device", device)})


# ---------------------------------------------------------------- tests


def test_fleet_overview_queries_return_their_columns(run: Snapshot) -> None:
    assert _check_all(run, "boots-fleet-overview", {"clinic": "$__all"}) >= 15
    _check_all(run, "boots-fleet-overview", {"clinic": [run.c1, run.c2]})


def test_boot_detail_queries_return_their_columns(run: Snapshot) -> None:
    # b2: stuck valve, vented, confirmed, bad data, then offline while idle.
    assert _check_all(run, "boots-boot-detail", {"clinic": run.c1, "device": "b2"}) >= 15


def test_safety_and_sessions_queries_return_their_columns(run: Snapshot) -> None:
    assert _check_all(run, "boots-safety-sessions", {"clinic": "$__all"}) >= 12


def test_variables_list_the_clinics_and_the_clinics_devices(run: Snapshot) -> None:
    dash = _dashboard("boots-boot-detail").body
    clinic_var, device_var = dash["templating"]["list"]
    clinics = columns(run.query(clinic_var["query"]))["value"]
    assert set(clinics) == {run.c1, run.c2}
    rendered = render(device_var["query"], dash, {"clinic": run.c2}, (0, 0))
    assert set(columns(run.query(rendered))["value"]) == {"b4", "b5", "b6", "b7"}


def test_boots_online_offline_and_in_session_match_the_gateway(run: Snapshot) -> None:
    values: dict[str, str | list[str]] = {"clinic": "$__all"}
    uid = "boots-fleet-overview"
    online = _series_by(_panel_query(run, uid, "Boots online", values), "clinic", "online")
    offline = _series_by(_panel_query(run, uid, "Boots offline", values), "clinic", "offline")
    in_session = _series_by(_panel_query(run, uid, "Boots in session", values), "clinic",
                            "in session")
    assert online == dict(run.online) == {run.c1: 2, run.c2: 3}
    assert offline == dict(run.offline)
    assert in_session == dict(run.in_session)
    one = _series_by(_panel_query(run, uid, "Boots online", {"clinic": [run.c1]}), "clinic",
                     "online")
    assert one == {run.c1: 2}


def test_boot_status_table_has_every_boot_with_its_state(run: Snapshot) -> None:
    uid, title = "boots-fleet-overview", "Boot status"
    panel = _panel(uid, title)
    frames = {t["refId"]: table_frame(_panel_query(run, uid, title, {"clinic": "$__all"},
                                                   t["refId"]))
              for t in panel["targets"]}
    (table,) = transform(panel, frames)
    rows = {(r["clinic"], r["device"]): r for r in _rows(table)}
    assert set(rows) == set(run.boots)
    for key, online in run.boots.items():
        assert rows[key]["online"] == int(online), key
        assert rows[key]["Last seen"] is not None, key  # every boot sent telemetry
        assert rows[key]["max_p"] is not None, key
    running = rows[(run.c2, "b4")]
    assert (running["outcome"], running["program_name"]) == ("started", "test_short")
    assert running["session_id"] and running["phase"] != "idle"
    assert rows[(run.c1, "b1")]["outcome"] == "completed"
    assert rows[(run.c2, "b5")]["outcome"] == "vented"
    assert rows[(run.c1, "b3")]["outcome"] == "user_stop"
    assert rows[(run.c2, "b7")]["outcome"] == "stopped"
    assert "Last session event" in table and "Time" not in table
    if "session_elapsed_s" in _field_keys(run, "telemetry"):
        assert running["remaining_s"] is not None and running["remaining_s"] < 60


def test_unacknowledged_alarms_panel_lists_exactly_the_gateways_active_alarms(
    run: Snapshot,
) -> None:
    uid, title = "boots-safety-sessions", "Unacknowledged alarms"
    panel = _panel(uid, title)
    (table,) = transform(panel, {"A": table_frame(_panel_query(run, uid, title,
                                                               {"clinic": "$__all"}))})
    assert set(table["alarm_id"]) == run.unacked
    assert len(run.unacked) >= 3  # b2 and b6 over target, b6 vent not confirmed, b5 offline
    assert "user_stop" not in table["rule"]  # acknowledged by the nurse
    assert set(table["state"]) == {"active"} and None not in table["Raised"]


def test_alarms_raised_count_each_alarm_once_per_severity(run: Snapshot) -> None:
    """alarm_id is a tag: the panel counts alarms, not their state changes."""
    series = _panel_query(run, "boots-fleet-overview", "Alarms raised, last 24 h",
                          {"clinic": "$__all"})
    raised = Counter(a.severity.value for a in run.gw.gw.alarms.listed(include_cleared=True))
    assert _series_by(series, "severity", "alarms") == dict(raised)
    assert sum(raised.values()) < run.gw.count('SELECT count("detail") FROM "alarm"')


def test_session_outcomes_per_program(run: Snapshot) -> None:
    series = _panel_query(run, "boots-safety-sessions", "Sessions per program and outcome",
                          {"clinic": "$__all"})
    counts = {(s["tags"]["program"], s["tags"]["outcome"]): s["values"][0][1] for s in series}
    # a custom program: its name is a field, the tag a closed vocabulary (docs/schema.md §2.4)
    assert counts == {("custom", "completed"): 1, ("custom", "vented"): 3,
                      ("custom", "user_stop"): 1, ("custom", "stopped"): 1}


def test_reaction_times_are_measured(run: Snapshot) -> None:
    values: dict[str, str | list[str]] = {"clinic": "$__all"}
    uid = "boots-safety-sessions"
    confirmed = columns(_panel_query(run, uid, "Vent confirmed after", values))
    assert 0 < confirmed["max"][0] < 15
    ack = columns(_panel_query(run, uid, "Vent command ack latency", values))
    assert 0 < ack["p50"][0] <= ack["max"][0] < 5000


@pytest.mark.parametrize(("uid", "fires"), [
    ("boots-vent", {("c1", "b2"), ("c2", "b6")}),
    ("boots-vent-not-confirmed", {("c2", "b6")}),
    ("boots-offline-in-session", {("c2", "b5")}),
])
def test_boot_alert_rules_fire_for_exactly_the_boots_concerned(
    run: Snapshot, uid: str, fires: set[tuple[str, str]],
) -> None:
    clinic = {"c1": run.c1, "c2": run.c2}
    firing = evaluate(_rules()[uid], _alert_query(run))
    assert firing == {_boot(clinic[c], d) for c, d in fires}


def test_gateway_alert_rules_are_quiet_while_the_gateway_is_healthy(run: Snapshot) -> None:
    for uid in ("boots-gateway-broker-lost", "boots-gateway-influx-lost",
                "boots-gateway-no-health", "boots-gateway-points-lost",
                "boots-gateway-storage-fault"):
        assert evaluate(_rules()[uid], _alert_query(run)) == set(), uid


def test_gateway_alert_rules_fire_on_lost_links_lost_points_and_silence(run: Snapshot) -> None:
    db = f"{run.db}_bad"
    httpx.post(f"{run.influx.url}/query", params={"q": f'CREATE DATABASE "{db}"'},
               timeout=10).raise_for_status()
    now = int(time.time() * 1000)
    lines = [f"gateway_health,gateway=gw-bad mqtt_connected=0i,influx_connected={c}i,"
             f"points_dropped={d}i,points_refused=0i,queue_depth=0i,spool_fault={f}i "
             f"{now - ago}"
             for ago, c, d, f in ((20_000, 1, 0, 0), (10_000, 0, 5, 0), (1_000, 1, 5, 1))]
    httpx.post(f"{run.influx.url}/write", params={"db": db, "precision": "ms"},
               content="\n".join(lines), timeout=10).raise_for_status()
    gw_bad = frozenset({("gateway", "gw-bad")})
    rules = _rules()
    for uid in ("boots-gateway-broker-lost", "boots-gateway-influx-lost",
                "boots-gateway-points-lost", "boots-gateway-storage-fault"):
        assert evaluate(rules[uid], _alert_query(run, db)) == {gw_bad}, uid
    assert evaluate(rules["boots-gateway-no-health"], _alert_query(run, db)) == set()

    empty = f"{run.db}_empty"
    httpx.post(f"{run.influx.url}/query", params={"q": f'CREATE DATABASE "{empty}"'},
               timeout=10).raise_for_status()
    assert evaluate(rules["boots-gateway-no-health"], _alert_query(run, empty)) == {frozenset()}
    assert evaluate(rules["boots-gateway-broker-lost"], _alert_query(run, empty)) == set()


def test_every_alert_rule_query_returns_the_number_it_names(run: Snapshot) -> None:
    problems = []
    for uid, rule in _rules().items():
        for item in rule["data"]:
            if item["datasourceUid"] == "__expr__":
                continue
            query = item["model"]["query"]
            (name,) = re.findall(r'AS "(\w+)"', query)
            series = _alert_query(run)(query, item["relativeTimeRange"]["from"])
            for s in series:
                assert s["columns"] == ["time", name], (uid, s["columns"])
                assert all(isinstance(row[1], int | float) for row in s["values"]), uid
            if uid.startswith("boots-gateway") and not series:
                problems.append(f"{uid} {item['refId']}: no data while the gateway runs")
    assert not problems, problems


def test_boot_status_computes_remaining_time_once_elapsed_is_stored() -> None:
    """The remaining-time column, fed with the telemetry field the gateway does not write yet."""
    panel = _panel("boots-fleet-overview", "Boot status")
    boot = {"clinic": ["c"], "device": ["d"]}
    frames = {"A": {"Time": [2_000], **boot, "seq": [7], "phase": ["hold"],
                    "session_id": ["s-1"], "max_p": [55.0], "session_elapsed_s": [100.0]},
              "B": {"Time": [1_000], **boot, "online": [1], "firmware": ["f"]},
              "C": {"Time": [1_500], **boot, "session": ["s-1"], "program_name": ["p"],
                    "outcome": ["started"], "planned_s": [600.0]}}
    (table,) = transform(panel, frames)
    (row,) = _rows(table)
    assert row["remaining_s"] == 500.0 and row["session_elapsed_s"] == 100.0
    assert (row["Last seen"], row["Last session event"], row["online"]) == (2_000, 1_500, 1)
    assert "planned_s" not in row and "seq" not in row
