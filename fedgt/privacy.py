"""Differential privacy for an organization's fine-tune: the only module that touches Opacus.

Modes (``DPConfig.mode``):
- ``none``: plain training.
- ``dp-sgd``: record-level DP with Opacus (per-sample clipping to ``max_grad_norm``, Gaussian noise,
  Poisson sampling by default). Give ``epsilon`` (the noise multiplier is solved for that ε at δ over
  the run's steps) or ``noise_multiplier`` directly; the ε actually spent comes from the accountant.
- ``update``: output perturbation of the uploaded update (the paper's code): clip its L2 norm to
  ``update_clip`` = C and add N(0, σ²) per coordinate with σ = C·sqrt(2 ln(1.25/δ))/ε (the classic
  Gaussian mechanism; formally valid for ε < 1, indicative above). Noise on one organization's update
  drowns its signal in high dimension (DESIGN.md §1b); central DP on an aggregate is the server's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DP_MODES = ("none", "dp-sgd", "update")


@dataclass(frozen=True)
class DPConfig:
    """Privacy settings of one organization's fine-tune (see the module docstring for the modes)."""

    mode: str = "none"
    epsilon: float | None = None  # dp-sgd: target ε of the whole fine-tune; update: ε of the one release
    delta: float = 1e-5
    noise_multiplier: float | None = None  # dp-sgd only: use this σ instead of solving for epsilon
    max_grad_norm: float = 1.0  # dp-sgd: per-sample gradient clip
    update_clip: float = 1.0  # update: L2 clip C of the update
    poisson_sampling: bool = True  # dp-sgd: Poisson batches (what the RDP accountant assumes)
    accountant: str = "rdp"
    secure_noise: bool = False  # draw noise from an unseeded generator (reproducible runs leave this off)

    def __post_init__(self) -> None:
        if self.mode not in DP_MODES:
            raise ValueError(f"dp.mode must be one of {DP_MODES}, got {self.mode!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"dp.delta must be in (0, 1), got {self.delta}")
        if self.epsilon is not None and self.epsilon <= 0:
            raise ValueError(f"dp.epsilon must be > 0, got {self.epsilon}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.max_grad_norm <= 0 or self.update_clip <= 0:
            raise ValueError(f"dp clip norms must be > 0, got max_grad_norm={self.max_grad_norm}, "
                             f"update_clip={self.update_clip}")
        if self.mode == "dp-sgd" and (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("dp.mode='dp-sgd' needs exactly one of dp.epsilon or dp.noise_multiplier")
        if self.mode == "update" and self.epsilon is None:
            raise ValueError("dp.mode='update' needs dp.epsilon")


def gaussian_sigma(clip: float, epsilon: float, delta: float) -> float:
    """Noise std of the classic Gaussian mechanism for L2 sensitivity ``clip``."""
    return clip * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def privatize_update(update: dict[str, torch.Tensor], dp: DPConfig, generator: torch.Generator
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Clip the update's global L2 norm to C and add Gaussian noise; returns it with its metrics."""
    assert dp.epsilon is not None
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    scale = min(1.0, dp.update_clip / (norm + 1e-12))
    sigma = gaussian_sigma(dp.update_clip, dp.epsilon, dp.delta)
    noisy = {k: t * scale + sigma * torch.randn(t.shape, generator=generator, dtype=t.dtype) for k, t in update.items()}
    metrics = {"dp-update-norm": norm, "dp-clip": dp.update_clip, "dp-sigma": sigma, "dp-clipped": float(scale < 1.0),
               "dp-epsilon": dp.epsilon, "dp-delta": dp.delta}
    return noisy, metrics


def dp_sgd_sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus' sampling rate for our loader: one over its number of (drop-last) batches."""
    return 1.0 / max(1, num_examples // min(batch_size, num_examples))


def dp_sgd_noise_multiplier(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """σ of a DP-SGD run: the configured one, or the one that reaches dp.epsilon after ``steps``."""
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta, sample_rate=sample_rate,
                                      steps=steps, accountant=dp.accountant))


class DPSGD:
    """Opacus DP-SGD around a model, optimizer and loader; ``close()`` leaves the model as it was."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loader: torch.utils.data.DataLoader, dp: DPConfig, steps: int, generator: torch.Generator):
        from opacus import PrivacyEngine  # imported here: Opacus is optional at runtime for non-DP users

        self.dp = dp
        self.noise_multiplier = dp_sgd_noise_multiplier(dp, 1.0 / len(loader), steps)
        self.engine = PrivacyEngine(accountant=dp.accountant, secure_mode=False)
        self.model, self.optimizer, self.loader = self.engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=dp.poisson_sampling,
            noise_generator=None if dp.secure_noise else generator,
        )

    def metrics(self) -> dict[str, float]:
        """ε spent so far (from the accountant) and the mechanism's parameters."""
        return {"dp-epsilon": float(self.engine.get_epsilon(self.dp.delta)), "dp-delta": self.dp.delta,
                "dp-noise-multiplier": float(self.noise_multiplier), "dp-clip": self.dp.max_grad_norm,
                "dp-sample-rate": float(self.optimizer.expected_batch_size / len(self.loader.dataset))}

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample gradient buffers from the wrapped model."""
        self.model._close()
