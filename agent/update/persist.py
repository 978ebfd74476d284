"""The update's persisted state: one JSON file, written atomically, with a schema version.

Atomic write = write a temp file, fsync it, rename it over the old one, fsync the directory: after
a power cut the file is either the old or the new version, never a mix. A file with a schema
version this agent does not know is refused (StateFileError), never guessed at.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.bundle.durable import fsync_dir
from agent.protocol import BundleRef, UpdateState, WatchPolicy
from agent.update.errors import StateFileError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
MAX_ACKS = 512  # command ids remembered for idempotency (oldest dropped first)
MAX_STATE_BYTES = 4 * 1024 * 1024


class _Rec(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AckRecord(_Rec):
    accepted: bool
    code: str = ""
    reason: str = ""


class UpdateRecord(_Rec):
    """The update in progress (or the last one)."""

    command_id: str
    kind: Literal["deploy", "rollback"] = "deploy"
    rollout_id: str | None = None
    state: UpdateState
    bundle: BundleRef | None = None  # what is being installed (for a rollback: the target)
    urls: list[str] = []
    size: int | None = None
    deadline: datetime | None = None
    watch: WatchPolicy = WatchPolicy()
    restore_sha: str | None = None  # the pointer to go back to on failure after the switch
    restore_previous_sha: str | None = None
    attempts: dict[str, int] = {}  # entries into each state: loop detection across restarts
    code: str = ""
    reason: str = ""
    metrics: dict[str, float] = {}
    baseline: dict[str, float] = {}
    switched_at: float | None = None
    updated_at: float = 0.0


class PersistedState(_Rec):
    schema_version: int = SCHEMA_VERSION
    update: UpdateRecord | None = None
    acks: dict[str, AckRecord] = Field(default_factory=dict)  # insertion-ordered: oldest first


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


class StateFile:
    """Load/save `PersistedState` at `path`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> PersistedState:
        """The saved state; a fresh one when there is no file; StateFileError when unreadable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return PersistedState()
        if len(raw) > MAX_STATE_BYTES:
            raise StateFileError(f"update state {self.path} is {len(raw)} bytes, over {MAX_STATE_BYTES}; "
                                 "move it aside to start fresh")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise StateFileError(f"update state {self.path} is not JSON ({exc}); move it aside to start fresh") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise StateFileError(
                f"update state {self.path} has schema_version {version!r}, this agent knows "
                f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}; upgrade the agent or move the file aside"
            )
        try:
            return PersistedState.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise StateFileError(f"update state {self.path}: {loc}: {err['msg']}; move it aside to start fresh") from None

    def save(self, state: PersistedState) -> None:
        while len(state.acks) > MAX_ACKS:
            state.acks.pop(next(iter(state.acks)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, state.model_dump_json().encode())
