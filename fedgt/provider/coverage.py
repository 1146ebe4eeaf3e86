"""Coverage: how far a TinyLM update lies from the curated TinyLM updates the Grad-Transformer was trained on.

The GT is trustworthy near its training data. An update ``x`` scores

    score(x) = min_i ||z(x) - z_i|| / r_q

where ``z`` is the GT's input normalisation (its ``TokenNorm`` on the source tokens, flattened), ``z_i`` the curated
TinyLM updates (the final pair of each training domain, as in the residual GT's retrieval table) and ``r_q`` the
``q``-quantile (default 0.95) of the curated updates' leave-one-out nearest-neighbour distances. ``score <= 1``:
the update is as close to the curated set as 95 % of the curated updates are to the rest of it (inside coverage).

``fedgt train-gt`` saves it next to the GT (``coverage.safetensors``). A GT directory without it gets it from its
prompt pool (the curated updates it holds as routing keys); one with neither reports coverage as unknown (None).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COVERAGE_FILE = "coverage.safetensors"
QUANTILE = 0.95


def nearest_other(keys: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean distance ``(N,)`` to its nearest other row of ``keys`` ``(N, D)``."""
    dist = torch.cdist(keys.double(), keys.double())
    dist.fill_diagonal_(float("inf"))
    return dist.min(1).values


class Coverage:
    """The curated TinyLM updates in the GT's normalised input space, and the reference distance of their spread."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, keys: torch.Tensor, reference: float,
                 quantile: float = QUANTILE):
        if keys.dim() != 2 or keys.shape[1] != mean.numel() or mean.shape != std.shape:
            raise ValueError(f"coverage: keys {tuple(keys.shape)} do not match the normalisation {tuple(mean.shape)}")
        if not reference > 0:
            raise ValueError(f"coverage: the reference distance must be > 0, got {reference}")
        self.mean, self.std = mean.float().cpu(), std.float().cpu()  # (Ls, Ds): the GT's source TokenNorm
        self.keys = keys.float().cpu()  # (N, Ls * Ds) normalised curated updates
        self.reference, self.quantile = float(reference), float(quantile)

    @classmethod
    def fit(cls, mean: torch.Tensor, std: torch.Tensor, tiny: torch.Tensor, quantile: float = QUANTILE) -> Coverage:
        """Coverage of curated TinyLM updates ``(N, Ls, Ds)`` under the GT's normalisation (``mean``, ``std``)."""
        if len(tiny) < 2:
            raise ValueError(f"coverage needs >= 2 curated TinyLM updates (leave-one-out distances), got {len(tiny)}")
        if not 0 < quantile <= 1:
            raise ValueError(f"coverage quantile must be in (0, 1], got {quantile}")
        keys = ((tiny.float().cpu() - mean.float().cpu()) / std.float().cpu()).flatten(1)
        reference = float(torch.quantile(nearest_other(keys), quantile))
        return cls(mean, std, keys, max(reference, 1e-12), quantile)  # identical curated updates: any other is out

    def distances(self, tiny: torch.Tensor) -> torch.Tensor:
        """Distance ``(B,)`` of each TinyLM update ``(B, Ls, Ds)`` to its nearest curated one, normalised space."""
        if tuple(tiny.shape[1:]) != tuple(self.mean.shape):
            raise ValueError(f"coverage reads (batch, {self.mean.shape[0]}, {self.mean.shape[1]}) TinyLM tokens, got "
                             f"{tuple(tiny.shape)}")
        z = ((tiny.float().cpu() - self.mean) / self.std).flatten(1)
        return torch.cdist(z.double(), self.keys.double()).min(1).values.float()

    def __call__(self, tiny: torch.Tensor) -> torch.Tensor:
        """Coverage scores ``(B,)``: nearest-curated distance over the reference; <= 1 is inside coverage."""
        return self.distances(tiny) / self.reference

    def save(self, gt_dir: Path) -> Path:
        """Write ``coverage.safetensors`` into a GT directory."""
        path = Path(gt_dir) / COVERAGE_FILE
        save_file({"mean": self.mean.contiguous(), "std": self.std.contiguous(), "keys": self.keys.contiguous(),
                   "reference": torch.tensor([self.reference], dtype=torch.float64),
                   "quantile": torch.tensor([self.quantile], dtype=torch.float64)}, str(path))
        return path

    @classmethod
    def load(cls, gt_dir: Path) -> Coverage:
        """Read a ``coverage.safetensors`` written by ``save``."""
        t = load_file(str(Path(gt_dir) / COVERAGE_FILE))
        return cls(t["mean"], t["std"], t["keys"], float(t["reference"][0]), float(t["quantile"][0]))


def load_coverage(gt_dir: Path, mean: torch.Tensor, std: torch.Tensor) -> Coverage | None:
    """A GT directory's coverage: saved with it, else from its prompt pool under its normalisation, else None."""
    from fedgt.provider.prompt_pool import POOL_TENSORS

    gt_dir = Path(gt_dir)
    if (gt_dir / COVERAGE_FILE).is_file():
        return Coverage.load(gt_dir)
    if (gt_dir / POOL_TENSORS).is_file():
        tiny = load_file(str(gt_dir / POOL_TENSORS))["tiny"]
        if tuple(tiny.shape[1:]) == tuple(mean.shape) and len(tiny) >= 2:
            return Coverage.fit(mean, std, tiny)
    return None
