"""The compose stack and Grafana provisioning, checked without Docker.

Static checks catch the mistakes that otherwise show up only after `docker compose up`: an env
var the gateway silently ignores, a port mismatch, a missing bind-mounted file, a dashboard
pointing at a data source that is not provisioned, a port published that should not be. The
"secure by default" part then runs the stack's init steps, its broker configuration, the
gateway and the simulator natively (real Mosquitto, real influxd), with the compose commands
and environment translated only where a container differs from a process (see _Native).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
import time
import types
import typing
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import httpx
import pytest
import trustme
import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from device_sim.__main__ import API_TOKEN_ENV, _parser
from device_sim.local_stack import LocalInflux, dynsec_plugin, find_binary, free_port
from device_sim.local_stack import _wait_port as wait_port
from gateway.boot_credentials import load_credentials
from gateway.contract import HEARTBEAT_TOPIC, Channel, topic
from gateway.mqtt_tls import client_security
from gateway.settings import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    PLACEHOLDER_PREFIX,
    GatewaySettings,
    MqttSettings,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DATASOURCES_DIR = ROOT / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS_DIR = ROOT / "grafana" / "provisioning" / "dashboards"
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; $$ is a literal $.
_VAR_RE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


# ---------------------------------------------------------------- helpers


def _load_compose() -> dict:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), (
        "compose.yaml has no services mapping"
    )
    return data


def _service(name: str) -> dict:
    services = _load_compose()["services"]
    assert name in services, f"compose.yaml has no service {name!r}"
    return services[name]


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=value: {line!r}"
        values[key.strip()] = value.strip()
    return values


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style variable interpolation (the subset compose.yaml may use)."""

    def repl(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        op, arg = m["op"] or "", m["arg"] or ""
        current = env.get(name)
        if op in (":-", ":?"):
            missing = not current
        else:
            missing = current is None
        if missing:
            if op.endswith("?"):
                raise AssertionError(f"${{{name}}} is required: {arg}")
            if op.endswith("-"):
                return arg
            return ""
        return current or ""

    return _VAR_RE.sub(repl, value)


def _environment(service: dict) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        env = {}
        for item in raw:
            key, _, value = str(item).partition("=")
            env[key] = value
        return env
    env = {}
    for key, value in raw.items():
        if value is None:
            value = ""
        elif isinstance(value, bool):
            value = str(value).lower()
        env[str(key)] = str(value)
    return env


def _strings(node: object) -> list[str]:
    """Every string (keys and values) in a parsed YAML document; comments are not included."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


def _gateway_env() -> dict[str, str]:
    env = _environment(_service("gateway"))
    assert env, "the gateway service sets no environment"
    return env


def _nested_model(annotation: object) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like `Model`, `Model | None`, `Optional[Model]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _nested_model(arg)
            if found is not None:
                return found
    return None


def _settings_path_error(var: str) -> str | None:
    """None if env var `var` sets a real GatewaySettings field, else what is wrong."""
    if var == CONFIG_FILE_ENV:
        return None
    if not var.startswith(ENV_PREFIX):
        return f"{var} lacks the {ENV_PREFIX} prefix"
    parts = var[len(ENV_PREFIX) :].lower().split("__")
    model: type[BaseModel] | None = GatewaySettings
    for depth, part in enumerate(parts):
        if model is None:
            return f"{var}: {'.'.join(parts[:depth])} is not a nested model"
        field = model.model_fields.get(part)
        if field is None:
            return f"{var}: {model.__name__} has no field {part!r}"
        model = _nested_model(field.annotation)
    if model is not None:
        return f"{var}: {'.'.join(parts)} is a whole section, not a field"
    return None


def _ports(service: dict, env: dict[str, str] | None = None) -> list[tuple[str, str, int]]:
    """(host address, published, target) of every entry of a service's `ports`, after
    interpolation with `env` (default .env.example); "" for an address means every one."""
    env = _env_example() if env is None else env
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.append((_interpolate(str(entry.get("host_ip", "")), env),
                        _interpolate(str(entry.get("published", "")), env), int(entry["target"])))
            continue
        spec = _interpolate(str(entry), env).split("/")[0]
        *rest, target = spec.split(":")
        published = rest[-1] if rest else ""
        address = rest[-2] if len(rest) >= 2 else ""
        out.append((address, published, int(target)))
    return out


def _port_pairs(service: dict) -> list[tuple[str, int]]:
    """(published, target) for every entry of a service's `ports`."""
    return [(published, target) for _, published, target in _ports(service)]


def _bind_mounts() -> list[tuple[str, str, str]]:
    """(service, host path, container path) of every bind mount in compose.yaml."""
    mounts = []
    for name, service in _load_compose()["services"].items():
        for entry in service.get("volumes") or []:
            if isinstance(entry, dict):
                if entry.get("type") == "bind":
                    mounts.append((name, str(entry["source"]), str(entry["target"])))
                continue
            source, _, rest = str(entry).partition(":")
            if source.startswith((".", "/", "~")):
                mounts.append((name, source, rest.split(":")[0]))
    return mounts


def _datasource_uids() -> set[str]:
    uids = set()
    files = sorted(DATASOURCES_DIR.glob("*.y*ml"))
    assert files, f"no data source provisioning files in {DATASOURCES_DIR}"
    for path in files:
        doc = yaml.safe_load(path.read_text()) or {}
        for ds in doc.get("datasources") or []:
            assert ds.get("uid"), f"{path.name}: data source {ds.get('name')!r} has no uid"
            uids.add(ds["uid"])
    return uids


def _dashboards() -> list[tuple[str, dict]]:
    files = sorted(DASHBOARDS_DIR.rglob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS_DIR}"
    return [(p.name, json.loads(p.read_text())) for p in files]


def _all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_all_panels(panel.get("panels") or []))  # collapsed rows
    return out


def _datasource_refs(dashboard: dict) -> list[tuple[str, object]]:
    """(where, datasource reference) of every panel, target and template variable."""
    refs: list[tuple[str, object]] = []
    for panel in _all_panels(dashboard.get("panels") or []):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("type") != "row" or "datasource" in panel:
            refs.append((where, panel.get("datasource")))
        for target in panel.get("targets") or []:
            refs.append((f"{where} target {target.get('refId')}", target.get("datasource")))
    for var in (dashboard.get("templating") or {}).get("list") or []:
        if var.get("type") == "query":
            refs.append((f"variable {var.get('name')}", var.get("datasource")))
    return refs


