"""`edgeship serve PATH`: try a bundle in one command, with the agent's own API and no fleet.

PATH is a bundle directory or its .tar; with the export extra also a hub id or a .gguf, exported
first with the default profile for this CPU into a cache directory that later runs reuse.
With trusted keys the signature is checked; without, every file's hash still is, and the caller
says once that the signature was not.

Errors: ServeError(ValueError) — PATH cannot be served; the message says what was expected.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.bundle import BundleError, TrustedKeys, VerifiedBundle, open_bundle, unpack
from agent.bundle.manifest import MANIFEST_NAME

DEFAULT_PORT = 8321


class ServeError(ValueError):
    """PATH is neither a bundle nor a model this machine can export; one line."""


@dataclass(frozen=True)
class Opened:
    bundle: VerifiedBundle
    signature_checked: bool


def cache_root() -> Path:
    """Where exports made by `edgeship serve` live ($EDGESHIP_CACHE, else ~/.cache/edgeship)."""
    return Path(os.environ.get("EDGESHIP_CACHE") or Path.home() / ".cache" / "edgeship")


def profile_for(arch: str, cpu_flags: frozenset[str]) -> str:
    """The default target profile for this CPU (the same presets `edgeship export --profile` names)."""
    if arch in ("aarch64", "arm64"):
        return "cpu-arm64"
    if {"avx512f", "avx512_vnni"} <= cpu_flags:
        return "cpu-x86-avx512-vnni"
    return "cpu-x86-avx2"


def open_for_serving(path: Path, trusted: TrustedKeys, *, workdir: Path) -> Opened:
    """A bundle directory or .tar, verified: signature when keys are given, every file's hash always."""
    check_sig = len(trusted) > 0
    try:
        if path.is_dir():
            if not (path / MANIFEST_NAME).is_file():
                raise ServeError(f"{path} is a directory without {MANIFEST_NAME}; pass a bundle directory, its .tar, "
                                 "a .gguf or a hub id")
            return Opened(open_bundle(path, trusted, verify_signature=check_sig), check_sig)
        return Opened(unpack(path, workdir / "bundle", trusted, verify_signature=check_sig), check_sig)
    except BundleError as exc:
        raise ServeError(f"{path}: {exc.code}: {exc}; pass a bundle directory, its .tar, a .gguf or a hub id") from None


def looks_exportable(source: str) -> bool:
    """A .gguf file or something shaped like a hub id (org/name), not an existing bundle path."""
    p = Path(source)
    return (p.is_file() and p.suffix == ".gguf") or (not p.exists() and source.count("/") == 1 and " " not in source)


def _cache_entry(source: str, profile: str) -> tuple[Path, Path]:
    """(bundle dir, key dir) in the cache. A file is known by its contents (the same GGUF in another
    place or venv is found; a replaced one is exported again), a directory by its path and mtime; the
    edgeship version is in the key, so a new exporter exports again."""
    from edgeship import __version__

    root = cache_root() / "serve"
    path = Path(source)
    if path.is_file():
        ident = "sha256:" + _file_digest(path.resolve(), root)
    elif path.exists():
        ident = f"{path.resolve()}\0{path.stat().st_mtime_ns}"
    else:
        ident = source
    key = hashlib.sha256(f"{ident}\0{profile}\0{__version__}".encode()).hexdigest()[:16]
    return root / key, root / "key"


def _file_digest(path: Path, root: Path) -> str:
    """sha256 of `path`, remembered by (path, size, mtime) so a multi-GB file is read once, not per start."""
    st = path.stat()
    seen = root / "digests.json"
    stamp = f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
    try:
        known = json.loads(seen.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        known[stamp] = h.hexdigest()
        root.mkdir(parents=True, exist_ok=True)
        tmp = seen.with_name(f".digests.{os.getpid()}.json")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, seen)
    return known[stamp]


def export_cached(source: str, *, announce: Callable[[str], None] = lambda line: None) -> tuple[Path, Path]:
    """Export `source` once per (source, profile) into the cache; returns (bundle dir, public key).

    `announce` hears one line when an export really starts (not when the cache has it).
    """
    if importlib.util.find_spec("exporter") is None or importlib.util.find_spec("torch") is None:
        raise ServeError(f"{source!r} is a model, not a bundle; exporting it needs the export extra: "
                         "pip install 'edgeship[export]', or pass a bundle directory or .tar")
    from agent.bundle import generate_keypair
    from agent.facts import cpu_facts
    from exporter.api import export
    from exporter.errors import ExportError

    cpu = cpu_facts()
    profile = profile_for(cpu["arch"], frozenset(cpu["flags"]))
    out, keys = _cache_entry(source, profile)
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:  # two `serve`s of one model: one exports, the other waits for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (keys / "edgeship.pub").is_file():
            generate_keypair(keys, overwrite=True)
        if not (out / MANIFEST_NAME).is_file():
            announce(f"exporting {source} for {profile} into {out} (once; the next run reuses it)...")
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=root) as tmp:
                try:
                    export(source, out=Path(tmp) / "b", key=keys / "edgeship.key", profile=profile, benchmark=False)
                except ExportError as exc:
                    raise ServeError(f"cannot export {source!r}: {exc}") from None
                os.replace(Path(tmp) / "b", out)
    return out, keys / "edgeship.pub"
