"""Who may import whom, read from the source (an AST walk, every import statement, also the
ones inside functions).

* The gateway never imports the simulator or the tests: it installs and runs without them.
* The conformance boot (tests/conformance_boot.py) is written from docs/protocol.md alone and
  imports nothing of the gateway.
* A simulated boot (device_sim/boot.py, boot_probes.py, boot_faults.py, firmware.py,
  physics.py, link_settings.py, fleet.py, worker.py) reaches the gateway only through the
  explicit list below: the contract (the two sides must not drift), the MQTT client helpers
  shared on purpose (TLS in mqtt_tls, the paho/aiomqtt private access in mqtt_internals),
  asyncio helpers and the credentials file format. Not the gateway's config
  (`gateway.settings`: gateway defaults; a boot has its own device_sim/link_settings.py) nor
  its MQTT link, and never the watchdog, the service, storage or the API: a boot built from
  this code must behave like firmware, not like a gateway.
* The scenario judge and validator reach the gateway's rules and limits only through
  device_sim/gateway_rules.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BOOT_SIDE = ["device_sim/boot.py", "device_sim/boot_probes.py", "device_sim/boot_faults.py",
             "device_sim/firmware.py", "device_sim/physics.py", "device_sim/link_settings.py",
             "device_sim/fleet.py", "device_sim/worker.py"]
BOOT_SIDE_MAY_USE = {
    "gateway.contract", "gateway.mqtt_tls", "gateway.mqtt_internals", "gateway.aio",
    "gateway.boot_credentials",
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _under(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix()
                                        for p in (ROOT / "gateway").rglob("*.py")))
def test_the_gateway_imports_neither_the_simulator_nor_the_tests(path: str) -> None:
    names = imported_modules(ROOT / path)
    assert not _under(names, "device_sim") | _under(names, "tests"), path


def test_the_conformance_boot_knows_only_the_contract_document() -> None:
    assert not _under(imported_modules(ROOT / "tests/conformance_boot.py"), "gateway")


@pytest.mark.parametrize("path", BOOT_SIDE)
def test_a_simulated_boot_reaches_the_gateway_only_through_the_contract_and_mqtt(
    path: str,
) -> None:
    used = {n for n in _under(imported_modules(ROOT / path), "gateway") if n.count(".") == 1}
    assert used <= BOOT_SIDE_MAY_USE, f"{path}: {sorted(used - BOOT_SIDE_MAY_USE)}"


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from gateway.watchdog import Watchdog\n")
    assert "gateway.watchdog" in imported_modules(probe)


@pytest.mark.parametrize("path", BOOT_SIDE)
def test_a_simulated_boot_is_not_configured_by_the_gateways_settings(path: str) -> None:
    # Named on its own so that a regression says what went wrong: the gateway's MqttSettings
    # carries gateway defaults (client id, persistent session) a boot must not inherit.
    used = _under(imported_modules(ROOT / path), "gateway")
    assert not {"gateway.settings", "gateway.mqtt_link"} & {
        n.rsplit(".", 1)[0] if n.count(".") > 1 else n for n in used}, path


# The scenario judge and validator check runs against the gateway's own rules and limits, on
# purpose; device_sim/gateway_rules.py is the one door to them (the demo runs a gateway itself).
GATEWAY_RULES = {"gateway.watchdog", "gateway.programs", "gateway.settings.ProgramLimits",
                 "gateway.settings.WatchdogSettings"}
RULES_DOOR = {"device_sim/gateway_rules.py", "device_sim/demo.py"}


@pytest.mark.parametrize("path", sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "device_sim").rglob("*.py")
    if p.relative_to(ROOT).as_posix() not in RULES_DOOR))
def test_the_simulator_reaches_the_gateways_rules_only_through_gateway_rules(path: str) -> None:
    used = _under(imported_modules(ROOT / path), "gateway") & GATEWAY_RULES
    assert not used, f"{path} imports {sorted(used)}: use device_sim.gateway_rules"
