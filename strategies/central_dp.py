"""Central (server-side) DP with a fixed clip on organizations' update vectors.

Organization-level DP: adjacency is adding or removing one organization, whose whole contribution in a round is
its one update vector, clipped to L2 norm ``clip`` = C (the sensitivity of the SUM of clipped updates). Gaussian
noise of std ``noise_multiplier * C`` = z·C is added once to that sum, and the sum is divided by the *expected*
number of participants q·N, a number fixed before the round (McMahan et al.'s fixed-denominator estimator): the
noise scale never depends on how many organizations happened to reply. Weights are uniform: weighting by
num-examples would let one organization move the aggregate by more than C / (q·N).

Sampling: each round every connected organization takes part independently with probability q
(``strategy.fraction-train``), drawn from the server's secret noise source — Poisson sampling for real, which is
what Opacus' RDP accountant assumes for its amplification (q = 1: everyone, no amplification). The noise is
secret too (``fedgt.core.noise.SecretNoise``). The accountant's history is part of ``state_dict`` and is saved with
every checkpoint. The server still sees each update in the clear: this protects the released model against its
users, not the organizations against the server (that is each site's own DP, ``fedgt.org.policy``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedgt.core.dp import Mechanism, rdp_epsilon
from fedgt.core.noise import NoiseSource, SecretNoise


class CentralDP:
    """Clip each organization's update to ``clip``; add N(0, (z·C)²) to their sum; divide by q·N.

    Args:
        clip: L2 bound C on each organization's update (its sensitivity).
        noise_multiplier: z; the noise on the sum of clipped updates has std z * C.
        delta: δ at which ε is reported.
        noise: where noise and sampling draws come from (default: secret).
    """

    def __init__(self, clip: float, noise_multiplier: float, delta: float = 1e-5, noise: NoiseSource | None = None):
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be finite and > 0, got {clip}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.clip, self.noise_multiplier, self.delta = clip, noise_multiplier, delta
        self.noise = noise if noise is not None else SecretNoise()
        self.history: list[Mechanism] = []

    def sample(self, node_ids: Sequence[int], sample_rate: float) -> list[int]:
        """Poisson sampling: each node independently with probability ``sample_rate`` (secret draws)."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if sample_rate == 1.0:
            return list(node_ids)
        keep = self.noise.uniform(len(node_ids)) < sample_rate
        return [n for n, k in zip(node_ids, keep.tolist(), strict=True) if k]

    def clip_vector(self, v: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Scale ``v`` (dim,) down to L2 norm <= clip; also says whether it was scaled."""
        if not bool(torch.isfinite(v).all()):
            raise ValueError("update contains NaN or infinite values")
        norm = float(v.detach().to(torch.float64).norm())
        if norm <= self.clip:
            return v, False
        return v * (self.clip / norm), True

    def noisy_mean(self, total: torch.Tensor, expected_participants: float) -> torch.Tensor:
        """(SUM ``total`` of clipped updates + N(0, (z·C)²)) / ``expected_participants`` (fixed before the round)."""
        if not expected_participants > 0:
            raise ValueError(f"expected_participants must be > 0, got {expected_participants}")
        if not bool(torch.isfinite(total).all()):
            raise ValueError("total contains NaN or infinite values")
        noise = self.noise.normal(tuple(total.shape), self.noise_multiplier * self.clip, torch.float64)
        return ((total.detach().double().cpu() + noise) / expected_participants).to(torch.float32).to(total.device)

    def record_round(self, sample_rate: float) -> dict[str, float]:
        """Account one released round at organization sampling rate ``sample_rate``; returns the DP metrics."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        step = (self.noise_multiplier, sample_rate, 1)
        self.history.append(step)
        return {
            "dp-central-round-epsilon": rdp_epsilon([step], self.delta),
            "dp-central-run-epsilon": rdp_epsilon(self.history, self.delta),
            "dp-central-sigma": self.noise_multiplier * self.clip,
            "dp-central-noise-multiplier": self.noise_multiplier,
            "dp-central-clip": self.clip,
            "dp-delta": self.delta,
        }

    def state_dict(self) -> dict:
        """The accountant's state: every round's mechanism (saved with the server's checkpoints)."""
        return {"history": [list(m) for m in self.history], "clip": self.clip,
                "noise_multiplier": self.noise_multiplier, "delta": self.delta}

    def load_state_dict(self, state: dict) -> None:
        """Resume the accountant; refuses a state kept under another mechanism."""
        if (state["clip"], state["noise_multiplier"], state["delta"]) != (self.clip, self.noise_multiplier, self.delta):
            raise ValueError(f"central DP state was kept with clip={state['clip']}, z={state['noise_multiplier']}, "
                             f"δ={state['delta']}; this run has {self.clip}, {self.noise_multiplier}, {self.delta}")
        self.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]
