"""`edgeship fleet`: run the controller and drive it over its REST API.

Exit codes: 0 ok, 1 refused or failed, 2 usage, 3 controller unreachable, 4 not authorized,
5 not found, 6 conflict (state forbids it); `rollout watch` ends with 0 completed, 7 paused,
8 aborted or rolled back. Every error is one line on stderr (and a JSON object with --json).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fleet.client import ClientError, FleetClient
from fleet.rollout.plan import DEVICE_DEADLINE, HEALTH_WINDOW

EXIT_PAUSED, EXIT_STOPPED = 7, 8
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _console():
    from rich.console import Console

    # piped output (grep, logs) should not be cut to 80 columns with ellipses
    return Console(width=None if sys.stdout.isatty() else 200)


def _fail(message: str, code: int, *, as_json: bool, kind: str = "error") -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message, "code": kind}))
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def command(fn: Callable) -> Callable:
    """Give a command a FleetClient and turn every ClientError into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        as_json = kwargs.get("as_json", False)
        client = FleetClient(ctx.obj.get("url"), ctx.obj.get("token"))
        try:
            return fn(client, *args, **kwargs)
        except ClientError as exc:
            _fail(str(exc), exc.exit_code, as_json=as_json, kind=getattr(exc, "code", "") or type(exc).__name__)
        finally:
            client.close()

    return wrapper


def _out(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, default=str))
    else:
        human(data)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


@click.group("fleet")
@click.option("--url", envvar="EDGESHIP_FLEET_URL", help="Controller URL (default http://127.0.0.1:8470).")
@click.option("--token", envvar="EDGESHIP_FLEET_TOKEN", help="API bearer token.")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None) -> None:
    """Run the fleet controller and manage devices, bundles and rollouts."""
    ctx.ensure_object(dict)
    ctx.obj.update(url=url, token=token)


@cli.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file.")
@click.option("--http-host")
@click.option("--http-port", type=int)
@click.option("--mqtt-url")
@click.option("--database-url")
@click.option("--data-dir", type=click.Path(path_type=Path))
@click.option("--log-level")
def serve(config_file: Path | None, **overrides: Any) -> None:
    """Run the controller (systemd-able; stops cleanly on SIGTERM)."""
    import logging

    from fleet.config import FleetSettings
    from fleet.errors import FleetError
    from fleet.server import Controller

    try:
        settings = FleetSettings.load(config_file, **overrides)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        controller = Controller(settings)
    except FleetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    controller.serve()


# ---- devices -----------------------------------------------------------------------------------


def _devices_table(rows: list[dict]) -> None:
    from rich.table import Table

    t = Table("device", "online", "last seen", "agent", "arch", "bundle", "labels", "errors/req", "p95 ms")
    for d in rows:
        inf = (d.get("health") or {}).get("inference") or {}
        active = d.get("active") or {}
        labels = {**d.get("labels", {}), **d.get("op_labels", {})}
        online = "[green]yes[/]" if d["online"] else f"[red]no[/] {d.get('offline_reason', '')}"
        t.add_row(d["id"], "[red]revoked[/]" if d.get("revoked") else online,
                  _ago(d.get("last_seen")), d.get("agent_version") or "-", (d.get("facts") or {}).get("arch", "-"),
                  (f"{active.get('name')}@{active.get('version')}" + (f" ({d['source']})" if d.get("source") else ""))
                  if active else "-",
                  ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-",
                  f"{inf.get('errors', 0)}/{inf.get('requests', 0)}" if inf else "-",
                  f"{inf['p95_ms']:.0f}" if inf.get("p95_ms") is not None else "-")
    _console().print(t)
    click.echo(f"{len(rows)} device(s), {sum(1 for d in rows if d['online'])} online")


@cli.command()
@click.option("--selector", default="", help="key=value[,key=value]: labels, arch, os, id, bundle.")
@json_option
@command
def devices(client: FleetClient, selector: str, as_json: bool) -> None:
    """List devices."""
    _out(client.devices(selector), as_json, _devices_table)


@cli.group()
def device() -> None:
    """Show or label one device."""


@device.command("show")
@click.argument("device_id")
@json_option
@command
def device_show(client: FleetClient, device_id: str, as_json: bool) -> None:
    """Everything known about a device."""

    def human(d: dict) -> None:
        _devices_table([d])
        facts = d.get("facts") or {}
        click.echo(f"facts: {facts.get('cpu_model', '-')}, {facts.get('cores', 0)} cores, "
                   f"{facts.get('ram_bytes', 0) // 2**20} MiB, EPs {facts.get('execution_providers', [])}")
        if d.get("update"):
            u = d["update"]
            click.echo(f"last update: {u.get('state')} {u.get('command_id')} {u.get('reason', '')}")
        for r in d.get("rollouts", []):
            click.echo(f"rollout {r['rollout']}: {r['state']} {r['reason']}")

    _out(client.device(device_id), as_json, human)


