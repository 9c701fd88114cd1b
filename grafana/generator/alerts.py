"""The alert rules, in Grafana's file provisioning format (folder and groups).

Group boot-safety (vents, unconfirmed vents, a boot offline mid-session) and group gateway
(broker or InfluxDB lost, no health data, points lost, disk spool failing); grafana/README.md
lists when each fires and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.schema import Measurement as M  # the measurement names
from grafana.generator.common import VENT_ACTIONS
from grafana.generator.dsl import DATASOURCE_UID, DS, EXPR_DS, FOLDER, Json


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
             {"A": f'SELECT count("detail") AS "vents" FROM "{M.SAFETY_EVENT}" WHERE '
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
             {"A": f'SELECT count("detail") AS "resends" FROM "{M.SAFETY_EVENT}" WHERE '
                   "\"rule\" = 'vent_not_confirmed' AND $timeFilter GROUP BY \"clinic\", "
                   '"device"'},
             300, [reduce_("B", "A", "sum"), threshold("C", "B", "gt", 0)], "C", "0s", "OK",
             {"severity": "critical", "component": "boot"},
             f"Vent of boot {boot} not confirmed: chambers still pressurised",
             "After a vent the boot's chambers did not fall below the safe level within the "
             "deadline; the gateway re-sends the vent (rule 8). Go to the boot and release the "
             f"pressure by hand if needed. {link}"),
        Rule("boots-offline-in-session", "Boot offline during a session",
             {"A": f'SELECT count("detail") AS "events" FROM "{M.SAFETY_EVENT}" WHERE '
                   "\"rule\" = 'offline_in_session' AND $timeFilter GROUP BY \"clinic\", "
                   '"device"',
              "B": f'SELECT last("online") AS "online" FROM "{M.BOOT_STATE}" WHERE $timeFilter '
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
             {"A": f'SELECT last("mqtt_connected") AS "mqtt_connected" FROM "{M.GATEWAY_HEALTH}" '
                   'WHERE $timeFilter GROUP BY "gateway"'},
             300, [reduce_("B", "A", "last"), threshold("C", "B", "lt", 1)], "C", "1m", "OK",
             {"severity": "critical", "component": "gateway"},
             f"Gateway {gw} is not connected to the MQTT broker",
             "The gateway reports mqtt_connected = 0 for over a minute: it receives no "
             "telemetry and cannot send vents. Boots in session vent themselves when the "
             "heartbeat stops. Check the broker and the network."),
        Rule("boots-gateway-influx-lost", "Gateway lost InfluxDB",
             {"A": 'SELECT min("influx_connected") AS "influx_connected" '
                   f'FROM "{M.GATEWAY_HEALTH}" WHERE $timeFilter GROUP BY "gateway"'},
             600, [reduce_("B", "A", "last"), threshold("C", "B", "lt", 1)], "C", "0s", "OK",
             {"severity": "warning", "component": "gateway"},
             f"Gateway {gw} could not write to InfluxDB in the last 10 minutes",
             "A health report says influx_connected = 0. While InfluxDB is unreachable these "
             "reports cannot arrive (the rule 'No gateway health data' fires instead); this one "
             "fires when they are written late or the connection flaps. Safety is not "
             "affected; dashboards show gaps until the queue and spool are written."),
        Rule("boots-gateway-no-health", "No gateway health data",
             {"A": f'SELECT count("queue_depth") AS "reports" FROM "{M.GATEWAY_HEALTH}" '
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
                   f'"{M.GATEWAY_HEALTH}" WHERE $timeFilter GROUP BY "gateway"',
              "B": 'SELECT non_negative_difference("points_refused") AS "refused" FROM '
                   f'"{M.GATEWAY_HEALTH}" WHERE $timeFilter GROUP BY "gateway"'},
             900, [reduce_("C", "A", "sum"), reduce_("D", "B", "sum"),
                   math("E", "$C > 0 || $D > 0")], "E", "0s", "OK",
             {"severity": "warning", "component": "gateway"},
             f"Gateway {gw} dropped or had points refused in the last 15 minutes",
             "points_dropped (queue full) or points_refused (InfluxDB rejected the data) "
             "increased: telemetry, safety events or session records are missing from "
             "InfluxDB. Check InfluxDB's capacity and the gateway log."),
        Rule("boots-gateway-storage-fault", "Gateway disk spool failing",
             {"A": f'SELECT last("spool_fault") AS "spool_fault" FROM "{M.GATEWAY_HEALTH}" '
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
