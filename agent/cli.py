"""`edgeship agent`: the on-device commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from agent.bundle import BundleError, TrustedKeys, open_bundle, unpack
from agent.bundle.signing import KeyError_


@click.group("agent")
def cli() -> None:
    """Run the on-device agent and check bundles."""


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True))
@click.option("--trusted-key", "keys", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A pinned public key (repeatable).")
@click.option("--json", "as_json", is_flag=True)
def verify(bundle: Path, keys: tuple[Path, ...], as_json: bool) -> None:
    """Verify a bundle directory or .tar archive against pinned keys."""
    import tempfile

    try:
        trusted = TrustedKeys.from_paths(list(keys))
        if bundle.is_dir():
            vb = open_bundle(bundle, trusted)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                vb = unpack(bundle, Path(tmp) / "b", trusted)
    except (BundleError, KeyError_) as exc:
        code = getattr(exc, "code", "key_invalid")
        if as_json:
            click.echo(json.dumps({"ok": False, "code": code, "error": str(exc)}))
        else:
            click.echo(f"error: {code}: {exc}", err=True)
        sys.exit(1)
    m = vb.manifest
    if as_json:
        click.echo(json.dumps({"ok": True, "ref": m.ref, "key_id": vb.key_id, "manifest_sha256": vb.manifest_sha256,
                               "task": m.task.value, "target": m.target.profile, "files": len(m.files)}))
    else:
        click.echo(f"ok: {m.ref} ({m.task.value}, target {m.target.profile}), {len(m.files)} files, "
                   f"signed by {vb.key_id}, manifest sha256 {vb.manifest_sha256}")
