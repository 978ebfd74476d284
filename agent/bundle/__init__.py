"""The bundle contract: what the exporter writes, the controller distributes, the agent runs.

See docs/BUNDLE.md. Import from here:

    from agent.bundle import Manifest, seal_bundle, open_bundle, pack, unpack, TrustedKeys
"""

from agent.bundle.archive import pack, unpack
from agent.bundle.errors import (
    ArchiveError,
    ArchiveTooLarge,
    BundleError,
    ExtraFile,
    HashMismatch,
    IntegrityError,
    ManifestError,
    MissingFile,
    MissingSignature,
    SignatureError,
    SizeMismatch,
    UnknownSchemaVersion,
    UnsafeMember,
    UntrustedKey,
)
from agent.bundle.manifest import (
    SCHEMA_VERSION,
    Benchmark,
    ExecutionProvider,
    FileEntry,
    FileRole,
    Golden,
    Manifest,
    ModelSpec,
    QualityReport,
    QualityStatus,
    Quantization,
    Runtime,
    Target,
    Task,
    semver_key,
)
from agent.bundle.signing import TrustedKeys, generate_keypair, load_private_key, load_public_key
from agent.bundle.store import VerifiedBundle, open_bundle, resign_bundle, seal_bundle, sha256_file

__all__ = [name for name in dir() if not name.startswith("_")]
