"""The HTTP API's contract without servers: OpenAPI, access control, validation."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from gateway.api import create_app
from gateway.commands import CommandTracker
from gateway.contract import BootState
from gateway.service import Gateway
from gateway.settings import ApiSettings, GatewaySettings


def client(token: str | None = None) -> TestClient:
    """With a token, the simple setup; without, an API open on purpose (allow_anonymous)."""
    api = ApiSettings(token=SecretStr(token)) if token else ApiSettings(allow_anonymous=True)
    return TestClient(create_app(Gateway(GatewaySettings(api=api))))


OPEN = GatewaySettings(api=ApiSettings(allow_anonymous=True))


def test_openapi_lists_the_control_routes() -> None:
    spec = client().get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/api/v1/boots", "/api/v1/boots/{clinic}/{device}/session",
                 "/api/v1/boots/{clinic}/{device}/stop", "/api/v1/boots/{clinic}/{device}/vent",
                 "/api/v1/programs", "/health"):
        assert path in paths, path
    responses = paths["/api/v1/boots/{clinic}/{device}/session"]["post"]["responses"]
    assert {"202", "409", "502"} <= set(responses)


def test_token_guards_the_api_but_not_health() -> None:
    c = client("s3cret")
    assert c.get("/api/v1/boots").status_code == 401
    assert c.get("/api/v1/boots", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = c.get("/api/v1/boots", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json() == []
    health = c.get("/health")
    assert health.status_code == 200 and health.json()["mqtt_connected"] is False
    assert health.json()["status"] == "degraded"


def test_unknown_boot_and_bad_requests() -> None:
    c = client()
    assert c.get("/api/v1/boots/c1/nope").status_code == 404
    r = c.post("/api/v1/boots/c1/nope/session", json={"program": "post_workout_recovery"})
    assert r.status_code == 404 and "no boot c1/nope" in r.text
    assert c.post("/api/v1/boots/c1/b1/session", json={"custom": {"name": "x"}}).status_code == 422
    programs = c.get("/api/v1/programs").json()
    assert [p["key"] for p in programs] == [
        "post_workout_recovery", "doms_24_48h", "rest_day_reset", "before_mobility",
        "office_travel"]


def test_commands_without_a_broker_answer_503() -> None:
    gw = Gateway(OPEN)
    gw.fleet.upsert_state("c1", "b1", BootState(
        online=True, firmware="f", chambers=1, zones=["calf"], max_pressure_mmhg=120,
        telemetry_period_s=0.5, ts=0), now=0, clinic_ceiling=100)
    with TestClient(create_app(gw)) as c:
        gw.commands = CommandTracker(5, lambda t: None, time.monotonic)
        r = c.post("/api/v1/boots/c1/b1/stop")
        assert r.status_code == 503 and "not connected" in r.text
        assert gw.fleet.boots["c1/b1"].session is None


def test_non_finite_numbers_in_a_body_are_a_clear_422_not_a_500() -> None:
    """JSON's NaN/Infinity extensions parse, then fail validation: the answer names the field
    and does not echo the input (which could not even be serialised back)."""
    c = TestClient(create_app(Gateway(OPEN)), raise_server_exceptions=False)
    program = (b'{"custom": {"name": "x", "targets_mmhg": [NaN], "duration_s": 600, '
               b'"timing": {"inflate_s": 1, "hold_s": 1, "deflate_s": 1, "pause_s": 1}}}')
    for path, body in (("/api/v1/boots/c1/b1/session", program),
                       ("/api/v1/alarms/a-1/ack", b'{"by": Infinity}'),
                       ("/api/v1/boots/c1/b1/session", b'{"custom": {"duration_s": -Infinity}}')):
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.status_code, r.text)
        detail = r.json()["detail"]
        assert detail and all({"loc", "msg"} <= set(e) and "input" not in e for e in detail)
    r = c.post("/api/v1/boots/c1/b1/session", content=program,
               headers={"content-type": "application/json"})
    assert r.json()["detail"][0]["loc"] == ["body", "custom", "targets_mmhg", 0]


def test_an_empty_token_is_a_configuration_error_not_an_open_api(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for blank in ("", "   "):
        monkeypatch.setenv("BOOTGW_API__TOKEN", blank)
        with pytest.raises(ValidationError, match=r"api\.token is empty"):
            GatewaySettings()
    monkeypatch.setenv("BOOTGW_API__TOKEN", "s3cret")
    assert GatewaySettings().api.token is not None


def test_the_token_is_checked_and_the_size_bounded_before_the_body_is_read() -> None:
    c = TestClient(create_app(Gateway(GatewaySettings(
        api=ApiSettings(token=SecretStr("s3cret"), max_body_bytes=4096)))))
    big = b'{"by": "' + b"x" * 100_000 + b'"}'
    r = c.post("/api/v1/alarms/a-1/ack", content=big,
               headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    auth = {"Authorization": "Bearer s3cret", "content-type": "application/json"}
    r = c.post("/api/v1/alarms/a-1/ack", content=big, headers=auth)
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: refused once the bytes pass the limit
        for _ in range(100):
            yield b"x" * 1000
    r = c.post("/api/v1/alarms/a-1/ack", content=chunks(), headers=auth)
    assert r.status_code == 413
    r = c.post("/api/v1/alarms/a-1/ack", json={"by": "nurse"}, headers=auth)
    assert r.status_code == 404  # a body within the limit reaches the route
    assert c.get("/health").status_code == 200  # no token needed outside /api/
