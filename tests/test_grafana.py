"""Static checks of the Grafana dashboards, data source and alert rules (no Grafana needed).

They catch what otherwise shows only in a browser after `docker compose up`: committed JSON
that is not what grafana/generate.py writes, a panel pointing at a data source or template
variable that does not exist, overlapping panels, a query without a time bound, or an alert
rule file that Grafana's provisioning would reject. tests/test_grafana_queries.py runs the
queries themselves against a real influxd.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import grafana_generator

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
GENERATOR = GRAFANA / "generate.py"

# Grafana's own variables and the InfluxDB data source's macros.
BUILTIN_VARIABLES = {"timeFilter", "__interval", "__interval_ms", "interval", "__range",
                     "__range_s", "__range_ms", "__rate_interval", "__from", "__to",
                     "__dashboard", "__org", "__user"}
# dashboard schemaVersion written by each Grafana release compose may pin
SCHEMA_VERSION_FOR_GRAFANA = {"11.3": 40, "11.4": 40, "11.5": 40, "11.6": 41}
PANEL_TYPES = {"row", "stat", "timeseries", "table", "bargauge", "state-timeline", "piechart",
               "barchart", "gauge", "text"}
NO_DATA_STATES = {"NoData", "Alerting", "OK", "KeepLast"}
EXEC_ERR_STATES = {"Error", "Alerting", "OK", "KeepLast"}
EXPRESSION_TYPES = {"reduce", "threshold", "math", "resample", "classic_conditions"}
# gateway/service.py health_fields() as issue 7 lists them: all on the fleet overview
GATEWAY_HEALTH_FIELDS = {
    "msgs_telemetry", "msgs_state", "msgs_event", "msgs_ack", "msgs_rejected", "points_written",
    "points_dropped", "points_refused", "write_errors", "write_latency_ms", "queue_depth",
    "spool_bytes", "mqtt_connected", "influx_connected", "mqtt_reconnects", "vents_sent",
    "vents_confirmed", "safety_events", "loop_lag_max_ms", "boots_online", "boots_in_session"}
REQUIRED_ALERTS = {"boots-vent", "boots-vent-not-confirmed", "boots-offline-in-session",
                   "boots-gateway-broker-lost", "boots-gateway-influx-lost",
                   "boots-gateway-no-health", "boots-gateway-storage-fault"}


gen = grafana_generator()


def _dashboards() -> list[dict[str, Any]]:
    files = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert files, "no dashboards"
    return [json.loads(p.read_text()) for p in files]


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels") or [])
    return out


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, InfluxQL) of every target, variable and annotation."""
    out = []
    for panel in _panels(dashboard):
        for t in panel.get("targets") or []:
            out.append((f"panel {panel['id']} {panel['title']!r} {t['refId']}", t["query"]))
    for var in dashboard["templating"]["list"]:
        out.append((f"variable {var['name']}", var["query"]))
    for anno in dashboard["annotations"]["list"]:
        if not anno.get("builtIn"):
            out.append((f"annotation {anno['name']}", anno["query"]))
            assert anno["target"]["query"] == anno["query"]
    return out


def _variables_used(text: str) -> set[str]:
    found = re.findall(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", text)
    return {a or b or c for a, b, c in found}


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", duration)
    assert m, f"not a duration: {duration!r}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _grafana_image_tag() -> str:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    image = compose["services"]["grafana"]["image"]
    name, _, tag = image.partition(":")
    assert name == "grafana/grafana" and tag, f"grafana image not pinned: {image}"
    return tag


def _alerting() -> dict[str, Any]:
    """The generated rules (ops may add contact points and policies next to them)."""
    path = gen.ALERTING_FILE
    assert path.parent == GRAFANA / "provisioning" / "alerting" and path.is_file()
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict[str, Any]]:
    return [r for g in _alerting()["groups"] for r in g["rules"]]


# ---------------------------------------------------------------- one source of truth