# ---------------------------------------------------------------- tests


def test_every_bootgw_env_var_of_the_gateway_is_a_settings_field():
    bootgw = [v for v in _gateway_env() if v.startswith(ENV_PREFIX)]
    assert bootgw, "the gateway service sets no BOOTGW_* variables"
    errors = [e for v in bootgw if (e := _settings_path_error(v))]
    assert not errors, "gateway env vars that GatewaySettings ignores:\n" + "\n".join(errors)


def test_settings_path_check_rejects_unknown_names():
    # Guards the check above against passing everything.
    assert _settings_path_error("BOOTGW_MQTT__HOST") is None
    assert _settings_path_error("BOOTGW_MQTT__HOTS") is not None
    assert _settings_path_error("BOOTGW_MQTT") is not None
    assert _settings_path_error("BOOTGW_API_PORT") is not None
    assert _settings_path_error("BOOTGW_MAX_PAYLOAD_BYTES__X") is not None


def test_gateway_publishes_its_api_port():
    env = _gateway_env()
    api_port = int(env["BOOTGW_API__PORT"])
    pairs = _port_pairs(_service("gateway"))
    assert pairs, "the gateway publishes no port"
    assert (str(api_port), api_port) in pairs, (
        f"BOOTGW_API__PORT={api_port} but the gateway's ports are {pairs}"
    )


def test_gateway_healthcheck_uses_the_api_port():
    env = _gateway_env()
    api_port = int(env["BOOTGW_API__PORT"])
    test = _service("gateway")["healthcheck"]["test"]
    text = " ".join(test) if isinstance(test, list) else str(test)
    urls = re.findall(r"https?://[^\s'\"]+", text)
    assert urls, f"no URL in the gateway healthcheck: {text!r}"
    for url in urls:
        parts = urlsplit(url)
        assert parts.port == api_port, f"healthcheck {url} does not use port {api_port}"
        assert parts.path == "/health", f"healthcheck {url} is not /health"


def test_bind_mounted_host_paths_exist():
    mounts = _bind_mounts()
    assert mounts, "compose.yaml has no bind mounts; expected config and dashboards"
    missing = [
        f"{service}: {source} -> {target}"
        for service, source, target in mounts
        if not (ROOT / source).exists()
    ]
    assert not missing, "bind-mounted paths missing from the repo:\n" + "\n".join(missing)


def test_build_contexts_and_dockerfiles_exist():
    built = {n: s["build"] for n, s in _load_compose()["services"].items() if "build" in s}
    assert "gateway" in built, "the gateway service is not built from the repo"
    for name, build in built.items():
        build = {"context": build} if isinstance(build, str) else build
        context = ROOT / build.get("context", ".")
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_compose_variables_are_defined_in_env_example():
    example = _env_example()
    needed = {
        m["braced"] or m["bare"]
        for text in _strings(_load_compose())
        for m in _VAR_RE.finditer(text)
        if not m["escaped"] and not (m["op"] or "").endswith("-")
    }
    assert needed, "compose.yaml references no variables; expected at least INFLUX_TOKEN"
    missing = sorted(needed - example.keys())
    assert not missing, f"variables used in compose.yaml but not in .env.example: {missing}"


def test_dashboard_datasource_uids_are_provisioned():
    uids = _datasource_uids()
    checked = 0
    problems = []
    for name, dashboard in _dashboards():
        for where, ref in _datasource_refs(dashboard):
            if isinstance(ref, dict) and ref.get("uid") in ("-- Grafana --", "-- Mixed --"):
                continue
            uid = ref.get("uid") if isinstance(ref, dict) else None
            checked += 1
            if uid not in uids:
                problems.append(f"{name}: {where} uses data source {ref!r}")
    assert checked, "no data source references found in the dashboards"
    assert not problems, f"not provisioned (known uids {sorted(uids)}):\n" + "\n".join(problems)


def test_dashboard_panel_ids_are_unique():
    for name, dashboard in _dashboards():
        panels = _all_panels(dashboard.get("panels") or [])
        assert panels, f"{name} has no panels"
        ids = [p.get("id") for p in panels]
        assert all(isinstance(i, int) for i in ids), f"{name}: panel without an integer id: {ids}"
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        assert not dupes, f"{name}: duplicate panel ids {dupes}"


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards():
    mounted = {
        target
        for service, source, target in _bind_mounts()
        if service == "grafana" and (ROOT / source).resolve() == DASHBOARDS_DIR.resolve()
    }
    assert mounted, "grafana does not mount ./grafana/dashboards"
    paths = set()
    for path in sorted(DASHBOARD_PROVIDERS_DIR.glob("*.y*ml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for provider in doc.get("providers") or []:
            paths.add((provider.get("options") or {}).get("path"))
    assert paths, "no dashboard provider provisioned"
    assert paths <= mounted, f"providers read {paths} but grafana mounts dashboards at {mounted}"


def test_grafana_datasource_queries_the_database_the_gateway_writes():
    database = _gateway_env()["BOOTGW_INFLUX__DATABASE"]
    grafana_env = _environment(_service("grafana"))
    dbs = []
    for path in sorted(DATASOURCES_DIR.glob("*.y*ml")):
        text = path.read_text()
        for ds in (yaml.safe_load(text) or {}).get("datasources") or []:
            if ds.get("type") == "influxdb":
                dbs.append((ds.get("jsonData") or {}).get("dbName") or ds.get("database"))
        for var in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text):
            assert var in grafana_env, f"{path.name} expands ${{{var}}}, not set for grafana"
    assert dbs, "no InfluxDB data source provisioned"
    assert set(dbs) == {database}, f"Grafana queries {dbs}, the gateway writes {database!r}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("${INFLUX_TOKEN}", "tok"),
        ("${MISSING:-fallback}", "fallback"),
        ("$$SYS/x", "$SYS/x"),
        ("Token ${INFLUX_TOKEN}", "Token tok"),
    ],
)
def test_interpolation_helper(raw, expected):
    assert _interpolate(raw, {"INFLUX_TOKEN": "tok"}) == expected


def test_interpolation_helper_fails_on_a_required_variable():
    with pytest.raises(AssertionError):
        _interpolate("${NOPE:?set it}", {})


# ---------------------------------------------------------------- the whole stack (issue 7)


