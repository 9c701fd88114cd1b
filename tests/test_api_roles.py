"""The HTTP API is closed by default and each user may do what its role allows, from outside.

The client here knows what a clinic app knows: the OpenAPI document (/openapi.json) and the
roles as README.md and docs/deploy.md give them. It talks to the real app served by uvicorn
in front of a real gateway on a real Mosquitto and influxd; `python -m gateway` is started as
a process for the startup checks. `EXPECTED_ROLES` is written from the docs, not imported from
gateway/api_users.py, so a change of the code's table that the docs do not say fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port
from gateway.api import create_app
from gateway.api_users import (
    ROUTES,
    ApiClosedError,
    ApiUser,
    Authenticator,
    Role,
    cli,
    hash_token,
    new_token,
)
from gateway.contract import BootState, Channel, topic
from gateway.logs import JsonFormatter
from gateway.service import Gateway
from gateway.settings import ApiSettings, GatewaySettings
from tests.helpers import RunningGateway, gateway_settings, running_gateway, wait_for

ROOT = Path(__file__).resolve().parent.parent

ALL = frozenset({"front_desk", "manager", "ops"})
DESK = frozenset({"front_desk", "ops"})
SUPERVISORS = frozenset({"manager", "ops"})
# The documented role table (README "HTTP API", docs/deploy.md "API users, roles and the
# audit trail"): front desk starts, stops, vents and reads what it needs for that; a manager
# reads everything and acknowledges alarms; ops may do everything.
EXPECTED_ROLES: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/api/v1/boots"): ALL,
    ("GET", "/api/v1/boots/{clinic}/{device}"): ALL,
    ("GET", "/api/v1/programs"): ALL,
    ("GET", "/api/v1/commands/{cmd_id}"): ALL,
    ("POST", "/api/v1/boots/{clinic}/{device}/session"): DESK,
    ("POST", "/api/v1/boots/{clinic}/{device}/stop"): DESK,
    ("POST", "/api/v1/boots/{clinic}/{device}/vent"): DESK,
    ("GET", "/api/v1/alarms"): SUPERVISORS,
    ("POST", "/api/v1/alarms/{alarm_id}/ack"): SUPERVISORS,
    ("GET", "/api/v1/stats"): SUPERVISORS,
    ("GET", "/api/v1/audit"): SUPERVISORS,
}
PUBLIC = {("GET", "/health")}
# What an allowed caller gets with ids nobody knows: the route ran (no 401/403).
ALLOWED_STATUS = {"/api/v1/boots": 200, "/api/v1/programs": 200, "/api/v1/alarms": 200,
                  "/api/v1/stats": 200, "/api/v1/audit": 200}
BODIES: dict[str, Any] = {"session": {"program": "post_workout_recovery"}, "vent": {},
                          "ack": {"by": "nurse"}}
POST_ROUTES = [path for (method, path) in EXPECTED_ROLES if method == "POST"]


@dataclass
class Users:
    tokens: dict[str, str]  # role -> token

    def settings(self, port: int) -> ApiSettings:
        return ApiSettings(port=port, users=[
            ApiUser(name=f"{role.replace('_', '-')}-1", role=Role(role),
                    token_sha256=hash_token(token)) for role, token in self.tokens.items()])

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@pytest.fixture
def users() -> Users:
    return Users({role: new_token() for role in ("front_desk", "manager", "ops")})


@pytest.fixture
async def closed(mosquitto: LocalMosquitto, influx: LocalInflux, users: Users
                 ) -> AsyncIterator[RunningGateway]:
    """A gateway whose API has one user per role and no anonymous access."""
    settings = gateway_settings(mosquitto, influx, api=users.settings(free_port()))
    async with running_gateway(settings, influx) as gw:
        yield gw


def fill(path: str, clinic: str) -> str:
    return (path.replace("{clinic}", clinic).replace("{device}", "nobody")
            .replace("{cmd_id}", "c-000000000000").replace("{alarm_id}", "a-000000000000"))


def body_for(path: str) -> Any:
    return BODIES.get(path.rsplit("/", 1)[-1])


CALLERS = ("no token", "wrong token", "hash as token", "front_desk", "manager", "ops")


def caller_headers(caller: str, users: Users) -> dict[str, str]:
    if caller == "no token":
        return {}
    if caller == "wrong token":
        return {"Authorization": f"Bearer {new_token()}"}
    if caller == "hash as token":  # what a leaked settings file holds does not open the API
        return {"Authorization": f"Bearer {hash_token(users.tokens['ops'])}"}
    return users.auth(caller)


def expected_status(caller: str, method: str, path: str) -> int:
    if caller not in ALL:
        return 401
    if caller not in EXPECTED_ROLES[(method, path)]:
        return 403
    return ALLOWED_STATUS.get(path, 404)


# ---------------------------------------------------------------- the route table


@pytest.mark.integration
async def test_every_route_answers_each_role_as_documented(closed: RunningGateway,
                                                           users: Users) -> None:
    spec = (await closed.api.get("/openapi.json")).json()  # public: how a client learns the API
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert routes == set(EXPECTED_ROLES) | PUBLIC, "a route the docs do not give roles to"
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    for method, path in EXPECTED_ROLES:
        documented = spec["paths"][path][method.lower()]["responses"]
        assert {"401", "403"} <= set(documented), (method, path)

    seen: list[tuple[str, str, str, int, int]] = []
    for (method, path) in EXPECTED_ROLES:
        url = fill(path, closed.clinic())
        for caller in CALLERS:
            body = body_for(path) if method == "POST" else None
            r = await closed.api.request(method, url, json=body,
                                         headers=caller_headers(caller, users))
            want = expected_status(caller, method, path)
            seen.append((caller, method, path, want, r.status_code))
            if r.status_code in (401, 403):
                assert r.json()["detail"], r.text
            if r.status_code == 401:
                assert r.headers["www-authenticate"] == "Bearer"
            if r.status_code == 403:  # the reason names the role and what it would take
                assert caller in r.json()["detail"] and "needs" in r.json()["detail"]
    wrong = [s for s in seen if s[3] != s[4]]
    table = "\n".join(f"{c:<14} {m:<5} {p:<45} want {w} got {g}" for c, m, p, w, g in wrong)
    assert not wrong, f"role matrix:\n{table}"
    assert (await closed.api.get("/health")).status_code == 200  # no token needed
    stats = (await closed.api.get("/api/v1/stats", headers=users.auth("ops"))).json()
    n_guarded = len(EXPECTED_ROLES)
    assert stats["api_refused"]["unauthorized"] == 3 * n_guarded
    assert stats["api_refused"]["forbidden"] == sum(
        len(ALL - roles) for roles in EXPECTED_ROLES.values())
    assert stats["api_anonymous"] is False and stats["api_users"] == 3


def app_routes(routes: list[Any]) -> Iterator[tuple[set[str], str]]:
    """(methods, path) of every endpoint: plain routes, and those of included routers
    (recent FastAPI keeps them behind one entry, older versions list them flat)."""
    for route in routes:
        if getattr(route, "methods", None) and getattr(route, "path", None):
            yield set(route.methods), route.path
        elif hasattr(route, "effective_route_contexts"):
            for ctx in route.effective_route_contexts():
                yield set(ctx.methods or ()), ctx.path
        elif hasattr(route, "routes"):
            raise AssertionError(f"a mounted app the gate does not know: {route!r}")
        else:
            raise AssertionError(f"a route of a kind this test does not know: {route!r}")


def test_every_route_of_the_app_is_in_the_route_table() -> None:
    """A route added to the app without a line in ROUTES would be unguarded: it fails here,
    and the gate answers 404 for it meanwhile."""
    app = create_app(Gateway(GatewaySettings(api=ApiSettings(allow_anonymous=True))))
    in_app = {(m, path) for methods, path in app_routes(app.routes) for m in methods
              if m != "HEAD"}
    assert ("POST", "/api/v1/alarms/{alarm_id}/ack") in in_app  # the walk finds the router's
    in_table = {(r.method, r.path) for r in ROUTES}
    assert in_app == in_table
    for rule in ROUTES:  # and the code's table says what the docs say
        if rule.roles is None:
            assert rule.path in ("/health", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                                 "/redoc")
        else:
            assert {r.value for r in rule.roles} == EXPECTED_ROLES[(rule.method, rule.path)]


# ---------------------------------------------------------------- 401/403 before the body


async def raw_post(port: int, path: str, headers: dict[str, str], declared: int, sent: bytes,
                   timeout: float = 5.0) -> tuple[int, bytes]:
    """A POST that declares `declared` body bytes and sends only `sent`: a server that waited
    for the body would not answer within the timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {declared}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
        writer.write(head.encode() + sent)
        await writer.drain()
        async with asyncio.timeout(timeout):
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            return status, await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.integration
async def test_401_and_403_come_before_the_body_is_read(closed: RunningGateway,
                                                        users: Users) -> None:
    port = closed.gw.settings.api.port
    huge = 50_000_000  # declared, never sent: only "{" is
    for path in POST_ROUTES:
        url = fill(path, closed.clinic())
        allowed = EXPECTED_ROLES[("POST", path)]
        for caller in CALLERS:
            headers = caller_headers(caller, users)
            t0 = time.monotonic()
            status, body = await raw_post(port, url, headers, huge, b"{")
            want = 413 if caller in allowed else expected_status(caller, "POST", path)
            assert status == want, (caller, path, status, body)
            assert time.monotonic() - t0 < 2.0, "answered only after a wait"
            if caller in ALL and caller not in allowed:
                # an invalid body, complete: still 403, not 422 (it was not parsed)
                status, _ = await raw_post(port, url, headers, 9, b"{not json")
                assert status == 403, (caller, path)

    # The control: for an allowed caller the server does wait for a body it may read, so
    # the answers above were given without the body.
    url = fill("/api/v1/boots/{clinic}/{device}/vent", closed.clinic())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: 9\r\nAuthorization: Bearer {users.tokens['front_desk']}\r\n"
                "\r\n{")
        writer.write(head.encode())
        await writer.drain()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await reader.readline()  # nothing: it waits for the other 8 bytes
        writer.write(b"not json")
        await writer.drain()
        async with asyncio.timeout(5):
            assert b" 422 " in await reader.readline()  # now read, parsed and refused
    finally:
        writer.close()


