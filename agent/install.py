"""`edgeship agent install` and `edgeship agent status`: a device without a fleet.

An install hands a bundle (directory or .tar) to whichever process owns the state dir:
- the agent is running: over its control socket (agent/control.py); the running agent installs
  it with the same zero-downtime switch as a fleet deploy and watches it as usual;
- the agent is stopped: this process takes the state-dir lock and runs the same UpdateManager
  itself, up to `committed` (nothing serves traffic, so there is nothing to watch); the next
  `edgeship agent run` serves the new bundle.

Exit codes (docs/AGENT.md#without-a-controller): 0 installed (or already active), 1 refused or
failed (one line naming the reason code), 2 bad config, 4 busy (another install or update runs).

Errors: InstallError(ValueError) — the PATH is not something that can be installed; one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle import Manifest, TrustedKeys, pack
from agent.bundle.manifest import MANIFEST_NAME
from agent.config import AgentSettings
from agent.control import ControlError, ControlRequest, StateDirLock, connect, request
from agent.protocol import UpdateState
from agent.update.download import fetch_head
from agent.update.errors import DownloadError
from agent.update.local import NOTHING_TO_WATCH, Step, run_local_install
from agent.update.persist import StateFile

EXIT_OK, EXIT_REFUSED, EXIT_CONFIG, EXIT_BUSY = 0, 1, 2, 4
BUSY_CODES = frozenset({"busy", "state_dir_locked"})


class InstallError(ValueError):
    """PATH cannot be installed (not a bundle); the message says what was expected."""


@dataclass(frozen=True)
class InstallResult:
    step: Step
    via: str  # "agent" (the running service switched) or "offline" (the next start serves it)

    @property
    def exit_code(self) -> int:
        if self.step.ok:
            return EXIT_OK
        return EXIT_BUSY if self.step.code in BUSY_CODES else EXIT_REFUSED


def _archive_of(path: Path, workdir: Path) -> Path:
    """`path` as a bundle archive: a directory is packed into `workdir`; a file must start with a manifest."""
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise InstallError(f"{path} is a directory without {MANIFEST_NAME}; pass a bundle directory or its .tar")
        return pack(path, workdir / "bundle.tar")
    try:
        fetch_head(path.resolve().as_uri())
    except DownloadError:
        raise InstallError(f"{path} is not a bundle archive (no manifest.json at its start); "
                           "pass a bundle directory or its .tar from `edgeship export`") from None
    return path


def install(settings: AgentSettings, path: Path, *, allow_downgrade: bool = False, replaces: tuple[str, ...] = (),
            progress: Callable[[Step], None] = lambda step: None) -> InstallResult:
    """Install the bundle at `path` into the agent that owns `settings.state_dir` (running or not)."""
    with tempfile.TemporaryDirectory(prefix="edgeship-install-") as tmp:
        archive = _archive_of(Path(path), Path(tmp))
        conn = connect(settings.state_dir)
        if conn is not None:
            with conn, open(archive, "rb") as src:
                final = None
                for reply in request(conn, ControlRequest(op="install", allow_downgrade=allow_downgrade,
                                                            replaces=list(replaces)),
                                     fds=[src.fileno()]):
                    step = Step(reply.state, ok=reply.ok, final=reply.final, code=reply.code, reason=reply.reason,
                                bundle=reply.bundle)
                    if not step.final:
                        progress(step)
                    final = step
            return InstallResult(final, via="agent")
        return InstallResult(_install_offline(settings, archive, allow_downgrade=allow_downgrade, replaces=replaces,
                                              progress=progress),
                             via="offline")


def _install_offline(settings: AgentSettings, archive: Path, *, allow_downgrade: bool, replaces: tuple[str, ...],
                     progress: Callable[[Step], None]) -> Step:
    from agent.facts import device_facts
    from agent.runtime import ModelHost, load_model
    from agent.service import update_config
    from agent.update.manager import UpdateManager
    from agent.update.store import BundleStore

    lock = StateDirLock(settings.state_dir)
    if not lock.acquire():
        return Step("", ok=False, final=True, code="state_dir_locked", reason=(
            f"another edgeship process holds {settings.state_dir} (an install in progress, or the agent starting); "
            "wait for it and retry"))
    host = ModelHost()
    manager = None
    try:
        trusted = TrustedKeys.from_paths(settings.trusted_keys)
        store = BundleStore(settings.state_dir, trusted=trusted)
        config = update_config(settings, session="local-install", facts=device_facts(isolate_onnxruntime=True))
        manager = UpdateManager(config=config, store=store, host=host, publish=lambda msg: None, trusted=trusted,
                                load=load_model)
        with open(archive, "rb") as src:
            return run_local_install(manager, src, size=os.fstat(src.fileno()).st_size, device_id=settings.device_id,
                                     allow_downgrade=allow_downgrade, replaces=replaces, watch=NOTHING_TO_WATCH, stop_at=frozenset(),
                                     emit=progress)
    finally:
        if manager is not None:
            manager.close()
        model = host.swap(None)
        if model is not None:
            model.close()
        lock.release()


def _ref_of(state_dir: Path, sha: str | None) -> dict[str, Any] | None:
    if not sha:
        return None
    try:
        m = Manifest.from_bytes((state_dir / "bundles" / sha / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError):
        return {"name": "?", "version": "?", "manifest_sha256": sha}
    return {"name": m.name, "version": m.version, "manifest_sha256": sha}


def status(settings: AgentSettings) -> dict[str, Any]:
    """Active and previous bundle and the last update with its outcome, read from the state dir.

    Reading only: the owner writes pointer.json and update.json atomically, so a reader sees a whole file.
    """
    state_dir = Path(settings.state_dir)
    try:
        pointer = json.loads((state_dir / "pointer.json").read_bytes())
    except FileNotFoundError:
        pointer = {}
    except ValueError as exc:
        raise InstallError(f"{state_dir / 'pointer.json'} is not JSON ({exc}); the store is damaged") from None
    update = StateFile(state_dir / "update.json").load().update
    conn = connect(state_dir)
    if conn is not None:
        conn.close()
    return {
        "state_dir": str(state_dir),
        "agent_running": conn is not None,
        "active": _ref_of(state_dir, pointer.get("active")),
        "previous": _ref_of(state_dir, pointer.get("previous")),
        "update": None if update is None else {
            "command_id": update.command_id, "kind": update.kind,
            "source": "local" if update.rollout_id == "local" else f"rollout {update.rollout_id}",
            "state": update.state.value, "bundle": update.bundle.ref if update.bundle else None,
            "code": update.code, "reason": update.reason, "updated_at": update.updated_at,
        },
    }


def describe(step: Step, via: str) -> str:
    """The one line a finished install prints."""
    if step.code == "downgrade_refused":
        return f"error: {step.code}: {step.reason.split('; send a rollback')[0]}; pass --allow-downgrade to install it anyway"
    if not step.ok:
        return f"error: {step.code}: {step.reason}"
    if step.state == UpdateState.WATCHING.value:
        return f"installed {step.bundle}: the agent switched to it and is watching it (rolls back on a regression)"
    if step.code == "already_active" or "already the active" in step.reason:
        return f"{step.bundle} is already the active bundle; nothing to do"
    where = "the running agent serves it" if via == "agent" else "the next `edgeship agent run` serves it"
    return f"installed {step.bundle} ({step.state}); {where}"


__all__ = ["ControlError", "InstallError", "InstallResult", "describe", "install", "status"]