def _named_volumes(service: dict) -> list[tuple[str, str]]:
    """(volume name, container path) of the named volumes a service mounts."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            if entry.get("type") == "volume":
                out.append((str(entry["source"]), str(entry["target"])))
            continue
        source, _, rest = str(entry).partition(":")
        if not source.startswith((".", "/", "~")):
            out.append((source, rest.split(":")[0]))
    return out


def _mount_target(service_name: str, host_path: Path) -> str:
    targets = [t for s, src, t in _bind_mounts()
               if s == service_name and (ROOT / src).resolve() == host_path.resolve()]
    assert len(targets) == 1, f"{service_name} does not mount {host_path.relative_to(ROOT)}"
    return targets[0]


def _duration_s(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", value)
    assert m, value
    return int(m[1]) * (60 if m[2] == "m" else 1)


def test_grafana_mounts_datasource_dashboard_and_alert_provisioning():
    provisioning = _mount_target("grafana", ROOT / "grafana" / "provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    for kind in ("datasources", "dashboards", "alerting"):
        assert sorted((ROOT / "grafana" / "provisioning" / kind).glob("*.yaml")), kind
    dashboards = _mount_target("grafana", DASHBOARDS_DIR)
    env = _environment(_service("grafana"))
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards + "/")
    assert (DASHBOARDS_DIR / home.removeprefix(dashboards + "/")).is_file()
    # read-only: the generator in the repo is the only writer
    assert all(str(v).endswith(":ro") for v in _service("grafana")["volumes"]
               if str(v).startswith("./"))


def test_grafana_image_is_pinned():
    image = _service("grafana")["image"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", image), image


def test_influxdb_is_initialised_for_the_v1_api_the_gateway_and_grafana_use():
    env = _environment(_service("influxdb"))
    assert env["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    for key in ("ORG", "BUCKET", "USERNAME", "PASSWORD", "ADMIN_TOKEN", "RETENTION"):
        assert env[f"DOCKER_INFLUXDB_INIT_{key}"], key
    database = _gateway_env()["BOOTGW_INFLUX__DATABASE"]
    assert env["INFLUX_V1_DATABASE"] == database
    initdb = _mount_target("influxdb", ROOT / "deploy" / "influxdb")
    assert initdb == "/docker-entrypoint-initdb.d"
    scripts = sorted((ROOT / "deploy" / "influxdb").glob("*.sh"))
    assert scripts and all(os.access(p, os.X_OK) for p in scripts), "init scripts not executable"
    text = "".join(p.read_text() for p in scripts)
    assert "influx v1 dbrp create" in text
    for var in ("INFLUX_V1_DATABASE", "INFLUX_V1_RETENTION_POLICY",
                "DOCKER_INFLUXDB_INIT_BUCKET_ID", "DOCKER_INFLUXDB_INIT_ORG"):
        assert var in text, var
    assert "--default" in text, "the mapping must be the default for its database"


def test_every_service_gets_the_same_influx_token_variable():
    uses = {
        "influxdb": _environment(_service("influxdb"))["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"],
        "gateway": _gateway_env()["BOOTGW_INFLUX__TOKEN"],
        "grafana": _environment(_service("grafana"))["INFLUX_TOKEN"],
    }
    names = {s: {m["braced"] or m["bare"] for m in _VAR_RE.finditer(v)} for s, v in uses.items()}
    assert all(n == {"INFLUX_TOKEN"} for n in names.values()), names


def test_services_reach_each_other_by_service_name_and_port():
    services = _load_compose()["services"]
    env = _gateway_env()
    assert env["BOOTGW_MQTT__HOST"] in services
    assert int(env["BOOTGW_MQTT__PORT"]) in _broker_listeners()
    influx = urlsplit(env["BOOTGW_INFLUX__URL"])
    assert influx.hostname in services
    # not published (test_influxdb_is_reachable_only_on_an_internal_network): the port is the
    # one its own health check asks
    health = " ".join(services[influx.hostname]["healthcheck"]["test"])
    assert f"localhost:{influx.port}" in health, health
    for path in sorted(DATASOURCES_DIR.glob("*.y*ml")):
        for ds in yaml.safe_load(path.read_text())["datasources"]:
            url = urlsplit(ds["url"])
            assert (url.hostname, url.port) == (influx.hostname, influx.port), ds["url"]


def test_device_sim_runs_a_small_clinic_against_the_stack():
    sim = _service("device_sim")
    args = _parser().parse_args(sim["command"][3:])
    assert sim["command"][:3] == ["python", "-m", "device_sim"]
    # the fleet is the boots the provisioning step made accounts for, in two clinics or more
    provision = _init_args("provision")
    assert args.command == "run" and args.boots is None and args.credentials is not None
    assert provision.boots >= 2 and provision.clinics >= 2
    services = _load_compose()["services"]
    assert args.mqtt_host == _gateway_env()["BOOTGW_MQTT__HOST"] and args.mqtt_host in services
    assert args.mqtt_port == int(_gateway_env()["BOOTGW_MQTT__PORT"])
    # over TLS with the stack's CA, each boot as itself; never plaintext
    assert args.mqtt_ca is not None and not args.mqtt_allow_plaintext
    assert not args.mqtt_insecure_skip_hostname_check and args.mqtt_username is None
    api = urlsplit(args.gateway_url)
    assert api.hostname == "gateway" and api.port == int(_gateway_env()["BOOTGW_API__PORT"])
    # and its bearer token is the gateway's
    assert _environment(sim)[API_TOKEN_ENV] == _gateway_env()["BOOTGW_API__TOKEN"]
    assert sim["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert sim["depends_on"]["provision"]["condition"] == "service_completed_successfully"


def test_dependencies_wait_for_health_checks():
    services = _load_compose()["services"]
    for name, service in services.items():
        if name not in ("device_sim", *ONE_SHOT):
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
            if dep in ONE_SHOT:
                assert cond.get("condition") == "service_completed_successfully", (name, dep)
    assert set(services["gateway"]["depends_on"]) == {"init", "mosquitto", "influxdb"}
    assert "influxdb" in services["grafana"]["depends_on"]
    for one_shot in ONE_SHOT:
        assert services[one_shot]["restart"] == "no", one_shot


def test_named_volumes_are_declared_and_used():
    compose = _load_compose()
    declared = set(compose.get("volumes") or {})
    used = {v for s in compose["services"].values() for v, _ in _named_volumes(s)}
    assert used == declared, f"declared {sorted(declared)}, used {sorted(used)}"
    for name in ("mosquitto", "influxdb", "grafana", "gateway"):
        assert _named_volumes(compose["services"][name]), f"{name} keeps no data"
    # a service in a profile must not be needed by one without: `up` with the profile off
    # would fail on the missing dependency
    for name, service in compose["services"].items():
        for dep in service.get("depends_on") or {}:
            assert set(compose["services"][dep].get("profiles") or []) <= set(
                service.get("profiles") or []), f"{name} needs {dep} of another profile"


def test_gateway_works_in_its_volume_and_has_time_to_flush_on_stop():
    gateway = _service("gateway")
    targets = {t for _, t in _named_volumes(gateway)}
    assert gateway["working_dir"] in targets, "relative paths (spool, bootgw.toml) must persist"
    # the session journal must survive a container restart: it is what closes the sessions
    # that ended while the gateway was away
    journal = GatewaySettings.model_fields["session_journal"].default
    assert journal is not None and not journal.is_absolute()
    assert "BOOTGW_SESSION_JOURNAL" not in _gateway_env(), "an override must stay in /data"
    # Gateway.run closes storage with a 10 s timeout; docker's default is 10 s, then SIGKILL.
    assert _duration_s(gateway["stop_grace_period"]) >= 15
    assert float(_gateway_env()["BOOTGW_HEALTH_INTERVAL_S"]) <= 60, (
        "the 'No gateway health data' alert expects a report at least every minute")


# ---------------------------------------------------------------- secure by default (issue 12)
#
# Static checks of what compose.yaml and the broker's configuration promise, then the stack
# itself run natively (no Docker here): the init steps' commands with every named volume a
# temporary directory, a real Mosquitto with the compose configuration, the gateway and the
# simulator as processes with the compose environment. Only what cannot be the same outside a
# container is translated (paths through the volume map, service names to loopback, ports to
# free ones, the plugin's path in the image to Debian's): _Native says which.

ONE_SHOT = ("init", "provision")
INIT_SCRIPT = ROOT / "deploy" / "init" / "compose_init.py"
BROKER_CONF_TARGET = "/mosquitto/config/mosquitto.conf"


def _init_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("compose_init", INIT_SCRIPT)
    assert spec and spec.loader, INIT_SCRIPT
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _init_args(service: str, env: dict[str, str] | None = None) -> argparse.Namespace:
    """A one-shot service's command, parsed by compose_init.py's own parser."""
    command = [_interpolate(str(c), _env_example() if env is None else env)
               for c in _service(service)["command"]]
    assert command[:2] == ["python", "/deploy/init/compose_init.py"], command
    assert _mount_target(service, INIT_SCRIPT.parent) == "/deploy/init"
    return _init_module().parser().parse_args(command[2:])


def _broker_conf_path() -> Path:
    sources = [ROOT / src for s, src, t in _bind_mounts()
               if s == "mosquitto" and t == BROKER_CONF_TARGET]
    assert len(sources) == 1, "mosquitto does not mount its configuration"
    return sources[0]


def _broker_conf() -> list[tuple[str, str]]:
    """(option, value) of every line of the mounted Mosquitto configuration."""
    lines = []
    for line in _broker_conf_path().read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            option, _, value = line.partition(" ")
            lines.append((option, value.strip()))
    return lines


def _broker_listeners() -> set[int]:
    return {int(v.split()[0]) for o, v in _broker_conf() if o == "listener"}


def _real_env() -> dict[str, str]:
    """.env.example with every change-me placeholder replaced by a real secret."""
    return {k: secrets.token_hex(16) if v.lower().startswith(PLACEHOLDER_PREFIX) else v
            for k, v in _env_example().items()}


def _mounts(service: str) -> list[tuple[str, str, bool]]:
    """(volume name or ./host path, container path, read-only) of a service's mounts."""
    out = []
    for entry in _service(service).get("volumes") or []:
        source, _, rest = str(entry).partition(":")
        target, _, mode = rest.partition(":")
        out.append((source, target, mode == "ro"))
    return out


