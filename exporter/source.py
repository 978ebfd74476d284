"""Where a model comes from: a hub id, a local directory, or a .gguf file; plus an optional LoRA adapter.

A local directory or file is read with `local_files_only=True`: no network call at all. A hub id
is downloaded once (huggingface_hub cache) and from then on read like a local directory.
`trust_remote_code` is passed only when the user asks for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import SourceError, TaskNotSupported

# Files a hub download needs: weights, configs, tokenizer, chat template. Not *.bin when
# safetensors exist is decided by the hub listing; the patterns only skip unrelated large files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class ResolvedSource:
    """A model readable from local disk. `gguf_file` is set when the weights are a GGUF file in `path`."""

    spec: str  # what the user passed
    path: Path  # local directory holding config/weights (or the GGUF file)
    kind: str  # "local" | "hub" | "gguf"
    revision: str | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None
    adapter: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def load_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw

    def describe(self) -> dict[str, Any]:
        """What goes into manifest.source."""
        out: dict[str, Any] = {"model": self.spec, "kind": self.kind}
        if self.revision:
            out["revision"] = self.revision
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        if self.adapter:
            out["adapter"] = str(self.adapter)
        return out

    @property
    def gguf_path(self) -> Path | None:
        return self.path / self.gguf_file if self.gguf_file else None


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not spec.startswith((".", "~")) and not os.path.isabs(spec)


def resolve_source(
    spec: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    adapter: str | Path | None = None,
) -> ResolvedSource:
    """Turn what the user typed into a local, readable model, downloading a hub id if needed."""
    text = str(spec)
    p = Path(text).expanduser()
    adapter_path = _check_adapter(Path(adapter).expanduser()) if adapter else None
    if p.is_file():
        if p.suffix != ".gguf":
            raise SourceError(f"model file {p} is not a .gguf file; pass a model directory, a hub id or a .gguf file")
        return ResolvedSource(text, p.parent.resolve(), "gguf", revision, trust_remote_code, p.name, adapter_path)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists():
            if len(ggufs) == 1:
                return ResolvedSource(text, p.resolve(), "gguf", revision, trust_remote_code, ggufs[0].name, adapter_path)
            hint = f"; it holds {len(ggufs)} .gguf files, pass one of them" if ggufs else ""
            raise SourceError(f"model directory {p} has no config.json{hint}")
        return ResolvedSource(text, p.resolve(), "local", revision, trust_remote_code, None, adapter_path)
    if not _looks_like_hub_id(text):
        raise SourceError(f"model {text!r} is neither an existing path nor a hub id like 'org/name'")
    return ResolvedSource(text, _download(text, revision), "hub", revision, trust_remote_code, None, adapter_path)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise SourceError(f"hub model {repo_id!r} not found (or private: run `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise SourceError(
            f"hub model {repo_id!r} is not in the local cache and the hub cannot be reached (offline?); "
            "pass a local model directory or .gguf file instead"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise SourceError(f"cannot download {repo_id!r}: {exc}; pass a local model directory instead") from None


def _check_adapter(path: Path) -> Path:
    if not (path / "adapter_config.json").exists():
        raise SourceError(f"adapter {path} has no adapter_config.json; pass a directory saved by peft's save_pretrained")
    return path.resolve()


def load_config(src: ResolvedSource) -> Any:
    from transformers import AutoConfig

    if src.gguf_path is not None:  # transformers' GGUF loader lacks some architectures (exporter/gguf/reference.py)
        from exporter.gguf.reference import load_config as gguf_config

        return gguf_config(src.gguf_path)
    try:
        return AutoConfig.from_pretrained(src.path, **src.load_kwargs)
    except ValueError as exc:
        raise SourceError(f"cannot read the model config of {src.spec}: {exc}") from None


def infer_task(config: Any) -> str:
    """The edgeship task a checkpoint was trained for, from its `architectures` list."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "text-generation"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text-classification"
    if archs and all(a.endswith("Model") for a in archs):
        return "embedding"
    model_type = getattr(config, "model_type", "")
    if model_type in ("bert", "xlm-roberta", "roberta", "mpnet", "distilbert"):
        return "embedding"
    if not archs:  # GGUF configs carry no `architectures`; a decoder model_type says enough
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return "text-generation"
    raise TaskNotSupported(
        f"cannot tell the task of this {getattr(config, 'model_type', '?')} model (architectures: {archs or 'none'}); "
        "pass --task text-generation, embedding or text-classification"
    )


def load_causal_lm(src: ResolvedSource) -> Any:
    """The PyTorch reference in float32, with the LoRA adapter (if any) merged into its weights."""
    import torch
    from transformers import AutoModelForCausalLM

    if src.gguf_path is not None:
        from exporter.gguf.reference import load_model

        model = load_model(src.gguf_path)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32, **src.load_kwargs)
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot load {src.spec} as a causal LM: {exc}") from None
    if src.adapter:
        model = merge_adapter(model, src.adapter)
    model.eval()
    return model


def merge_adapter(model: Any, adapter: Path) -> Any:
    """Fold a LoRA/PEFT adapter into the base weights so the ONNX graph has no adapter ops."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise SourceError(f"adapter {adapter} does not fit this base model: {exc}") from None
    return peft_model.merge_and_unload()


def load_tokenizer(src: ResolvedSource) -> Any:
    from transformers import AutoTokenizer

    if src.gguf_path is not None:
        from exporter.gguf.reader import GgufFile
        from exporter.gguf.tokenizer import load_tokenizer as gguf_tokenizer

        return gguf_tokenizer(GgufFile(src.gguf_path))
    try:
        return AutoTokenizer.from_pretrained(src.path, **src.load_kwargs)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a GGUF's tokenizer.* fields its converter cannot read
        raise SourceError(f"cannot load the tokenizer of {src.spec}: {exc}") from None


def write_tokenizer(src: ResolvedSource, tokenizer: Any, out_dir: Path) -> list[str]:
    """Save the tokenizer (and its chat template) into `out_dir` in the fast-tokenizer layout the agent reads."""
    if src.gguf_file and getattr(tokenizer, "vocab_file", None):
        tokenizer.vocab_file = None  # else save_pretrained copies the whole GGUF in as "tokenizer.model"
    # transformers writes the padding/truncation of the tokenizer's last call into tokenizer.json; the
    # device pads and truncates per bundle (static shapes, its own batches), so the file carries neither
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    tokenizer.save_pretrained(out_dir)
    written = sorted(p.name for p in out_dir.iterdir() if p.name in TOKENIZER_FILES)
    if "tokenizer.json" not in written:
        raise SourceError(
            f"the tokenizer of {src.spec} has no fast (tokenizer.json) form; the device needs one. "
            "Install `tokenizers`/`sentencepiece` or use a model with a fast tokenizer"
        )
    cfg_path = out_dir / "tokenizer_config.json"
    if getattr(tokenizer, "chat_template", None) and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if "chat_template" not in cfg and not (out_dir / "chat_template.jinja").exists():
            (out_dir / "chat_template.jinja").write_text(tokenizer.chat_template)
            written.append("chat_template.jinja")
    return written
