"""Streaming aggregators of update vectors: organizations' flattened updates arrive one at a time.

No aggregator holds every organization's vector in RAM. The means keep a running float64 sum (one
vector). The median, the trimmed mean and the norm-bounded mean relative to the round's median norm need every
row before they can reduce, so they keep the rows in
a disk-backed ``numpy.memmap`` and reduce it a block of columns at a time: peak RAM is
O(capacity * block) on top of the page cache, which the OS can evict.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bounded_mean", "task_arithmetic", "ties", "dare")
BLOCK_COLUMNS = 65536  # columns reduced at once by the row-store aggregators: peak RAM ~ capacity * block * 4 B


class Aggregator:
    """Base: validates each (vector, weight) and counts them; subclasses override ``_accumulate``/``_finish``."""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self._count = 0

    @property
    def count(self) -> int:
        """How many vectors have been added."""
        return self._count

    def add(self, vector: torch.Tensor, weight: float) -> None:
        """Validate one organization's update vector (dim,) and fold it into the aggregate."""
        self._check(vector, weight)
        self._accumulate(vector.detach().cpu(), float(weight))
        self._count += 1

    def result(self) -> torch.Tensor:
        """The aggregate of everything added so far, a float32 vector (dim,)."""
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        return self._finish()

    def close(self) -> None:
        """Release resources (nothing to release for the in-memory aggregators)."""

    def __enter__(self) -> Aggregator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check(self, vector: torch.Tensor, weight: float) -> None:
        if not isinstance(vector, torch.Tensor):
            raise ValueError(f"update must be a torch.Tensor, got {type(vector).__name__}")
        if vector.dim() != 1:
            raise ValueError(f"update must be 1-D, got shape {tuple(vector.shape)}")
        if vector.numel() != self.dim:
            raise ValueError(f"update has length {vector.numel()}, expected dim={self.dim}")
        if not vector.is_floating_point():
            raise ValueError(f"update must be a floating-point tensor, got {vector.dtype}")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("update contains NaN or infinite values")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and > 0, got {weight}")

    def _accumulate(self, vector: torch.Tensor, weight: float) -> None:
        raise NotImplementedError

    def _finish(self) -> torch.Tensor:
        raise NotImplementedError


class WeightedMean(Aggregator):
    """FedAvg: sum(w_i * x_i) / sum(w_i), accumulated in float64."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self._sum = torch.zeros(dim, dtype=torch.float64)  # (dim,)
        self._total_weight = 0.0

    def _accumulate(self, vector: torch.Tensor, weight: float) -> None:
        self._sum.add_(vector.to(torch.float64), alpha=weight)
        self._total_weight += weight

    def _finish(self) -> torch.Tensor:
        return (self._sum / self._total_weight).to(torch.float32)


class NormBoundedMean(WeightedMean):
    """Weighted mean after scaling each vector down to L2 norm <= ``bound`` (limits any one organization's pull)."""

    def __init__(self, dim: int, bound: float):
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"norm bound must be finite and > 0, got {bound}")
        super().__init__(dim)
        self.bound = bound
        self.clipped = 0  # how many vectors were scaled down

    def _accumulate(self, vector: torch.Tensor, weight: float) -> None:
        vector = vector.to(torch.float64)
        norm = float(vector.norm())
        if norm > self.bound:
            vector = vector * (self.bound / norm)
            self.clipped += 1
        super()._accumulate(vector, weight)


class _RowStore(Aggregator):
    """Keeps up to ``capacity`` rows in a temp-dir memmap (capacity, dim); reduces it in column blocks."""

    def __init__(self, dim: int, capacity: int, block: int = BLOCK_COLUMNS):
        super().__init__(dim)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.capacity = capacity
        self.block = block
        self._tmp: tempfile.TemporaryDirectory | None = tempfile.TemporaryDirectory(prefix="fedgt-agg-")
        self.path = Path(self._tmp.name) / "rows.f32"
        # Sparse file: only the rows actually written take disk space.
        self._rows: np.memmap | None = np.memmap(self.path, dtype=np.float32, mode="w+", shape=(capacity, dim))

    def add(self, vector: torch.Tensor, weight: float) -> None:
        """Validate and store one vector; ``weight`` is checked but unused (unweighted, like Flower)."""
        if self._rows is None:
            raise ValueError("aggregator is closed")
        if self._count >= self.capacity:
            raise ValueError(f"more than capacity={self.capacity} updates added")
        super().add(vector, weight)

    def result(self) -> torch.Tensor:
        """Reduce the stored rows block by block into a float32 vector (dim,)."""
        if self._rows is None:
            raise ValueError("aggregator is closed")
        return super().result()

    def close(self) -> None:
        """Drop the memmap and delete its temporary directory (idempotent)."""
        self._rows = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __del__(self) -> None:
        # Defensive: TemporaryDirectory has its own finalizer, but close early when the object goes away.
        if getattr(self, "_tmp", None) is not None:
            self.close()

    def _accumulate(self, vector: torch.Tensor, weight: float) -> None:
        self._rows[self._count] = vector.to(torch.float32).numpy()

    def _finish(self) -> torch.Tensor:
        out = np.empty(self.dim, dtype=np.float32)
        for start in range(0, self.dim, self.block):
            stop = min(start + self.block, self.dim)
            rows = np.array(self._rows[: self._count, start:stop])  # (n, block) in RAM
            out[start:stop] = self._reduce(rows)
        return torch.from_numpy(out)

    def _reduce(self, rows: np.ndarray) -> np.ndarray:
        """(n, b) rows -> (b,) per-coordinate statistic."""
        raise NotImplementedError


