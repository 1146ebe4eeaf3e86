"""Update maps a user would try before a Grad-Transformer, behind one interface: ``predict(tiny) -> llm``.

All are fitted on the same curated shadow pairs as the GT and work in the same normalised spaces:
- ``MeanUpdate``: the mean shadow LLM update (data-free: ignores its input);
- ``NearestShadow``: the mean LLM update of the k shadow domains whose TinyLM updates are most similar;
- ``RidgeMap``: a linear map between the flattened normalised updates (closed form).
Hyper-parameters (k, alpha) are chosen on validation shadow domains with the caller's criterion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedgt.provider.shadow import ShadowPairs


def _zscore(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((x - mean) / std).flatten(1)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    std = x.std(0)
    return x.mean(0), torch.where(std > 1e-12, std, torch.ones_like(std))


class MeanUpdate:
    """The generic update: what fine-tuning on *some* shadow domain does on average."""

    name = "mean_update"

    def __init__(self, pairs: ShadowPairs):
        self.mean = pairs.final().llm.mean(0)

    def predict(self, tiny: torch.Tensor) -> torch.Tensor:
        return self.mean.expand(len(tiny), -1, -1).clone()


class NearestShadow:
    """k-nearest shadow domains by cosine similarity of normalised TinyLM updates."""

    name = "knn"

    def __init__(self, pairs: ShadowPairs, k: int = 5):
        final = pairs.final()
        self.src_mean, self.src_std = _stats(final.tiny)
        self.keys = torch.nn.functional.normalize(_zscore(final.tiny, self.src_mean, self.src_std), dim=1)
        self.values = final.llm
        self.k = min(k, len(self.values))

    def predict(self, tiny: torch.Tensor) -> torch.Tensor:
        q = torch.nn.functional.normalize(_zscore(tiny, self.src_mean, self.src_std), dim=1)
        top = (q @ self.keys.T).topk(self.k, dim=1).indices
        return self.values[top].mean(1)


class RidgeMap:
    """Ridge regression from normalised TinyLM update to normalised LLM update (all snapshot pairs)."""

    name = "ridge"

    def __init__(self, pairs: ShadowPairs, alpha: float = 100.0):
        self.src_mean, self.src_std = _stats(pairs.tiny)
        self.tgt_mean, self.tgt_std = _stats(pairs.llm)
        x = _zscore(pairs.tiny, self.src_mean, self.src_std).double()
        y = _zscore(pairs.llm, self.tgt_mean, self.tgt_std).double()
        # The dual form, W = X^T (X X^T + alpha I)^-1 Y, is the same map; it never builds the (D_src, D_tgt) weight,
        # which for a real pair (23K -> 115K update entries) would not fit in memory. Targets are centred: no bias.
        self.x = x.float()
        self.coef = torch.linalg.solve(x @ x.T + alpha * torch.eye(len(x), dtype=x.dtype), y).float()  # (n, D_tgt)
        self.alpha = alpha

    def predict(self, tiny: torch.Tensor) -> torch.Tensor:
        z = (_zscore(tiny, self.src_mean, self.src_std) @ self.x.T) @ self.coef
        return z.view(len(tiny), *self.tgt_mean.shape) * self.tgt_std + self.tgt_mean


def select(build: Callable[[float], object], values: Sequence[float], val_tiny: torch.Tensor,
           criterion: Callable[[torch.Tensor], float]) -> tuple[object, dict[float, float]]:
    """The map (over hyper-parameter ``values``) whose validation predictions score lowest."""
    scores, best, best_score = {}, None, float("inf")
    for v in values:
        m = build(v)
        scores[v] = criterion(m.predict(val_tiny))
        if scores[v] < best_score:
            best, best_score = m, scores[v]
    return best, scores
