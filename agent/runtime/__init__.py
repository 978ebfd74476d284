"""On-device inference: onnxruntime sessions for verified bundles, generation, embeddings.

    from agent.runtime import load_model, ModelHost, usable_cpus, cpu_facts

Nothing here imports torch or transformers; onnxruntime is imported when a model is loaded.
"""

from agent.runtime.cpu import cpu_facts, usable_cpus
from agent.runtime.errors import (
    Cancelled,
    ConstraintError,
    InputError,
    LoadError,
    NoModelLoaded,
    ProviderUnavailable,
    RuntimeError_,
    WrongTask,
)
from agent.runtime.host import ModelHost, StatsCollector
from agent.runtime.model import GoldenResult, LoadedModel, load_model
from agent.runtime.sampling import SamplingParams

__all__ = [name for name in dir() if not name.startswith("_")]
