"""The scenario loader: YAML or TOML files to a validated `Scenario`, errors with their lines.

A scenario is YAML (.yaml/.yml) or TOML (.toml), validated by the pydantic models below (no
unknown keys anywhere). Every problem is reported as `file:line: field.path: message`, so ops
can fix a file without reading Python: YAML lines come from the composed node tree, TOML lines
from a cheap scan for `key =` and table headers (best effort; the path is always given).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from device_sim.faults import FaultKind
from device_sim.scenario.errors import Loc, Problem, ScenarioError
from device_sim.scenario.schema import Scenario
from gateway.boot_credentials import CredentialsError, load_credentials

# Deeper nesting than this is no scenario (they nest four levels) but a stack overflow in the
# parsers (PyYAML's composer and tomllib recurse per level): refused first, with its line.
MAX_NESTING = 50


# ---------------------------------------------------------------- loading


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; ScenarioError names the file, line and field."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ScenarioError([Problem((), "a scenario is .yaml, .yml or .toml")], path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([Problem((), f"cannot read: {exc}")], path) from None
    if suffix == ".toml":
        data, line_of = _parse_toml(text, path)
    else:
        data, line_of = _parse_yaml(text, path)
    if not isinstance(data, dict):
        raise ScenarioError([Problem((), "the file must hold a mapping of fields", 1)], path)
    try:
        sc = Scenario.model_validate(data)
        creds = sc.broker.credentials_file
        if creds is not None and not creds.is_absolute():  # as the file's author sees it
            broker = sc.broker.model_copy(update={"credentials_file": path.parent / creds})
            sc = sc.model_copy(update={"broker": broker})
        if sc.broker.credentials_file is not None:
            try:  # an unusable file stops the run here, not in every worker
                load_credentials(sc.broker.credentials_file)
            except CredentialsError as exc:
                raise ScenarioError([Problem(("broker", "credentials_file"), str(exc))]
                                    ) from None
        return sc
    except ValidationError as exc:
        problems = _from_validation(exc)
    except ScenarioError as exc:
        problems = exc.problems
    raise ScenarioError([Problem(p.loc, p.msg, p.line or line_of(p.loc)) for p in problems],
                        path) from None


def _from_validation(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors(include_url=False):
        loc = _normalise(err["loc"])
        msg = err["msg"]
        if err["type"] == "union_tag_invalid":  # a bad fault kind
            *head, last = [f"'{k.value}'" for k in FaultKind]
            loc, msg = (*loc, "kind"), f"Input should be {', '.join(head)} or {last}"
        elif err["type"] == "union_tag_not_found":
            loc, msg = (*loc, "kind"), "Field required"
        out.append(Problem(loc, msg))
    return out


def _normalise(loc: Sequence[str | int]) -> Loc:
    """Drop the union tag pydantic puts after `faults.N` (the kind): it is not in the file."""
    kinds = {k.value for k in FaultKind}
    out: list[str | int] = []
    for part in loc:
        if (part in kinds and len(out) >= 2 and out[-2] == "faults"
                and isinstance(out[-1], int)):
            continue
        out.append(part)
    return tuple(out)


def _parse_yaml(text: str, path: Path) -> tuple[Any, Any]:
    try:
        deep = _yaml_too_deep(text)
        if deep is not None:
            raise ScenarioError([Problem((), f"nested more than {MAX_NESTING} levels deep",
                                         deep)], path)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        if isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses: no mark
            line = text.count("\n", 0, exc.position) + 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError([Problem((), f"YAML syntax: {problem}", line)], path) from None
    if root is not None:
        dupes = _yaml_duplicates(root)
        if dupes:
            raise ScenarioError(dupes, path)

    def line_of(loc: Loc) -> int | None:
        return None if root is None else _yaml_line(root, loc)

    return data, line_of


def _yaml_too_deep(text: str) -> int | None:
    """The line where the nesting first exceeds MAX_NESTING, from the (iterative) scanner."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _YAML_OPEN):
            depth += 1
            if depth > MAX_NESTING:
                return int(token.start_mark.line) + 1
        elif isinstance(token, _YAML_CLOSE):
            depth -= 1
    return None


