"""What the boot-fleet dashboards and alert rules share: InfluxQL fragments and value maps.

The look-backs, the running/ended session filters, the clinic and boot filters, the colours of
states, outcomes and severities, and the link to a boot's detail dashboard: written once, so
the three dashboards agree on what "running", "vent" or "this clinic" means.
"""

from __future__ import annotations

from typing import Any

from gateway.schema import Measurement as M  # the measurement names
from grafana.generator.dsl import Json, override, value_map, variable

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


def clinic_variable(*, multi: bool) -> Json:
    return variable("clinic", "Clinic", f'SHOW TAG VALUES FROM "{M.TELEMETRY}" WITH KEY = "clinic"',
                    multi=multi)
