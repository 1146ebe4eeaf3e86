"""Baseline maps of the quality benchmark."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from simulations.baselines import RidgeMap, _stats, _zscore


def test_ridge_in_dual_form_equals_the_primal_solution() -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = SimpleNamespace(tiny=torch.randn(12, 3, 10, generator=gen), llm=torch.randn(12, 4, 6, generator=gen))
    ridge = RidgeMap(pairs, alpha=3.0)
    mean, std = _stats(pairs.tiny)
    x = _zscore(pairs.tiny, mean, std).double()
    tmean, tstd = _stats(pairs.llm)
    y = _zscore(pairs.llm, tmean, tstd).double()
    weight = torch.linalg.solve(x.T @ x + 3.0 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    query = torch.randn(5, 3, 10, generator=gen)
    primal = (_zscore(query, mean, std).double() @ weight).float().view(5, 4, 6) * tstd + tmean
    assert torch.allclose(ridge.predict(query), primal, atol=1e-4)
