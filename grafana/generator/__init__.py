"""The code behind grafana/generate.py: every dashboard and alert rule of the boot fleet.

One module per job, so a change to one dashboard touches one file:

    dsl.py              Grafana-generic builders: Target/Expect, Layout, panels, dashboard
    common.py           InfluxQL fragments and value maps the dashboards and rules share
    fleet_overview.py   dashboard "Boots: fleet overview" (the home dashboard)
    boot_detail.py      dashboard "Boots: boot detail"
    safety_sessions.py  dashboard "Boots: safety and sessions"
    alerts.py           the alert rules and their provisioning document

grafana/generate.py renders these to the committed JSON and YAML (and `--check`s them).
"""

from __future__ import annotations

from grafana.generator.alerts import alerting_document
from grafana.generator.boot_detail import boot_detail
from grafana.generator.dsl import Dashboard
from grafana.generator.fleet_overview import fleet_overview
from grafana.generator.safety_sessions import safety_sessions

__all__ = ["alerting_document", "dashboards"]


def dashboards() -> list[Dashboard]:
    """Every dashboard, in the order they have always been written."""
    return [fleet_overview(), boot_detail(), safety_sessions()]
