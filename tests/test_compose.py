"""Static checks of the compose stack and Grafana provisioning (no Docker needed).

They catch the mistakes that otherwise show up only after `docker compose up`: an env var the
gateway silently ignores, a port mismatch, a missing bind-mounted file, a dashboard pointing at
a data source that is not provisioned.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from gateway.settings import CONFIG_FILE_ENV, ENV_PREFIX, GatewaySettings

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


def _port_pairs(service: dict) -> list[tuple[str, int]]:
    """(published, target) for every entry of a service's `ports`."""
    pairs = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            pairs.append((str(entry.get("published", "")), int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]
        *rest, target = spec.split(":")
        published = rest[-1] if rest else ""
        pairs.append((published, int(target)))
    return pairs


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


def test_gateway_settings_load_from_the_compose_environment(monkeypatch, tmp_path):
    example = _env_example()
    env = {k: _interpolate(v, example) for k, v in _gateway_env().items()}
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "absent.toml"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    settings = GatewaySettings()

    assert settings.mqtt.host == env["BOOTGW_MQTT__HOST"] == "mosquitto"
    assert settings.api.port == int(env["BOOTGW_API__PORT"])
    assert settings.api.host == "0.0.0.0"
    assert settings.influx.url == env["BOOTGW_INFLUX__URL"]
    assert settings.influx.database == env["BOOTGW_INFLUX__DATABASE"]
    assert settings.influx.create_database is False
    assert settings.influx.token is not None
    assert settings.influx.token.get_secret_value() == example["INFLUX_TOKEN"]


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