def test_committed_files_are_what_the_generator_writes() -> None:
    rendered = gen.rendered_files()
    stale = [str(p.relative_to(ROOT)) for p, text in rendered.items()
             if not p.exists() or p.read_text() != text]
    assert not stale, f"run `python grafana/generate.py`; stale: {stale}"
    committed = set((GRAFANA / "dashboards").glob("*.json"))
    assert committed == {p for p in rendered if p.suffix == ".json"}, (
        "dashboards not written by grafana/generate.py")


def test_generator_check_mode_reports_and_repairs_stale_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(gen, "DASHBOARDS_DIR", tmp_path / "dashboards")
    monkeypatch.setattr(gen, "ALERTING_FILE", tmp_path / "alerting" / "rules.yaml")
    assert gen.main(["--check"]) == 1
    assert not (tmp_path / "dashboards").exists()  # --check writes nothing
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    (tmp_path / "dashboards" / "boot-detail.json").write_text("{}")
    assert gen.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().out


def test_generator_command_line_runs_from_any_directory(tmp_path: Path) -> None:
    """The documented command, as a process: generate.py must find its grafana/generator/
    package without the test's sys.path (the tests above load it in-process)."""
    done = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""  # nothing stale, nothing written


# ---------------------------------------------------------------- dashboards


def test_dashboards_use_the_schema_version_of_the_pinned_grafana() -> None:
    tag = _grafana_image_tag()
    minor = ".".join(tag.split(".")[:2])
    assert minor in SCHEMA_VERSION_FOR_GRAFANA, f"schemaVersion of Grafana {tag} unknown"
    expected = SCHEMA_VERSION_FOR_GRAFANA[minor]
    dashboards = _dashboards()
    assert {d["schemaVersion"] for d in dashboards} == {expected}
    uids = [d["uid"] for d in dashboards]
    titles = [d["title"] for d in dashboards]
    assert len(set(uids)) == len(uids) == 3 and len(set(titles)) == 3
    assert all(len(u) <= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", u) for u in uids)
    assert all("boots" in d["tags"] for d in dashboards)


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    for dash in _dashboards():
        panels = _panels(dash)
        ids = [p["id"] for p in panels]
        assert len(set(ids)) == len(ids), f"{dash['uid']}: duplicate panel ids"
        boxes = []
        for p in panels:
            pos = p["gridPos"]
            assert all(isinstance(pos[k], int) for k in "xywh"), (dash["uid"], p["title"])
            assert pos["w"] >= 1 and pos["h"] >= 1 and 0 <= pos["x"] and pos["x"] + pos["w"] <= 24
            assert p["type"] in PANEL_TYPES, p["type"]
            boxes.append((p["title"], pos))
        for (t1, a), (t2, b) in combinations(boxes, 2):
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, f"{dash['uid']}: {t1!r} overlaps {t2!r}"


def test_every_datasource_reference_resolves_to_the_provisioned_influxdb() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "influxdb.yaml")
                         .read_text())
    uids = {ds["uid"] for ds in doc["datasources"]}
    assert uids == {gen.DATASOURCE_UID}
    for dash in _dashboards():
        refs = [(f"variable {v['name']}", v["datasource"]) for v in dash["templating"]["list"]]
        refs += [(f"annotation {a['name']}", a["datasource"]) for a in dash["annotations"]["list"]
                 if not a.get("builtIn")]
        for p in _panels(dash):
            if p["type"] != "row":
                refs.append((f"panel {p['title']}", p["datasource"]))
                refs += [(f"{p['title']} {t['refId']}", t["datasource"]) for t in p["targets"]]
        bad = [(w, r) for w, r in refs if r != {"type": "influxdb", "uid": gen.DATASOURCE_UID}]
        assert not bad, f"{dash['uid']}: {bad}"


