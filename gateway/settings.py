"""Gateway configuration: env vars prefixed `BOOTGW_` (nested with `__`) over an optional TOML file.

Every limit that matters for safety is a named field here with a safe default;
the README and docs/safety.md list them. The file is `BOOTGW_CONFIG_FILE`
(default `bootgw.toml` in the working directory, read only if it exists).
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.contract import SENSOR_MAX_MMHG, SENSOR_MIN_MMHG

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


class InfluxSettings(BaseModel):
    """InfluxDB through its v1-compatible API (1.x natively, 2.x via DBRP mapping + token)."""

    url: str = "http://127.0.0.1:8086"
    database: str = "boots"
    retention_policy: str | None = None
    token: SecretStr | None = Field(None, description="sent as 'Authorization: Token ...' (2.x)")
    create_database: bool = Field(True, description="issue CREATE DATABASE at start (1.x only)")
    batch_size: int = Field(5000, ge=1, le=100_000)
    flush_interval_s: float = Field(1.0, gt=0, le=60)
    queue_max_points: int = Field(
        500_000, ge=100, description="points held in memory; past it the oldest go to the spool"
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
        None, description="if set, every /api call needs 'Authorization: Bearer <token>'"
    )
    max_body_bytes: int = Field(
        65_536, ge=1024, le=16 << 20, description="a request body larger than this is refused "
        "(413) before it is read further; an unauthenticated body is never read at all",
    )

    @field_validator("token")
    @classmethod
    def _not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token would match a request without one: the API would be open while
        # the configuration looks closed.
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("api.token is empty: give a token, or leave it unset")
        return token


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore"
    )

    gateway_id: str = Field("gw-1", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    mqtt: MqttSettings = MqttSettings()
    influx: InfluxSettings = InfluxSettings()
    watchdog: WatchdogSettings = WatchdogSettings()
    programs: ProgramLimits = ProgramLimits()
    api: ApiSettings = ApiSettings()
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
    health_interval_s: float = Field(
        10.0, gt=0, le=3600,
        description="how often the gateway writes and logs its own health (gateway_health)",
    )
    reject_log_interval_s: float = Field(
        60.0, gt=0, description="bad input is logged at most once per device per interval"
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