def test_broker_is_tls_only_and_refuses_anonymous_clients():
    conf = _broker_conf()
    options = [o for o, _ in conf]
    listeners = [v for o, v in conf if o == "listener"]
    assert listeners == ["8883"], f"exactly one listener, the TLS one: {listeners}"
    # every listener option comes after the listener line: they belong to it
    after = options[options.index("listener"):]
    for option in ("cafile", "certfile", "keyfile"):
        assert option in after, f"the listener has no {option}"
    assert dict(conf)["tls_version"] in ("tlsv1.2", "tlsv1.3")
    assert dict(conf)["allow_anonymous"] == "false"
    assert "mosquitto_dynamic_security.so" in dict(conf)["plugin"]
    # the plugin's file is on the data volume, which the broker may rewrite
    data = dict((t, s) for s, t, _ in _mounts("mosquitto"))["/mosquitto/data"]
    assert dict(conf)["plugin_opt_config_file"].startswith("/mosquitto/data/"), data
    # nothing that would let a client past the plugin's password and client-id check
    for bad in ("password_file", "acl_file", "use_identity_as_username",
                "use_subject_as_username", "psk_file", "allow_zero_length_clientid"):
        assert bad not in options, f"{bad} in {_broker_conf_path().name}"
    assert dict(conf).get("per_listener_settings", "false") == "false"


def test_only_the_ports_users_need_are_published():
    published = {name: _ports(s) for name, s in _load_compose()["services"].items()
                 if s.get("ports")}
    assert published == {
        # boots on the clinic network: every address
        "mosquitto": [("", "8883", 8883)],
        # plain HTTP with logins and bearer tokens: this host only unless .env says otherwise
        "grafana": [("127.0.0.1", "3000", 3000)],
        "gateway": [("127.0.0.1", "8080", 8080)],
    }, published
    # the addresses are variables with a loopback default, and .env.example keeps it
    assert _ports(_service("gateway"), {})[0][0] == "127.0.0.1"
    assert _ports(_service("grafana"), {})[0][0] == "127.0.0.1"
    assert _ports(_service("gateway"), {"API_BIND_ADDRESS": "10.0.0.2"})[0][0] == "10.0.0.2"
    assert 8883 in _broker_listeners()