def test_template_variables_used_in_queries_are_defined_before_use() -> None:
    for dash in _dashboards():
        defined: list[str] = []
        for var in dash["templating"]["list"]:
            used = _variables_used(var["query"]) - BUILTIN_VARIABLES
            assert used <= set(defined), f"{dash['uid']} {var['name']} uses {used}"
            defined.append(var["name"])
        for where, query in _queries(dash):
            used = _variables_used(query) - BUILTIN_VARIABLES
            assert used <= set(defined), f"{dash['uid']} {where} uses undefined {used}"
        # and the guard itself finds what it must
        assert _variables_used("WHERE c =~ /^$clinic$/ AND d = '${device}' AND [[x]]") == {
            "clinic", "device", "x"}


def test_every_query_is_bounded_in_time() -> None:
    """A query without a time bound scans the whole retention: dashboards must load fast."""
    for dash in _dashboards():
        for where, query in _queries(dash):
            if query.startswith("SHOW TAG VALUES"):
                continue
            bounded = "$timeFilter" in query or re.search(r"time > now\(\) - \d+[smhd]", query)
            assert bounded, f"{dash['uid']} {where}: no time bound in {query}"


def test_targets_are_raw_influxql_with_unique_refs_and_grouped_alias_tags() -> None:
    for dash in _dashboards():
        for p in _panels(dash):
            targets = p.get("targets") or []
            refs = [t["refId"] for t in targets]
            assert len(set(refs)) == len(refs), p["title"]
            for t in targets:
                assert t["rawQuery"] is True and t["resultFormat"] in ("time_series", "table")
                if t["resultFormat"] == "time_series":
                    assert t.get("alias"), f"{p['title']}: series would be named m.col {{tags}}"
                for tag in re.findall(r"\$tag_(\w+)", t.get("alias", "")):
                    assert re.search(rf'GROUP BY .*"{tag}"', t["query"]), (
                        f"{p['title']}: alias uses $tag_{tag}, query does not group by it")
            for step in p.get("transformations") or []:
                only = (step.get("filter") or {}).get("options")
                assert only is None or only in refs, f"{p['title']}: filter on unknown {only}"


def test_boot_detail_links_and_variables_fit_together() -> None:
    detail = next(d for d in _dashboards() if d["uid"] == "boots-boot-detail")
    names = [v["name"] for v in detail["templating"]["list"]]
    assert names == ["clinic", "device"]
    links = [link["url"] for d in _dashboards() for p in _panels(d)
             for o in p.get("fieldConfig", {}).get("overrides", [])
             for prop in o["properties"] if prop["id"] == "links" for link in prop["value"]]
    assert links, "no panel links to the boot detail"
    for url in links:
        assert url.startswith(f"/d/{detail['uid']}/")
        assert set(re.findall(r"var-(\w+)=", url)) == set(names)


def test_dashboards_cover_the_clinic_managers_questions() -> None:
    """The panels the issue asks for exist (titles are what managers see)."""
    titles = {d["uid"]: {p["title"] for p in _panels(d)} for d in _dashboards()}
    assert {"Boots online", "Boots offline", "Boots in session", "Boot status",
            "Safety events, last 24 h", "Message rate", "Gateway links"} <= titles[
        "boots-fleet-overview"]
    assert {"Chamber pressures vs target", "Sessions, vents and connection",
            "Commands and acks", "Connection history"} <= titles["boots-boot-detail"]
    assert {"Safety events by rule and severity", "Vent confirmed after",
            "Vent command ack latency", "Unacknowledged alarms",
            "Sessions per program and outcome"} <= titles["boots-safety-sessions"]
    detail = next(d for d in _dashboards() if d["uid"] == "boots-boot-detail")
    assert {a["name"] for a in detail["annotations"]["list"]} >= {"Vents", "Alarms"}
    overview = next(d for d in _dashboards() if d["uid"] == "boots-fleet-overview")
    health = " ".join(t["query"] for p in _panels(overview) for t in p.get("targets", [])
                      if '"gateway_health"' in t["query"])
    assert GATEWAY_HEALTH_FIELDS <= set(re.findall(r'"(\w+)"', health))