class CoordinateMedian(_RowStore):
    """Per-coordinate median (FedMedian); the mean of the two middle values when the count is even."""

    def _reduce(self, rows: np.ndarray) -> np.ndarray:
        return np.median(rows.astype(np.float64), axis=0)


class TrimmedMean(_RowStore):
    """Per-coordinate mean after dropping floor(beta * n) values from each end (FedTrimmedAvg), at least one.

    Flower's floor alone trims nothing below 1 / beta organizations (10 at the default 0.1), so one outlier among
    five would pass untouched: with beta > 0 and n >= 3 at least one value is dropped from each end.
    """

    def __init__(self, dim: int, capacity: int, beta: float, block: int = BLOCK_COLUMNS):
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"trim beta must be in [0, 0.5), got {beta}")
        super().__init__(dim, capacity, block)
        self.beta = beta

    def _reduce(self, rows: np.ndarray) -> np.ndarray:
        n = rows.shape[0]
        cut = trim_count(self.beta, n)
        kept = np.sort(rows, axis=0)[cut : n - cut]  # (n - 2 cut, b)
        return kept.mean(axis=0, dtype=np.float64)


def trim_count(beta: float, n: int) -> int:
    """Values dropped from each end of n: floor(beta * n), but at least one when beta > 0 and n >= 3."""
    cut = int(beta * n)  # floor, as Flower's _trim_mean
    return max(cut, 1) if beta > 0 and n >= 3 else cut


class RelativeNormBoundedMean(_RowStore):
    """Weighted mean after scaling each vector down to L2 norm <= ``bound`` x the median norm of the round.

    An absolute bound needs the units of the aggregated space (a TinyLM factor vector and an LLM weight change
    differ by orders of magnitude); relative to the round's median norm it caps any one organization's pull at
    ``bound`` honest-looking updates whatever the space, as long as most organizations are honest.
    """

    def __init__(self, dim: int, capacity: int, bound: float, block: int = BLOCK_COLUMNS):
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"norm bound must be finite and > 0, got {bound}")
        super().__init__(dim, capacity, block)
        self.bound = bound
        self._norms: list[float] = []
        self._weights: list[float] = []
        self.clipped = 0  # how many vectors were scaled down (known after result())

    def _accumulate(self, vector: torch.Tensor, weight: float) -> None:
        super()._accumulate(vector, weight)
        self._norms.append(float(vector.double().norm()))
        self._weights.append(weight)

    def _finish(self) -> torch.Tensor:
        norms = np.array(self._norms)
        limit = self.bound * float(np.median(norms))
        scale = np.where(norms > limit, limit / np.maximum(norms, 1e-300), 1.0)
        self.clipped = int((norms > limit).sum())
        self._coef = scale * np.array(self._weights) / sum(self._weights)  # (n,)
        return super()._finish()

    def _reduce(self, rows: np.ndarray) -> np.ndarray:
        return self._coef @ rows.astype(np.float64)


def make_aggregator(name: str, dim: int, capacity: int, *, trim_beta: float = 0.1,
                    norm_bound: float = 1.0, merge_scale: float = 1.0, density: float = 0.5,
                    seed: int = 0, norm_bound_mode: str = "relative") -> Aggregator:
    """Build the aggregator called ``name`` (one of ``AGGREGATORS``) for vectors of length ``dim``."""
    if name in ("task_arithmetic", "ties", "dare"):
        return _make_merge(name, dim, merge_scale, density, seed)
    if name == "mean":
        return WeightedMean(dim)
    if name == "norm_bounded_mean":
        if norm_bound_mode == "absolute":
            return NormBoundedMean(dim, norm_bound)
        if norm_bound_mode != "relative":
            raise ValueError(f"norm bound mode must be 'relative' or 'absolute', got {norm_bound_mode!r}")
        return RelativeNormBoundedMean(dim, capacity, norm_bound)
    if name == "median":
        return CoordinateMedian(dim, capacity)
    if name == "trimmed_mean":
        return TrimmedMean(dim, capacity, trim_beta)
    raise ValueError(f"unknown aggregator {name!r}; choose one of {AGGREGATORS}")


def _make_merge(name: str, dim: int, scale: float, density: float, seed: int) -> Aggregator:
    """Build a model-merging aggregator (strategies.merging imports this module, hence the lazy import)."""
    from strategies.merging import DareMerge, TaskArithmetic, TiesMerge

    if name == "task_arithmetic":
        return TaskArithmetic(dim, scale)
    if name == "ties":
        return TiesMerge(dim, density, scale)
    return DareMerge(dim, density, scale, seed)
