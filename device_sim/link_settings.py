"""The simulated boot's own MQTT connection settings: what a boot needs to reach its broker.

A boot is not a gateway: it must not be configured through the gateway's config class (whose
defaults, such as the `boot-gateway` client id and its persistent session, are the
gateway's). `BootLinkSettings` holds exactly what a boot's link reads - broker address, TLS
(CA, client certificate, host-name check), the shared account, keepalive and reconnect
back-off - with the same secure-by-default refusals as the gateway's settings: plain TCP to a
broker off loopback only with `allow_plaintext`, TLS files loaded at validation so a wrong
path stops the start. `BootLink` is the structural type `SimBoot` and `SimFleet` accept, so a
caller may still pass any settings object with these fields.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from gateway.mqtt_tls import (
    MQTT_TLS_PORT,
    MqttClientSecurity,
    check_mqtt_transport,
)

# Nagle's algorithm would hold a small state or event packet back behind an unacked one; the
# gateway's link sets the same option (gateway/mqtt_link.py) for its vents.
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


class BootLink(MqttClientSecurity, Protocol):
    """What a boot's link reads of its settings (TLS and account fields, plus these)."""

    @property
    def keepalive_s(self) -> int: ...
    @property
    def reconnect_min_s(self) -> float: ...
    @property
    def reconnect_max_s(self) -> float: ...


class BootLinkSettings(BaseModel):
    """A boot's (or a fleet's shared) broker connection, with defaults right for a boot."""

    # A misspelt option must be an error, not a silent plaintext link; errors must not echo
    # the input (it holds the password).
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = Field(
        None, description="shared broker account of boots without their own credentials")
    password: SecretStr | None = None
    password_file: Path | None = Field(
        None, description="read the shared password from this file, re-read at every connect; "
        "not together with password")
    keepalive_s: int = Field(
        30, ge=5, le=3600, description="MQTT keepalive; the broker publishes the boot's last "
        "will (online: false) after 1.5 times this of silence")
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect back-off")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest reconnect back-off")
    tls: bool = Field(
        False, description="TLS 1.2 or later, the broker's certificate verified (port 8883 "
        "then); plain TCP only to a loopback broker unless allow_plaintext")
    ca_file: Path | None = Field(
        None, description="CA the broker's certificate must chain to; unset: system store")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="unencrypted key of cert_file")
    tls_check_hostname: bool = Field(
        True, description="the broker's certificate must name host; off is warned at connect")
    allow_plaintext: bool = Field(
        False, description="permit plain TCP to a broker off loopback (trusted networks only, "
        "warned at connect)")

    @model_validator(mode="after")
    def _secure_transport(self) -> BootLinkSettings:
        # The same refusals, in the same words, as the gateway's MqttSettings (one function):
        # the simulator CLI reports them to whoever runs it.
        if check_mqtt_transport(self) and "port" not in self.model_fields_set:
            self.port = MQTT_TLS_PORT
        return self
