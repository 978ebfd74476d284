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


@cli.command("run")
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="TOML config file (default /etc/edgeship/agent.toml, or $EDGESHIP_AGENT_CONFIG).")
@click.option("--device-id", default=None, help="Override the device id (default: /etc/machine-id).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label (repeatable); replaces configured labels.")
@click.option("--broker-url", default=None, help="mqtt://host:port or mqtts://host:port.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="Bundles and update state (default /var/lib/edgeship).")
@click.option("--api-bind", default=None, help="host:port or unix:/path for the local API.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path), help="Pinned public key (repeatable).")
@click.option("--log-level", default=None, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--set", "sets", multiple=True, metavar="PATH=VALUE", help="Any option by dotted path, e.g. broker.keepalive_s=60.")
@click.option("--check-config", is_flag=True, help="Print the resolved config as JSON (password masked) and exit.")
def run(config, device_id, labels, broker_url, state_dir, api_bind, trusted_keys, log_level, sets, check_config) -> None:
    """Run the agent: serve the active bundle locally, report to the fleet, apply updates.

    Sources, highest first: these options, EDGESHIP_AGENT_* environment variables, the TOML file, defaults.
    """
    from agent.config import ConfigError, load_settings, merge, parse_override
    from agent.service import StartupError, run_agent

    try:
        overrides: dict = {}
        for item in sets:
            overrides = merge(overrides, parse_override(item))
        flags = {"device_id": device_id, "broker": {"url": broker_url} if broker_url else None, "state_dir": state_dir,
                 "api": {"bind": api_bind} if api_bind else None, "log_level": log_level,
                 "labels": ",".join(labels) if labels else None, "trusted_keys": list(trusted_keys) or None}
        overrides = merge(overrides, {k: v for k, v in flags.items() if v is not None})
        if check_config:
            click.echo(json.dumps(load_settings(config, overrides).redacted(), indent=2))
            return
        sys.exit(run_agent(config, overrides))
    except ConfigError as exc:
        for line in exc.lines:
            click.echo(line, err=True)
        sys.exit(2)
    except StartupError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@cli.command("install-service")
@click.option("--dry-run", is_flag=True, help="Print the unit instead of writing it.")
@click.option("--unit-dir", type=click.Path(path_type=Path), default=Path("/etc/systemd/system"), show_default=True)
@click.option("--user", default=None, help="Run as this existing system user (default: DynamicUser=yes).")
@click.option("--config", "config", type=click.Path(path_type=Path), default=Path("/etc/edgeship/agent.toml"), show_default=True,
              help="Config path the unit passes to `edgeship agent run`.")
@click.option("--watchdog", "watchdog_s", type=int, default=60, show_default=True, help="WatchdogSec= in seconds.")
@click.option("--allow-device", "devices", multiple=True, metavar="/dev/...", help="Device node an NPU/GPU needs (repeatable).")
def install_service(dry_run, unit_dir, user, config, watchdog_s, devices) -> None:
    """Write a hardened systemd unit for the agent (edgeship-agent.service)."""
    from agent.systemd import (BACKOFF_SYSTEMD, CREDENTIALS, CREDENTIALS_NAME_CONFIG, UnitError, UnitOptions,
                               credentials_for, default_exec_start, install_unit, render_unit, systemd_version)

    # agent.toml (and the broker key it names) go to the service as credentials: enrolment writes them 0600.
    config_credential, key_credential = credentials_for(config)
    try:
        text = render_unit(UnitOptions(
            exec_start=default_exec_start(CREDENTIALS / CREDENTIALS_NAME_CONFIG if config_credential else config),
            user=user, watchdog_s=watchdog_s, devices=list(devices), config_credential=config_credential,
            key_credential=key_credential, restart_backoff=(systemd_version() or 0) >= BACKOFF_SYSTEMD))
        if dry_run:
            click.echo(text, nl=False)
            return
        path = install_unit(text, unit_dir)
    except UnitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if config_credential is None:
        click.echo(f"note: {config} is not there yet, so the unit reads it in place; after enrolling the device, "
                   "run install-service again to hand its root-only files to the service", err=True)
    click.echo(f"wrote {path}\nnext: systemctl daemon-reload && systemctl enable --now edgeship-agent")


def _local_settings(config: Path | None, state_dir: Path | None, trusted_keys: tuple[Path, ...]):
    """The agent's settings as `agent run` resolves them, for the commands that act on its state dir."""
    from agent.config import ConfigError, load_settings

    flags = {"state_dir": state_dir, "trusted_keys": list(trusted_keys) or None}
    try:
        return load_settings(config, {k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        for line in exc.lines:
            click.echo(line, err=True)
        sys.exit(2)


_config_option = click.option("--config", "config", type=click.Path(path_type=Path), default=None,
                              help="The agent's TOML config (as for `agent run`).")
_state_dir_option = click.option("--state-dir", type=click.Path(path_type=Path), default=None,
                                 help="The agent's state dir (default /var/lib/edgeship).")


@cli.command("install")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@_config_option
@_state_dir_option
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path),
              help="Pinned public key (repeatable) for a stopped agent; default: the agent's trusted_keys. "
                   "A running agent always checks against its own.")
@click.option("--allow-downgrade", is_flag=True, help="Install even if PATH is older than the active bundle.")
@click.option("--replaces", multiple=True, metavar="NAME",
              help="PATH's bundle may replace the active bundle of this name (repeatable); needed when the names differ.")
def install_cmd(path, config, state_dir, trusted_keys, allow_downgrade, replaces) -> None:
    """Install a bundle directory or .tar on this device, without a controller.

    A running agent switches to it without a restart; a stopped one serves it on its next start.
    Exit codes: 0 installed, 1 refused or failed, 2 bad config, 4 busy.
    """
    from agent.control import ControlError
    from agent.install import InstallError, describe, install

    settings = _local_settings(config, state_dir, trusted_keys)
    try:
        result = install(settings, path, allow_downgrade=allow_downgrade, replaces=tuple(replaces),
                         progress=lambda step: click.echo(f"{step.state}...", err=True))
    except (InstallError, ControlError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(describe(result.step, result.via), err=not result.step.ok)
    sys.exit(result.exit_code)


@cli.command("status")
@_config_option
@_state_dir_option
@click.option("--json", "as_json", is_flag=True)
def status_cmd(config, state_dir, as_json) -> None:
    """Show the active and previous bundle and the last update, with its outcome."""
    from agent.install import InstallError, status
    from agent.update.errors import StateFileError

    settings = _local_settings(config, state_dir, ())
    try:
        info = status(settings)
    except (InstallError, StateFileError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return

    def ref(r):
        return f"{r['name']}@{r['version']} ({r['manifest_sha256'][:12]})" if r else "none"

    click.echo(f"agent:    {'running' if info['agent_running'] else 'not running'} ({info['state_dir']})")
    click.echo(f"active:   {ref(info['active'])}")
    click.echo(f"previous: {ref(info['previous'])}")
    u = info["update"]
    if u is None:
        click.echo("last update: none")
    else:
        outcome = f"{u['state']}" + (f" ({u['code']}: {u['reason']})" if u["code"] else (f" ({u['reason']})" if u["reason"] else ""))
        click.echo(f"last update: {u['kind']} {u['bundle']} from {u['source']}: {outcome}")
