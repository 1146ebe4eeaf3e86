"""Pretraining of the model presets on public data (``fedgt prepare``): explicit loop, cached result.

The pretraining mixture is public: fact-table rows and biographies stating every fact of the world
(the knowledge the LLM memorises and the TinyLM cannot hold), task examples of the *pretrain* domains
(so both models learn the ops and the Q/A layout), and a little real public text.
Private-only and shadow domains never appear here.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fedgt.core.batching import encode, per_example_loss
from fedgt.core.examples import Example, text_example
from fedgt.core.manifest import write_manifest
from fedgt.core.mixture import TOKENIZERS, PretrainData
from fedgt.core.models import (
    DERIVED,
    PREPARED_META,
    ModelPreset,
    build_model,
    count_parameters,
    get_preset,
    prepared_dir,
)
from fedgt.core.splits import make_domain_splits
from fedgt.core.tasks import arithmetic_practice, generate
from fedgt.core.tokenizer import train_char_tokenizer
from fedgt.core.world import make_world, sample_bios
from fedgt.provider.shipped import install


def make_tokenizer(cfg: PretrainData) -> PreTrainedTokenizerFast:
    """The tokenizer a prepared model is trained with (deterministic for the config)."""
    return train_char_tokenizer(public_texts(), words=TOKENIZERS[cfg.tokenizer])


def public_texts() -> list[str]:
    """Real public text shipped by a PyPI package (empty if it is not installed)."""
    try:
        from fedgt.core.data import load_public_text
    except ImportError:
        return []
    try:
        return [ex.target for ex in load_public_text()]
    except (ImportError, FileNotFoundError):
        return []


def pretraining_corpus(cfg: PretrainData, n: int, seed: int) -> list[Example]:
    """n examples of the public mixture, shuffled, deterministic for (cfg, seed)."""
    rng = random.Random(f"corpus-{seed}")
    world = make_world(cfg.num_people, seed=cfg.world_seed)
    domains = make_domain_splits(cfg.splits_seed).pretrain
    n_bio = int(n * cfg.knowledge_fraction)
    texts = public_texts()
    n_text = int(n * cfg.text_fraction) if texts else 0
    n_arith = int(n * cfg.arithmetic_fraction)
    n_task = n - n_bio - n_text - n_arith
    examples = [text_example(t) for t in sample_bios(world, n_bio, seed, table_fraction=cfg.table_fraction)]
    examples += arithmetic_practice(n_arith, seed)
    examples += [text_example(rng.choice(texts)) for _ in range(n_text)]
    per_domain = math.ceil(n_task / len(domains))
    tasks = [ex for d in domains for ex in generate(world, d, "public", per_domain, seed)]
    examples += rng.sample(tasks, n_task)
    rng.shuffle(examples)
    return examples


def lr_at(step: int, preset: ModelPreset) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < preset.pretrain_warmup:
        return preset.pretrain_lr * (step + 1) / preset.pretrain_warmup
    progress = (step - preset.pretrain_warmup) / max(1, preset.pretrain_steps - preset.pretrain_warmup)
    return preset.pretrain_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def length_bucketed_batches(lengths: torch.Tensor, batch_size: int, seed: int, window: int = 64) -> list[torch.Tensor]:
    """Shuffled batches of similar-length rows: sort within windows of ``window`` batches, then shuffle batches.

    Trimming each batch to its longest row then wastes little compute on padding (one long text
    example would otherwise widen its whole batch).
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g)
    batches = []
    for start in range(0, len(order), window * batch_size):
        chunk = order[start:start + window * batch_size]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, preset: ModelPreset,
             examples: list[Example], max_length: int, seed: int, progress: bool = True) -> list[float]:
    """Train all weights for preset.pretrain_steps with AdamW; returns the per-step loss."""
    data = encode(tokenizer, examples, max_length)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.pretrain_lr, betas=(0.9, 0.98), weight_decay=0.1)
    batches = length_bucketed_batches(data.attention_mask.sum(1), preset.pretrain_batch, seed)
    losses = []
    model.train()
    bar = tqdm(range(preset.pretrain_steps), desc=f"pretrain {preset.name}", disable=not progress)
    for step in bar:
        batch = data.select(batches[step % len(batches)])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, preset)
        loss = per_example_loss(model, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return losses


def prepare_preset(name: str, data: PretrainData = PretrainData(), seed: int = 0, force: bool = False,
                   progress: bool = True) -> Path:
    """Pretrain a preset and save it as a Hugging Face model directory (cached: a second call is free)."""
    preset = get_preset(name)
    out = prepared_dir(preset, asdict(data), seed)
    if (out / PREPARED_META).is_file() and not force:
        return out
    if not force and install(f"models/{out.name}", out):  # shipped in the repository: verified and copied
        return out
    t0 = time.time()
    tokenizer = make_tokenizer(data)
    model = build_model(preset, len(tokenizer), seed)
    examples = pretraining_corpus(data, preset.pretrain_steps * preset.pretrain_batch, seed)
    losses = pretrain(model, tokenizer, preset, examples, data.max_length, seed, progress)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "preset": asdict(preset),
        "data": asdict(data),
        "seed": seed,
        "parameters": count_parameters(model),
        "pretrain_seconds": round(time.time() - t0, 1),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "torch_threads": torch.get_num_threads(),
    }
    (out / PREPARED_META).write_text(json.dumps(meta, indent=2))  # marks the cache complete
    write_manifest(out)  # every file's sha256, verified on each load
    return out


def prepare_model(name: str, seed: int = 0, force: bool = False, progress: bool = True) -> Path:
    """``fedgt prepare`` for any model name: pretrain a preset, or derive a real model (``fedgt.provider.derive``)."""
    if name in DERIVED:
        from fedgt.provider.derive import prepare_derived

        return prepare_derived(name, force=force, progress=progress)
    return prepare_preset(name, seed=seed, force=force, progress=progress)
