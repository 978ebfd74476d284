"""The `edgeship` command: one group per role, each loaded only when it is used.

A group's module is imported lazily, so `edgeship agent ...` on a device never imports the
exporter's torch stack, and a group whose extra is not installed fails with one line naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from edgeship import __version__

# group name -> (module holding a click group called `cli`, extra, modules that extra provides)
GROUPS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "export": (
        "exporter.cli",
        "export",
        ("torch", "transformers", "optimum.exporters.onnx", "onnx", "onnxruntime"),
        "Export a Hugging Face model to a signed ONNX bundle (workstation).",
    ),
    "agent": (
        "agent.cli",
        "agent",
        ("onnxruntime", "paho.mqtt", "pydantic_settings", "numpy", "tokenizers", "cryptography"),
        "Run and manage the on-device agent (edge device).",
    ),
    "fleet": (
        "fleet.cli",
        "fleet",
        ("sqlalchemy", "alembic", "paho.mqtt", "httpx", "rich", "fastapi", "uvicorn"),
        "Run and drive the fleet controller.",
    ),
    "serve": (
        "agent.serve_cli",
        "agent",
        ("onnxruntime", "numpy", "tokenizers", "cryptography"),
        "Serve a bundle (or, with the export extra, a model) on the OpenAI-compatible API, no fleet needed.",
    ),
    "keys": (
        "agent.keys_cli",
        "agent",
        ("cryptography",),
        "Generate and inspect bundle-signing keys.",
    ),
}


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """Modules of `modules` that cannot be found, without importing them."""
    missing = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:  # parent package absent
            missing.append(name)
    return missing


class LazyGroups(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(GROUPS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in GROUPS:
            return None
        module_name, extra, needs, help_text = GROUPS[name]
        # `edgeship --help` lists the groups without importing any of them.
        if ctx.resilient_parsing or "--help" in sys.argv[1:2]:
            return click.Group(name, help=help_text)
        missing = missing_modules(needs)
        if missing:
            click.echo(
                f"edgeship {name}: the '{extra}' extra is not installed (missing "
                f"{', '.join(missing)}); install it with: pip install 'edgeship[{extra}]'",
                err=True,
            )
            sys.exit(3)
        return importlib.import_module(module_name).cli


@click.group(cls=LazyGroups, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeship")
def cli() -> None:
    """edgeship: Hugging Face model -> signed ONNX bundle -> fleet of edge devices."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
