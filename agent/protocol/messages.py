"""Wire messages (pydantic, versioned) and their total parsers.

Every message is a JSON object with `v` (protocol version), `type`, `device_id` and, from a
device, `session` (random per agent process) and `seq` (monotonic within the session). Unknown
fields are ignored so that newer peers can add optional fields; an unknown `v` or `type` is a
typed ProtocolError. Parsers never raise anything else, whatever the bytes.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from agent.protocol.topics import PROTOCOL_VERSION, Channel, check_device_id

MAX_PAYLOAD_BYTES = 64 * 1024
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})


class ProtocolError(ValueError):
    """A payload that is not a valid message. `.code` is a stable reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ---- shared parts ---------------------------------------------------------------------------


class BundleRef(_Msg):
    name: str = Field(max_length=64)
    version: str = Field(max_length=64)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class DeviceFacts(_Msg):
    arch: str = ""
    os: str = ""
    cpu_model: str = ""
    cores: int = 0  # CPUs this process may use (affinity and cgroup quota)
    cpu_features: list[str] = []
    ram_bytes: int = 0
    execution_providers: list[str] = []
    onnxruntime: str = ""


class UpdateState(StrEnum):
    """The agent's update state machine states (agent/update)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SMOKE_TESTING = "smoke_testing"
    SWITCHING = "switching"
    WATCHING = "watching"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


LOCAL_ROLLOUT = "local"  # the rollout_id of an `edgeship agent install` on the device (no controller)


class UpdateStatus(_Msg):
    command_id: str
    rollout_id: str | None = None
    state: UpdateState
    bundle: BundleRef | None = None
    code: str = ""
    reason: str = Field(default="", max_length=2000)


class InferenceStats(_Msg):
    """Inference since the previous heartbeat."""

    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    queue_depth: int = 0


class _FromDevice(_Msg):
    v: int = PROTOCOL_VERSION
    device_id: str
    session: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0)
    ts: float = Field(default_factory=time.time)

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_id(v)


# ---- device -> controller ---------------------------------------------------------------------


class StateMessage(_FromDevice):
    """Birth / full state. Retained on .../state, re-published on every (re)connect and change."""

    type: Literal["state"] = "state"
    online: Literal[True] = True
    agent_version: str
    facts: DeviceFacts = DeviceFacts()
    labels: dict[str, str] = {}
    active: BundleRef | None = None
    previous: BundleRef | None = None  # the rollback slot
    execution_provider: str | None = None  # the EP the active model actually runs on
    update: UpdateStatus | None = None  # the last or current update


class OfflineMessage(_Msg):
    """Death: the Last Will (retained on .../state), or a clean shutdown's last word."""

    v: int = PROTOCOL_VERSION
    type: Literal["offline"] = "offline"
    device_id: str
    session: str = Field(min_length=1, max_length=64)
    reason: Literal["lwt", "shutdown"] = "lwt"

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_id(v)


class HealthMessage(_FromDevice):
    type: Literal["health"] = "health"
    uptime_s: float = 0.0
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    mem_available_bytes: int | None = None
    disk_free_bytes: int | None = None
    temperature_c: float | None = None
    active: BundleRef | None = None
    update_state: UpdateState = UpdateState.IDLE
    inference: InferenceStats = InferenceStats()


class AckMessage(_FromDevice):
    type: Literal["ack"] = "ack"
    command_id: str = Field(min_length=1, max_length=64)
    accepted: bool
    code: str = ""  # reason code when rejected (e.g. "downgrade_refused", "target_mismatch")
    reason: str = Field(default="", max_length=2000)
    duplicate: bool = False  # true when this repeats the answer to an id already seen


class EventMessage(_FromDevice):
    """One update state change (or download progress), QoS 1."""

    type: Literal["event"] = "event"
    command_id: str = Field(min_length=1, max_length=64)
    rollout_id: str | None = None
    state: UpdateState
    bundle: BundleRef | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    code: str = ""
    reason: str = Field(default="", max_length=2000)
    metrics: dict[str, float] = {}


# ---- controller -> device ---------------------------------------------------------------------


LEGACY_MAX_ERROR_RATE = 0.05  # what a watch policy with neither error limit has always meant: 5 % absolute


class WatchPolicy(_Msg):
    """How long to watch a new model after switching, and what counts as a regression.

    `max_error_rate_increase` is a margin over the error rate the device measured on its old model;
    `max_error_rate` is an absolute ceiling. Either or both may be given; both apply when both are.
    A policy with neither keeps its original v1 meaning: an absolute ceiling of 5 %.
    """

    window_s: float = Field(default=60.0, ge=0)
    min_requests: int = Field(default=0, ge=0)  # the watch waits for this many (at most the agent's max_watch_s)
    min_judged_requests: int = Field(default=0, ge=0)  # fewer since the switch: error rate and p95 not judged
    max_error_rate_increase: float | None = Field(default=None, ge=0, le=1)
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_p95_ratio: float = Field(default=2.0, gt=0)  # new p95 / old baseline p95

    @model_validator(mode="before")
    @classmethod
    def _legacy_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_error_rate") is None and data.get("max_error_rate_increase") is None:
            return {**data, "max_error_rate": LEGACY_MAX_ERROR_RATE}
        return data


class _Command(_Msg):
    v: int = PROTOCOL_VERSION
    type: Literal["command"] = "command"
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    device_id: str
    issued_at: float = Field(default_factory=time.time)

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_id(v)


LOCAL_FILES = "local_files"  # validation context key: this deploy was built on the device


