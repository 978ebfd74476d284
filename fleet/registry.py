"""The device registry: selectors, and how device messages change a device's row.

Pure functions over ORM rows; the engine (rollout/engine.py) calls them inside its batch
transaction. A device's `session` tells an old connection's Last Will from the current one's.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from agent.protocol import LOCAL_ROLLOUT, HealthMessage, OfflineMessage, StateMessage
from fleet.errors import InvalidRequest
from fleet.models import Device

log = logging.getLogger("edgeship.fleet.registry")
# Selector keys the controller fills from its own knowledge; no label, reported or set, may shadow them.
RESERVED_KEYS = frozenset({"id", "arch", "os", "online", "revoked", "bundle"})
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_VALUE_RE = re.compile(r"^[A-Za-z0-9._:/-]{0,128}$")


@dataclass(frozen=True)
class Selector:
    """`site=plant-a,arch=arm64`: every pair must match (labels, operator labels, facts, `id`)."""

    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Selector:
        if not text or not text.strip():
            return cls()
        pairs = []
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not _KEY_RE.match(key) or not _VALUE_RE.match(value):
                raise InvalidRequest(f"selector part {part.strip()!r} in {text!r} is not key=value; use e.g. site=plant-a,arch=aarch64")
            pairs.append((key, value))
        return cls(tuple(pairs))

    def matches(self, view: dict[str, str]) -> bool:
        return all(view.get(k) == v for k, v in self.pairs)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.pairs)


def parse_labels(items: list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """['k=v', 'gone='] -> {'k': 'v', 'gone': None} (an empty value removes the label)."""
    out: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _KEY_RE.match(key) or not _VALUE_RE.match(value):
            raise InvalidRequest(f"label {item!r} is not key=value (letters, digits, . _ : / -); 'key=' removes a label")
        if key in RESERVED_KEYS and value:
            raise InvalidRequest(f"label key {key!r} is reserved ({', '.join(sorted(RESERVED_KEYS))} come from the "
                                 "controller's own records); choose another key")
        out[key] = value or None
    return out


def device_view(device: Device) -> dict[str, str]:
    """What selectors match against: device labels, operator labels over them, then the reserved keys.

    The reserved keys come from the controller's records last, also for rows stored before labels
    that shadow them were dropped at intake.
    """
    facts = device.facts or {}
    labels = {**(device.labels or {}), **(device.op_labels or {})}
    view = {k: v for k, v in labels.items() if k not in RESERVED_KEYS}
    view.update({"id": device.id, "arch": str(facts.get("arch", "")), "os": str(facts.get("os", "")),
                 "online": "true" if device.online else "false",
                 "revoked": "true" if device.revoked_at is not None else "false"})
    if device.active:
        view["bundle"] = f"{device.active.get('name')}@{device.active.get('version')}"
    return view


def new_device(device_id: str, now: float) -> Device:
    return Device(id=device_id, online=False, session="", first_seen=now, last_seen=now, offline_reason="",
                  agent_version="", facts={}, labels={}, op_labels={}, active=None, previous=None,
                  execution_provider=None, update=None, health=None, revoked_at=None)


def revoke(device: Device, now: float) -> None:
    """Mark `device` revoked (kept on a second revoke) and offline: it never answers again."""
    device.revoked_at = device.revoked_at or now
    device.online = False
    device.offline_reason = "revoked"


def apply_state(device: Device, msg: StateMessage, now: float) -> bool:
    """Birth / state. Returns True when the device came online with this message."""
    came_online = not device.online
    device.online = True
    device.session = msg.session
    device.offline_reason = ""
    device.last_seen = now
    device.agent_version = msg.agent_version[:64]  # the wire does not bound it; the column does
    device.facts = msg.facts.model_dump(mode="json")
    shadowing = sorted(RESERVED_KEYS.intersection(msg.labels))
    if shadowing:
        log.warning("device %s reported label(s) %s, which are reserved selector keys; dropped them "
                    "(rename them in the agent's labels)", device.id, ", ".join(shadowing))
    device.labels = {k: v for k, v in msg.labels.items() if k not in RESERVED_KEYS}
    device.active = msg.active.model_dump(mode="json") if msg.active else None
    device.previous = msg.previous.model_dump(mode="json") if msg.previous else None
    device.execution_provider = msg.execution_provider[:64] if msg.execution_provider else None
    device.update = msg.update.model_dump(mode="json") if msg.update else None
    return came_online


def apply_offline(device: Device, msg: OfflineMessage, now: float) -> bool:
    """Last Will or clean shutdown; ignored when it is an older connection's will."""
    if device.session and device.session != msg.session:
        return False
    device.online = False
    device.offline_reason = msg.reason
    return True


def apply_health(device: Device, msg: HealthMessage, now: float) -> bool:
    """Heartbeat. Returns True when the device came online with it (e.g. missed birth)."""
    came_online = not device.online and (not device.session or device.session == msg.session)
    if came_online:
        device.online = True
        device.session = msg.session
        device.offline_reason = ""
    device.last_seen = now
    if msg.active is not None:
        device.active = msg.active.model_dump(mode="json")
    device.health = health_summary(msg)
    return came_online


def health_summary(msg: HealthMessage) -> dict[str, Any]:
    data = msg.model_dump(mode="json", exclude={"v", "type", "device_id", "session", "seq", "active"}, exclude_none=True)
    return data


def bundle_source(active: dict[str, Any] | None, update: dict[str, Any] | None) -> str:
    """Where the device's active bundle came from, as far as its last update tells:
    `rollout:<id>`, `local` (`edgeship agent install` on the device), `fallback` (the agent fell back
    to its previous bundle), or `` when the last update is about another bundle."""
    if not active or not update:
        return ""
    if update.get("code") == "active_bundle_damaged":
        return "fallback"
    bundle = update.get("bundle") or {}
    if bundle.get("manifest_sha256") != active.get("manifest_sha256") or update.get("state") not in (
            "watching", "committed"):
        return ""
    rollout = update.get("rollout_id") or ""
    return LOCAL_ROLLOUT if rollout == LOCAL_ROLLOUT else f"rollout:{rollout}" if rollout else ""


def device_dict(device: Device) -> dict[str, Any]:
    """The API's view of a device."""
    return {
        "id": device.id, "online": device.online, "last_seen": device.last_seen, "first_seen": device.first_seen,
        "offline_reason": device.offline_reason, "agent_version": device.agent_version, "facts": device.facts or {},
        "labels": device.labels or {}, "op_labels": device.op_labels or {}, "active": device.active,
        "previous": device.previous, "execution_provider": device.execution_provider, "update": device.update,
        "health": device.health, "revoked": device.revoked_at is not None, "revoked_at": device.revoked_at,
        "source": bundle_source(device.active, device.update),
    }