# ---------------------------------------------------------------- closed by default


def gateway_env(mosquitto: LocalMosquitto, influx: LocalInflux, tmp: Path,
                **over: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTGW_")}
    env.update({
        "BOOTGW_CONFIG_FILE": str(tmp / "none.toml"),
        "BOOTGW_MQTT__PORT": str(mosquitto.port),
        "BOOTGW_MQTT__CLIENT_ID": f"gw-roles-{os.getpid()}-{free_port()}",
        "BOOTGW_INFLUX__URL": influx.url, "BOOTGW_INFLUX__DATABASE": "roles",
        "BOOTGW_INFLUX__SPOOL_DIR": str(tmp / "spool"),
        "BOOTGW_SESSION_JOURNAL": str(tmp / "sessions.jsonl"),
        "BOOTGW_API__PORT": str(free_port()), "BOOTGW_LOG_FORMAT": "json",
        **{f"BOOTGW_{k.upper()}": v for k, v in over.items()},
    })
    return env


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, stdout=out,
                                stderr=out, env=env)


def log_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


@pytest.mark.integration
def test_without_users_the_gateway_refuses_to_start(mosquitto: LocalMosquitto,
                                                    influx: LocalInflux, tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "gateway"], cwd=ROOT, stdout=out,
                              stderr=out, env=gateway_env(mosquitto, influx, tmp_path),
                              timeout=60, check=False)
    assert proc.returncode != 0
    errors = [r for r in log_lines(log) if r["level"] == "error"]
    assert any(r["msg"] == "gateway refuses to start" and "api.allow_anonymous" in r["reason"]
               and "api.users" in r["reason"] for r in errors), log.read_text()