def test_influxdb_is_reachable_only_on_an_internal_network():
    compose = _load_compose()
    networks = compose.get("networks") or {}
    internal = {n for n, spec in networks.items() if (spec or {}).get("internal")}
    influx = compose["services"]["influxdb"]
    assert not influx.get("ports"), "InfluxDB must not be published"
    assert set(influx.get("networks") or ["default"]) <= internal, influx.get("networks")
    # that, and only that, is why the gateway may speak plain http to it
    env = _gateway_env()
    assert urlsplit(env["BOOTGW_INFLUX__URL"]).hostname == "influxdb"
    assert env["BOOTGW_INFLUX__ALLOW_PLAINTEXT"] == "true"
    assert "BOOTGW_MQTT__ALLOW_PLAINTEXT" not in env
    # every service on the internal network also needs to be there
    users = {n for n, s in compose["services"].items() if internal & set(s.get("networks") or [])}
    assert users == {"influxdb", "grafana", "gateway", "provision"}, users


def test_the_gateway_connects_to_the_tls_port_with_the_stacks_ca():
    env = _gateway_env()
    assert env["BOOTGW_MQTT__TLS"] == "true"
    assert int(env["BOOTGW_MQTT__PORT"]) in _broker_listeners()
    assert "BOOTGW_MQTT__TLS_CHECK_HOSTNAME" not in env
    # the CA file is the one `certs init` writes into the volume the broker reads
    init = _init_args("init")
    ca_volume = next(s for s, t, _ in _mounts("init") if t == str(init.certs))
    gateway_mount = next(t for s, t, _ in _mounts("gateway") if s == ca_volume)
    assert env["BOOTGW_MQTT__CA_FILE"] == f"{gateway_mount}/ca.crt"
    # the broker's certificate names the host the gateway dials
    assert env["BOOTGW_MQTT__HOST"] in init.host
    # its own account: the identity `broker init` binds, its password from the init step
    identity = {k: v for k, v in _environment(_service("init")).items()
                if k.startswith("BOOTGW_MQTT__")}
    assert identity and all(env[k] == v for k, v in identity.items()), identity
    secrets_volume = next(s for s, t, _ in _mounts("init")
                          if str(init.gateway_password_file).startswith(t + "/"))
    assert any(s == secrets_volume and env["BOOTGW_MQTT__PASSWORD_FILE"].startswith(t + "/")
               for s, t, _ in _mounts("gateway"))


def test_secrets_volumes_are_mounted_only_where_they_are_needed():
    compose = _load_compose()
    by_volume: dict[str, dict[str, bool]] = {}
    for name in compose["services"]:
        for source, _, read_only in _mounts(name):
            by_volume.setdefault(source, {})[name] = read_only
    # the CA's key: the init step alone; the broker admin: never the gateway or the boots
    assert by_volume["ca"] == {"init": False}
    assert by_volume["broker-admin"] == {"init": False, "provision": True}
    assert by_volume["gateway-secrets"] == {"init": False, "gateway": True}
    assert by_volume["sim-credentials"] == {"provision": False, "device_sim": True}
    assert by_volume["mqtt-certs"] == {"init": False, "mosquitto": True, "provision": True,
                                       "gateway": True, "device_sim": True}


def test_init_checks_every_secret_from_env_and_the_rest_waits_for_it():
    compose = _load_compose()
    checked = {name for name, _ in _init_args("init").check_secret}
    # the secrets in .env are its change-me values; each is checked before anything starts
    placeholders = {k for k, v in _env_example().items()
                    if v.lower().startswith(PLACEHOLDER_PREFIX)}
    assert placeholders == checked, (placeholders, checked)
    assert placeholders == {"INFLUX_TOKEN", "INFLUX_PASSWORD", "GRAFANA_ADMIN_PASSWORD",
                            "GATEWAY_API_TOKEN"}
    # compose's ${VAR:?} cannot check a value: InfluxDB and Grafana wait for the check
    for name in ("mosquitto", "influxdb", "grafana", "gateway"):
        assert compose["services"][name]["depends_on"]["init"]["condition"] == (
            "service_completed_successfully"), name
    env = _environment(_service("init"))
    assert checked <= {m["braced"] for v in env.values() for m in _VAR_RE.finditer(v)}
    # the simulated clinic is on by default, and a profile away
    assert "sim" in _env_example()["COMPOSE_PROFILES"].split(",")
    assert _service("device_sim")["profiles"] == ["sim"] == _service("provision")["profiles"]


def test_init_commands_parse_with_the_real_command_line_parsers():
    from gateway.certs import parser as certs_parser
    from gateway.provision import _parser as provision_parser

    module = _init_module()
    init = _init_args("init")
    certs = certs_parser().parse_args(module.certs_argv(init))
    assert certs.command == "init" and certs.dir == init.certs and certs.ca_dir == init.ca_dir
    # the broker's certificate names what the boots and the broker's own health check dial
    assert {"mosquitto", "localhost"} <= set(certs.host)
    assert certs.owner == (1883, 1883)
    broker = provision_parser().parse_args(module.broker_init_argv(init))
    assert (broker.area, broker.command) == ("broker", "init")
    assert str(broker.file) == dict(_broker_conf())["plugin_opt_config_file"].replace(
        "/mosquitto/data", next(t for s, t, _ in _mounts("init") if s == "mosquitto-data"))
    boots = _init_args("provision")
    for key in module.fleet_members(boots.boots, boots.clinics, boots.clinic_prefix):
        add = provision_parser().parse_args(module.add_argv(key, boots.credentials_out))
        assert (add.command, f"{add.clinic}/{add.device}") == ("add", key)
        assert add.credentials_out == boots.credentials_out
    # the simulated boots are named as the simulator names a fleet of that size
    from device_sim.fleet import SimFleet
    from gateway.settings import MqttSettings

    fleet = SimFleet.make(boots.boots, boots.clinics, MqttSettings(),
                          clinic_prefix=boots.clinic_prefix)
    assert sorted(fleet.boots) == sorted(module.fleet_members(
        boots.boots, boots.clinics, boots.clinic_prefix))


