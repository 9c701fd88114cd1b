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

from device_sim.__main__ import _parser
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
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    listeners = {int(p) for p in re.findall(r"^listener\s+(\d+)", conf, re.M)}
    assert int(env["BOOTGW_MQTT__PORT"]) in listeners
    influx = urlsplit(env["BOOTGW_INFLUX__URL"])
    assert influx.hostname in services
    assert influx.port in {t for _, t in _port_pairs(services[influx.hostname])}
    for path in sorted(DATASOURCES_DIR.glob("*.y*ml")):
        for ds in yaml.safe_load(path.read_text())["datasources"]:
            url = urlsplit(ds["url"])
            assert (url.hostname, url.port) == (influx.hostname, influx.port), ds["url"]


def test_device_sim_runs_a_small_clinic_against_the_stack():
    sim = _service("device_sim")
    args = _parser().parse_args(sim["command"][3:])
    assert sim["command"][:3] == ["python", "-m", "device_sim"]
    assert args.command == "run" and args.boots >= 2 and args.clinics >= 2
    services = _load_compose()["services"]
    assert args.mqtt_host == _gateway_env()["BOOTGW_MQTT__HOST"] and args.mqtt_host in services
    assert args.mqtt_port == int(_gateway_env()["BOOTGW_MQTT__PORT"])
    api = urlsplit(args.gateway_url)
    assert api.hostname == "gateway" and api.port == int(_gateway_env()["BOOTGW_API__PORT"])
    assert sim["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_dependencies_wait_for_health_checks():
    services = _load_compose()["services"]
    for name, service in services.items():
        if name != "device_sim":
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
    assert set(services["gateway"]["depends_on"]) == {"mosquitto", "influxdb"}
    assert "influxdb" in services["grafana"]["depends_on"]


def test_named_volumes_are_declared_and_used():
    compose = _load_compose()
    declared = set(compose.get("volumes") or {})
    used = {v for s in compose["services"].values() for v, _ in _named_volumes(s)}
    assert used == declared, f"declared {sorted(declared)}, used {sorted(used)}"
    for name in ("mosquitto", "influxdb", "grafana", "gateway"):
        assert _named_volumes(compose["services"][name]), f"{name} keeps no data"


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
