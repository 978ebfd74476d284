"""The wire contract: MQTT topics and messages between agents and the controller (docs/PROTOCOL.md)."""

from agent.protocol.messages import (
    LOCAL_ROLLOUT,
    MAX_PAYLOAD_BYTES,
    AckMessage,
    BundleRef,
    CancelCommand,
    DeployCommand,
    DeviceFacts,
    EventMessage,
    HealthMessage,
    InferenceStats,
    OfflineMessage,
    ProtocolError,
    ReportCommand,
    RollbackCommand,
    StateMessage,
    UpdateState,
    UpdateStatus,
    WatchPolicy,
    encode,
    parse_command,
    parse_device_message,
)
from agent.protocol.topics import DEFAULT_PREFIX, PROTOCOL_VERSION, Channel, Topics, check_device_id

__all__ = [name for name in dir() if not name.startswith("_")]
