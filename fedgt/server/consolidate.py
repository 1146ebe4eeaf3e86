"""Server-side consolidation: one joint LLM adapter distilled from many organizations' LLM updates, no data.

Averaging LLM updates in weight space loses most of what each one taught (nearly orthogonal updates, each
diluted 1/n), while one adapter fine-tuned on the union of the organizations' data keeps almost all of it. The
server has no private data, but it has each organization's teacher: the LLM with that organization's update
applied, and the provider's public prompts. Multi-teacher, data-free, sequence-level distillation:

1. ``PromptPool.route``: each organization's released TinyLM update picks its k nearest curated shadow domains
   (cosine of normalised TinyLM updates, as the kNN baseline); their public prompts are that teacher's prompts.
   (A teacher cannot write its own prompts: organizations train on answers only, so an adapter knows nothing
   of its prompts; sampled prompts come out as pretraining noise.)
2. ``Consolidator.label``: every teacher answers its prompts greedily (its exact-match answer), all teachers in
   one batched ``generate`` through grouped LoRA.
3. ``Consolidator.__call__``: a fresh LLM adapter (the seeded LoRA init) is fine-tuned on the union of the
   labelled prompts, so one adapter serves every organization's task; its update is the round's LLM update.

This only post-processes the released updates (the GT's images of them) with public prompts: no privacy cost.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedgt.core.examples import END_OF_ANSWER, Example
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.grouped_lora import grouped_lora
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings
from fedgt.provider.shadow import LoraTuner, load_pairs


@dataclass(frozen=True)
class DistillConfig:
    """Budget of one round's consolidation."""

    prompts_per_teacher: int = 256
    neighbours: int = 1  # shadow domains whose prompts each teacher answers
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 32
    max_length: int = 96
    max_answer_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompts_per_teacher", "neighbours", "steps", "batch_size", "max_answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"distill.{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"distill.lr must be a finite number > 0, got {self.lr}")


class PromptPool:
    """Public prompts of the provider's shadow domains, with the TinyLM update it curated on each (routing keys)."""

    def __init__(self, names: Sequence[str], prompts: Sequence[Sequence[str]], tiny: torch.Tensor):
        if not (len(names) == len(prompts) == len(tiny)):
            raise ValueError(f"prompt pool: {len(names)} names, {len(prompts)} prompt lists, {len(tiny)} updates")
        self.names, self.prompts = list(names), [list(p) for p in prompts]
        flat = tiny.flatten(1).float()
        std = flat.std(0) if len(flat) > 1 else torch.ones(flat.shape[1])
        self.mean, self.std = flat.mean(0), torch.where(std > 1e-12, std, torch.ones_like(std))
        self.keys = torch.nn.functional.normalize((flat - self.mean) / self.std, dim=1)  # (S, Ls * Ds)

    @classmethod
    def from_provider(cls, gt_dir: str | Path) -> PromptPool:
        """The pool of a provider folder: its curated shadow pairs and its (regenerated) public shadow domains."""
        from fedgt.provider.public_data import task_shadow_domains

        gt_dir = Path(gt_dir)
        meta_path = gt_dir / "provider.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"consolidation needs the provider's metadata: {meta_path} is missing")
        provider = json.loads(meta_path.read_text())["provider"]
        pairs = load_pairs(gt_dir.parent / "shadow").final()
        domains = {d.name: d for d in task_shadow_domains(provider["n_examples"], provider["shadow_domains"],
                                                          provider["seed"])}
        missing = [n for n in pairs.names if n not in domains]
        if missing:
            raise ValueError(f"{gt_dir.parent / 'shadow'}: curated domains {missing[:3]} are not built-in shadow "
                             "domains (a user shadow folder cannot be regenerated here)")
        order = torch.argsort(pairs.domain)
        prompts = [[ex.context for ex in domains[n].train if ex.is_task] for n in pairs.names]
        return cls(pairs.names, prompts, pairs.tiny[order])

    def neighbours(self, tiny: torch.Tensor, k: int) -> list[list[int]]:
        """Indices of the ``k`` nearest shadow domains of each TinyLM update ``(T, Ls, Ds)``."""
        q = torch.nn.functional.normalize((tiny.flatten(1).float() - self.mean) / self.std, dim=1)
        return (q @ self.keys.T).topk(min(k, len(self.keys)), dim=1).indices.tolist()

    def route(self, tiny: torch.Tensor, n: int, k: int, seed: int = 0) -> list[list[str]]:
        """``n`` public prompts per TinyLM update, drawn evenly from its ``k`` nearest shadow domains."""
        rng = random.Random(seed)
        out = []
        for near in self.neighbours(tiny, k):
            pool = [p for i in near for p in self.prompts[i]]
            out.append([pool[j % len(pool)] for j in rng.sample(range(max(n, len(pool))), n)])
        return out


