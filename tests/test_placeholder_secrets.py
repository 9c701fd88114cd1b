"""A stack started from `.env.example` unchanged must not run with its public placeholders."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings


@pytest.mark.parametrize("env", [
    "BOOTGW_INFLUX__TOKEN", "BOOTGW_MQTT__PASSWORD", "BOOTGW_API__TOKEN",
])
def test_a_placeholder_secret_is_a_configuration_error(
    env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env, "change-me-something")
    with pytest.raises(ValidationError) as err:
        GatewaySettings()
    assert "placeholder" in str(err.value)


def test_a_real_secret_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOTGW_INFLUX__TOKEN", "9f1c2e7a0b3d4c5e6f708192a3b4c5d6")
    assert GatewaySettings().influx.token is not None


def test_the_service_refuses_to_start_naming_the_setting_not_the_secret(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "BOOTGW_API__TOKEN": "change-me-api-token-41d9",
           "BOOTGW_CONFIG_FILE": str(tmp_path / "none.toml")}
    done = subprocess.run([sys.executable, "-m", "gateway"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "configuration refused" in done.stderr and "api.token" in done.stderr
    assert "41d9" not in done.stderr + done.stdout
