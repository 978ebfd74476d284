"""`edgeship keys`: bundle-signing key pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from agent.bundle.signing import KeyError_, generate_keypair, key_id, load_public_key


@click.group("keys")
def cli() -> None:
    """Generate and inspect the Ed25519 keys that sign bundles."""


@cli.command("generate")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("keys"), show_default=True,
              help="Directory for NAME.key (mode 0600) and NAME.pub.")
@click.option("--name", default="edgeship", show_default=True, help="Base name of the two files.")
@click.option("--overwrite", is_flag=True, help="Replace an existing key pair.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate(out_dir: Path, name: str, overwrite: bool, as_json: bool) -> None:
    """Write a new signing key pair. Keep NAME.key secret; give NAME.pub to agents and the controller."""
    try:
        pair = generate_keypair(out_dir, name, overwrite=overwrite)
    except FileExistsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({"private_key": str(pair.private_path), "public_key": str(pair.public_path), "key_id": pair.key_id}))
    else:
        click.echo(f"private key: {pair.private_path} (keep secret, mode 0600)")
        click.echo(f"public key:  {pair.public_path} (pin this on agents and the controller)")
        click.echo(f"key id:      {pair.key_id}")


@cli.command("id")
@click.argument("public_key", type=click.Path(path_type=Path))
def show_id(public_key: Path) -> None:
    """Print the key id of a public key (the id bundle signatures name)."""
    try:
        click.echo(key_id(load_public_key(public_key)))
    except KeyError_ as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
