"""The simulated boot's own MQTT settings (device_sim/link_settings.py) refuse exactly what the
gateway's MqttSettings refuse, in the same words, and carry none of the gateway's identity.

Written from the README's promise ("plain TCP is refused to a broker off loopback unless
--mqtt-allow-plaintext", the TLS files checked at start) and checked against the gateway's
class so that the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from device_sim.link_settings import BootLinkSettings
from gateway.mqtt_tls import client_security
from gateway.settings import MqttSettings


def _refusal(cls: type[Any], fields: dict[str, object]) -> str:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(fields)
    return "; ".join(e["msg"] for e in info.value.errors())


@pytest.mark.parametrize("fields", [
    {"host": "broker.example"},
    {"host": "10.0.0.5"},
    {"host": "::ffff:10.0.0.1"},
    {"host": "127.0.0.1.nip.io"},
    {"ca_file": "/nonexistent/ca.pem"},  # a TLS file without tls
    {"tls": True, "ca_file": "/nonexistent/ca.pem"},
    {"tls": True, "cert_file": "/nonexistent/c.pem"},  # cert without key
    {"password": "x", "password_file": "/nonexistent/pw"},
    {"password_file": "/nonexistent/pw"},
    {"tsl": True},  # misspelt: an error, not a silent plaintext link
    {"port": 0},
])
def test_the_boot_refuses_what_the_gateway_refuses_in_the_same_words(
    fields: dict[str, object],
) -> None:
    assert _refusal(BootLinkSettings, fields) == _refusal(MqttSettings, fields)


def test_plain_tcp_off_loopback_only_when_said_so() -> None:
    assert BootLinkSettings(host="10.0.0.5", allow_plaintext=True).host == "10.0.0.5"
    assert BootLinkSettings().tls is False  # loopback default


def test_tls_moves_the_default_port_to_8883() -> None:
    assert BootLinkSettings(tls=True).port == 8883
    assert BootLinkSettings(tls=True, port=9999).port == 9999


def test_a_refusal_never_echoes_the_password() -> None:
    message = _refusal(BootLinkSettings, {"host": "10.0.0.5", "password": "s3cret-pw"})
    assert "s3cret-pw" not in message


def test_the_boot_carries_none_of_the_gateways_identity() -> None:
    # The gateway's client id and persistent session are the gateway's; a boot has its own
    # client id (SimBoot) and a clean session.
    for gateway_only in ("client_id", "session_expiry_s"):
        assert gateway_only not in BootLinkSettings.model_fields
        assert gateway_only in MqttSettings.model_fields


def test_client_security_reads_both_settings_classes_alike(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    boot = client_security(BootLinkSettings(username="boots", password_file=secret))
    gw = client_security(MqttSettings(username="boots", password_file=secret))
    assert boot == gw == {"username": "boots", "password": "from-file", "tls_context": None}