class DeployCommand(_Command):
    kind: Literal["deploy"] = "deploy"
    rollout_id: str = Field(min_length=1, max_length=64)
    bundle: BundleRef
    urls: list[str] = Field(min_length=1, max_length=8)
    size: int | None = Field(default=None, ge=0)  # archive bytes, for the free-disk check
    deadline: datetime  # required: never started after this (naive = UTC), so an old deploy cannot be replayed
    # bundle names this deploy may replace: a deploy of another name than the active bundle's must list it
    replaces: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default=[], max_length=16)
    watch: WatchPolicy = WatchPolicy()

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str], info: ValidationInfo) -> list[str]:
        # file:// only for a deploy built on the device itself (agent/update/local.py), never off the wire.
        schemes = ("http://", "https://", "file://") if (info.context or {}).get(LOCAL_FILES) else ("http://", "https://")
        for url in v:
            if not url.startswith(schemes) or len(url) > 2048:
                raise ValueError(f"download URL must be http(s) and at most 2048 chars: {url[:80]!r}")
        return v


class RollbackCommand(_Command):
    """Back to the previous bundle. Naming a rollout, it acts only while that rollout's bundle is the
    one installed; naming none, it must carry a deadline (the agent refuses it otherwise)."""

    kind: Literal["rollback"] = "rollback"
    rollout_id: str | None = None
    deadline: datetime | None = None


class CancelCommand(_Command):
    kind: Literal["cancel"] = "cancel"
    rollout_id: str | None = None


class ReportCommand(_Command):
    kind: Literal["report"] = "report"


Command = Annotated[
    Union[DeployCommand, RollbackCommand, CancelCommand, ReportCommand], Field(discriminator="kind")
]
DeviceMessage = Annotated[
    Union[StateMessage, OfflineMessage, HealthMessage, AckMessage, EventMessage], Field(discriminator="type")
]

_command_adapter: TypeAdapter = TypeAdapter(Command)
_device_adapter: TypeAdapter = TypeAdapter(DeviceMessage)

# Which message types may arrive on which channel.
CHANNEL_TYPES: dict[Channel, frozenset[str]] = {
    Channel.STATE: frozenset({"state", "offline"}),
    Channel.HEALTH: frozenset({"health"}),
    Channel.ACK: frozenset({"ack"}),
    Channel.EVENTS: frozenset({"event"}),
    Channel.CMD: frozenset({"command"}),
}


def encode(message: BaseModel) -> bytes:
    """Compact JSON bytes for a message (None fields are dropped to keep heartbeats small)."""
    return json.dumps(message.model_dump(mode="json", exclude_none=True), separators=(",", ":")).encode()


def _load(payload: bytes | bytearray | str) -> dict[str, Any]:
    if isinstance(payload, str):
        payload = payload.encode("utf-8", errors="surrogatepass")
    if not isinstance(payload, (bytes, bytearray)):
        raise ProtocolError("bad_payload", f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES} limit")
    try:
        data = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"payload is not UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", "payload must be a JSON object")
    v = data.get("v")
    if type(v) is not int:
        raise ProtocolError("bad_version", "payload has no integer 'v' (protocol version)")
    if v not in SUPPORTED_VERSIONS:
        raise ProtocolError("unsupported_version", f"protocol version {v} is not supported (supported: {sorted(SUPPORTED_VERSIONS)})")
    return data


def _validate(adapter: TypeAdapter, data: dict[str, Any]) -> Any:
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        errors = exc.errors()
        if [(e["type"], e["loc"][-1:]) for e in errors] == [("missing", ("deadline",))]:
            raise ProtocolError("deadline_missing", "deploy command has no 'deadline'; every deploy must carry one "
                                "(an ISO 8601 time after which it is refused), so an old one cannot be replayed") from None
        err = errors[0]
        loc = ".".join(str(p) for p in err["loc"])
        code = "unknown_type" if err["type"] in ("union_tag_invalid", "union_tag_not_found") else "invalid"
        raise ProtocolError(code, f"{loc or 'message'}: {err['msg']}"[:500]) from None
    except (RecursionError, OverflowError, ValueError, TypeError) as exc:
        raise ProtocolError("invalid", f"message: {str(exc)[:300]}") from None


def parse_command(payload: bytes | bytearray | str) -> Any:
    """A Command, or ProtocolError; never any other exception."""
    try:
        data = _load(payload)
        if data.get("type") != "command":
            raise ProtocolError("unknown_type", f"expected a command, got type {str(data.get('type'))[:40]!r}")
        return _validate(_command_adapter, data)
    except ProtocolError:
        raise
    except Exception as exc:  # the contract is totality: nothing else may escape to the MQTT thread
        raise ProtocolError("invalid", f"unparseable command: {type(exc).__name__}") from None


def parse_device_message(payload: bytes | bytearray | str, *, channel: Channel | None = None, device_id: str | None = None) -> Any:
    """A device message, or ProtocolError; checks it belongs on `channel` and to `device_id`."""
    try:
        data = _load(payload)
        msg = _validate(_device_adapter, data)
        if channel is not None and msg.type not in CHANNEL_TYPES[channel]:
            raise ProtocolError("wrong_channel", f"a {msg.type!r} message does not belong on the {channel.value!r} topic")
        if device_id is not None and msg.device_id != device_id:
            raise ProtocolError("spoofed", f"message claims device {msg.device_id!r} but arrived on {device_id!r}'s topic")
        return msg
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError("invalid", f"unparseable message: {type(exc).__name__}") from None
