"""Central (server-side) DP with a fixed clip on organizations' update vectors.

User-level DP here means organization-level: each organization's whole contribution in a round is its
one update vector, clipped to L2 norm ``clip`` (its sensitivity), and Gaussian noise is added once to the
aggregate, not to each update. The mechanism is the subsampled Gaussian mechanism on the SUM of
clipped updates with std ``noise_multiplier * clip``; dividing by the number of organizations n gives
the mean with noise std ``noise_multiplier * clip / n``. This needs uniform weights: weighting by
num-examples would let one organization move the aggregate by more than ``clip / n``. So the mean is
plain, as in Flower's DifferentialPrivacyServerSideFixedClipping.

Accounting: Opacus' RDP accountant, one step per round with the round's organization sampling rate
(amplification by subsampling assumes organizations are sampled independently at that rate; use 1.0
when every organization takes part). The server sees the updates in the clear: this protects the
released model against its users, not the organizations against the server.
"""

from __future__ import annotations

import math

import torch


class CentralDP:
    """Clip each organization's update to ``clip``; add N(0, (noise_multiplier * clip / n)^2) to the mean.

    Args:
        clip: L2 bound C on each organization's update (its sensitivity).
        noise_multiplier: z; the noise on the sum of clipped updates has std z * C.
        delta: δ at which ε is reported.
        seed: seeds the noise generator (reproducible runs); None draws a fresh nondeterministic seed.
    """

    def __init__(self, clip: float, noise_multiplier: float, delta: float = 1e-5, seed: int | None = None):
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be finite and > 0, got {clip}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.clip, self.noise_multiplier, self.delta = clip, noise_multiplier, delta
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()  # a bare Generator() has a fixed default seed
        else:
            self.generator.manual_seed(seed)
        self.rounds = 0
        self._accountant = _new_accountant()

    def clip_vector(self, v: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Scale ``v`` (dim,) down to L2 norm <= clip; also says whether it was scaled."""
        if not bool(torch.isfinite(v).all()):
            raise ValueError("update contains NaN or infinite values")
        norm = float(v.detach().to(torch.float64).norm())
        if norm <= self.clip:
            return v, False
        return v * (self.clip / norm), True

    def noisy_mean(self, total: torch.Tensor, n: int) -> torch.Tensor:
        """Mean of n clipped updates from their SUM ``total`` (dim,), plus Gaussian noise of std z * C / n."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not bool(torch.isfinite(total).all()):
            raise ValueError("total contains NaN or infinite values")
        std = self.noise_multiplier * self.clip / n
        noise = torch.randn(total.shape, generator=self.generator, dtype=torch.float32)  # on CPU, as the generator
        return total.detach().to(torch.float32) / n + std * noise.to(total.device)

    def record_round(self, sample_rate: float) -> dict[str, float]:
        """Account one released round at organization sampling rate ``sample_rate``; returns the DP metrics."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)
        self.rounds += 1
        one_round = _new_accountant()
        one_round.step(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)
        return {
            "dp-central-round-epsilon": float(one_round.get_epsilon(self.delta)),
            "dp-central-run-epsilon": float(self._accountant.get_epsilon(self.delta)),
            "dp-central-sigma": self.noise_multiplier * self.clip,
            "dp-central-noise-multiplier": self.noise_multiplier,
            "dp-central-clip": self.clip,
            "dp-delta": self.delta,
        }


def _new_accountant():  # -> opacus.accountants.RDPAccountant
    from opacus.accountants import RDPAccountant  # imported here, as in fedgt.privacy: only DP runs need Opacus

    return RDPAccountant()