# ---------------------------------------------------------------- provisioning


def test_datasource_is_influxql_over_post_with_a_token_header() -> None:
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "influxdb.yaml")
                           .read_text())["datasources"]
    assert ds["type"] == "influxdb" and ds["access"] == "proxy"
    data = ds["jsonData"]
    assert data["version"] == "InfluxQL" and data["httpMode"] == "POST" and data["dbName"]
    assert data["httpHeaderName1"] == "Authorization"
    assert ds["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUX_TOKEN}"


def test_dashboard_provider_reads_files_into_the_boots_folder() -> None:
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "boots.yaml")
                                 .read_text())["providers"]
    assert provider["type"] == "file" and provider["folder"] == gen.FOLDER
    assert provider["options"]["path"].startswith("/")


# ---------------------------------------------------------------- alert rules


def test_alert_rule_file_is_well_formed_grafana_provisioning() -> None:
    doc = _alerting()
    assert doc["apiVersion"] == 1 and doc["groups"]
    uids, titles = [], []
    for group in doc["groups"]:
        assert group["orgId"] == 1 and group["name"] and group["folder"] == gen.FOLDER
        interval = _seconds(group["interval"])
        assert interval % 10 == 0, "Grafana evaluates in multiples of its 10 s base interval"
        for rule in group["rules"]:
            uids.append(rule["uid"])
            titles.append(rule["title"])
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", rule["uid"])
            refs: list[str] = []
            for item in rule["data"]:
                model = item["model"]
                assert item["refId"] == model["refId"] and item["refId"] not in refs
                span = item["relativeTimeRange"]
                assert isinstance(span["from"], int) and isinstance(span["to"], int)
                if item["datasourceUid"] == "__expr__":
                    assert model["type"] in EXPRESSION_TYPES
                    assert span == {"from": 0, "to": 0}
                    inputs = (re.findall(r"\$([A-Z])", model["expression"])
                              if model["type"] == "math" else [model["expression"]])
                    assert inputs and set(inputs) <= set(refs), f"{rule['uid']}: {inputs}"
                else:
                    assert item["datasourceUid"] == gen.DATASOURCE_UID
                    assert model["rawQuery"] is True and "$timeFilter" in model["query"]
                    assert span["from"] > interval and span["to"] == 0
                refs.append(item["refId"])
            assert rule["condition"] in refs
            assert rule["noDataState"] in NO_DATA_STATES
            assert rule["execErrState"] in EXEC_ERR_STATES
            _seconds(rule["for"])
            for mapping in ("labels", "annotations"):
                assert all(isinstance(k, str) and isinstance(v, str)
                           for k, v in rule[mapping].items())
            assert rule["annotations"]["summary"]
            # provisioning expands $VAR in titles and labels and ${VAR} in annotations
            assert "$" not in rule["title"] + "".join(rule["labels"].values())
            assert "${" not in "".join(rule["annotations"].values())
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)


def test_required_alert_rules_exist_with_sensible_timing() -> None:
    rules = {r["uid"]: r for r in _rules()}
    assert REQUIRED_ALERTS <= set(rules)
    for uid in ("boots-vent", "boots-vent-not-confirmed", "boots-offline-in-session"):
        assert rules[uid]["labels"]["severity"] == "critical"
        assert _seconds(rules[uid]["for"]) == 0, "a vent is news at once"
    groups = {g["name"]: g for g in _alerting()["groups"]}
    assert _seconds(groups["boot-safety"]["interval"]) <= 30
    silence = rules["boots-gateway-no-health"]
    assert silence["noDataState"] == "Alerting", "no health point at all must alert"
    span = silence["data"][0]["relativeTimeRange"]["from"]
    assert span >= 3 * 10, "several default health intervals (10 s) without a report"


def test_alert_rules_match_the_generator() -> None:
    assert _alerting() == gen.alerting_document()
