"""`edgeship serve PATH`: the agent's OpenAI-compatible API over one bundle, no broker, no controller."""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from pathlib import Path

import click

from agent.serve import DEFAULT_PORT


@click.command("serve")
@click.argument("path")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
@click.option("--trusted-key", "keys", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Pinned public key (repeatable): the bundle's signature must verify against one.")
@click.option("--threads", type=int, default=None, help="Inference threads (default: detected).")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A file holding a bearer token; every route but /healthz then requires it.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Generations decoded together (1: one request at a time).")
@click.option("--kv-cache-mb", type=click.IntRange(16, 1 << 20), default=512, show_default=True,
              help="KV memory of the batched generations; a request that does not fit waits.")
@click.option("--prefix-cache-mb", type=click.IntRange(0, 1 << 20), default=256, show_default=True,
              help="KV of recent prompts kept for the next request that starts the same way (0: none).")
def cli(path: str, host: str, port: int, keys: tuple[Path, ...], threads: int | None, token_file: Path | None,
        max_batch: int, kv_cache_mb: int, prefix_cache_mb: int) -> None:
    """Serve a bundle directory or .tar (or, with the export extra, a hub id or .gguf) until Ctrl-C."""
    from agent.api import ApiServer
    from agent.bundle import TrustedKeys
    from agent.bundle.signing import KeyError_
    from agent.runtime import ModelHost, load_model
    from agent.runtime.batch_policy import BatchPolicy
    from agent.serve import ServeError, export_cached, looks_exportable, open_for_serving
    from agent.service import StartupError, read_token

    try:
        trusted = TrustedKeys.from_paths(list(keys))
        token = read_token(token_file) if token_file is not None else None
    except KeyError_ as exc:
        click.echo(f"error: --trusted-key: {exc}", err=True)
        sys.exit(2)
    except StartupError as exc:
        click.echo(f"error: --token-file: {str(exc).replace('api.token_file ', '')}", err=True)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="edgeship-serve-") as tmp:
        try:
            source = Path(path)
            if not source.exists() or looks_exportable(path):
                if not looks_exportable(path):
                    raise ServeError(f"{path} does not exist; pass a bundle directory, its .tar, a .gguf or a hub id")
                source, key = export_cached(path, announce=lambda line: click.echo(line, err=True))
                trusted = TrustedKeys.from_paths([key, *keys])
            opened = open_for_serving(source, trusted, workdir=Path(tmp))
            batching = BatchPolicy(max_batch=max_batch, kv_cache_mb=kv_cache_mb, prefix_cache_mb=prefix_cache_mb)
            model = load_model(opened.bundle, threads=threads, batching=batching)
        except ServeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        if not opened.signature_checked:
            click.echo("note: the signature was not checked (no --trusted-key); every file's hash was", err=True)
        server = ApiServer(ModelHost(model), host_addr=host, port=port, token=token, slots=max_batch)
        try:
            server.start()
        except OSError as exc:
            model.close()
            click.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port", err=True)
            sys.exit(1)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        m = opened.bundle.manifest
        route, body = (("chat/completions", '{"messages":[{"role":"user","content":"Hello"}]}')
                       if m.task.value == "text-generation" else ("embeddings", '{"input":"Hello"}'))
        auth = f' -H "Authorization: Bearer $(cat {token_file})"' if token is not None else ""
        click.echo(f"serving {m.ref} at {server.url}/v1 — try: curl {server.url}/v1/{route}{auth} "
                   f"-H 'Content-Type: application/json' -d '{body}'", err=False)
        sys.stdout.flush()
        stop.wait()
        server.stop(10.0)
        model.close()
        click.echo("stopped", err=True)
