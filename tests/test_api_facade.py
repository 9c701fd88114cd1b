"""The HTTP API reaches the gateway only through its control facade (gateway/control.py).

Read from the source (an AST walk of gateway/api.py): every attribute the API reads of the
facade is one `Control` defines, and of the `Gateway` it reads only `.control`, so no route
reaches into the fleet, the command tracker, the alarm book, the writer or the MQTT link.
"""

from __future__ import annotations

import ast
from pathlib import Path

from gateway.service import Gateway
from gateway.settings import GatewaySettings, InfluxSettings

API = Path(__file__).resolve().parent.parent / "gateway" / "api.py"
FACADE_NAMES = {"gw", "control"}  # what api.py calls the facade
PARTS = {"fleet", "commands", "alarms", "writer", "link", "journal", "watchdog", "effects",
         "ingest", "sessions", "recorder"}


def _reads(name_of: set[str]) -> list[tuple[int, str]]:
    tree = ast.parse(API.read_text(), str(API))
    return [(node.lineno, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in name_of]


def test_the_api_reads_of_the_gateway_only_its_facade() -> None:
    reads = _reads({"gateway"})
    assert reads, "the walk found no use of the gateway: the names changed, fix this test"
    assert {attr for _, attr in reads} == {"control"}, reads


def test_the_api_calls_only_what_the_facade_defines_and_no_part_behind_it(
    tmp_path: Path,
) -> None:
    control = Gateway(GatewaySettings(influx=InfluxSettings(spool_dir=None),
                                      session_journal=tmp_path / "sessions.jsonl")).control
    reads = _reads(FACADE_NAMES)
    assert reads, "the walk found no facade call: the names changed, fix this test"
    unknown = [(line, attr) for line, attr in reads if not hasattr(control, attr)]
    assert not unknown, f"api.py uses what Control does not define: {unknown}"
    parts = [(line, attr) for line, attr in reads if attr in PARTS]
    assert not parts, f"api.py reaches through the facade into a part: {parts}"
