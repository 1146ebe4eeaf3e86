"""Weight-space model merging (mergekit-style) over task vectors: each organization's LLM weight change.

- Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"): ``scale * sum(deltas)``;
  ``scale`` is the paper's lambda.
- TIES (Yadav et al. 2023, "TIES-Merging"): trim each delta to its top-``density`` fraction of entries by
  magnitude, elect a sign per coordinate (sign of the sum of trimmed values), then take the disjoint mean
  of the trimmed values that agree with it; times ``scale``.
- DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each entry with probability
  ``1 - density`` and rescale survivors by ``1 / density`` (expectation kept), then ``scale * sum``.

The pure functions over stacked deltas ``(n, dim)`` are the reference; the streaming ``Aggregator``
subclasses give the same result with O(dim) memory however many vectors arrive. All methods are
unweighted, like mergekit's defaults: ``add``'s weight is validated by the base class but unused.
"""

from __future__ import annotations

import math

import torch

from strategies.aggregators import Aggregator


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got {density}")


def _as_rows(deltas: torch.Tensor) -> torch.Tensor:
    """Validate stacked deltas (n, dim) and return them as CPU float64 (n, dim)."""
    if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2 or deltas.shape[0] < 1 or deltas.shape[1] < 1:
        shape = tuple(deltas.shape) if isinstance(deltas, torch.Tensor) else type(deltas).__name__
        raise ValueError(f"deltas must be a non-empty (n, dim) tensor, got {shape}")
    return deltas.detach().cpu().to(torch.float64)


def keep_count(density: float, dim: int) -> int:
    """Entries TIES keeps per vector: ceil(density * dim), at least 1."""
    # Round first so float noise (0.3 * 10 = 3.0000000000000004) does not bump the ceiling.
    return max(1, math.ceil(round(density * dim, 6)))


def _trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the top-k entries of vector (dim,) by magnitude; ties broken by torch.topk."""
    k = keep_count(density, vector.numel())
    if k >= vector.numel():
        return vector.clone()
    idx = vector.abs().topk(k).indices  # (k,)
    out = torch.zeros_like(vector)
    out[idx] = vector[idx]
    return out


def _dare_drop(vector: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry of vector (dim,) with probability density, rescaled by 1/density; one mask draw."""
    keep = torch.rand(vector.shape, generator=generator) < density  # (dim,)
    return torch.where(keep, vector / density, torch.zeros_like(vector))


def task_arithmetic(deltas: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * sum of deltas (n, dim) -> float32 (dim,)."""
    _check_scale(scale)
    return (scale * _as_rows(deltas).sum(dim=0)).to(torch.float32)


def ties(deltas: torch.Tensor, density: float = 0.5, scale: float = 1.0) -> torch.Tensor:
    """TIES merge (trim, elect sign, disjoint mean) of deltas (n, dim) -> float32 (dim,)."""
    _check_density(density)
    _check_scale(scale)
    trimmed = torch.stack([_trim(row, density) for row in _as_rows(deltas)])  # (n, dim)
    elected = torch.sign(trimmed.sum(dim=0))  # (dim,) in {-1, 0, 1}
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # (n, dim); none where elected == 0
    count = agree.sum(dim=0)  # (dim,)
    total = (trimmed * agree).sum(dim=0)  # (dim,)
    merged = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return (scale * merged).to(torch.float32)


def dare(deltas: torch.Tensor, density: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """DARE merge of deltas (n, dim) -> float32 (dim,); one mask per row drawn from generator in row order."""
    _check_density(density)
    _check_scale(scale)
    dropped = [_dare_drop(row, density, generator) for row in _as_rows(deltas)]  # n x (dim,)
    return (scale * torch.stack(dropped).sum(dim=0)).to(torch.float32)


class TaskArithmetic(Aggregator):
    """Streaming task arithmetic: scale * float64 running sum; unweighted (``weight`` is checked, not used)."""

    def __init__(self, dim: int, scale: float = 1.0):
        _check_scale(scale)
        super().__init__(dim)
        self.scale = scale
        self._sum = torch.zeros(dim, dtype=torch.float64)  # (dim,)

    def _accumulate(self, vector: torch.Tensor, weight: float) -> None:
        self._sum.add_(vector.to(torch.float64))

    def _finish(self) -> torch.Tensor:
        return (self.scale * self._sum).to(torch.float32)


class TiesMerge(Aggregator):
    """Streaming TIES: trim each vector, keep per-sign float64 sums and counts; unweighted (``weight`` unused)."""

    def __init__(self, dim: int, density: float = 0.5, scale: float = 1.0):
        _check_density(density)
        _check_scale(scale)
        super().__init__(dim)
        self.density = density
        self.scale = scale
        self._pos_sum = torch.zeros(dim, dtype=torch.float64)  # (dim,)
        self._neg_sum = torch.zeros(dim, dtype=torch.float64)  # (dim,)
        self._pos_count = torch.zeros(dim, dtype=torch.int64)  # (dim,)
        self._neg_count = torch.zeros(dim, dtype=torch.int64)  # (dim,)

    def _accumulate(self, vector: torch.Tensor, weight: float) -> None:
        trimmed = _trim(vector.to(torch.float64), self.density)  # (dim,)
        self._pos_sum.add_(trimmed.clamp(min=0))
        self._neg_sum.add_(trimmed.clamp(max=0))
        self._pos_count.add_(trimmed > 0)
        self._neg_count.add_(trimmed < 0)

    def _finish(self) -> torch.Tensor:
        total = self._pos_sum + self._neg_sum  # (dim,); its sign is the elected sign
        pos_mean = self._pos_sum / self._pos_count.clamp(min=1)
        neg_mean = self._neg_sum / self._neg_count.clamp(min=1)
        merged = torch.where(total > 0, pos_mean, torch.where(total < 0, neg_mean, torch.zeros_like(total)))
        return (self.scale * merged).to(torch.float32)


class DareMerge(Aggregator):
    """Streaming DARE: each vector gets its own mask, drawn in arrival order from a generator seeded with
    ``seed``; unweighted (``weight`` is checked, not used)."""

    def __init__(self, dim: int, density: float = 0.5, scale: float = 1.0, seed: int = 0):
        _check_density(density)
        _check_scale(scale)
        super().__init__(dim)
        self.density = density
        self.scale = scale
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._sum = torch.zeros(dim, dtype=torch.float64)  # (dim,)

    def _accumulate(self, vector: torch.Tensor, weight: float) -> None:
        self._sum.add_(_dare_drop(vector.to(torch.float64), self.density, self._generator))

    def _finish(self) -> torch.Tensor:
        return (self.scale * self._sum).to(torch.float32)
