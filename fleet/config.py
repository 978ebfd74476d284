"""Controller settings: init (CLI) > environment (EDGESHIP_FLEET_*) > TOML file > defaults.

Resolved when `FleetSettings.load()` is called, never at import time. The TOML file is the one
named by `--config` or EDGESHIP_FLEET_CONFIG; no file is read unless one is named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from agent.protocol import DEFAULT_PREFIX, Topics
from fleet.errors import ConfigError


def default_data_dir() -> Path:
    base = os.environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=
    if base:
        return Path(base)
    return Path.home() / ".local" / "share" / "edgeship" / "fleet"


class FleetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGESHIP_FLEET_", extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None  # default: sqlite file in data_dir
    database_schema: str | None = None  # PostgreSQL only: schema to live in (created if absent)

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_ca_file: Path | None = None  # CA of the broker's certificate (mqtts://; system CAs when unset)
    # Client certificate login (the shipped broker's port 8883): the certificate's CN is the MQTT
    # username, `fleet@controller` for `edgeship fleet ca client-cert`.
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    mqtt_client_id: str = "edgeship-fleet"
    # Set to a group name to subscribe through $share/<group>/... (EMQX, HiveMQ, mosquitto 2).
    mqtt_shared_group: str | None = None
    mqtt_keepalive_s: int = 30
    topic_prefix: str = DEFAULT_PREFIX

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8470, ge=0, le=65535)
    public_url: str | None = None  # base URL devices download bundles from
    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    trusted_keys: list[Path] = []
    # the largest bundle `bundle push` accepts: a 7B int4 bundle is about 4 GiB, fp16 about 14 GiB
    max_upload_bytes: int = Field(default=16 * 1024**3, ge=1)

    tick_interval_s: float = Field(default=0.5, gt=0)
    batch_max: int = Field(default=5000, ge=1)
    resend_interval_s: float = Field(default=30.0, gt=0)
    heartbeat_timeout_s: float = Field(default=180.0, gt=0)  # silent this long -> offline
    log_level: str = "INFO"

    config_file: Path | None = Field(default=None, exclude=True)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        Topics(v)
        return v

    @field_validator("mqtt_ca_file", "mqtt_cert_file", "mqtt_key_file")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"no such file: {v}")
        return v

    @model_validator(mode="after")
    def _client_certificate(self) -> FleetSettings:
        if (self.mqtt_cert_file is None) != (self.mqtt_key_file is None):
            raise ValueError("mqtt_cert_file and mqtt_key_file go together (client certificate); set both or neither")
        if self.mqtt_cert_file is not None and urlsplit(self.mqtt_url).scheme != "mqtts":
            raise ValueError(f"a client certificate needs TLS: make mqtt_url mqtts://HOST:8883, not {self.mqtt_url!r}")
        return self

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"mqtt_url {v!r} must look like mqtt://host:1883 or mqtts://host:8883")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get("path")
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> FleetSettings:
        """Resolve settings now; every problem is one ConfigError line."""
        path = config_file or (Path(os.environ["EDGESHIP_FLEET_CONFIG"]) if os.environ.get("EDGESHIP_FLEET_CONFIG") else None)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"config file {path} not found; pass an existing TOML file to --config")
        _CONFIG_FILE["path"] = path
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"setting {loc}: {err['msg']} (env EDGESHIP_FLEET_{loc.upper()} or {path or 'config file'})") from None
        except ValueError as exc:  # TOML syntax
            raise ConfigError(f"config file {path}: {exc}") from None
        finally:
            _CONFIG_FILE["path"] = None

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fleet.db'}"

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")

    def token(self) -> str:
        """The API bearer token; the controller refuses to serve without one."""
        if self.api_token is not None and self.api_token.get_secret_value():
            return self.api_token.get_secret_value()
        if self.api_token_file is not None:
            try:
                value = self.api_token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"api_token_file {self.api_token_file} cannot be read: {exc.strerror}") from None
            if value:
                return value
        raise ConfigError("no API token: set EDGESHIP_FLEET_API_TOKEN or api_token_file (e.g. `openssl rand -hex 32`)")


# settings_customise_sources is a classmethod without arguments for the file; load() passes it here.
_CONFIG_FILE: dict[str, Path | None] = {"path": None}
