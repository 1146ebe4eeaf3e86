"""Server-side consolidation: one joint LLM adapter distilled from many organizations' LLM updates, no data.

Averaging LLM updates in weight space loses most of what each one taught (nearly orthogonal updates, each
diluted 1/n), while one adapter fine-tuned on the union of the organizations' data keeps almost all of it. The
server has no private data, but it has each organization's teacher: the LLM with that organization's update
applied, and the provider's public prompts. Multi-teacher, data-free, sequence-level distillation:

1. ``PromptPool.route`` (``fedgt.provider.prompt_pool``): each organization's released TinyLM update picks its
   k nearest curated shadow domains (cosine of normalised TinyLM updates, as the kNN baseline); their public
   prompts are that teacher's prompts.
   (A teacher cannot write its own prompts: organizations train on answers only, so an adapter knows nothing
   of its prompts; sampled prompts come out as pretraining noise.)
2. ``Consolidator.label``: every teacher answers its prompts greedily (its exact-match answer), all teachers in
   one batched ``generate`` through grouped LoRA.
3. ``Consolidator.__call__``: one LLM adapter (the seeded LoRA init, or the previous round's joint adapter with
   ``warm_start``) is fine-tuned on the union of the labelled prompts, so one adapter serves every
   organization's task; its change from the seeded init is the round's LLM update.

This only post-processes the released updates (the GT's images of them) with public prompts: no privacy cost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedgt.core.examples import END_OF_ANSWER, Example
from fedgt.core.finetune import FinetuneConfig, finetune
from fedgt.core.grouped_lora import grouped_lora
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings, set_lora_parameters
from fedgt.core.updates import unflatten
from fedgt.provider.prompt_pool import PromptPool
from fedgt.provider.shadow import LoraTuner


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
    warm_start: bool = True  # each round's joint adapter starts from the previous round's
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompts_per_teacher", "neighbours", "steps", "batch_size", "max_answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"distill.{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"distill.lr must be a finite number > 0, got {self.lr}")


class Consolidator:
    """Distils many teachers (LLM updates as layer tokens) into one LLM update, on public prompts from ``pool``."""

    def __init__(self, llm_model: str, lora: LoraSettings, pool: PromptPool, cfg: DistillConfig = DistillConfig(),
                 device: str | torch.device = "cpu"):
        self.cfg, self.pool = cfg, pool
        self.teacher = LLMJudge(llm_model, lora, device=device, max_length=cfg.max_length)
        self.student = LoraTuner(llm_model, lora)
        self.student.model.to(device)
        tok = self.teacher.tokenizer
        self.end_id = tok(END_OF_ANSWER, add_special_tokens=False).input_ids[-1]  # the newline's own token
        self.last_stats: dict[str, float] = {}
        self.previous: torch.Tensor | None = None  # the last joint update (layer tokens), for warm starts

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
        # GPT-2-style tokenizers have no pad token: pad with eos (masked out either way).
        pad = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
        out = []
        for start in range(0, len(flat), batch_rows):
            rows = encoded[start:start + batch_rows]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)  # left pad
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
            groups = torch.tensor([g for g, _ in flat[start:start + batch_rows]], device=dev)
            with grouped_lora(model, factors, groups):
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=self.cfg.max_answer_tokens, eos_token_id=self.end_id,
                                     pad_token_id=pad)
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
        self.student.reset()
        start = torch.zeros_like(teachers[0]) if self.previous is None or not self.cfg.warm_start else self.previous
        if self.previous is not None and self.cfg.warm_start:
            delta = unflatten(start, self.student.spec)
            set_lora_parameters(self.student.model, {k: v + delta[k] for k, v in self.student.init.items()})
        result = finetune(self.student.model, self.student.tokenizer, union, cfg)
        joint = start + self.student.tokens(result.update).to(start.dtype)  # relative to the seeded init
        self.previous = joint.detach().clone()
        asked = sum(len(p) for p in prompts)
        self.last_stats = {"distill-examples": float(len(union)), "distill-answered": len(union) / max(asked, 1),
                           "distill-label-seconds": t_label,
                           "distill-train-seconds": time.perf_counter() - t0 - t_label}
        return joint.to(teachers.dtype)

    def reset(self) -> None:
        """Forget the previous joint adapter (the next call starts from the seeded init)."""
        self.previous = None
