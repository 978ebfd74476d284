"""Power cuts for the update tests: which writes reached the disk, and what a cut leaves of the rest.

A SIGKILL loses nothing the kernel already has; a power cut loses every write nobody fsynced. In
the agent process, `FsyncLog(path, root).install()` wraps os.fsync, os.rename and os.replace and
appends one JSON line per fsync of a file or directory under `root` (its inode, mtime and size,
and for a directory its entries) and per rename into `root` (every inode it moves, with its mtime).
`baseline()` calls os.sync() and logs the whole tree: what was on disk before the update began.

- `unsynced_publications(records)`: renames that published a file or directory before it and
  everything under it were fsynced, and renames whose target directory was not fsynced afterwards.
- `cut_power(root, records)`: does to the real files what a power cut may do (the POSIX worst
  case): a directory entry made since its directory's last fsync disappears, and a file whose
  content changed since its last fsync is left empty (what ext4's delayed allocation leaves).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

ENV = "EDGESHIP_TEST_FSYNC_LOG"  # the log path; the driver installs the spy when it is set


def _state(path: str) -> dict[str, Any]:
    st = os.lstat(path)
    rec: dict[str, Any] = {"path": path, "ino": st.st_ino, "mtime": st.st_mtime_ns, "size": st.st_size}
    if os.path.isdir(path):
        rec["entries"] = {}
        for name in os.listdir(path):
            try:
                rec["entries"][name] = os.lstat(os.path.join(path, name)).st_ino
            except FileNotFoundError:  # removed meanwhile (gc on another thread)
                pass
    return rec


def _tree(path: str) -> list[dict[str, Any]]:
    if not os.path.isdir(path):
        return [_state(path)]
    out = []
    for top, dirs, files in os.walk(path):
        out += [_state(os.path.join(top, n)) for n in files]
        out.append(_state(top))
    return out


class FsyncLog:
    """Records fsyncs and renames under `root` into the JSON-lines file `path`."""

    def __init__(self, path: Path, root: Path):
        self.path, self.root = Path(path), os.path.realpath(root)
        self._lock = threading.Lock()

    def _under(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def _write(self, rec: dict[str, Any]) -> None:
        with self._lock, open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def install(self) -> FsyncLog:
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd: int) -> None:
            real_fsync(fd)
            path = os.readlink(f"/proc/self/fd/{fd}")
            if self._under(path) and os.path.lexists(path):  # not " (deleted)"
                self._write({"op": "fsync", **_state(path)})

        def moving(real):
            def rename(src, dst, *a, **kw):
                src_path, dst_path = os.path.realpath(src), os.path.join(
                    os.path.realpath(os.path.dirname(os.path.abspath(dst))), os.path.basename(dst))
                rec = {"op": "rename", "src": src_path, "dst": dst_path, "tree": _tree(src_path)} \
                    if self._under(dst_path) and os.path.lexists(src_path) else None
                real(src, dst, *a, **kw)
                if rec is not None:
                    rec["parent"] = os.lstat(os.path.dirname(dst_path)).st_ino
                    self._write(rec)
            return rename

        os.fsync, os.rename, os.replace = fsync, moving(real_rename), moving(real_replace)
        return self

    def baseline(self) -> None:
        """Everything under root is on disk now (os.sync()): log it as such."""
        os.sync()
        for rec in _tree(self.root):
            self._write({"op": "fsync", **rec})


def read_log(path: Path) -> list[dict[str, Any]]:
    # a line cut by the SIGKILL is the only one that may be incomplete
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def unsynced_publications(records: list[dict[str, Any]]) -> list[str]:
    """Every rename that published something not yet on disk, or was itself not made durable."""
    synced: dict[int, int] = {}  # inode -> mtime at its last fsync
    problems, awaiting = [], {}
    for r in records:
        if r["op"] == "fsync":
            synced[r["ino"]] = r["mtime"]
            awaiting.pop(r["ino"], None)
        else:
            for f in r["tree"]:
                if synced.get(f["ino"]) != f["mtime"]:
                    problems.append(f"{f['path']} was not fsynced before the rename {r['src']} -> {r['dst']}")
            awaiting[r["parent"]] = f"directory of {r['dst']} not fsynced after the rename that made it"
    return problems + sorted(awaiting.values())


def cut_power(root: Path, records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Drop what a power cut may drop under `root`; returns (entries removed, files emptied)."""
    durable = {r["ino"]: r for r in records if r["op"] == "fsync"}
    removed: list[str] = []
    emptied: list[str] = []

    def visit(d: Path) -> None:
        st = d.lstat()
        rec = durable.get(st.st_ino)
        all_durable = rec is not None and rec["mtime"] == st.st_mtime_ns
        entries = rec.get("entries", {}) if rec else {}
        for child in sorted(d.iterdir()):
            cst = child.lstat()
            if not all_durable and entries.get(child.name) != cst.st_ino:
                removed.append(str(child))
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            elif child.is_dir():
                visit(child)
            else:
                f = durable.get(cst.st_ino)
                if (f is None or (f["mtime"], f["size"]) != (cst.st_mtime_ns, cst.st_size)) and cst.st_size:
                    emptied.append(str(child))
                    os.truncate(child, 0)

    visit(Path(os.path.realpath(root)))
    return removed, emptied