@device.command("label")
@click.argument("device_id")
@click.argument("labels", nargs=-1, required=True)
@json_option
@command
def device_label(client: FleetClient, device_id: str, labels: tuple[str, ...], as_json: bool) -> None:
    """Set operator labels (k=v; k= removes one)."""
    _out(client.label(device_id, list(labels)), as_json,
         lambda d: click.echo(f"{d['id']}: " + (",".join(f"{k}={v}" for k, v in sorted(d["op_labels"].items())) or "no labels")))


# ---- bundles -----------------------------------------------------------------------------------


@cli.group()
def bundle() -> None:
    """Push, list, show and remove bundles."""


def _bundles_table(rows: list[dict]) -> None:
    from rich.table import Table

    t = Table("bundle", "task", "target", "size", "manifest sha256", "served", "in use by")
    for b in rows:
        served = ("controller" if b["stored"] and not b["url_only"] else "") + (" +urls" if b["urls"] else "")
        t.add_row(b["ref"], b.get("task") or "-", (b.get("target") or {}).get("profile", "-"), f"{b['size']:,}",
                  b["manifest_sha256"][:16], served.strip() or "removed", ",".join(b.get("active_rollouts", [])) or "-")
    _console().print(t)


@bundle.command("push")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
@command
def bundle_push(client: FleetClient, path: Path, as_json: bool) -> None:
    """Upload a bundle (directory or .tar); the controller verifies it against its trusted keys."""
    _out(client.push(path), as_json,
         lambda b: click.echo(f"pushed {b['ref']} (manifest sha256 {b['manifest_sha256']}, {b['size']:,} bytes, signed by {b['key_id']})"))


@bundle.command("list")
@json_option
@command
def bundle_list(client: FleetClient, as_json: bool) -> None:
    """List bundles."""
    _out(client.bundles(), as_json, _bundles_table)


@bundle.command("show")
@click.argument("ref")
@json_option
@command
def bundle_show(client: FleetClient, ref: str, as_json: bool) -> None:
    """Show a bundle (NAME@VERSION or manifest sha256)."""

    def human(b: dict) -> None:
        _bundles_table([b])
        m = b.get("manifest", {})
        click.echo(f"quality: {m.get('quality', {}).get('status')}, quantization: {m.get('quantization', {}).get('recipe')}, "
                   f"files: {b['files']}, urls: {b['urls'] or '-'}")

    _out(client.bundle(ref), as_json, human)


@bundle.command("rm")
@click.argument("ref")
@json_option
@command
def bundle_rm(client: FleetClient, ref: str, as_json: bool) -> None:
    """Remove a bundle (refused while an active rollout uses it)."""
    _out(client.remove_bundle(ref), as_json, lambda d: click.echo(f"removed {d['removed']}"))


@bundle.command("register-url")
@click.argument("ref")
@click.argument("url")
@click.option("--only", is_flag=True, help="Devices get only external URLs, not the controller's copy.")
@json_option
@command
def bundle_register_url(client: FleetClient, ref: str, url: str, only: bool, as_json: bool) -> None:
    """Register an external download URL (object store, CDN) for a bundle."""
    _out(client.register_url(ref, url, only=only), as_json, lambda b: click.echo(f"{b['ref']}: urls {b['urls']}"))


# ---- rollouts ----------------------------------------------------------------------------------


@cli.group()
def rollout() -> None:
    """Create and drive staged rollouts."""


def _rollouts_table(rows: list[dict]) -> None:
    from rich.table import Table

    t = Table("rollout", "bundle", "state", "wave", "devices", "committed", "failed", "selector", "reason")
    for r in rows:
        c = r["counts"]
        t.add_row(r["id"], r["bundle"], r["state"], f"{r['wave']}/{r['waves']}", str(r["total"]),
                  str(c.get("committed", 0)), str(c.get("failed", 0)), r["selector"] or "(all)", r["reason"] or "")
    _console().print(t)


