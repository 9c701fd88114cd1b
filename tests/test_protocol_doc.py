"""docs/protocol.md is what firmware teams implement: its examples must be valid messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import ValidationError

from gateway.contract import Ack, BootEvent, BootState, Command, Heartbeat, Telemetry

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
MODELS = (BootState, Telemetry, BootEvent, Ack, Command, Heartbeat)


def examples() -> list[str]:
    return re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_json_example_is_a_valid_message() -> None:
    found = examples()
    assert len(found) >= 15
    kinds: set[str] = set()
    for text in found:
        data = json.loads(text)
        matched = []
        for model in MODELS:
            try:
                model.model_validate(data)
                matched.append(model.__name__)
            except ValidationError:
                pass
        assert matched, f"example matches no contract model: {text}"
        kinds.update(matched)
    assert {"BootState", "Telemetry", "BootEvent", "Ack", "Command", "Heartbeat"} <= kinds


def test_every_payload_field_is_documented() -> None:
    doc = DOC.read_text()
    for model in MODELS:
        for name in model.model_fields:
            assert f"`{name}`" in doc, f"{model.__name__}.{name} is not in docs/protocol.md"
