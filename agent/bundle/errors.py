"""Errors raised while reading, verifying or unpacking a bundle.

    BundleError(ValueError)                    .code is a stable reason code for the wire
    ├── ManifestError                          manifest.json unreadable or invalid
    │   └── UnknownSchemaVersion
    ├── SignatureError
    │   ├── MissingSignature
    │   └── UntrustedKey                       signed, but not by a pinned key / bad signature
    ├── IntegrityError
    │   ├── MissingFile
    │   ├── ExtraFile
    │   ├── SizeMismatch
    │   └── HashMismatch
    └── ArchiveError
        ├── UnsafeMember                       absolute path, '..', link, device, fifo
        └── ArchiveTooLarge
"""

from __future__ import annotations


class BundleError(ValueError):
    code = "bundle_invalid"


class ManifestError(BundleError):
    code = "manifest_invalid"


class UnknownSchemaVersion(ManifestError):
    code = "manifest_schema_unknown"


class SignatureError(BundleError):
    code = "signature_invalid"


class MissingSignature(SignatureError):
    code = "signature_missing"


class UntrustedKey(SignatureError):
    code = "signature_untrusted"


class IntegrityError(BundleError):
    code = "integrity"


class MissingFile(IntegrityError):
    code = "file_missing"


class ExtraFile(IntegrityError):
    code = "file_extra"


class SizeMismatch(IntegrityError):
    code = "file_size_mismatch"


class HashMismatch(IntegrityError):
    code = "file_hash_mismatch"


class ArchiveError(BundleError):
    code = "archive_invalid"


class UnsafeMember(ArchiveError):
    code = "archive_unsafe_member"


class ArchiveTooLarge(ArchiveError):
    code = "archive_too_large"
