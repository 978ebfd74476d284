"""Making files survive a power cut: fsync a file, a directory, or a whole tree before publishing it.

A rename publishes a file or directory only once its contents AND the directory entries naming
them are on disk; otherwise a power cut after the rename can leave the new name pointing at
empty or missing files. The rule everywhere in the agent: write, `fsync_tree` what was written,
rename, `fsync_dir` the directory (or directories) the rename changed.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (creations, renames, deletions) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the contents of the regular file at `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every directory from the deepest up to `root`."""
    for top, dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(top) / name)
        fsync_dir(Path(top))
