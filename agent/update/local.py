"""A local install: a bundle archive handed to the device itself (`edgeship agent install`, a USB
stick) becomes the same DeployCommand a fleet deploy sends, so it takes the same path through
UpdateManager: verify -> stage -> smoke test -> switch -> watch, same journal, same crash table.

The archive is first copied into `<state_dir>/incoming/` by the process that owns the state dir,
and the command's URL is a file:// URL to that copy: a restart in `downloading` resumes from it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO

from agent.bundle import BundleError, Manifest
from agent.protocol import LOCAL_ROLLOUT, BundleRef, DeployCommand, UpdateState, WatchPolicy
from agent.protocol.messages import LOCAL_FILES
from agent.update import decide
from agent.update.download import fetch_head
from agent.update.errors import UpdateError
from agent.update.manager import UpdateManager
from agent.update.persist import fsync_dir
from agent.update.state import is_rest

INCOMING = "incoming"
# The deploy fields a controller sets; a local install has no controller to wait for.
LOCAL_DEADLINE = timedelta(days=1)
NOTHING_TO_WATCH = WatchPolicy(window_s=0.0, min_requests=0)  # the service is stopped: no traffic to judge


def incoming_dir(state_dir: Path) -> Path:
    return Path(state_dir) / INCOMING


def receive_archive(src: BinaryIO, state_dir: Path, *, size: int, free_bytes: int, margin: int) -> Path:
    """Copy an archive into the state dir's incoming/ (fsynced); refuses when the install would not fit."""
    need = size + decide.bytes_needed(size, margin=margin)  # this copy + download + unpacked copy + margin
    if free_bytes < need:
        raise UpdateError(f"a {size} byte bundle needs {need} bytes free in {state_dir}, there are {free_bytes}; "
                          "free disk space", code="insufficient_disk")
    directory = incoming_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / f"{uuid.uuid4().hex}.tar"
    try:
        with open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        fsync_dir(directory)
    except OSError as exc:
        dest.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise UpdateError(f"disk full while copying the bundle into {directory}; free disk space",
                              code="insufficient_disk") from None
        raise
    return dest


def local_deploy(archive: Path, *, device_id: str, watch: WatchPolicy | None = None,
                 replaces: tuple[str, ...] = ()) -> DeployCommand:
    """The deploy command for an archive on this device, named `local-...` with rollout id `local`.

    `replaces` (the operator's `--replaces`) names the active bundles it may take over, as a fleet deploy's does.

    Raises DownloadError(code="not_a_bundle") when the file does not start with a bundle manifest.
    """
    archive = Path(archive).resolve()
    url = archive.as_uri()
    raw, _ = fetch_head(url)
    manifest = Manifest.from_bytes(raw)
    body = {
        "id": f"local-{uuid.uuid4().hex[:16]}",
        "device_id": device_id,
        "rollout_id": LOCAL_ROLLOUT,
        "bundle": BundleRef(name=manifest.name, version=manifest.version,
                            manifest_sha256=hashlib.sha256(raw).hexdigest()),
        "urls": [url],
        "size": archive.stat().st_size,
        "deadline": datetime.now(timezone.utc) + LOCAL_DEADLINE,
        "replaces": list(replaces),
    }
    if watch is not None:  # otherwise the device's configured watch policy applies, as for a fleet deploy
        body["watch"] = watch
    return DeployCommand.model_validate(body, context={LOCAL_FILES: True})


def clean_incoming(state_dir: Path, *, keep_urls: Iterable[str] = ()) -> None:
    """Delete received archives no update in progress still reads from."""
    directory = incoming_dir(state_dir)
    if not directory.is_dir():
        return
    keep = set(keep_urls)
    for p in directory.iterdir():
        if p.resolve().as_uri() not in keep:
            p.unlink(missing_ok=True)


@dataclass(frozen=True)
class Step:
    """One report of a local install: a state reached, or its end (`final`)."""

    state: str
    ok: bool = True
    final: bool = False
    code: str = ""
    reason: str = ""
    bundle: str = ""


def run_local_install(manager: UpdateManager, src: BinaryIO, *, size: int, device_id: str, allow_downgrade: bool,
                      replaces: tuple[str, ...] = (), watch: WatchPolicy | None, stop_at: frozenset[UpdateState], emit: Callable[[Step], None],
                      poll_s: float = 0.1) -> Step:
    """Receive `src`, hand the manager a local deploy, and report each state until one in `stop_at`
    (or a rest state). Run by the process that owns the state dir. Returns the final step."""
    state_dir = Path(manager.config.state_dir)
    if not is_rest(manager.state):
        return Step(manager.state.value, ok=False, final=True, code="busy", reason=(
            f"an update is in progress ({manager.state.value}); wait for it to finish (edgeship agent status), "
            "or start the agent to finish an interrupted one"))
    try:
        archive = receive_archive(src, state_dir, size=size, free_bytes=manager.store.free_bytes(),
                                  margin=manager.config.disk_margin_bytes)
    except UpdateError as exc:
        return Step("", ok=False, final=True, code=exc.code, reason=str(exc))
    try:
        cmd = local_deploy(archive, device_id=device_id, watch=watch, replaces=replaces)
    except (UpdateError, BundleError) as exc:
        archive.unlink(missing_ok=True)
        return Step("", ok=False, final=True, code=exc.code, reason=str(exc))
    ack = manager.handle(cmd, allow_downgrade=allow_downgrade)
    ref = cmd.bundle.ref
    if not ack.accepted:
        archive.unlink(missing_ok=True)
        return Step(manager.state.value, ok=False, final=True, code=ack.code, reason=ack.reason, bundle=ref)
    last = None
    while True:
        status = manager.status
        if status is not None and status.command_id == cmd.id and status.state != last:
            last = status.state
            done = is_rest(last) or last in stop_at
            step = Step(last.value, ok=last not in (UpdateState.FAILED, UpdateState.ROLLED_BACK), final=done,
                        code=status.code, reason=status.reason, bundle=ref)
            if done:
                clean_incoming(state_dir)  # past the download: the store has its own copy
                return step
            emit(step)
        time.sleep(poll_s)
