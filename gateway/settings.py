"""Gateway configuration: env vars prefixed `BOOTGW_` (nested with `__`) over an optional TOML file.

Every limit that matters for safety is a named field here with a safe default;
the README and docs/safety.md list them. The file is `BOOTGW_CONFIG_FILE`
(default `bootgw.toml` in the working directory, read only if it exists).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from enum import StrEnum
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.api_users import ApiUser, check_users
from gateway.contract import SENSOR_MAX_MMHG, SENSOR_MIN_MMHG
from gateway.redact import redact

ENV_PREFIX = "BOOTGW_"
CONFIG_FILE_ENV = "BOOTGW_CONFIG_FILE"
# `.env.example` and the docs write every secret as `change-me-...`: a stack started from the
# example unchanged must not run with credentials that are public.
PLACEHOLDER_PREFIX = "change-me"


def placeholder_secrets(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the secrets in `model` (recursively) still holding a placeholder."""
    found: list[str] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            if value.get_secret_value().strip().lower().startswith(PLACEHOLDER_PREFIX):
                found.append(prefix + name)
        elif isinstance(value, BaseModel):
            found.extend(placeholder_secrets(value, f"{prefix}{name}."))
    return found


class MqttSettings(BaseModel):
    """The MQTT connection of the gateway; the simulated boots use the same class."""

    # A misspelt setting (`tsl`, `ca_fle`) must be an error, not a silent plaintext link.
    # The errors must not echo the input: it holds the password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    client_id: str = "boot-gateway"
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    session_expiry_s: int = Field(
        3600, ge=0, le=7 * 86400, description="persistent session: the broker keeps the "
        "gateway's subscriptions and queues QoS 1 messages for this long while it is away "
        "(restart, crash); 0 starts clean every time",
    )
    # TLS and credentials (docs/deploy.md §2.1). gateway/mqtt_tls.py turns these into the
    # client's arguments for the gateway and the simulated boots alike.
    tls: bool = Field(
        False, description="connect over TLS 1.2 or later, verifying the broker's certificate "
        "(port defaults to 8883 then); plain TCP is allowed only to a loopback broker unless "
        "allow_plaintext",
    )
    ca_file: Path | None = Field(
        None, description="PEM file of the CA(s) the broker's certificate must chain to; "
        "unset with tls: the system trust store",
    )
    cert_file: Path | None = Field(
        None, description="client certificate (PEM) for mutual TLS; needs key_file",
    )
    key_file: Path | None = Field(
        None, description="unencrypted private key (PEM) of cert_file, readable by the gateway "
        "alone; may be the same file as cert_file",
    )
    tls_check_hostname: bool = Field(
        True, description="the broker's certificate must name `host`; turning this off "
        "(anyone with a certificate from the CA could pose as the broker) is logged as a "
        "warning at every connect",
    )
    allow_plaintext: bool = Field(
        False, description="permit plain TCP to a broker that is not on loopback (127.0.0.0/8, "
        "::1, localhost): credentials, commands and telemetry then cross the network "
        "unencrypted; for a trusted network only, logged as a warning at every connect",
    )
    password_file: Path | None = Field(
        None, description="read the password from this file (container secrets); a trailing "
        "newline is dropped, it is re-read at every connect; not together with password",
    )

    @model_validator(mode="after")
    def _secure_transport(self) -> MqttSettings:
        if check_mqtt_transport(self) and "port" not in self.model_fields_set:
            self.port = MQTT_TLS_PORT
        return self


