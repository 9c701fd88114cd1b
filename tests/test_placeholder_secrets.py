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
