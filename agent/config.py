"""The agent's configuration (pydantic-settings), resolved when `load_settings` is called.

Sources, highest first (docs/AGENT.md):

    1. CLI overrides          `edgeship agent run --device-id ... --label k=v --set broker.url=...`
    2. environment            EDGESHIP_AGENT_<FIELD>, nested with `__`: EDGESHIP_AGENT_BROKER__URL
    3. TOML file              /etc/edgeship/agent.toml, or `--config PATH` / EDGESHIP_AGENT_CONFIG
    4. defaults               configs/agent.toml lists every one of them

Errors:

    ConfigError(ValueError)   `.lines`: one line per bad field, "path: problem (got value)"
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as _PydanticSettingsError
from pydantic_settings import TomlConfigSettingsSource

from agent.bundle.manifest import NAME_RE as BUNDLE_NAME
from agent.liveness import LivenessPolicy
from agent.protocol import DEFAULT_PREFIX, Topics, check_device_id

DEFAULT_CONFIG = Path("/etc/edgeship/agent.toml")
MACHINE_ID = Path("/etc/machine-id")
ENV_PREFIX = "EDGESHIP_AGENT_"
LABEL_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class ConfigError(ValueError):
    """Invalid configuration; `.lines` holds one line per bad field."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Section):
    """The MQTT broker and how to reach it."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None  # CA bundle for mqtts:// (system CAs when unset)
    cert_file: Path | None = None  # client certificate for mTLS (needs key_file)
    key_file: Path | None = None
    topic_prefix: str = DEFAULT_PREFIX
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    buffer_size: int = Field(default=256, ge=1, le=100_000)  # state changes/acks/events kept while offline

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must be mqtt://host[:port] or mqtts://host[:port]")
        try:
            parts.port
        except ValueError:
            raise ValueError("port must be a number 1-65535") from None
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError("put credentials in broker.username/password, not in the URL; no path or query")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        Topics(v)
        return v

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("no such file")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> BrokerSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mTLS); set both or neither")
        if self.password is not None and self.username is None:
            raise ValueError("password without username; set broker.username too")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)


class ApiSettings(_Section):
    """The local OpenAI-compatible HTTP API."""

    bind: str = "127.0.0.1:8321"  # host:port, or unix:/path/to/socket
    queue_size: int = Field(default=8, ge=1, le=10_000)  # requests waiting or running; more get 503
    request_timeout_s: float = Field(default=120.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, ge=0)  # on SIGTERM, how long in-flight requests may finish
    max_connections: int = Field(default=64, ge=1, le=100_000)  # open connections; more get 503 and are closed
    read_timeout_s: float = Field(default=10.0, gt=0, le=3600)  # to send a whole request (headers and body)
    # Host names besides loopback and the bound address that reach this agent (a proxy, a local DNS name)
    allowed_hosts: list[str] = []
    token_file: Path | None = None  # a file holding a bearer token every route but /healthz then requires
    max_body_bytes: int = Field(default=4 << 20, ge=1 << 10, le=1 << 30)  # a larger request body gets 413, unread
    # generations decoded together, one model call per token for all (continuous batching; 1: one at a time).
    # 4 measured best on 2 cores (bench/serve_vs_llama_cpp.py, docs/AGENT.md "Concurrent requests")
    max_batch: int = Field(default=4, ge=1, le=256)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        parse_bind(v)
        return v

    @property
    def unix_socket(self) -> Path | None:
        return parse_bind(self.bind)[2]

    @property
    def host(self) -> str:
        return parse_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return parse_bind(self.bind)[1]


class RuntimeSettings(_Section):
    """Inference runtime."""

    threads: int = Field(default=0, ge=0, le=1024)  # 0 = the CPUs this process may really use
    providers: list[str] = []  # empty = the bundle target's order, falling back to CPU
    # idle inference threads spin-wait between ops instead of sleeping: up to +16% decode on cores the model has
    # to itself; false when other CPU-heavy processes share the cores (spinning then steals them)
    spin_wait: bool = True
    # the repacked weights on 2 MiB pages (transparent huge pages, MADV_COLLAPSE) while loading: decode +6-12 %
    huge_pages: bool = True
    # the KV cache of the generations batched together stays within this; a request that does not fit
    # waits for room, and one answer alone is capped to what fits (docs/AGENT.md "Concurrent requests")
    kv_cache_mb: int = Field(default=512, ge=16, le=1 << 20)
    # the KV of recent prompts and answers kept for a next request that starts the same way (its time to first
    # token); 0 keeps none
    prefix_cache_mb: int = Field(default=256, ge=0, le=1 << 20)


class WatchSettings(_Section):
    """Defaults for watching a new model after a switch (a deploy command may override them)."""

    window_s: float = Field(default=60.0, ge=0)
    min_requests: int = Field(default=0, ge=0)
    min_judged_requests: int = Field(default=0, ge=0)  # fewer since the switch: not judged (5 at least)
    max_error_rate_increase: float | None = Field(default=0.05, ge=0, le=1)  # over the old model's measured rate
    max_error_rate: float | None = Field(default=None, ge=0, le=1)  # an absolute ceiling on top, if set
    max_p95_ratio: float = Field(default=2.0, gt=0)


class LivenessSettings(_Section):
    """The systemd watchdog pings only while inference is proven to answer (agent/liveness.py)."""

    probe_interval_s: float = Field(default=10.0, gt=0, le=3600)
    max_silence_s: float = Field(default=150.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> LivenessSettings:
        self.policy()  # the policy checks its own rule
        return self

    def policy(self) -> LivenessPolicy:
        return LivenessPolicy(interval_s=self.probe_interval_s, max_silence_s=self.max_silence_s)


class DownloadSettings(_Section):
    """How bundles are fetched from the controller or a mirror."""

    timeout_s: float = Field(default=30.0, gt=0)  # per socket operation; a hanging server fails after this
    retries: int = Field(default=4, ge=0, le=100)  # extra attempts after the first, over all URLs
    limit_bps: int = Field(default=0, ge=0)  # bandwidth cap in bytes/s; 0 = no cap


def parse_bind(value: str) -> tuple[str, int, Path | None]:
    """('127.0.0.1', 8321, None) or ('', 0, Path(sock)) for 'unix:/run/x.sock' or '/run/x.sock'."""
    if value.startswith("unix:") or value.startswith("/"):
        path = Path(value.removeprefix("unix:"))
        if not path.is_absolute():
            raise ValueError("a unix socket path must be absolute, e.g. unix:/run/edgeship/api.sock")
        return "", 0, path
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("use host:port (e.g. 127.0.0.1:8321) or unix:/path/to/socket")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host {host!r} must be an IP address or localhost") from None
    return host, int(port), None


def _split_pairs(value: Any, what: str) -> Any:
    """'a=1,b=2' or JSON (from the environment) -> dict; dicts pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        return json.loads(text)
    pairs = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"{what} must be key=value pairs separated by commas")
        pairs[key.strip()] = val.strip()
    return pairs


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        return json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
    return value