_YAML_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
              yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
_YAML_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _yaml_duplicates(root: yaml.Node) -> list[Problem]:
    """PyYAML keeps the last of two equal keys silently; a scenario must not.

    Each node is looked at once: an alias is the node it names, so nine aliases of nine
    aliases would otherwise be walked 9**9 times, and an alias inside its own anchor forever.
    """
    problems: list[Problem] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                name = str(key.value)
                if name in keys:
                    problems.append(Problem((*loc, name), "duplicate key",
                                            key.start_mark.line + 1))
                keys.add(name)
                stack.append((value, (*loc, name)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*loc, i)) for i, item in enumerate(node.value))
    return sorted(problems, key=lambda p: p.line or 0)


def _yaml_line(node: yaml.Node, loc: Loc) -> int:
    """Line (1-based) of the deepest node along `loc`: the key itself when it is there, else
    the mapping or item that should hold it (a missing field)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _parse_toml(text: str, path: Path) -> tuple[Any, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        line = int(m[1]) if m else len(text.splitlines()) or 1  # "at end of document"
        raise ScenarioError([Problem((), f"TOML syntax: {exc}", line)], path) from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ScenarioError([Problem((), f"nested more than {MAX_NESTING} levels deep",
                                     _toml_too_deep(text))], path) from None
    index = _toml_index(text)

    def line_of(loc: Loc) -> int | None:
        for n in range(len(loc), 0, -1):
            if loc[:n] in index:
                return index[loc[:n]]
        return 1  # nothing of it in the file: the top level, which starts at line 1

    return data, line_of


def _toml_too_deep(text: str) -> int | None:
    """The line where brackets first nest more than MAX_NESTING deep (strings not skipped:
    only called once tomllib has overflowed, to say where)."""
    depth = 0
    for n, line in enumerate(text.splitlines(), start=1):
        for c in line:
            depth += (c in "[{") - (c in "]}")
            if depth > MAX_NESTING:
                return n
    return None


_TOML_ARRAY = re.compile(r"^\[\[\s*([^\]]+?)\s*\]\]")
_TOML_TABLE = re.compile(r"^\[\s*([^\]]+?)\s*\]")
_TOML_KEY = re.compile(r"""^([A-Za-z0-9_\-."' ]+?)\s*=""")
_TOML_INLINE_KEY = re.compile(r"[{,]\s*([A-Za-z0-9_-]+)\s*=")


def _toml_index(text: str) -> dict[Loc, int]:
    """Field path -> line, from table headers and `key =` lines (a cheap scan, not a parser:
    multi-line strings that look like keys can mislead it; the path is reported anyway)."""
    index: dict[Loc, int] = {}
    arrays: dict[Loc, int] = {}  # array-of-tables path -> index of its latest element
    table: Loc = ()

    def keys(dotted: str) -> Loc:
        return tuple(k.strip().strip("\"'") for k in dotted.split("."))

    def resolve(path: Loc) -> Loc:
        out: Loc = ()
        for part in path:
            out = (*out, part)
            if out in arrays:
                out = (*out, arrays[out])
        return out

    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _TOML_ARRAY.match(line):
            parent = resolve(keys(m[1])[:-1])
            path = (*parent, keys(m[1])[-1])
            arrays[path] = arrays.get(path, -1) + 1
            index.setdefault(path, n)
            table = (*path, arrays[path])
            index[table] = n
        elif m := _TOML_TABLE.match(line):
            table = resolve(keys(m[1]))
            index.setdefault(table, n)
        elif m := _TOML_KEY.match(line):
            key = (*table, *keys(m[1]))
            index.setdefault(key, n)
            for inner in _TOML_INLINE_KEY.finditer(line):
                index.setdefault((*key, inner[1]), n)
    return index
