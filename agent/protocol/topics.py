"""The MQTT topic tree (docs/PROTOCOL.md).

    {prefix}/v1/devices/{device_id}/state    device -> all    retained, QoS 1 (birth/state; LWT 'offline')
    {prefix}/v1/devices/{device_id}/health   device -> ctrl   QoS 0, not retained (heartbeat)
    {prefix}/v1/devices/{device_id}/cmd      ctrl -> device   QoS 1, not retained
    {prefix}/v1/devices/{device_id}/ack      device -> ctrl   QoS 1, not retained
    {prefix}/v1/devices/{device_id}/events   device -> ctrl   QoS 1, not retained
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "edgeship"
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class Channel(StrEnum):
    STATE = "state"
    HEALTH = "health"
    CMD = "cmd"
    ACK = "ack"
    EVENTS = "events"


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise ValueError(
            f"invalid device id {device_id!r}: use 1-128 of A-Z a-z 0-9 . _ : - (no '/', '+', '#')"
        )
    return device_id


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix; a frozen, validated value."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"invalid topic prefix {self.prefix!r}: use path segments of A-Z a-z 0-9 . _ -")

    @property
    def root(self) -> str:
        return f"{self.prefix}/v{PROTOCOL_VERSION}/devices"

    def device(self, device_id: str, channel: Channel) -> str:
        return f"{self.root}/{check_device_id(device_id)}/{channel.value}"

    def all_devices(self, channel: Channel) -> str:
        """Subscription filter for one channel of every device."""
        return f"{self.root}/+/{channel.value}"

    def parse(self, topic: str) -> tuple[str, Channel] | None:
        """(device_id, channel) for a topic of this tree, None for any other topic."""
        head = self.root + "/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):].split("/")
        if len(rest) != 2 or not DEVICE_ID_RE.match(rest[0]):
            return None
        try:
            return rest[0], Channel(rest[1])
        except ValueError:
            return None
