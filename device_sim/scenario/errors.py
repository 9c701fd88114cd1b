"""What is wrong with a scenario, and where: `Problem` (field path, line, message) and
`ScenarioError`, shared by the schema's cross-field checks, the fault planner and the loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

Loc = tuple[str | int, ...]


# ---------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a scenario: where (field path, line) and what."""

    loc: Loc
    msg: str
    line: int | None = None

    def format(self, path: Path | str | None = None) -> str:
        where = f"{path}:{self.line}" if path is not None and self.line else (
            str(path) if path is not None else (f"line {self.line}" if self.line else ""))
        field = ".".join(str(p) for p in self.loc)
        return ": ".join(p for p in (where, field, self.msg) if p)


class ScenarioError(Exception):
    """A scenario that cannot run; the message has one `file:line: field: problem` per line."""

    def __init__(self, problems: Sequence[Problem], path: Path | str | None = None) -> None:
        self.problems = list(problems)
        self.path = path
        super().__init__("\n".join(p.format(path) for p in self.problems))

