"""TLS and password of an MQTT client, from its settings: for the gateway and the boots alike.

One function, `client_security`, turns the settings into `aiomqtt.Client` keyword arguments,
so the gateway's link and the simulated boots cannot drift apart in how they verify the broker.
It depends on the settings only (no gateway internals), so the device side may import it.

The context is strict on purpose: TLS 1.2 or later, the broker's certificate must chain to
the configured CA (or the system trust store) and, unless explicitly turned off, name the host
dialled. Turning the host-name check off, or going plaintext to a broker off loopback, is
logged as a warning at connect: both are allowed, neither is quiet.
"""

from __future__ import annotations

import functools
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

# The transport rules live with the gateway's MqttSettings (settings.py cannot import this
# module); they are re-exported here so that the boot's own settings (device_sim/
# link_settings.py) apply the very same checks without importing the gateway's config.
from gateway.settings import (
    MQTT_TLS_PORT,
    check_mqtt_transport,
    is_loopback_host,
    read_password_file,
)

__all__ = [
    "MQTT_TLS_PORT", "TLS_MIN_VERSION", "MqttClientSecurity", "check_mqtt_transport",
    "client_security", "is_loopback_host", "mqtt_password", "read_password_file", "tls_context",
]

log = logging.getLogger(__name__)

TLS_MIN_VERSION = ssl.TLSVersion.TLSv1_2


class MqttClientSecurity(Protocol):
    """What this module reads of a client's settings: the gateway's `MqttSettings` has it,
    and so can the simulator's own settings, without either importing the other's config."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> SecretStr | None: ...
    @property
    def password_file(self) -> Path | None: ...
    @property
    def tls(self) -> bool: ...
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def cert_file(self) -> Path | None: ...
    @property
    def key_file(self) -> Path | None: ...
    @property
    def tls_check_hostname(self) -> bool: ...
    @property
    def allow_plaintext(self) -> bool: ...


@dataclass(frozen=True)
class _TlsKey:
    """What a TLS context depends on (and what its warnings name): hashable, for sharing."""

    host: str
    port: int
    tls: bool
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    check_hostname: bool
    allow_plaintext: bool

    @classmethod
    def of(cls, mqtt: MqttClientSecurity) -> _TlsKey:
        return cls(mqtt.host, mqtt.port, mqtt.tls, mqtt.ca_file, mqtt.cert_file, mqtt.key_file,
                   mqtt.tls_check_hostname, mqtt.allow_plaintext)


def _build_context(key: _TlsKey) -> ssl.SSLContext | None:
    """A fresh context from the files as they are now (so renewed certificates are used)."""
    broker = f"{key.host}:{key.port}"
    if not key.tls:
        if not is_loopback_host(key.host):  # only possible with allow_plaintext (validated)
            log.warning("mqtt without TLS to a broker off loopback (allow_plaintext): "
                        "credentials and telemetry cross the network unencrypted",
                        extra={"broker": broker})
        return None
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(key.ca_file) if key.ca_file else None)
    ctx.minimum_version = TLS_MIN_VERSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    if key.cert_file is not None:
        ctx.load_cert_chain(str(key.cert_file), str(key.key_file) if key.key_file else None,
                            password=_no_password)
    ctx.check_hostname = key.check_hostname
    if not key.check_hostname:
        log.warning("mqtt TLS host-name check is off (tls_check_hostname=false): any "
                    "certificate from the CA is accepted as the broker's",
                    extra={"broker": broker})
    return ctx


@functools.lru_cache(maxsize=32)
def _shared_context(key: _TlsKey) -> ssl.SSLContext | None:
    return _build_context(key)


def _no_password() -> str:
    # An encrypted key would make OpenSSL prompt on a terminal; settings validation refuses
    # one, this is for a key replaced by an encrypted one after startup.
    raise ValueError("mqtt.key_file is encrypted: give an unencrypted key")


def tls_context(mqtt: MqttClientSecurity, *, shared: bool = False) -> ssl.SSLContext | None:
    """The client's SSL context, None for plain TCP.

    shared: one context per distinct configuration and process, built (and warned about)
    once. For fleets of simulated boots: loading the system trust store for each of thousands
    of boots would cost seconds of CPU. The gateway builds a fresh one at every connect.
    """
    key = _TlsKey.of(mqtt)
    return _shared_context(key) if shared else _build_context(key)


def mqtt_password(mqtt: MqttClientSecurity) -> str | None:
    """`password`, or the content of `password_file` as it is now (a rotated secret is used
    at the next connect)."""
    if mqtt.password is not None:
        return mqtt.password.get_secret_value()
    if mqtt.password_file is not None:
        return read_password_file(mqtt.password_file)
    return None


def client_security(mqtt: MqttClientSecurity, *, shared: bool = False) -> dict[str, Any]:
    """`aiomqtt.Client` keyword arguments: `username`, `password` and `tls_context`.

    Raises ValueError / OSError / ssl.SSLError when a file named by the settings cannot be
    used (the messages name the file, never a secret).
    """
    return {
        "username": mqtt.username,
        "password": mqtt_password(mqtt),
        "tls_context": tls_context(mqtt, shared=shared),
    }