class Consolidator:
    """Distils many teachers (LLM updates as layer tokens) into one LLM update, on public prompts from ``pool``."""

    def __init__(self, llm_model: str, lora: LoraSettings, pool: PromptPool, cfg: DistillConfig = DistillConfig(),
                 device: str | torch.device = "cpu"):
        self.cfg, self.pool = cfg, pool
        self.teacher = LLMJudge(llm_model, lora, device=device, max_length=cfg.max_length)
        self.student = LoraTuner(llm_model, lora)
        self.student.model.to(device)
        tok = self.teacher.tokenizer
        (self.end_id,) = tok(END_OF_ANSWER, add_special_tokens=False).input_ids
        self.last_stats: dict[str, float] = {}

    @torch.no_grad()
    def label(self, teachers: torch.Tensor, prompts: Sequence[Sequence[str]], batch_rows: int = 512
              ) -> list[Example]:
        """Each teacher ``(T, layers, token_dim)`` answers its prompts greedily; the finished answers as examples."""
        if len(teachers) != len(prompts):
            raise ValueError(f"label: {len(teachers)} teachers but {len(prompts)} prompt lists")
        tok, model, dev = self.teacher.tokenizer, self.teacher.model, self.teacher.device
        flat = [(g, p) for g, ps in enumerate(prompts) for p in ps]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        encoded = [bos + ids for ids in tok([p for _, p in flat], add_special_tokens=False).input_ids]
        factors = self.teacher.factors(teachers)
        out = []
        for start in range(0, len(flat), batch_rows):
            rows = encoded[start:start + batch_rows]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=dev)  # left pad
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
            groups = torch.tensor([g for g, _ in flat[start:start + batch_rows]], device=dev)
            with grouped_lora(model, factors, groups):
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=self.cfg.max_answer_tokens, eos_token_id=self.end_id,
                                     pad_token_id=tok.pad_token_id)
            for (_, prompt), new in zip(flat[start:start + batch_rows], gen[:, width:].tolist(), strict=True):
                if self.end_id in new:  # an answer that never ended is dropped
                    answer = tok.decode(new[:new.index(self.end_id)])
                    out.append(Example(prompt, answer + END_OF_ANSWER, True))
        return out

    def __call__(self, teachers: torch.Tensor, tiny: torch.Tensor) -> torch.Tensor:
        """The joint LLM update of ``teachers`` ``(T, Lt, Dt)``, each on the prompts its TinyLM update routes to."""
        return self.distil(teachers, self.pool.route(tiny, self.cfg.prompts_per_teacher, self.cfg.neighbours,
                                                     self.cfg.seed))

    def distil(self, teachers: torch.Tensor, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """The joint LLM update ``(layers, token_dim)`` distilled from ``teachers`` on the given prompts."""
        t0 = time.perf_counter()
        union = self.label(teachers, prompts)
        if not union:
            raise ValueError("consolidation: no teacher finished an answer within distill.max-answer-tokens")
        t_label = time.perf_counter() - t0
        cfg = FinetuneConfig(steps=self.cfg.steps, lr=self.cfg.lr, batch_size=self.cfg.batch_size,
                             max_length=self.cfg.max_length, seed=self.cfg.seed)
        result = self.student.run(union, cfg)
        asked = sum(len(p) for p in prompts)
        self.last_stats = {"distill-examples": float(len(union)), "distill-answered": len(union) / max(asked, 1),
                           "distill-label-seconds": t_label,
                           "distill-train-seconds": time.perf_counter() - t0 - t_label}
        return self.student.tokens(result.update).to(teachers.dtype)