class _Native:
    """compose.yaml's services as local processes: each named volume a directory under
    `root`, the service names on loopback (the broker as "localhost", a name its certificate
    carries), free ports for 8883 and 8080, the test's influxd for InfluxDB."""

    def __init__(self, root: Path, env: dict[str, str], influx: LocalInflux) -> None:
        self.root, self.env, self.influx = root, env, influx
        self.mqtt_port, self.api_port = free_port(), free_port()
        self.database = f"compose_{secrets.token_hex(4)}"
        self.broker: subprocess.Popen[bytes] | None = None

    def volume(self, name: str) -> Path:
        assert name in (_load_compose().get("volumes") or {}), f"undeclared volume {name}"
        path = self.root / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def host_path(self, service: str, container_path: str) -> Path | None:
        """Where a container path of `service` is on this machine (None: not mounted)."""
        best: tuple[str, str] | None = None
        for source, target, _ in _mounts(service):
            if (container_path == target or container_path.startswith(target + "/")) and (
                    best is None or len(target) > len(best[1])):
                best = (source, target)
        if best is None:
            return None
        source, target = best
        base = (ROOT / source) if source.startswith(".") else self.volume(source)
        return base / container_path[len(target):].lstrip("/")

    def value(self, service: str, key: str, value: str) -> str:
        """One environment value or argument, as the native process needs it."""
        value = _interpolate(value, self.env)
        if key in ("BOOTGW_MQTT__HOST", "--mqtt-host") and value == "mosquitto":
            return "localhost"
        if key in ("BOOTGW_MQTT__PORT", "--mqtt-port") and value == "8883":
            return str(self.mqtt_port)
        if key == "BOOTGW_API__PORT":
            return str(self.api_port)
        if key == "BOOTGW_API__HOST":
            return "127.0.0.1"
        if key == "BOOTGW_INFLUX__DATABASE":
            return self.database
        if key == "--broker-owner" and os.geteuid() != 0:
            return f"{os.getuid()}:{os.getgid()}"
        if self.influx is not None and value.startswith("http://influxdb:8086"):
            return value.replace("http://influxdb:8086", self.influx.url)
        if value.startswith("http://gateway:8080"):
            return value.replace("http://gateway:8080", f"http://127.0.0.1:{self.api_port}")
        if value.startswith("/") and (path := self.host_path(service, value)) is not None:
            return str(path)
        return value

    def command(self, service: str) -> list[str]:
        raw = [str(c) for c in _service(service)["command"]]
        assert raw[0] == "python", raw
        out = [sys.executable]
        for i, arg in enumerate(raw[1:], start=1):
            out.append(self.value(service, raw[i - 1], arg))
        return out

    def environ(self, service: str) -> dict[str, str]:
        env = {k: self.value(service, k, v) for k, v in _environment(_service(service)).items()}
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
                CONFIG_FILE_ENV: str(self.root / "no-bootgw.toml"), **env}

    def run(self, service: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(service), env={**self.environ(service), **kw},
                              cwd=self.root, capture_output=True, text=True, timeout=120)

    def spawn(self, service: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """A long-running service as a process; its output in ROOT/<service>.log."""
        with (self.root / f"{service}.log").open("ab") as log:
            return subprocess.Popen(self.command(service), env=self.environ(service),
                                    cwd=cwd or self.root, stdout=log, stderr=log)

    def broker_conf(self) -> str:
        """The mounted configuration with its paths through the volume map; the listener on
        loopback and a free port; Debian's plugin path; as root, `user root` (the broker would
        drop to a user that cannot read the test's files). Nothing else changes."""
        out, replaced = [], set()
        for line in _broker_conf_path().read_text().splitlines():
            option, _, value = line.strip().partition(" ")
            value = value.strip()
            if option == "listener":
                line, _ = f"listener {self.mqtt_port} 127.0.0.1", replaced.add(option)
            elif option == "plugin":
                plugin = dynsec_plugin()
                if plugin is None:
                    pytest.skip("mosquitto_dynamic_security.so not installed")
                line, _ = f"plugin {plugin}", replaced.add(option)
            elif value.startswith("/mosquitto/"):
                path = self.host_path("mosquitto", value.rstrip("/"))
                assert path is not None, f"{option} {value}: not on a volume of the broker"
                line = f"{option} {path}{'/' if value.endswith('/') else ''}"
                replaced.add(option)
            out.append(line)
        assert {"listener", "plugin", "certfile", "plugin_opt_config_file"} <= replaced
        if os.geteuid() == 0:
            out.append("user root")
        return "\n".join(out) + "\n"

    def start_broker(self) -> None:
        conf = self.root / "mosquitto.conf"
        conf.write_text(self.broker_conf())
        binary = find_binary("mosquitto")
        if binary is None:
            pytest.skip("mosquitto is not installed")
        log = (self.root / "mosquitto.log").open("ab")
        self.broker = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        wait_port(self.mqtt_port, self.broker, 10, "mosquitto")

    def stop_broker(self) -> None:
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            self.broker.wait(10)

    def mqtt(self, **over: Any) -> MqttSettings:
        """MqttSettings as the compose gateway has them (TLS with the stack's CA)."""
        fields: dict[str, Any] = {"host": "localhost", "port": self.mqtt_port, "tls": True,
                                  "ca_file": self.volume("mqtt-certs") / "ca.crt"}
        return MqttSettings(**{**fields, **over})


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory, influx: LocalInflux) -> Iterator[_Native]:
    stack = _Native(tmp_path_factory.mktemp("compose"), _real_env(), influx)
    done = stack.run("init")
    assert done.returncode == 0, done.stderr
    stack.start_broker()
    try:
        influx.query("", f'CREATE DATABASE "{stack.database}"')
        done = stack.run("provision")
        assert done.returncode == 0, done.stderr
        yield stack
    finally:
        stack.stop_broker()


def test_a_stack_started_from_the_unchanged_env_example_does_not_start(tmp_path: Path):
    """The init step (which everything waits for) refuses, naming each variable, never a
    value, and writes nothing: no CA, no accounts."""
    stack = _Native(tmp_path, _env_example(), influx=None)  # type: ignore[arg-type]
    done = stack.run("init")
    assert done.returncode == 1, done.stderr
    for name in ("INFLUX_TOKEN", "INFLUX_PASSWORD", "GRAFANA_ADMIN_PASSWORD",
                 "GATEWAY_API_TOKEN"):
        assert re.search(rf"refused: {name} is still the placeholder", done.stderr), name
        assert _env_example()[name] not in done.stderr + done.stdout
    written = [p for p in (tmp_path / "volumes").rglob("*") if p.is_file()]
    assert not written, written