@pytest.mark.integration
async def test_allow_anonymous_starts_open_with_a_warning(mosquitto: LocalMosquitto,
                                                          influx: LocalInflux,
                                                          tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    env = gateway_env(mosquitto, influx, tmp_path, api__allow_anonymous="true")
    proc = spawn(env, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['BOOTGW_API__PORT']}",
                                     timeout=5) as api:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await api.get("/health")).status_code == 200:
                        break
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "did not come up"
                await asyncio.sleep(0.1)
            stats = await api.get("/api/v1/stats")  # no token: every caller is ops
            assert stats.status_code == 200 and stats.json()["api_anonymous"] is True
        warnings = [r for r in log_lines(log) if r["level"] == "warning"]
        assert any("anonymous" in r["msg"] for r in warnings), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_app_itself_refuses_an_api_without_users() -> None:
    with pytest.raises(ApiClosedError, match="allow_anonymous"):
        create_app(Gateway(GatewaySettings()))


@pytest.mark.parametrize("api", [
    {"allow_anonymous": True, "token": "s3cret-s3cret"},
    {"allow_anonymous": True, "users": [{"name": "a", "role": "ops", "token_sha256": "0" * 64}]},
    {"users": [{"name": "a", "role": "ops", "token_sha256": "0" * 64},
               {"name": "a", "role": "manager", "token_sha256": "1" * 64}]},
    {"users": [{"name": "a", "role": "ops", "token_sha256": "0" * 64},
               {"name": "b", "role": "manager", "token_sha256": "0" * 64}]},
    {"token": "s3cret-s3cret",
     "users": [{"name": "token", "role": "manager", "token_sha256": "0" * 64}]},
    {"users": [{"name": "anonymous", "role": "ops", "token_sha256": "0" * 64}]},
    {"users": [{"name": "bad name", "role": "ops", "token_sha256": "0" * 64}]},
    {"users": [{"name": "a", "role": "admin", "token_sha256": "0" * 64}]},
    {"users": [{"name": "a", "role": "ops", "token_sha256": "not-hex"}]},
])
def test_ambiguous_or_bad_user_lists_are_configuration_errors(api: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ApiSettings.model_validate(api)


# ---------------------------------------------------------------- tokens are stored hashed


def test_a_token_where_its_hash_belongs_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValidationError, match="users hash"):
        ApiSettings.model_validate(
            {"users": [{"name": "desk-1", "role": "front_desk", "token": new_token()}]})


