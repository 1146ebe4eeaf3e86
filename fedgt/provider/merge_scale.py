"""The provider picks a merge method's scale (lambda) on public data: simulated federations of shadow domains.

A weight-space merge (``strategies.merging``) has a knob that decides everything: summed task vectors at
lambda = 1 break the model, a mean (lambda = 1/n) dilutes every one. Tuning it on an organization's data is not an
option, so the provider does it on what it owns: groups of ``n`` shadow domains play the organizations, their
LLM updates (the GT's images of their curated TinyLM updates, or the curated LLM updates themselves) are merged
at each candidate scale, and the merged LLM is scored on those domains' public test examples.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from fedgt.core.dense import dense_change, dense_to_vector, vector_to_dense
from fedgt.core.examples import Example
from fedgt.core.judge import LLMJudge
from fedgt.core.updates import unflatten

Merge = Callable[[torch.Tensor, float], torch.Tensor]  # (n, dim) dense task vectors, scale -> (dim,)


def dense_vectors(judge: LLMJudge, updates: torch.Tensor, scaling: float) -> torch.Tensor:
    """LLM updates ``(n, layers, token_dim)`` (relative to the judge's seeded init) as dense changes ``(n, dim)``."""
    init = {k: v.cpu() for k, v in judge.init.items()}
    rows = []
    for tokens in updates:
        delta = unflatten(tokens, judge.spec)
        rows.append(dense_to_vector(dense_change({k: init[k] + delta[k] for k in judge.spec.keys}, judge.spec,
                                                 scaling), judge.spec))
    return torch.stack(rows)


@torch.no_grad()
def choose_merge_scale(judge: LLMJudge, updates: torch.Tensor, tests: Sequence[Sequence[Example]], merge: Merge,
                       grid: Sequence[float], scaling: float, n: int = 8, groups: int = 3, seed: int = 0
                       ) -> tuple[float, dict[float, float]]:
    """The scale in ``grid`` with the best mean exact match over ``groups`` seeded groups of ``n`` shadow domains.

    ``updates`` ``(S, layers, token_dim)`` and ``tests`` (S lists) are the shadow domains' LLM updates and public
    test examples; ``scaling`` is the LoRA scaling. Returns (best scale, {scale: mean exact match}).
    """
    if len(updates) != len(tests) or len(updates) < n:
        raise ValueError(f"choose_merge_scale: {len(updates)} updates, {len(tests)} test sets, groups of {n}")
    vectors = dense_vectors(judge, updates, scaling)
    rng = random.Random(f"merge-scale-{seed}")
    picks = [rng.sample(range(len(updates)), n) for _ in range(groups)]
    zeros = torch.zeros(n, judge.spec.num_layers, judge.spec.token_dim)
    scores: dict[float, float] = {}
    try:
        for scale in grid:
            ems = []
            for pick in picks:
                judge.set_dense(vector_to_dense(merge(vectors[pick], scale), judge.spec))
                ems += [s.get("exact_match", 0.0) for s in judge.score(zeros, [tests[i] for i in pick])]
            scores[scale] = sum(ems) / len(ems)
    finally:
        judge.set_dense({})
    best = max(grid, key=lambda s: (scores[s], -s))  # ties: the smaller scale (less change)
    return best, scores
