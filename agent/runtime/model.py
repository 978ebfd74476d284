"""LoadedModel: one verified bundle in an onnxruntime session, plus what every task shares."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.bundle import Manifest, Task, VerifiedBundle
from agent.runtime.batch_policy import BatchPolicy
from agent.runtime.errors import LoadError, WrongTask
from agent.runtime.session import SessionChoice


@dataclass(frozen=True)
class GoldenResult:
    ok: bool
    max_abs_diff: float
    latency_ms: float
    reason: str = ""


class LoadedModel:
    """A bundle ready to run. Subclasses add generate / embed / classify for their task."""

    def __init__(self, bundle: VerifiedBundle, choice: SessionChoice) -> None:
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.path: Path = bundle.path
        self.task: Task = bundle.manifest.task
        self.session = choice.session
        self.execution_provider = choice.execution_provider
        self.threads = choice.threads
        self.provider_notes = choice.tried
        self.model_file = choice.model_file
        self.loaded_at = time.time()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._closed = threading.Event()

    @property
    def max_concurrency(self) -> int:
        """Requests this model runs at once; the API admits no more (a batching LM raises it)."""
        return 1

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def ref(self) -> str:
        return self.manifest.ref

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _wrong_task(self, what: str) -> WrongTask:
        return WrongTask(f"model {self.ref} is a {self.task.value} bundle; it cannot {what}")

    def generate(self, *args, **kwargs):
        raise self._wrong_task("generate text")

    def embed(self, texts):
        raise self._wrong_task("compute embeddings")

    def classify(self, texts):
        raise self._wrong_task("classify text")

    def run_golden(self) -> GoldenResult:
        """Run the bundle's golden inputs and compare with its golden outputs (the smoke test)."""
        import numpy as np

        golden = self.manifest.golden
        if golden is None:
            return GoldenResult(True, 0.0, 0.0, "bundle has no golden files; nothing to compare")
        try:
            with np.load(self.bundle.file_path(golden.inputs)) as f:
                feeds = {k: f[k] for k in f.files if k in self.input_names}
            with np.load(self.bundle.file_path(golden.outputs)) as f:
                expected = {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            return GoldenResult(False, float("inf"), 0.0, f"golden files unreadable: {exc}")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            return GoldenResult(False, float("inf"), 0.0, f"golden inputs lack {', '.join(missing)}")
        names = [n for n in self.output_names if n in expected]
        if not names:
            return GoldenResult(False, float("inf"), 0.0,
                                f"golden outputs name none of the model's outputs {self.output_names}")
        try:
            self.session.run(names, feeds)  # warm-up: first runs pay for allocation
            start = time.perf_counter()
            got = self.session.run(names, feeds)
            latency_ms = (time.perf_counter() - start) * 1000
        except Exception as exc:  # onnxruntime's own error types
            return GoldenResult(False, float("inf"), 0.0, f"running golden inputs failed: {exc}")
        worst, bad = 0.0, []
        for name, out in zip(names, got):
            ref = expected[name]
            if out.shape != ref.shape:
                bad.append(f"{name}: shape {out.shape} != golden {ref.shape}")
                worst = float("inf")
                continue
            diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if out.size else 0.0
            worst = max(worst, diff)
            if not np.allclose(out, ref, atol=golden.atol, rtol=golden.rtol):
                bad.append(f"{name}: max abs diff {diff:.3g} over atol {golden.atol} / rtol {golden.rtol}")
        if golden.latency_budget_ms is not None and latency_ms > golden.latency_budget_ms:
            bad.append(f"latency {latency_ms:.1f} ms over the budget of {golden.latency_budget_ms} ms")
        return GoldenResult(not bad, worst, latency_ms, "; ".join(bad))

    def close(self) -> None:
        """Release the session; later calls fail with a clear error."""
        self._closed.set()
        self.session = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ref} on {self.execution_provider} x{self.threads}>"


def load_model(bundle: VerifiedBundle, *, threads: int | None = None,
               providers: list[str] | None = None, spin: bool = True, huge_pages: bool = True,
               batching: BatchPolicy | None = None) -> LoadedModel:
    """Open a session for a verified bundle (not re-verified here) and wrap it for its task.

    `batching`: how a text-generation model shares decode steps among concurrent requests (None: one
    request at a time)."""
    from agent.runtime.encoders import ClassificationModel, EmbeddingModel
    from agent.runtime.generation import TextGenerationModel
    from agent.runtime.memory import trim_heap
    from agent.runtime.session import create_session

    if not isinstance(bundle, VerifiedBundle):
        raise LoadError(f"load_model needs a VerifiedBundle from open_bundle(), got {type(bundle).__name__}")
    choice = create_session(bundle, threads=threads, providers=providers, spin=spin, huge_pages=huge_pages)
    cls = {Task.TEXT_GENERATION: TextGenerationModel, Task.EMBEDDING: EmbeddingModel,
           Task.CLASSIFICATION: ClassificationModel}[bundle.manifest.task]
    if cls is TextGenerationModel and bundle.manifest.model.config.get("kv_layout") == "static":
        from agent.runtime.static_generation import StaticTextGenerationModel  # NPU bundles: host-side KV cache

        cls = StaticTextGenerationModel
    model = cls(bundle, choice, batching=batching) if cls is TextGenerationModel and batching is not None \
        else cls(bundle, choice)
    trim_heap()  # what loading read and parsed, freed but still mapped: 23 MB for SmolLM2
    return model
