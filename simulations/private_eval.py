"""One simulated organization in the quality benchmark: everything computed *with* its private data.

Per private domain: the TinyLM's own fine-tune (its update, and its own test scores: ``tiny_ft``), the
same under DP, proxy-tuning scores, the LLM fine-tuned on the private data (the ceiling, simulation
only), and distillation through the TinyLM (the server rebuilds the tuned TinyLM from the update,
lets it answer public prompts, and fine-tunes the LLM on those answers: ``tiny_sample_kd``). Updates
come back as layer tokens; LLM updates are scored later, all methods alike, by ``fedgt.core.judge``.
Domains run in worker processes (one torch thread each).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from fedgt.core.data import DomainData
from fedgt.core.dp import DPConfig, privatize_update
from fedgt.core.evaluate import evaluate_split, greedy_answers
from fedgt.core.examples import Example
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.lora import LoraSettings
from fedgt.core.noise import SeededNoise
from fedgt.provider.shadow import LoraTuner, _with_lr
from simulations.proxy_tuning import proxy_tuning_scores, same_vocabulary


@dataclass(frozen=True)
class OrgConfig:
    """How organizations fine-tune (must match the curation) and which extras to compute."""

    tiny_model: str
    llm_model: str
    lora: LoraSettings
    finetune: FinetuneConfig
    tiny_lr: float | None = None
    llm_lr: float | None = None
    dp_sgd_epsilons: tuple[float, ...] = ()  # extra TinyLM fine-tunes under DP-SGD at these ε
    update_dp_epsilons: tuple[float, ...] = ()  # the non-DP update clipped + noised at these ε
    update_clip: float = 1.0
    kd_prompts: tuple[str, ...] = field(default=())  # public prompts for tiny_sample_kd (empty: skip it)


def _scores(model, tokenizer, examples: Sequence[Example]) -> dict[str, float]:
    m = evaluate_split(model, tokenizer, examples)
    return {k: m[k] for k in ("loss", "exact_match") if k in m}


def run_org(tiny: LoraTuner, llm: LoraTuner, data: DomainData, cfg: OrgConfig) -> dict:
    """Everything one organization's private data yields for the benchmark."""
    ft_tiny, ft_llm = _with_lr(cfg.finetune, cfg.tiny_lr), _with_lr(cfg.finetune, cfg.llm_lr)
    out: dict = {"name": data.name, "tokens": {}, "scores": {}, "seconds": {}}
    tiny.reset()
    out["scores"]["tiny_base"] = _scores(tiny.model, tiny.tokenizer, data.test)
    t0 = time.process_time()
    result = tiny.run(data.train, ft_tiny)
    out["seconds"]["tiny_ft"] = time.process_time() - t0
    out["tokens"]["tiny"] = tiny.tokens(result.update)
    out["scores"]["tiny_ft"] = _scores(tiny.model, tiny.tokenizer, data.test)
    llm.reset()  # B = 0: the untuned LLM
    if same_vocabulary(tiny.tokenizer, llm.tokenizer):
        out["scores"]["proxy_tuning"] = proxy_tuning_scores(llm.model, tiny.model, tiny.tokenizer, data.test)
    kd_examples = []
    if cfg.kd_prompts:
        answers = greedy_answers(tiny.model, tiny.tokenizer, list(cfg.kd_prompts), max_new_tokens=24)
        kd_examples = [Example(p, a + "\n", True) for p, a in zip(cfg.kd_prompts, answers, strict=True)]
    for eps in cfg.update_dp_epsilons:
        dp = DPConfig(mode="update", epsilon=eps, update_clip=cfg.update_clip)
        noisy, _ = privatize_update(result.update, dp, SeededNoise(cfg.finetune.seed + 1))  # reproducible bench
        out["tokens"][f"tiny_update_dp_eps{eps:g}"] = tiny.tokens(noisy)
    for eps in cfg.dp_sgd_epsilons:
        r = tiny.run(data.train, ft_tiny, DPConfig(mode="dp-sgd", epsilon=eps))
        out["tokens"][f"tiny_dpsgd_eps{eps:g}"] = tiny.tokens(r.update)
        out["scores"][f"tiny_ft_dpsgd_eps{eps:g}"] = _scores(tiny.model, tiny.tokenizer, data.test)
        out["scores"][f"tiny_ft_dpsgd_eps{eps:g}"]["epsilon_spent"] = r.metrics.get("dp-epsilon", float("nan"))
    t0 = time.process_time()
    g = llm.run(data.train, ft_llm)
    out["seconds"]["llm_ft"] = time.process_time() - t0
    out["tokens"]["llm_ft"] = llm.tokens(g.update)
    if kd_examples:
        t0 = time.process_time()
        k = llm.run(kd_examples, ft_llm)
        out["seconds"]["tiny_sample_kd"] = time.process_time() - t0
        out["tokens"]["tiny_sample_kd"] = llm.tokens(k.update)
    return out


_WORKER: dict = {}


def _init(cfg: OrgConfig, cache: str | None) -> None:
    torch.set_num_threads(1)
    if cache is not None:
        os.environ["FEDGT_CACHE"] = cache
    _WORKER.update(cfg=cfg, tiny=LoraTuner(cfg.tiny_model, cfg.lora), llm=LoraTuner(cfg.llm_model, cfg.lora))


def _work(data: DomainData) -> dict:
    return run_org(_WORKER["tiny"], _WORKER["llm"], data, _WORKER["cfg"])


def run_orgs(domains: Sequence[DomainData], cfg: OrgConfig, workers: int = 2, progress: bool = True) -> list[dict]:
    """``run_org`` for every domain in worker processes, results in input order."""
    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init, initargs=(cfg, os.environ.get("FEDGT_CACHE"))) as pool:
        results = list(tqdm(pool.imap(_work, domains), total=len(domains), desc="organizations",
                            disable=not progress))
    return results


def config_json(cfg: OrgConfig) -> dict:
    """The config without the (long) prompt list."""
    d = asdict(cfg)
    d["kd_prompts"] = len(cfg.kd_prompts)
    return d
