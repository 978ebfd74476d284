"""Errors of the update machinery. Every one carries a stable wire `code`.

    UpdateError(RuntimeError)
    ├── StateFileError        persisted state unreadable or of an unknown schema version
    ├── StoreError            the bundle store is inconsistent or a bundle is not in it
    └── DownloadError         every URL failed (404/500/timeouts/truncation), after retries
        ├── DiskFull          ENOSPC while writing
        └── Cancelled         a cancel command stopped the download

Refusals (downgrade, wrong target, bad smoke test...) are UpdateError with their own `code`.
"""

from __future__ import annotations


class UpdateError(RuntimeError):
    code = "update_error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class StateFileError(UpdateError):
    code = "state_file_invalid"


class StoreError(UpdateError):
    code = "store_error"


class DownloadError(UpdateError):
    code = "download_failed"


class DiskFull(DownloadError):
    code = "disk_full"


class Cancelled(DownloadError):
    code = "cancelled"
