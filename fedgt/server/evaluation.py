"""Server-side evaluation of the shared LLM after each round (it never leaves the server).

Scores the LLM (base + folded-in rounds + current adapter) on the public validation text always, and in
simulation on each organization's held-out test split — all sets in one grouped forward pass
(``fedgt.core.judge``). Optionally fine-tunes the LLM directly on each organization's data once (the ceiling of
LGR; simulation only: in a real federation that data never reaches the server).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedgt.core.data import DomainData, public_text_domains
from fedgt.core.examples import Example
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings
from fedgt.core.metrics import pooled_ratio
from fedgt.core.run_config import FedConfig
from fedgt.core.updates import flatten
from fedgt.provider.shadow import LoraTuner
from fedgt.server.global_adapter import GlobalAdapter, dense_change


class LLMEvaluator:
    """Scores a GlobalAdapter's LLM on the organizations' test splits and on public text."""

    def __init__(self, llm_model: str, lora: LoraSettings, orgs: Sequence[DomainData], public: Sequence[Example],
                 test_examples: int = 64, device: str | torch.device = "cpu", max_length: int = 96):
        self.judge = LLMJudge(llm_model, lora, device=device, max_length=max_length)
        self.llm_model = llm_model
        self.lora = lora
        self.org_names = [o.name for o in orgs]
        self.org_tests = [list(o.test[:test_examples]) for o in orgs]
        self.public = list(public)
        self.base_scores: list[dict] | None = None
        self.ceiling: list[dict] | None = None

    def _load(self, adapter: GlobalAdapter, dense: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Put the LLM's change from its base into the judge; the adapter's current factors as update tokens.

        ``dense`` (weights space): the LLM is base + these dense changes, and the adapter's factors are unused.
        Otherwise the rounds folded into the adapter's base are set as dense changes (reset every call, so a
        candidate round scored and then rolled back leaves no trace).
        """
        if dense is None:
            folded = [dense_change(piece, adapter.spec, self.lora.scaling) for piece in adapter.merged]
            dense = {m: sum(c[m] for c in folded) for m in folded[0]} if folded else {}
            delta = {k: adapter.current[k] - self.judge.init[k].cpu() for k in adapter.spec.keys}
        else:
            delta = {k: torch.zeros_like(v) for k, v in adapter.init.items()}
        self.judge.set_dense(dense)
        return flatten(delta, adapter.spec)

    @torch.no_grad()
    def public_loss(self, adapter: GlobalAdapter, dense: dict[str, torch.Tensor] | None = None) -> float:
        """The LLM's loss on the public validation text (the round acceptance criterion)."""
        return self.judge.score(self._load(adapter, dense).unsqueeze(0), [self.public])[0]["loss"]

    @torch.no_grad()
    def __call__(self, adapter: GlobalAdapter, dense: dict[str, torch.Tensor] | None = None) -> dict:
        """Per-organization and pooled scores, plus LGR against the base (and the ceiling when computed).

        ``dense`` (weights space): the LLM is base + these dense changes, and the adapter's factors are unused.
        """
        sets = [*self.org_tests, self.public]
        tokens = self._load(adapter, dense).unsqueeze(0).expand(len(sets), -1, -1)
        scores = self.judge.score(tokens, sets)
        orgs, public = scores[:-1], scores[-1]
        if self.base_scores is None:
            self.base_scores = orgs
        out: dict = {"public-loss": public["loss"]}
        if orgs:
            out["org-loss"] = sum(s["loss"] for s in orgs) / len(orgs)
            if all("exact_match" in s for s in orgs):
                out["org-em"] = sum(s["exact_match"] for s in orgs) / len(orgs)
            if self.ceiling is not None:
                for key, name in (("loss", "lgr"), ("exact_match", "lgr-em")):
                    if all(key in s for s in orgs + self.base_scores + self.ceiling):
                        ps, lo, hi = ([s[key] for s in x] for x in (orgs, self.base_scores, self.ceiling))
                        out[name] = pooled_ratio(ps, lo, hi)
        out["orgs"] = {n: s for n, s in zip(self.org_names, orgs, strict=True)}
        return out

    @torch.no_grad()
    def own_adapters(self, tokens: torch.Tensor, org_index: Sequence[int], shared: dict[str, torch.Tensor]) -> dict:
        """Organizations scored with their own LLM updates ``(K, layers, token_dim)``: alone and on the shared LLM.

        Weights space only (``shared``: the shared LLM's dense change). Pooled EM/loss, and LGR where the ceiling is
        computed; ``orgs``: each organization's rows.
        """
        tests = [self.org_tests[i] for i in org_index]
        self.judge.set_dense(shared)
        on_shared = self.judge.score(tokens, tests)
        self.judge.set_dense({})
        alone = self.judge.score(tokens, tests)
        out: dict = {"orgs": {self.org_names[i]: {"alone": a, "on_shared": s}
                              for i, a, s in zip(org_index, alone, on_shared, strict=True)}}
        for name, scores in (("own", alone), ("own-on-shared", on_shared)):
            for key, metric in (("exact_match", "em"), ("loss", "loss")):
                if all(key in s for s in scores):
                    out[f"{name}-{metric}"] = sum(s[key] for s in scores) / len(scores)
                    if self.ceiling is not None and self.base_scores is not None:
                        lo = [self.base_scores[i][key] for i in org_index]
                        hi = [self.ceiling[i][key] for i in org_index]
                        out[f"{name}-lgr-{metric}"] = pooled_ratio([s[key] for s in scores], lo, hi)
        return out

    def compute_ceiling(self, orgs: Sequence[DomainData], finetune_cfg: FinetuneConfig) -> list[dict]:
        """The LLM fine-tuned directly on each organization's train split, scored on its test split."""
        self.judge.set_dense({})  # the untouched base LLM
        tuner = LoraTuner(self.llm_model, self.lora)
        tokens = torch.stack([tuner.tokens(tuner.run(list(o.train), finetune_cfg).update) for o in orgs])
        self.ceiling = self.judge.score(tokens, self.org_tests)
        return self.ceiling


def run_evaluator(cfg: FedConfig, llm_name: str, orgs: Sequence[DomainData], device: str | torch.device
                  ) -> LLMEvaluator:
    """The evaluator a run config describes: ``eval.public-examples`` of public text, the organizations' test splits."""
    public = [ex for d in public_text_domains() for ex in d.test][:cfg.eval.public_examples]
    return LLMEvaluator(llm_name, cfg.lora_settings(), orgs, public, cfg.eval.test_examples, device,
                        cfg.train.max_length)