def _rollout_view(r: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(f"rollout {r['id']}  {r['bundle']}  [{r['state']}]  wave {r['wave']}/{r['waves']}  {r['reason']}")
    waves = Table("wave", "devices", "committed", "failed", "skipped", "in progress", "gate")
    prev = 0
    devs = r.get("devices") or []
    gates = {g["wave"] + 1: g for g in r.get("gate", [])}
    for i, upto in enumerate(r["wave_sizes"], start=1):
        mine = [d for d in devs if d["wave"] == i]
        states = [d["state"] for d in mine]
        g = gates.get(i)
        waves.add_row(str(i), str(upto - prev), str(states.count("committed")), str(states.count("failed")),
                      str(states.count("skipped")),
                      str(sum(1 for s in states if s in ("sent", "accepted", "updating", "waiting"))),
                      (("pass" if g["passed"] else "FAIL") + f": {g['reason']}") if g else "")
        prev = upto
    counts = Text("  ".join(f"{k}: {v}" for k, v in sorted(r["counts"].items())))
    failures = Table("device", "wave", "state", "code", "reason")
    for d in [d for d in devs if d["state"] in ("failed", "skipped")][:20]:
        failures.add_row(d["device"], str(d["wave"]), d["state"], d["code"], d["reason"])
    parts = [head, waves, counts]
    if failures.row_count:
        parts.append(failures)
    return Group(*parts)


@rollout.command("create")
@click.option("--bundle", "bundle_ref", required=True, help="NAME@VERSION")
@click.option("--selector", default="", help="key=value[,key=value]; empty selects every device.")
@click.option("--waves", default="1,10%,50%,100%", show_default=True)
@click.option("--max-failure-rate", default="5%", show_default=True)
@click.option("--health-window", default="10m", show_default=True, help=f"Watch each wave this long ({HEALTH_WINDOW}).")
@click.option("--device-deadline", default="30m", show_default=True,
              help=f"Time a device has to commit, or to come online ({DEVICE_DEADLINE}).")
@click.option("--auto-rollback", is_flag=True, help="On a failed gate, abort and roll back every updated device.")
@click.option("--max-concurrent-downloads", type=int)
@click.option("--offline-policy", type=click.Choice(["fail", "skip"]), default="fail", show_default=True)
@click.option("--max-error-rate-increase", default="5%", show_default=True, help="Allowed error rate over baseline.")
@click.option("--max-p95-ratio", type=float, default=1.5, show_default=True, help="Allowed p95 latency / baseline.")
@click.option("--min-requests", type=int, default=1, show_default=True, help="Traffic needed to judge health.")
@click.option("--replaces", multiple=True, metavar="NAME",
              help="A bundle name this bundle may replace on a device (repeatable); devices refuse other name changes.")
@json_option
@command
def rollout_create(client: FleetClient, bundle_ref: str, as_json: bool, **opts: Any) -> None:
    """Start a staged rollout."""
    r = client.create_rollout(bundle=bundle_ref, **opts)
    _out(r, as_json, lambda r: click.echo(f"created rollout {r['id']}: {r['bundle']} to {r['total']} device(s) in "
                                         f"{r['waves']} wave(s) {r['wave_sizes']}"))


@rollout.command("list")
@json_option
@command
def rollout_list(client: FleetClient, as_json: bool) -> None:
    """List rollouts, newest first."""
    _out(client.rollouts(), as_json, _rollouts_table)


@rollout.command("show")
@click.argument("rollout_id")
@json_option
@command
def rollout_show(client: FleetClient, rollout_id: str, as_json: bool) -> None:
    """Waves, per-state counts, failures with reasons."""
    _out(client.rollout(rollout_id), as_json, lambda r: _console().print(_rollout_view(r)))


@rollout.command("watch")
@click.argument("rollout_id")
@click.option("--interval", type=float, default=1.0, show_default=True)
@click.option("--timeout", type=float, default=0, help="Give up after this many seconds (0: never).")
@json_option
@command
def rollout_watch(client: FleetClient, rollout_id: str, interval: float, timeout: float, as_json: bool) -> None:
    """Live progress until the rollout completes, pauses or stops (exit 0, 7, 8)."""
    ends = {"completed": 0, "paused": EXIT_PAUSED, "aborted": EXIT_STOPPED, "rolled_back": EXIT_STOPPED}
    give_up = time.monotonic() + timeout if timeout else None
    r = client.rollout(rollout_id)
    if as_json:
        last = None
        while True:
            key = (r["state"], r["wave"], tuple(sorted(r["counts"].items())))
            if key != last:
                click.echo(json.dumps({k: v for k, v in r.items() if k != "devices"}, default=str))
                last = key
            if r["state"] in ends or (give_up and time.monotonic() > give_up):
                break
            time.sleep(interval)
            r = client.rollout(rollout_id)
    else:
        from rich.live import Live

        with Live(_rollout_view(r), console=_console(), refresh_per_second=4) as live:
            while r["state"] not in ends and not (give_up and time.monotonic() > give_up):
                time.sleep(interval)
                r = client.rollout(rollout_id)
                live.update(_rollout_view(r))
    if r["state"] not in ends:
        _fail(f"rollout {rollout_id} still {r['state']} after {timeout:g}s", 1, as_json=as_json, kind="timeout")
    sys.exit(ends[r["state"]])


def _operation(verb: str, help_text: str) -> None:
    @rollout.command(verb, help=help_text)
    @click.argument("rollout_id")
    @json_option
    @command
    def op(client: FleetClient, rollout_id: str, as_json: bool) -> None:
        _out(client.operate(rollout_id, verb), as_json,
             lambda r: click.echo(f"rollout {r['id']}: {r['state']} (wave {r['wave']}/{r['waves']})"))


_operation("pause", "Stop sending new deploys (devices already updating finish).")
_operation("resume", "Continue a paused rollout (after a failed gate: accept that wave and go on).")
_operation("abort", "Stop the rollout and cancel updates not yet committed.")
_operation("rollback", "Roll every device this rollout updated back to its previous bundle.")


# ---- broker credentials (fleet/enroll.py): the fleet CA, `device enroll`, `device revoke` -------

from fleet.enroll import ca as _ca_group, enroll_command as _enroll_command, revoke_command as _revoke_command  # noqa: E402

cli.add_command(_ca_group)
device.add_command(_enroll_command)
device.add_command(_revoke_command)