def machine_id(path: Path = MACHINE_ID) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


_toml_path: ContextVar[Path | None] = ContextVar("edgeship_agent_toml", default=None)


class AgentSettings(BaseSettings):
    """Everything `edgeship agent run` can be told; every option is in configs/agent.toml."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    device_id: str | None = None  # default: /etc/machine-id
    labels: Annotated[dict[str, str], NoDecode] = {}
    # bundle names this device may run (e.g. ["smollm2-chat"]); empty = any, but a deploy that changes the
    # active bundle's name must still say it `replaces` it
    bundle_names: Annotated[list[str], NoDecode] = []
    state_dir: Path = Path("/var/lib/edgeship")
    trusted_keys: Annotated[list[Path], NoDecode] = []
    heartbeat_interval_s: float = Field(default=30.0, ge=1, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    broker: BrokerSettings = BrokerSettings()
    api: ApiSettings = ApiSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    watch: WatchSettings = WatchSettings()
    download: DownloadSettings = DownloadSettings()
    liveness: LivenessSettings = LivenessSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_toml_path.get())
        return init_settings, env_settings, toml

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return None if v is None else check_device_id(v)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_in(cls, v: Any) -> Any:
        return _split_pairs(v, "labels")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, val in v.items():
            if not key or len(key) > 64 or set(key) - LABEL_KEY_CHARS:
                raise ValueError(f"label key {key!r} must be 1-64 of A-Z a-z 0-9 . _ -")
            if len(val) > 128:
                raise ValueError(f"label {key!r} value is longer than 128 characters")
        if len(v) > 32:
            raise ValueError("at most 32 labels")
        return v

    @field_validator("bundle_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not BUNDLE_NAME.match(n)]
        if bad:
            raise ValueError(f"bundle name {bad[0]!r} is not a bundle name (1-64 of a-z 0-9 . _ -, as in a manifest)")
        return v

    @field_validator("trusted_keys", "bundle_names", mode="before")
    @classmethod
    def _lists_in(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("trusted_keys")
    @classmethod
    def _keys(cls, v: list[Path]) -> list[Path]:
        missing = [str(p) for p in v if not p.is_file()]
        if missing:
            raise ValueError(f"no such key file: {', '.join(missing)}")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _fill_device_id(self) -> AgentSettings:
        if self.device_id is None:
            mid = machine_id()
            if mid is None:
                raise ValueError(f"no device_id and {MACHINE_ID} is unreadable; set device_id or {ENV_PREFIX}DEVICE_ID")
            self.device_id = check_device_id(mid)
        return self

    @property
    def topics(self) -> Topics:
        return Topics(self.broker.topic_prefix)

    def redacted(self) -> dict[str, Any]:
        """The resolved settings as JSON-able data, password masked."""
        return self.model_dump(mode="json")


# ---- loading --------------------------------------------------------------------------------


def config_path(explicit: Path | None) -> tuple[Path, bool]:
    """(path, required): --config wins, then EDGESHIP_AGENT_CONFIG, then the default (optional)."""
    if explicit is not None:
        return Path(explicit), True
    env = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if env:
        return Path(env), True
    return DEFAULT_CONFIG, False


def parse_override(item: str) -> dict[str, Any]:
    """'broker.url=mqtt://x' -> {'broker': {'url': 'mqtt://x'}} (values stay strings; pydantic converts)."""
    path, sep, value = item.partition("=")
    if not sep or not path.strip():
        raise ConfigError([f"--set {item!r}: use dotted.path=value, e.g. --set broker.url=mqtt://10.0.0.5"])
    out: dict[str, Any] = {}
    node = out
    keys = [k.strip() for k in path.split(".")]
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested override dicts (extra wins)."""
    out = dict(base)
    for key, val in extra.items():
        out[key] = merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) else val
    return out


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, BaseModel):
        value = dict(value)
    if isinstance(value, dict):
        return {k: "**********" if "password" in str(k) else _mask(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    text = repr(_mask(value))
    return text if len(text) <= 120 else text[:117] + "..."


def error_lines(exc: ValidationError) -> list[str]:
    """One line per bad field: 'broker.url: must be mqtt://... (got 'http://x')'."""
    lines = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option (misspelt? every option is listed in configs/agent.toml)"
        shown = "'**********'" if "password" in path else _show(err.get("input"))
        lines.append(f"config error: {path}: {msg} (got {shown})")
    return lines


def load_settings(config: Path | None = None, overrides: dict[str, Any] | None = None) -> AgentSettings:
    """Resolve settings from all sources; ConfigError (one line per bad field) when invalid."""
    path, required = config_path(config)
    if required and not path.is_file():
        raise ConfigError([f"config error: config file {path} does not exist (pass an existing --config or EDGESHIP_AGENT_CONFIG)"])
    unknown = unknown_env()
    token = _toml_path.set(path)
    try:
        settings = AgentSettings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(unknown + error_lines(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config error: {path} is not valid TOML: {exc}"]) from None
    except PermissionError as exc:
        raise ConfigError([f"config error: cannot read {exc.filename}: permission denied"]) from None
    except _PydanticSettingsError as exc:
        # e.g. an environment variable whose JSON does not parse
        raise ConfigError([f"config error: {str(exc).splitlines()[0]}"]) from None
    finally:
        _toml_path.reset(token)
    if unknown:
        raise ConfigError(unknown)
    return settings


def unknown_env() -> list[str]:
    """EDGESHIP_AGENT_* variables that name no option (pydantic-settings would ignore them silently)."""
    known = set(AgentSettings.model_fields) | {"config"}
    return [
        f"config error: environment {key}: unknown option (misspelt? every option is listed in configs/agent.toml) "
        f"(got {_show(value)})"
        for key, value in sorted(os.environ.items())
        if key.upper().startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].split("__")[0].lower() not in known
    ]
