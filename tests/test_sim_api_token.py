"""`python -m device_sim run --gateway-url` against a closed API: the simulator sends a bearer
token (--api-token-file or $BOOTSIM_API_TOKEN), as the compose stack's device_sim must.

From the outside: a real Mosquitto, a real gateway whose API needs a token, the simulator as
its own process; what counts is what the gateway's audit trail and counters say.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from device_sim.__main__ import API_TOKEN_ENV, main
from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port
from gateway.settings import ApiSettings
from tests.helpers import gateway_settings, running_gateway

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _sim(mosquitto: LocalMosquitto, api_port: int, prefix: str, *extra: str,
         env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Two simulated boots in one clinic, starting a session each through the gateway."""
    base = {k: v for k, v in os.environ.items() if k != API_TOKEN_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "device_sim", "run", "--boots", "2", "--clinics", "1",
         "--clinic-prefix", prefix, "--mqtt-port", str(mosquitto.port),
         "--gateway-url", f"http://127.0.0.1:{api_port}", "--seconds", "60", *extra],
        cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


async def _starts(api, clinic: str) -> list[dict]:
    r = await api.get("/api/v1/audit", params={"action": "session_start", "clinic": clinic})
    assert r.status_code == 200, r.text
    return r.json()


async def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen[str]):
    """Poll the gateway's API (the only view from outside) until `predicate` holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the simulator exited ({proc.returncode}) before {what}:\n"
                                 + _stop(proc))
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}:\n"
                                 + _stop(proc))
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("how", ["file", "env"])
async def test_the_simulator_starts_sessions_with_its_token(
        how: str, mosquitto: LocalMosquitto, influx: LocalInflux, tmp_path: Path) -> None:
    token = "bgw_" + secrets.token_hex(16)
    port = free_port()
    settings = gateway_settings(mosquitto, influx,
                                api=ApiSettings(port=port, token=SecretStr(token)))
    if how == "file":
        (tmp_path / "token").write_text(token + "\n")
        extra, env = ("--api-token-file", str(tmp_path / "token")), None
    else:
        extra, env = (), {API_TOKEN_ENV: token}
    async with running_gateway(settings, influx, token=token) as gw:
        proc = _sim(mosquitto, port, gw.clinic_prefix, *extra, env=env)
        try:
            clinic = gw.clinic(1)

            async def both_started() -> list[dict]:
                done = [r for r in await _starts(gw.api, clinic) if r["result"] == "done"]
                return done if len(done) == 2 else []

            records = await _wait(both_started, 60, "two session starts", proc)
        finally:
            out = _stop(proc)
    # The calls were the token's user's: the audit trail says who started them.
    assert {r["actor"] for r in records} == {"token"}, records
    assert token not in out, "the simulator logged its token"


async def test_without_a_token_the_closed_api_refuses_and_the_simulator_says_so_once(
        mosquitto: LocalMosquitto, influx: LocalInflux) -> None:
    token = "bgw_" + secrets.token_hex(16)
    port = free_port()
    settings = gateway_settings(mosquitto, influx,
                                api=ApiSettings(port=port, token=SecretStr(token)))
    async with running_gateway(settings, influx, token=token) as gw:
        proc = _sim(mosquitto, port, gw.clinic_prefix)
        try:
            async def refused() -> int:
                stats = (await gw.api.get("/api/v1/stats")).json()
                return stats["api_refused"].get("unauthorized", 0)

            await _wait(refused, 60, "the gateway refusing the simulator", proc)
            assert not await _starts(gw.api, gw.clinic(1))
        finally:
            out = _stop(proc)
    assert out.count("refused the simulator's token") == 1, out


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--api-token-file", "{tmp}/token"], {API_TOKEN_ENV: "bgw_0123456789abcdef"},
     "both set"),
    ([], {API_TOKEN_ENV: "change-me-gateway-api-token"}, "placeholder"),
    (["--api-token-file", "{tmp}/missing"], {}, "cannot be read"),
    (["--api-token-file", "{tmp}/empty"], {}, "is empty"),
])
def test_a_bad_token_source_is_refused_before_any_boot_connects(
        args: list[str], env: dict[str, str], expected: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "token").write_text("bgw_0123456789abcdef\n")
    (tmp_path / "empty").write_text("\n")
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["run", "--boots", "1", "--mqtt-port", "1", "--gateway-url", "http://127.0.0.1:1",
            *(a.format(tmp=tmp_path) for a in args)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err