def test_users_from_toml_and_from_the_environment(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    desk, mgr = new_token(), new_token()
    toml = tmp_path / "bootgw.toml"
    toml.write_text(f'[[api.users]]\nname = "desk-1"\nrole = "front_desk"\n'
                    f'token_sha256 = "{hash_token(desk).upper()}"\n')
    for key in [k for k in os.environ if k.startswith("BOOTGW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BOOTGW_CONFIG_FILE", str(toml))
    from_file = GatewaySettings()
    auth = Authenticator(from_file.api)
    assert auth.authenticate(f"Bearer {desk}".encode()).name == "desk-1"
    monkeypatch.setenv("BOOTGW_API__USERS", json.dumps(
        [{"name": "mgr-1", "role": "manager", "token_sha256": hash_token(mgr)}]))
    from_env = GatewaySettings()  # the environment wins over the file, as for every setting
    assert [(u.name, u.role) for u in from_env.api.users] == [("mgr-1", Role.MANAGER)]
    for s in (from_file, from_env):
        dumped = s.model_dump_json() + repr(s) + str(s.model_dump())
        assert desk not in dumped and mgr not in dumped


def test_the_simple_setup_is_the_ops_user_named_token() -> None:
    auth = Authenticator(ApiSettings(token=SecretStr("simple-shared-secret")))
    user = auth.authenticate(b"Bearer simple-shared-secret")
    assert user is not None and (user.name, user.role) == ("token", Role.OPS)
    assert auth.authenticate(b"Bearer simple-shared-secreT") is None
    assert auth.authenticate(b"Basic simple-shared-secret") is None
    assert auth.authenticate(b"Bearer ") is None and auth.authenticate(None) is None
    assert "simple-shared-secret" not in repr(ApiSettings(token=SecretStr("simple-shared-"
                                                                          "secret")))


def test_users_new_prints_a_working_token_once_and_only_its_hash_for_the_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    assert cli(["new", "desk-7", "--role", "front_desk"], stdout=out) == 0
    text = out.getvalue()
    tokens = [w for w in text.split() if w.startswith("bgw_")]
    assert len(tokens) == 1, text  # printed once
    token = tokens[0]
    toml_part = text[text.index("[[api.users]]"):text.index("or to the environment")]
    env_line = next(line for line in text.splitlines() if line.startswith("BOOTGW_API__USERS="))
    assert token not in toml_part and token not in env_line
    for key in [k for k in os.environ if k.startswith("BOOTGW_")]:
        monkeypatch.delenv(key)
    (tmp_path / "bootgw.toml").write_text(toml_part)
    monkeypatch.setenv("BOOTGW_CONFIG_FILE", str(tmp_path / "bootgw.toml"))
    user = Authenticator(GatewaySettings().api).authenticate(f"Bearer {token}".encode())
    assert user is not None and (user.name, user.role) == ("desk-7", Role.FRONT_DESK)
    monkeypatch.setenv("BOOTGW_API__USERS", env_line.split("=", 1)[1].strip("'"))
    assert Authenticator(GatewaySettings().api).authenticate(f"Bearer {token}".encode())

    hashed = io.StringIO()
    assert cli(["hash"], stdin=io.StringIO(token + "\n"), stdout=hashed) == 0
    assert hashed.getvalue().strip() == hash_token(token) and hashed.getvalue().strip() in text
    err = io.StringIO()
    assert cli(["hash"], stdin=io.StringIO("\n"), stderr=err) == 2 and "no token" in err.getvalue()
    for bad in (["new", "bad name", "--role", "ops"], ["new", "anonymous", "--role", "ops"],
                ["new", "x", "--role", "admin"], ["new", "x"]):
        assert cli(bad, stdout=io.StringIO(), stderr=io.StringIO()) == 2, bad


@pytest.mark.integration
async def test_no_token_reaches_a_log_line(closed: RunningGateway, users: Users,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = new_token()
    clinic = closed.clinic()
    for headers in (users.auth("front_desk"), users.auth("manager"), users.auth("ops"),
                    {"Authorization": f"Bearer {wrong}"}):
        for method, path in EXPECTED_ROLES:
            await closed.api.request(method, fill(path, clinic), headers=headers,
                                     json=body_for(path) if method == "POST" else None)
    audit = (await closed.api.get("/api/v1/audit", headers=users.auth("manager"))).json()
    assert {r["actor"] for r in audit} == {"front-desk-1", "manager-1", "ops-1"}
    await closed.flush()
    stored = json.dumps(closed.query("SELECT * FROM audit"))
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert "front-desk-1" in text  # the audit lines are there...
    for token in (*users.tokens.values(), wrong):  # ...and no token anywhere
        assert token not in text and token not in stored and token not in json.dumps(audit)


# ---------------------------------------------------------------- bodies: 4xx, never 500

JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30))
JSON = st.recursive(JSON_LEAVES, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=16)
VALID: dict[str, list[Any]] = {  # valid bodies, mutated one place at a time
    "session": [{"program": "post_workout_recovery", "wait": False},
                {"custom": {"name": "x", "mode": "sequential", "targets_mmhg": [60, 55],
                            "duration_s": 900, "timing": {"inflate_s": 5, "hold_s": 10,
                                                          "deflate_s": 5, "pause_s": 5}}}],
    "vent": [{"reason": "fuzz", "wait": False}],
    "ack": [{"by": "nurse"}],
}


def _mutate(doc: Any, path: list[str | int], value: Any) -> Any:
    if not path or not isinstance(doc, dict | list):
        return value
    key, rest = path[0], path[1:]
    if isinstance(doc, dict):
        keys = list(doc)
        k = key if key in doc or not keys else keys[len(str(key)) % len(keys)]
        return {**doc, k: _mutate(doc.get(k), rest, value)}
    i = key % len(doc) if isinstance(key, int) and doc else 0
    return [*doc[:i], _mutate(doc[i] if doc else None, rest, value), *doc[i + 1:]]


@st.composite
def bodies(draw: st.DrawFn, kind: str) -> bytes:
    choice = draw(st.sampled_from(["random", "mutated", "mutated", "raw"]))
    valid = draw(st.sampled_from(VALID[kind]))
    if choice == "random":
        return json.dumps(draw(JSON), allow_nan=True).encode()
    if choice == "mutated":
        path = draw(st.lists(st.text(max_size=8) | st.integers(0, 5), max_size=4))
        return json.dumps(_mutate(valid, path, draw(JSON)), allow_nan=True).encode()
    depth = draw(st.integers(1, 30_000))
    return draw(st.sampled_from([
        b"[" * depth + b"]" * depth, b'{"reason": ' + b"[" * depth + b"]" * depth + b"}",
        b"1" * depth, b"\xef\xbb\xbf" + json.dumps(valid).encode(), json.dumps(valid).encode(),
        b'{"wait": false, "wait": "x", "by": "a", "by": 7}', b"\xff\xfe\x00", b"",
        b'{"by": "\\ud800"}', b'{"custom": {"duration_s": 1e999}}', b"NaN", b"null",
    ]))


@pytest.mark.integration
async def test_fuzzed_bodies_get_a_4xx_with_a_reason_never_a_500(
        closed: RunningGateway, users: Users, mosquitto: LocalMosquitto) -> None:
    clinic = closed.clinic()
    # A boot the gateway knows, offline: a valid start gets as far as the checks (409).
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=f"fz-{clinic}") as c:
        await c.publish(topic(clinic, "off-1", Channel.STATE), BootState(
            online=False, firmware="f", chambers=2, zones=["calf", "thigh"],
            max_pressure_mmhg=120, telemetry_period_s=0.5, ts=time.time()).to_payload(),
            qos=1, retain=True)
    await wait_for(lambda: f"{clinic}/off-1" in closed.gw.fleet.boots, 10, "the boot")
    port = closed.gw.settings.api.port
    targets = {"session": [f"/api/v1/boots/{clinic}/off-1/session",
                           f"/api/v1/boots/{clinic}/nobody/session"],
               "vent": [f"/api/v1/boots/{clinic}/nobody/vent"],
               "ack": ["/api/v1/alarms/a-000000000000/ack"]}
    seen: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def fuzz(http: httpx.Client, data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(sorted(targets)))
        url = data.draw(st.sampled_from(targets[kind]))
        body = data.draw(bodies(kind))
        r = http.post(url, content=body, headers={"content-type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (url, body[:200], r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["detail"], (url, body[:200], r.text[:300])

    def run() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                          headers=users.auth("ops")) as http:
            # The unmutated valid bodies first: they must reach the checks (409, offline), so
            # the fuzz is known to start from bodies that pass validation (drawing one by
            # chance failed once in 300 examples).
            for body in VALID["session"]:
                r = http.post(targets["session"][0], json=body)
                assert r.status_code == 409 and r.json()["detail"], r.text
            fuzz(http)

    await asyncio.to_thread(run)
    assert 422 in seen, seen  # the fuzz reached validation
    assert (await closed.api.get("/health")).status_code == 200
    assert closed.gw.fleet.boots[f"{clinic}/off-1"].session is None

