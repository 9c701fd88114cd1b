"""The gateway installs and ships without the simulator.

`pip install .` brings the gateway's dependencies only; the simulator's (scenario files, live
view, plots) are the `sim` extra. The gateway's image (Dockerfile target `gateway`) holds no
`device_sim`; compose runs the simulated clinic from the `sim` target.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import yaml

from tests.test_import_boundaries import imported_modules

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DISTRIBUTION = {"paho": "paho-mqtt", "pydantic_settings": "pydantic-settings", "yaml": "pyyaml"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def _third_party(package: str) -> set[str]:
    tops = set()
    for path in (ROOT / package).rglob("*.py"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("gateway", "device_sim"):
                tops.add(DISTRIBUTION.get(top, top).lower())
    return tops


def test_the_gateway_imports_only_its_declared_dependencies() -> None:
    declared = _names(PYPROJECT["project"]["dependencies"])
    assert _third_party("gateway") <= declared, sorted(_third_party("gateway") - declared)


def test_the_simulators_libraries_are_an_extra_not_the_gateways() -> None:
    sim = _names(PYPROJECT["project"]["optional-dependencies"]["sim"])
    assert {"pyyaml", "rich", "matplotlib"} <= sim
    assert not sim & _names(PYPROJECT["project"]["dependencies"])
    assert _third_party("device_sim") <= sim | _names(PYPROJECT["project"]["dependencies"])


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = m[1]
            stages[current] = []
        elif current and line.strip() and not line.lstrip().startswith("#"):
            stages[current].append(line)
    return stages


def test_the_gateway_image_holds_the_gateway_only() -> None:
    stages = _stages()
    assert list(stages)[-1] == "gateway", "the default build (no target) must be the gateway"
    chain = stages["base"] + stages["gateway"]
    assert not any("device_sim" in line for line in chain), chain
    assert any(re.search(r'pip install \.(\s|&|$)', line) for line in stages["gateway"])
    assert any("device_sim" in line for line in stages["sim"])
    assert any("[sim]" in line for line in stages["sim"])


def test_compose_runs_each_service_from_its_own_image() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    built = {name: s["build"].get("target") for name, s in services.items() if "build" in s}
    assert built.pop("device_sim") == "sim"
    assert built and set(built.values()) == {"gateway"}, built


def test_the_readmes_table_of_paths_names_every_gateway_module() -> None:
    readme = (ROOT / "README.md").read_text()
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `"))
    missing = [p.name for p in sorted((ROOT / "gateway").glob("*.py"))
               if p.name != "__init__.py" and f"`{p.name}`" not in table
               and f"`gateway/{p.name}`" not in table]
    assert not missing, f"README's table of paths does not name {missing}"
