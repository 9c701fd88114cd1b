"""InfluxDB line protocol encoding (pure).

Escaping follows the InfluxDB 1.x/2.x reference: measurement escapes comma and space; tag keys,
tag values and field keys escape comma, equals and space; string field values escape double
quote and backslash. Non-finite floats are refused: InfluxDB rejects them and one bad value
would fail a whole batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

FieldValue = float | int | bool | str


class PointError(ValueError):
    """A point that cannot be encoded."""


# Line protocol has no escape for a line break in a name or a tag value: a newline there would
# end the point and start another (free text from outside could write rows into any
# measurement). Every control character becomes U+FFFD there; in strings it is escaped.
_CONTROL = {c: "\ufffd" for c in (*range(0x20), 0x7F)}
_STR_CONTROL = {**{c: f"\\x{c:02x}" for c in _CONTROL}, ord("\n"): "\\n", ord("\r"): "\\r",
                ord("\t"): "\\t"}


# Keys, measurements and tag values repeat (a few names, one id per boot): escape each once.
@functools.lru_cache(maxsize=65_536)
def _escape_measurement(s: str) -> str:
    return s.translate(_CONTROL).replace("\\", "\\\\").replace(",", "\\,").replace(" ", "\\ ")


@functools.lru_cache(maxsize=65_536)
def _escape_key(s: str) -> str:
    return (
        s.translate(_CONTROL).replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
        .replace(" ", "\\ ")
    )


def _escape_str(s: str) -> str:
    escaped = s.replace("\\", "\\\\").replace('"', '\\"')
    return escaped.translate(_STR_CONTROL) if not escaped.isprintable() else escaped


def _field(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PointError(f"non-finite float {value!r}")
        return repr(value)
    if isinstance(value, str):
        return f'"{_escape_str(value)}"'
    raise PointError(f"unsupported field type {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class Point:
    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    time_us: int  # microseconds since the epoch (the writer posts with precision=u)
    # Part of the clinical safety record: written and spooled ahead of telemetry. Set by the
    # schema's builders (gateway/schema.py make_point), so storage never reads a measurement
    # name; not part of the point's identity (InfluxDB never sees it).
    priority: bool = field(default=False, compare=False)

    def encode(self) -> str:
        if not self.fields:
            raise PointError("a point needs at least one field")
        head = _escape_measurement(self.measurement)
        for k in sorted(self.tags):
            v = self.tags[k]
            if v == "":
                continue  # InfluxDB refuses empty tag values; an absent tag means the same
            head += f",{_escape_key(k)}={_escape_key(v)}"
        body = ",".join(f"{_escape_key(k)}={_field(v)}" for k, v in self.fields.items())
        return f"{head} {body} {int(self.time_us)}"


def encode_batch(points: list[Point]) -> tuple[bytes, list[tuple[Point, str]]]:
    """Encode what can be encoded; return the body and the points refused with their reason."""
    lines: list[str] = []
    refused: list[tuple[Point, str]] = []
    for p in points:
        try:
            lines.append(p.encode())
        except PointError as exc:
            refused.append((p, str(exc)))
    return ("\n".join(lines).encode(), refused)
