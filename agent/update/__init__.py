"""Crash-safe model updates on the device (docs/UPDATES.md).

    state.py     states, events, THE transition table, recovery decisions (pure)
    decide.py    accept/refuse commands and manifests, judge the watch window (pure)
    persist.py   the update record + command-id log, one atomically written file, schema-versioned
    store.py     BundleStore: content-addressed bundles + the atomically switched active/previous pointer
    download.py  HTTP(S) with Range resume, retries, bandwidth limit, sha256, disk-full detection
    smoke.py     the smoke test, in a subprocess (`python -m agent.update.smoke`)
    manager.py   UpdateManager: the I/O shell that runs it all on its own worker thread
    crashpoint.py  test-only SIGKILL injection, inert unless EDGESHIP_CRASH_AT is set
"""

from agent.update.download import DownloadOptions
from agent.update.errors import (
    Cancelled,
    DiskFull,
    DownloadError,
    StateFileError,
    StoreError,
    UpdateError,
)
from agent.update.manager import UpdateConfig, UpdateManager
from agent.update.state import Event, next_state
from agent.update.store import BundleStore

__all__ = [name for name in dir() if not name.startswith("_")]