def test_init_refuses_a_placeholder_password_file_and_a_lost_one(tmp_path: Path):
    """The broker's passwords come from files: one holding a placeholder (copied from the
    docs) is refused, and so is a dynamic-security file whose password files are gone."""
    stack = _Native(tmp_path, _real_env(), influx=None)  # type: ignore[arg-type]
    init = _init_args("init")
    password = stack.host_path("init", str(init.gateway_password_file))
    dynsec = stack.host_path("init", str(init.dynsec))
    assert password is not None and dynsec is not None
    password.parent.mkdir(parents=True, exist_ok=True)
    password.write_text("change-me-gateway-password\n")
    done = stack.run("init")
    assert done.returncode == 1 and "placeholder" in done.stderr, done.stderr
    assert not dynsec.exists()
    password.unlink()
    assert stack.run("init").returncode == 0 and password.is_file() and dynsec.is_file()
    password.unlink()
    done = stack.run("init")
    assert done.returncode == 1 and "is missing" in done.stderr, done.stderr


def test_the_gateway_loads_the_compose_environment_with_real_secrets(native: _Native,
                                                                     monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in native.environ("gateway").items():
        monkeypatch.setenv(key, value)

    settings = GatewaySettings()

    env = _gateway_env()
    assert settings.mqtt.tls and settings.mqtt.port == native.mqtt_port
    assert settings.mqtt.ca_file == native.volume("mqtt-certs") / "ca.crt"
    assert settings.mqtt.username == env["BOOTGW_MQTT__USERNAME"]
    assert settings.mqtt.password_file is not None and settings.mqtt.password_file.is_file()
    assert settings.api.token is not None
    assert settings.api.token.get_secret_value() == native.env["GATEWAY_API_TOKEN"]
    assert settings.influx.token is not None
    assert settings.influx.token.get_secret_value() == native.env["INFLUX_TOKEN"]
    assert settings.influx.create_database is False


def test_the_gateway_refuses_the_unchanged_env_example(native: _Native, monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    unchanged = _Native(native.root, _env_example(), native.influx)
    unchanged.mqtt_port, unchanged.api_port = native.mqtt_port, native.api_port
    for key, value in unchanged.environ("gateway").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as refused:
        GatewaySettings()
    text = str(refused.value)
    assert "placeholder" in text and "api.token" in text and "influx.token" in text
    assert _env_example()["GATEWAY_API_TOKEN"] not in text
    # and the provisioning step, which shares the InfluxDB token for its audit records
    done = unchanged.run("provision")
    assert done.returncode == 2 and "influx.token" in done.stderr, done.stderr
    assert "placeholder" in done.stderr


def test_every_file_a_service_reads_is_made_by_an_init_step(native: _Native):
    """Paths in the services' environment and commands, and in the broker's configuration,
    exist once `init` and `provision` ran, on a volume those steps wrote."""
    needed: list[tuple[str, str]] = []
    for name in ("mosquitto", "gateway", "device_sim"):
        service = _service(name)
        values = list(_environment(service).values()) + [str(c) for c in
                                                          service.get("command") or []]
        needed += [(name, v) for v in values if v.startswith("/") and v not in ("/data",)]
    needed += [("mosquitto", v.rstrip("/")) for o, v in _broker_conf()
               if v.startswith("/mosquitto/")]
    assert len(needed) >= 8, needed
    written_by_init = {s for step in ONE_SHOT for s, _, ro in _mounts(step) if not ro}
    missing = []
    for service, path in needed:
        source = next((s for s, t, _ in _mounts(service)
                       if path == t or path.startswith(t + "/")), None)
        assert source in written_by_init, f"{service}: {path} is on {source}, no init writes it"
        host = native.host_path(service, path)
        if host is None or not host.exists():
            missing.append(f"{service}: {path}")
    assert not missing, missing


async def _connect(mqtt: MqttSettings, timeout: float = 10, **kw: Any) -> None:
    async with aiomqtt.Client(mqtt.host, mqtt.port, protocol=aiomqtt.ProtocolVersion.V5,
                              timeout=timeout, **client_security(mqtt), **kw):
        pass


async def test_the_broker_takes_tls_with_the_ca_and_refuses_plain_strangers_and_anonymous(
        native: _Native, tmp_path: Path):
    gateway = GatewaySettings(mqtt=native.mqtt(
        username="boot-gateway", client_id="boot-gateway",
        password_file=native.volume("gateway-secrets") / "mqtt-password"))
    await _connect(gateway.mqtt, identifier="boot-gateway")
    # a simulated boot with the credentials the provisioning step wrote
    creds = load_credentials(native.volume("sim-credentials") / "credentials.json")
    assert len(creds) == _init_args("provision").boots
    _, boot = sorted(creds.items())[0]
    await _connect(native.mqtt(username=boot.username, password=SecretStr(boot.password)),
                   identifier=boot.client_id)
    # anonymous, over TLS: not authorised
    with pytest.raises(aiomqtt.MqttCodeError, match=r"(?i)not authori"):
        await _connect(native.mqtt(), identifier="anonymous-probe")
    # a wrong password for a real account
    with pytest.raises(aiomqtt.MqttCodeError, match=r"(?i)not authori|bad user"):
        await _connect(native.mqtt(username=boot.username, password=SecretStr("x" * 32)),
                       identifier=boot.client_id)
    # plain MQTT on the TLS port: no CONNACK, whatever the credentials (the broker waits for
    # the rest of a TLS record that never comes: the bound only sets how long we look)
    plain = MqttSettings(host="127.0.0.1", port=native.mqtt_port, username=boot.username,
                         password=SecretStr(boot.password))
    with pytest.raises(aiomqtt.MqttError):
        await _connect(plain, timeout=3, identifier=boot.client_id)
    # a client that trusts another CA does not take this broker for the real one
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    with pytest.raises(aiomqtt.MqttError):
        await _connect(native.mqtt(ca_file=tmp_path / "other-ca.pem",
                                   username=boot.username, password=SecretStr(boot.password)),
                       identifier=boot.client_id)
    # nor a broker reached by a name its certificate does not carry
    with pytest.raises(aiomqtt.MqttError):
        await _connect(MqttSettings(host="127.0.0.1", port=native.mqtt_port, tls=True,
                                    ca_file=native.volume("mqtt-certs") / "ca.crt",
                                    username=boot.username, password=SecretStr(boot.password)),
                       identifier=boot.client_id)


async def test_a_boot_cannot_fake_the_heartbeat_or_command_another_boot(native: _Native):
    """The attack on the old stack: a retained heartbeat and a start sent straight to a boot.
    Boot A tries both at boot B; B hears nothing of it, and then hears the gateway (which may),
    so the silence is the broker's refusal, not a lost subscription."""
    creds = sorted(load_credentials(native.volume("sim-credentials") / "credentials.json")
                   .items())
    (_, a), (key_b, b) = creds[0], creds[1]
    clinic_b, device_b = key_b.split("/")
    cmd_b = topic(clinic_b, device_b, Channel.CMD)
    gateway = native.mqtt(username="boot-gateway", client_id="boot-gateway",
                          password_file=native.volume("gateway-secrets") / "mqtt-password")

    def client(mqtt: MqttSettings, ident: str) -> aiomqtt.Client:
        return aiomqtt.Client(mqtt.host, mqtt.port, identifier=ident, timeout=10,
                              protocol=aiomqtt.ProtocolVersion.V5, **client_security(mqtt))

    async with client(native.mqtt(username=b.username, password=SecretStr(b.password)),
                      b.client_id) as victim:
        await victim.subscribe(cmd_b, qos=1)
        async with client(native.mqtt(username=a.username, password=SecretStr(a.password)),
                          a.client_id) as attacker:
            await attacker.publish(HEARTBEAT_TOPIC, b'{"forged": true}', qos=1, retain=True)
            await attacker.publish(cmd_b, b'{"type": "start", "forged": true}', qos=1)
        async with client(gateway, "boot-gateway") as gw:
            await gw.publish(cmd_b, b'{"type": "vent", "from": "gateway"}', qos=1)
        async with asyncio.timeout(10):
            first = await anext(aiomqtt_messages(victim))
        assert first.payload == b'{"type": "vent", "from": "gateway"}', first.payload
    # and no forged heartbeat was retained for the boots that subscribe next
    async with client(native.mqtt(username=b.username, password=SecretStr(b.password)),
                      b.client_id) as late:
        await late.subscribe(HEARTBEAT_TOPIC, qos=1)
        async with client(gateway, "boot-gateway") as gw:
            await gw.publish(HEARTBEAT_TOPIC, b"", qos=1, retain=True)  # clears, and marks
        async with asyncio.timeout(10):
            first = await anext(aiomqtt_messages(late))
        assert first.payload != b'{"forged": true}'


def aiomqtt_messages(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    return aiter(client.messages)


def test_the_init_steps_keep_what_exists(native: _Native):
    """`docker compose up` runs them at every start: the CA, the broker's certificate, the
    accounts and the simulated boots' credentials stay as they are."""
    ca, certs = native.volume("ca"), native.volume("mqtt-certs")
    creds = native.volume("sim-credentials") / "credentials.json"
    before = {p: p.read_bytes() for p in (*ca.iterdir(), *certs.iterdir(), creds)}
    again = native.run("init")
    assert again.returncode == 0, again.stderr
    assert "dynamic-security file kept" in again.stderr and "CA kept" in again.stderr
    again = native.run("provision")
    assert again.returncode == 0, again.stderr
    boots = _init_args("provision").boots
    assert f"0 account(s) added, {boots} kept" in again.stderr
    assert {p: p.read_bytes() for p in before} == before
    # the clinic's own host name added in .env: a new server certificate, the same CA
    with_name = _Native(native.root, {**native.env, "BROKER_HOSTNAMES": "mqtt.clinic.example"},
                        native.influx)
    again = with_name.run("init")
    assert again.returncode == 0, again.stderr
    assert (ca / "ca.key").read_bytes() == before[ca / "ca.key"]
    assert (certs / "server.crt").read_bytes() != before[certs / "server.crt"]
    assert "mqtt.clinic.example" in again.stderr


def test_the_brokers_health_check_passes_on_the_compose_broker(native: _Native):
    if find_binary("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub not installed (Debian package mosquitto-clients)")
    test = _service("mosquitto")["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = test[1].replace("-p 8883", f"-p {native.mqtt_port}").replace(
        "/mosquitto/certs/", f"{native.volume('mqtt-certs')}/")
    assert command != test[1]
    assert subprocess.run(["sh", "-c", command], timeout=30).returncode == 0
    closed = command.replace(f"-p {native.mqtt_port}", f"-p {free_port()}")
    assert subprocess.run(["sh", "-c", closed], timeout=30).returncode != 0


async def test_the_stack_runs_secured_gateway_and_simulated_clinic(native: _Native):
    """The gateway and the simulator with their compose environment and commands: the
    gateway logs in as itself over TLS, the boots each as themselves, and every simulated
    boot gets its session through the closed API, started by the token's user."""
    work = native.host_path("gateway", _service("gateway")["working_dir"])
    assert work is not None
    gateway = native.spawn("gateway", cwd=work)
    sim = None
    try:
        api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{native.api_port}", timeout=10,
                                headers={"Authorization":
                                         f"Bearer {native.env['GATEWAY_API_TOKEN']}"})
        async with api:
            await _until(lambda: _ok(api, "/health"), 30, "the gateway's API", gateway)
            assert (await api.get("/api/v1/boots", headers={"Authorization": ""})
                    ).status_code == 401
            sim = native.spawn("device_sim")
            boots = _init_args("provision").boots

            async def started() -> list[dict[str, Any]]:
                r = await api.get("/api/v1/audit", params={"action": "session_start",
                                                           "result": "done"})
                return r.json() if len(r.json()) >= boots else []

            records = await _until(started, 60, f"{boots} sessions started", sim)
            assert {r["actor"] for r in records} == {"token"}
            health = (await api.get("/health")).json()
            assert health["mqtt_connected"] is True
    finally:
        for proc in (sim, gateway):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in (sim, gateway):
            if proc is not None:
                proc.wait(30)
    assert gateway.returncode == 0, (native.root / "gateway.log").read_text()[-3000:]
    assert native.env["GATEWAY_API_TOKEN"] not in (native.root / "device_sim.log").read_text()


async def _ok(api: httpx.AsyncClient, path: str) -> bool:
    try:
        return (await api.get(path)).status_code == 200
    except httpx.HTTPError:
        return False


async def _until(predicate: Any, timeout: float, what: str, proc: subprocess.Popen) -> Any:
    """Poll the API (a process's state has no event to await from here), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(0.1)