MQTT_TLS_PORT = 8883


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) or the name `localhost`.

    Names are not resolved: what a name resolves to can change after startup, and a check
    that trusts DNS would let any name that once pointed at 127.0.0.1 go plaintext.
    """
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def read_password_file(path: Path) -> str:
    """The password in `path`, without the trailing newline editors and `echo` add."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        # The error names the file, never its content.
        raise ValueError(f"mqtt.password_file {str(path)!r} cannot be read: "
                         f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    password = text.rstrip("\r\n")
    if not password.strip():
        raise ValueError(f"mqtt.password_file {str(path)!r} is empty")
    return password


class MqttTransport(Protocol):
    """What the transport rules read: the gateway's MqttSettings and a boot's link settings."""

    host: str
    tls: bool
    allow_plaintext: bool
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    password: SecretStr | None
    password_file: Path | None


def check_mqtt_transport(s: MqttTransport) -> bool:
    """Refuse an insecure or inconsistent MQTT transport; True when TLS is on.

    Every refusal names the setting and the way out: these errors are read by whoever
    deploys the gateway or runs the simulator, at startup, not by a developer with a debugger.
    """
    if s.password is not None and s.password_file is not None:
        raise ValueError("mqtt.password and mqtt.password_file are both set: give one")
    if s.password_file is not None:
        read_password_file(s.password_file)
    if (s.cert_file is None) != (s.key_file is None):
        given, missing = ("cert_file", "key_file") if s.cert_file else ("key_file", "cert_file")
        raise ValueError(f"mqtt.{given} is set without mqtt.{missing}: a client certificate "
                         "needs both (they may name the same combined PEM file)")
    tls_files = [n for n in ("ca_file", "cert_file", "key_file") if getattr(s, n)]
    if not s.tls:
        if tls_files:
            raise ValueError(f"mqtt.{tls_files[0]} is set but mqtt.tls is false: set "
                             "mqtt.tls=true, or the file would silently not be used")
        if not s.allow_plaintext and not is_loopback_host(s.host):
            raise ValueError(
                f"mqtt.host {s.host!r} is not loopback and mqtt.tls is false: "
                "credentials, commands and telemetry would cross the network unencrypted. "
                "Set mqtt.tls=true (port 8883, mqtt.ca_file for a private CA) or, on a "
                "trusted network only, mqtt.allow_plaintext=true")
        return False
    _check_tls_files(s.ca_file, s.cert_file, s.key_file)
    return True


def _check_tls_files(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> None:
    """Load the TLS files once so that a wrong path or a bad PEM stops the start, not the
    first connect; the system trust store (ca_file unset) is not loaded here (it is slow)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    checks: list[tuple[str, Path | None]] = [("ca_file", ca_file), ("cert_file", cert_file),
                                             ("key_file", key_file)]
    for name, path in checks:
        if path is not None and not path.is_file():
            raise ValueError(f"mqtt.{name} {str(path)!r}: no such file")
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except ssl.SSLError as exc:
            raise ValueError(f"mqtt.ca_file {str(ca_file)!r} holds no usable PEM "
                             f"certificate: {exc.reason or exc}") from None
    if cert_file is not None and key_file is not None:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file), password=_no_key_password)
        except _EncryptedKey:
            raise ValueError(f"mqtt.key_file {str(key_file)!r} is encrypted: give an "
                             "unencrypted key and protect it by file permissions") from None
        except ssl.SSLError as exc:
            raise ValueError(f"mqtt.cert_file {str(cert_file)!r} / key_file "
                             f"{str(key_file)!r}: not a certificate and its matching key "
                             f"({exc.reason or exc})") from None


class _EncryptedKey(Exception):
    pass


def _no_key_password() -> str:
    """Called by OpenSSL for an encrypted key. Without it OpenSSL would prompt on the
    terminal: a service without one would stall at startup."""
    raise _EncryptedKey


class InfluxSettings(BaseModel):
    """InfluxDB through its v1-compatible API (1.x natively, 2.x via DBRP mapping + token)."""

    # A misspelt setting (`verify_tsl`) must be an error, not a silently unverified link;
    # a refusal must not print the input, which holds the password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    url: str = Field(
        "http://127.0.0.1:8086", description="https:// for any InfluxDB that is not on "
        "loopback; plain http:// to another host is refused unless allow_plaintext",
    )
    database: str = "boots"
    retention_policy: str | None = None
    token: SecretStr | None = Field(None, description="sent as 'Authorization: Token ...' (2.x)")
    username: str | None = Field(
        None, description="InfluxDB 1.x user: sent with `password` as HTTP basic auth, so the "
        "credentials never appear in a URL; not together with token",
    )
    password: SecretStr | None = Field(None, description="the password of `username`")
    ca_file: Path | None = Field(
        None, description="PEM file of the CA(s) InfluxDB's certificate must chain to (https); "
        "unset: the system trust store",
    )
    verify_tls: bool = Field(
        True, description="verify InfluxDB's certificate and host name; false (anyone on the "
        "path could read the data and the credentials) is logged as a warning at start",
    )
    allow_plaintext: bool = Field(
        False, description="permit http:// to an InfluxDB that is not on loopback (127.0.0.0/8, "
        "::1, localhost): data and credentials then cross the network unencrypted; for a "
        "trusted network only, logged as a warning at start",
    )
    create_database: bool = Field(True, description="issue CREATE DATABASE at start (1.x only)")
    batch_size: int = Field(5000, ge=1, le=100_000)
    flush_interval_s: float = Field(1.0, gt=0, le=60)
    queue_max_points: int = Field(
        500_000, ge=100, description="points held in memory while the spool cannot take them "
        "(none configured, its disk failing); past it the newest telemetry is dropped, counted",
    )
    spill_after_points: int = Field(
        20_000, ge=100, description="points held in memory while the spool can take them (at "
        "least two batches); past it the oldest batch goes to disk, so an InfluxDB slower "
        "than ingest costs disk, not memory, and a SIGKILL loses less",
    )
    timeout_s: float = Field(10.0, gt=0)
    retry_min_s: float = Field(0.2, gt=0, description="first retry delay after a failed write")
    retry_max_s: float = Field(30.0, gt=0, description="retry delay cap (exponential, jittered)")
    spool_dir: Path | None = Field(
        Path("spool"), description="disk spool for batches InfluxDB could not take; unset: none"
    )
    spool_max_bytes: int = Field(
        1 << 30, ge=1 << 20, description="spool cap; past it new telemetry is refused (counted) "
        "while safety records keep a 5 % reserve",
    )
    spool_fsync: bool = Field(False, description="fsync each spooled batch (power-loss safe)")
    spool_retry_s: float = Field(
        5.0, gt=0, le=300, description="while the spool's disk fails (full, read-only, I/O "
        "error) it is tried again this often; meanwhile points wait in memory (up to "
        "queue_max_points, then counted drops) and go to InfluxDB if it is up",
    )

    @model_validator(mode="after")
    def _secure_link(self) -> InfluxSettings:
        # Refusals name the setting and the way out: they are read at startup by whoever
        # deploys the gateway.
        scheme, _, rest = self.url.partition("://")
        host = urlsplit(self.url).hostname if rest else None
        if scheme.lower() not in ("http", "https") or not host:
            raise ValueError(f"influx.url {redact(self.url)!r} is not an http(s):// URL")
        if (scheme.lower() == "http" and not self.allow_plaintext
                and not is_loopback_host(host)):
            raise ValueError(
                f"influx.url {redact(self.url)!r} is plain http to a host that is not loopback: "
                "data and credentials would cross the network unencrypted. Use https:// "
                "(influx.ca_file for a private CA) or, on a trusted network only, "
                "influx.allow_plaintext=true")
        if (self.username is None) != (self.password is None):
            raise ValueError("influx.username and influx.password go together: give both")
        if self.username is not None and self.token is not None:
            raise ValueError("influx.token and influx.username are both set: give one "
                             "(token for 2.x, username/password for 1.x)")
        if self.ca_file is not None:
            if not self.ca_file.is_file():
                raise ValueError(f"influx.ca_file {str(self.ca_file)!r}: no such file")
            try:
                ssl.create_default_context(cafile=str(self.ca_file))
            except ssl.SSLError as exc:
                raise ValueError(f"influx.ca_file {str(self.ca_file)!r} holds no usable PEM "
                                 f"certificate: {exc.reason or exc}") from None
        return self


class WatchdogSettings(BaseModel):
    """Limits of the safety rules (see docs/safety.md). Defaults err on the side of venting."""

    hard_ceiling_mmhg: float = Field(
        120.0, gt=0, le=200, description="rule 1: absolute ceiling, also capped by device max "
        "and clinic ceiling"
    )
    over_target_tolerance_mmhg: float = Field(
        15.0, ge=0, le=50, description="rule 2: how far above its program target a chamber may go"
    )
    over_target_samples: int = Field(
        3, ge=1, le=20, description="rule 2: consecutive samples above target+tolerance to vent"
    )
    telemetry_loss_periods: float = Field(
        6.0, ge=2, description="rule 5: silence limit in multiples of the boot's telemetry period"
    )
    telemetry_loss_floor_s: float = Field(
        3.0, gt=0, le=60, description="rule 5: silence limit never shorter than this"
    )
    receive_backlog_grace_s: float = Field(
        1.0, ge=0, le=5, description="rule 5: how long past its silence limit a boot's vent "
        "may wait while input is still unread in the gateway's MQTT socket (its samples may "
        "be in there, after a stall of the gateway's own loop); counted once per silence, so "
        "no traffic defers a vent by more than this",
    )
    inflated_level_mmhg: float = Field(
        20.0, gt=0, le=60, description="rule 3: a chamber above this counts as inflated"
    )
    sustained_inflation_grace_s: float = Field(
        5.0, ge=0, le=60, description="rule 3: allowed beyond the program's longest inflation"
    )
    max_inflation_s: float = Field(
        120.0, gt=0, le=600, description="rule 3: longest continuous inflation in any case, "
        "also outside a session"
    )
    overrun_grace_s: float = Field(
        30.0, ge=0, le=600, description="rule 4: allowed beyond the program's duration"
    )
    plausible_min_mmhg: float = Field(
        -10.0, ge=SENSOR_MIN_MMHG, le=0, description="rule 6: readings below this are implausible"
    )
    plausible_max_mmhg: float = Field(
        250.0, gt=0, le=SENSOR_MAX_MMHG,
        description="rule 6: readings above this are implausible"
    )
    safe_level_mmhg: float = Field(
        10.0, ge=0, le=40, description="rule 8: a vented chamber counts as safe below this"
    )
    vent_confirm_deadline_s: float = Field(
        5.0, gt=0, le=60, description="rule 8: every chamber below the safe level by then, "
        "or the vent is re-sent and a high-priority alarm raised"
    )
    vent_resend_max: int = Field(
        10, ge=1, le=1000, description="rule 8: re-sends per episode before only alarming"
    )
    tick_interval_s: float = Field(
        0.1, gt=0, le=5, description="how often time-based rules (4, 5, 8) are evaluated"
    )


class Intensity(StrEnum):
    VERY_LOW = "very_low"
    LOW = "low"
    LOW_MODERATE = "low_moderate"
    MODERATE = "moderate"


class ProgramLimits(BaseModel):
    """Checks applied to every program before it is sent (rule 9)."""

    clinic_ceiling_mmhg: float = Field(100.0, gt=0, le=200, description="default clinic ceiling")
    clinic_ceilings: dict[str, float] = Field(
        default_factory=dict, description="per-clinic ceilings overriding the default"
    )
    ceiling_margin_mmhg: float = Field(
        5.0, ge=0, le=50, description="rule 9: a target must stay this far below the ceiling, "
        "so a boot's regulation overshoot and sensor noise do not trip rule 1",
    )
    min_pressure_mmhg: float = Field(20.0, ge=0)
    min_cycle_s: float = Field(20.0, gt=0, description="shortest inflate/deflate cycle")
    min_release_s: float = Field(
        4.0, ge=0, le=60, description="rule 9: deflate_s + pause_s at least this (and at "
        "least two telemetry periods of the boot), so every chamber empties each cycle and "
        "the watchdog sees it empty",
    )
    max_cycle_s: float = Field(60.0, gt=0, description="longest inflate/deflate cycle")
    min_duration_s: float = Field(600.0, gt=0, description="shortest session")
    max_duration_s: float = Field(2400.0, gt=0, description="longest session")
    intensity_mmhg: dict[Intensity, float] = Field(
        default_factory=lambda: {
            Intensity.VERY_LOW: 40.0,
            Intensity.LOW: 50.0,
            Intensity.LOW_MODERATE: 60.0,
            Intensity.MODERATE: 70.0,
        },
        description="calf pressure for each intensity word; a clinic may change it",
    )
    start_expiry_s: float = Field(
        10.0, gt=0, le=300, description="a start command not executed within this is void"
    )

    def ceiling_for(self, clinic: str) -> float:
        return self.clinic_ceilings.get(clinic, self.clinic_ceiling_mmhg)


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: SecretStr | None = Field(
        None, description="the simple setup: one shared bearer token, the 'ops' user named "
        "'token' (every /api call needs 'Authorization: Bearer <token>')"
    )
    users: list[ApiUser] = Field(
        default_factory=list, max_length=1000, description="API users, each with a role "
        "(front_desk, manager, ops) and the SHA-256 of its token (`boot-gateway users new`); "
        "TOML [[api.users]] or JSON in BOOTGW_API__USERS",
    )
    allow_anonymous: bool = Field(
        False, description="run the API open: every caller is the 'ops' user 'anonymous'. "
        "Without it, and with no user and no token, the gateway refuses to start",
    )
    max_body_bytes: int = Field(
        65_536, ge=1024, le=16 << 20, description="a request body larger than this is refused "
        "(413) before it is read further; an unauthenticated body is never read at all",
    )
    audit_keep: int = Field(
        1000, ge=10, le=100_000, description="audit records kept in memory for "
        "GET /api/v1/audit (the newest; all of them go to the log and InfluxDB)",
    )

    @field_validator("token")
    @classmethod
    def _not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token would match a request without one: the API would be open while
        # the configuration looks closed.
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("api.token is empty: give a token, or leave it unset")
        return token

    @model_validator(mode="after")
    def _users_consistent(self) -> ApiSettings:
        check_users(self)
        return self


class BrokerAdminSettings(BaseModel):
    """The broker's dynamic-security admin account (docs/deploy.md §2.2), for the provisioning
    commands `boot-gateway boots ...` and `broker init` only. The running gateway never uses
    it: a gateway that could create broker accounts would turn one compromised gateway into a
    compromised fleet. Connects with the gateway's mqtt host, port and TLS settings."""

    model_config = ConfigDict(extra="forbid")

    username: str = Field(
        "bootgw-admin", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the admin's broker "
        "username; no boot may have it as its device id",
    )
    client_id: str = Field(
        "bootgw-admin", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the admin's client "
        "id, bound to its account by `broker init` (the account logs in with this id only)",
    )
    password: SecretStr | None = Field(None, description="the admin's password; or "
                                       "password_file, not both")
    password_file: Path | None = Field(
        None, description="file holding the admin's password (a trailing newline is "
        "dropped); `broker init` creates it, mode 0600, when it does not exist yet",
    )
    timeout_s: float = Field(
        10.0, gt=0, le=120, description="how long a provisioning command waits for the broker "
        "(connect, each control-topic answer) before it fails",
    )
    min_password_chars: int = Field(
        16, ge=12, le=1024, description="a password given to `broker init` or `boots add "
        "--password-stdin` shorter than this is refused (generated ones are 32 characters)",
    )

    @model_validator(mode="after")
    def _one_password(self) -> BrokerAdminSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("broker_admin.password and broker_admin.password_file are both "
                             "set: give one")
        return self


class CoordinationSettings(BaseModel):
    """Several gateways sharing the clinics through etcd (docs/deploy.md §4). No endpoints:
    this gateway is the only one and watches every clinic, as a single gateway always has."""

    model_config = ConfigDict(extra="forbid")

    etcd_endpoints: list[str] = Field(
        default_factory=list, description="client URLs of every etcd member (http(s)://host:"
        "port); the gateway moves to the next one when one does not answer. Plain http:// "
        "to a host that is not loopback is refused unless allow_plaintext",
    )
    prefix: str = Field(
        "/boot-gateway", pattern=r"^/[A-Za-z0-9_./-]{1,100}$", description="the etcd keys "
        "of this fleet's gateways live under it: members/, owners/, clinics/",
    )
    lease_ttl_s: int = Field(
        2, ge=2, le=10, description="the TTL of this gateway's etcd lease: a dead gateway's "
        "clinics are free this long (plus up to 0.5 s of etcd's expiry check) after its last "
        "keep-alive. Well inside the boots' heartbeat timeout (3 x heartbeat_interval_s)",
    )
    lease_margin_s: float = Field(
        0.25, ge=0.05, le=5, description="the gateway stops acting for its clinics this long "
        "before its lease could run out in etcd, for clock rates that differ",
    )
    request_timeout_s: float = Field(
        0.5, gt=0, le=10, description="one etcd request's timeout, per endpoint: a member that "
        "hangs must not hold the keep-alive past the lease",
    )
    allow_plaintext: bool = Field(
        False, description="permit http:// to an etcd that is not on loopback (anyone on the "
        "path could take clinics over); for a trusted network only",
    )
    clinic_client_prefix: str = Field(
        "bootgw-clinic-", pattern=r"^[A-Za-z0-9_-]{1,40}$", description="the MQTT client id "
        "of a clinic's session is this plus the clinic id, the same on every gateway: whoever "
        "watches the clinic takes the session over, with what the broker queued for it",
    )

    @model_validator(mode="after")
    def _secure_link(self) -> CoordinationSettings:
        for url in self.etcd_endpoints:
            scheme, _, rest = url.partition("://")
            host = urlsplit(url).hostname if rest else None
            if scheme.lower() not in ("http", "https") or not host:
                raise ValueError(f"coordination.etcd_endpoints: {redact(url)!r} is not an "
                                 "http(s):// URL")
            if scheme.lower() == "http" and not self.allow_plaintext \
                    and not is_loopback_host(host):
                raise ValueError(
                    f"coordination.etcd_endpoints: {redact(url)!r} is plain http to a host that "
                    "is not loopback: use https:// or, on a trusted network only, "
                    "coordination.allow_plaintext=true")
        if self.lease_margin_s >= self.lease_ttl_s / 2:
            raise ValueError("coordination.lease_margin_s must be under half of lease_ttl_s")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.etcd_endpoints)


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore",
        # A refused setting must not echo its input: that would print passwords and
        # tokens into the startup error (and the container log).
        hide_input_in_errors=True,
    )

    gateway_id: str = Field("gw-1", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    mqtt: MqttSettings = MqttSettings()
    influx: InfluxSettings = InfluxSettings()
    watchdog: WatchdogSettings = WatchdogSettings()
    programs: ProgramLimits = ProgramLimits()
    api: ApiSettings = ApiSettings()
    broker_admin: BrokerAdminSettings = BrokerAdminSettings()
    coordination: CoordinationSettings = CoordinationSettings()
    max_payload_bytes: int = Field(16_384, ge=256, le=1_048_576)
    command_ack_timeout_s: float = Field(
        5.0, gt=0, le=120, description="how long a boot has to ack a stop or vent; a start has "
        "this plus programs.start_expiry_s, since a boot may accept it until it expires",
    )
    session_journal: Path | None = Field(
        Path("state/sessions.jsonl"), description="the open sessions, kept on disk so that "
        "after a restart every session still gets its one outcome; unset: none",
    )
    reconcile_window_s: float = Field(
        10.0, gt=0, le=300, description="after a restart, how long the broker's queued events "
        "may take to say how a journalled session ended before it is recorded 'lost'",
    )
    session_end_grace_s: float = Field(
        2.0, gt=0, le=60, description="a boot whose messages stop showing its session has this "
        "long to send the terminal event before the session is recorded 'lost'",
    )
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60)
    heartbeat_fleet_topic: bool = Field(
        True, description="also publish the fleet-wide heartbeat (boots/v1/_gateway/heartbeat)"
        " that boots of protocol revision 1 time out on; with several gateways such a boot "
        "vents itself only when every gateway is gone, not when its clinic's owner is",
    )
    health_interval_s: float = Field(
        10.0, gt=0, le=3600,
        description="how often the gateway writes and logs its own health (gateway_health)",
    )
    reject_log_interval_s: float = Field(
        60.0, gt=0, description="bad input is logged at most once per device per interval"
    )
    device_fault_points_per_s: float = Field(
        20.0, gt=0, le=10_000, description="bad input is stored as device_fault points at "
        "most this often on average (bursts of 10 s worth pass): a flood of junk must not "
        "fill InfluxDB or the spool's reserve for safety records; the rest is counted "
        "(device_faults_unrecorded) and every rejection still counted by kind",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> GatewaySettings:
        if names := placeholder_secrets(self):
            raise ValueError(f"{', '.join(names)}: still the placeholder from .env.example "
                             "or the docs; set a real secret")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get(CONFIG_FILE_ENV, "bootgw.toml")
        toml = TomlConfigSettingsSource(settings_cls, toml_file=path)
        return (init_settings, env_settings, toml, file_secret_settings)
