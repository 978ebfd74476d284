"""Turn a verified bundle into an onnxruntime session: threads, graph options, EP ordered fallback."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from agent.bundle import Manifest, VerifiedBundle
from agent.runtime.cpu import usable_cpus
from agent.runtime.errors import LoadError, ProviderUnavailable
from agent.runtime.memory import anonymous_regions, collapse_to_huge_pages, release_clean_file_pages

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
QNN = "QNNExecutionProvider"


@dataclass(frozen=True)
class SessionChoice:
    session: object  # onnxruntime.InferenceSession
    execution_provider: str
    threads: int
    tried: tuple[str, ...]  # "EP: why it was skipped", in order
    model_file: str = ""  # the bundle file the session runs (the entry, or QNN's compiled EP context)
    spin: bool = True  # idle intra-op threads spin (runtime.spin_wait): a bundle's second graph opens alike


def session_options(threads: int, *, spin: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # Idle pool threads spin-wait between ops by default, as onnxruntime, llama.cpp and onnxruntime-genai
    # do: on a quiet 2-core EPYC (bench/agent_speed.py, two runs) decode +9 to +11 % for Qwen2.5-0.5B-shaped
    # int4 and -1 to +16 % for TinyLlama. When other processes share the cores, spinning steals the cores
    # the next op needs (measured under load: 6.9 vs 11.6 tok/s sleeping): runtime.spin_wait = false.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return so


def resolve_threads(manifest: Manifest, threads: int | None) -> int:
    if threads is not None:
        if threads < 1:
            raise LoadError(f"threads={threads} is not a thread count; use 1 or more, or None for auto")
        return threads
    return manifest.runtime.intra_op_threads or usable_cpus()


def _register_qnn() -> str | None:
    """Make the QNN plugin EP available; return why not, or None when it is."""
    try:
        from agent.runtime import qnn
    except ImportError as exc:
        return f"no QNN support in this agent ({exc})"
    register = getattr(qnn, "register_qnn_ep", None)
    if register is None:
        return "agent.runtime.qnn has no register_qnn_ep()"
    try:
        register()
    except Exception as exc:  # the plugin library can fail in many ways; fall back, say why
        return f"registering the QNN plugin failed: {exc}"
    return None


def create_session(bundle: VerifiedBundle, *, threads: int | None = None,
                   providers: list[str] | None = None, spin: bool = True,
                   huge_pages: bool = True) -> SessionChoice:
    """Try the bundle's execution providers in order (e.g. QNN, then CPU); CPU is the last resort.

    A plugin EP (QNN) must take the whole graph; otherwise the next EP in the list is used and the
    reason is kept in `tried`. `huge_pages`: the memory the session allocated while loading (the
    repacked weights) is moved to 2 MiB pages before it returns (agent/runtime/memory.py).
    """
    import onnxruntime as ort

    manifest = bundle.manifest
    n = resolve_threads(manifest, threads)
    # an EP named by the agent's config still gets the bundle's options for it (QNN: HTP backend, ...)
    bundle_options = {ep.name: dict(ep.options) for ep in manifest.runtime.execution_providers}
    wanted: list[tuple[str, dict[str, str]]] = (
        [(p, bundle_options.get(p, {})) for p in providers] if providers is not None
        else list(bundle_options.items())
    )
    if CPU not in [name for name, _ in wanted]:
        wanted.append((CPU, {}))
    model_path = str(bundle.file_path(manifest.model.entry))
    # NPU bundles may carry the graph already compiled for HTP (exporter --ep-context): QNN loads it
    # instead of compiling the entry at every start
    context = manifest.model.config.get("ep_context")
    context_path = str(bundle.file_path(context)) if isinstance(context, str) and context else None
    tried: list[str] = []
    for name, options in wanted:
        if name == QNN:
            why = _register_qnn()
            if why:
                tried.append(f"{name}: {why}")
                continue
        if name not in ort.get_available_providers() and not _plugin_has(name):
            tried.append(f"{name}: not available in this onnxruntime ({', '.join(ort.get_available_providers())})")
            continue
        before = anonymous_regions() if huge_pages else set()
        try:
            session, path = _open(name, options, model_path, session_options(n, spin=spin), context_path=context_path)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            tried.append(f"{name}: session creation failed: {str(exc).splitlines()[0][:300]}")
            log.warning("execution provider %s failed for %s: %s", name, manifest.ref, exc)
            continue
        released = release_clean_file_pages(bundle.path)  # weights repacked at load: their file pages
        if released:
            log.info("%s: released %.0f MB of file pages the session no longer reads", manifest.ref, released / 2**20)
        if huge_pages:
            _collapse(anonymous_regions() - before, manifest.ref)
        got = session.get_providers()[0]
        if got != name:
            tried.append(f"{name}: onnxruntime fell back to {got}")
        if tried:  # the bundle asked for something better first: say what it got and why
            log.warning("%s runs on %s; skipped: %s", manifest.ref, got, "; ".join(tried))
        return SessionChoice(session, got, n, tuple(tried), model_file=path, spin=spin)
    raise ProviderUnavailable(f"no execution provider could run {manifest.ref}: " + "; ".join(tried))


def _open(name: str, options: dict[str, str], path: str, so, *, context_path: str | None = None):
    """One session of the graph at `path` on EP `name` -> (session, the file it runs). CPU and the built-in EPs
    fall back to CPU node by node; a plugin EP (QNN, onnxruntime >= 1.22, attached by device) must take the
    whole graph, and QNN runs `context_path` (its compiled EP context) instead when given."""
    import onnxruntime as ort

    if name == CPU or not _plugin_has(name):
        chain = [(name, options)] + ([] if name == CPU else [(CPU, {})])
        return ort.InferenceSession(path, sess_options=so, providers=[c[0] for c in chain],
                                    provider_options=[c[1] for c in chain]), path
    # All or nothing: a graph the NPU takes only in part would report the NPU while the CPU
    # does the work, so any node it cannot run makes this EP fail and the next one is tried.
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if name == QNN:
        from agent.runtime.qnn import plugin_options

        options = plugin_options(options)
        path = context_path or path
    so.add_provider_for_devices([d for d in ort.get_ep_devices() if d.ep_name == name][:1], options)
    return ort.InferenceSession(path, sess_options=so), path


def graph_session(bundle: VerifiedBundle, choice: SessionChoice, entry: str, *, context: str | None = None):
    """A session for a second graph of the bundle (an NPU LM's decode graph) on the EP `choice` got, with the
    bundle's options for it and the main session's threads and spinning; on QNN its compiled EP `context` when
    the main session also runs compiled."""
    manifest = bundle.manifest
    path = bundle.file_path(entry)
    if not path.is_file():
        raise LoadError(f"{manifest.ref}: model.config names the graph {entry!r}, which the bundle does not hold; "
                        "re-export the bundle")
    name = choice.execution_provider
    options = {ep.name: dict(ep.options) for ep in manifest.runtime.execution_providers}.get(name, {})
    compiled = context and Path(choice.model_file).name != Path(manifest.model.entry).name
    try:
        return _open(name, options, str(path), session_options(choice.threads, spin=choice.spin),
                     context_path=str(bundle.file_path(context)) if compiled else None)[0]
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise LoadError(f"{manifest.ref}: graph {entry!r} does not load on {name}: "
                        f"{str(exc).splitlines()[0][:300]}") from None


HUGE_PAGES_MIN_MB = 64  # a model whose session allocated less gains nothing worth the copy


def _collapse(regions: set[tuple[int, int]], ref: str) -> int:
    """Huge pages for the session's new memory, before the model serves: MADV_COLLAPSE copies ~0.35 GB/s
    here (2.3 s for TinyLlama-1.1B int4), and a model serving meanwhile would see its latency jump (an
    update's watch window starts with the swap)."""
    t0 = time.perf_counter()
    done = collapse_to_huge_pages(regions, min_total=HUGE_PAGES_MIN_MB << 20)
    if done:
        log.info("%s: %.0f MB of weights on 2 MiB pages in %.1f s", ref, done / 2**20, time.perf_counter() - t0)
    return done


def _plugin_has(name: str) -> bool:
    import onnxruntime as ort

    try:
        return any(d.ep_name == name for d in ort.get_ep_devices())
    except AttributeError:
        return False
