"""Differential privacy mechanisms for a fine-tune or an update: the only module that touches Opacus.

Modes (``DPConfig.mode``):
- ``none``: plain training.
- ``dp-sgd``: record-level DP with Opacus' per-sample clipping (``max_grad_norm``), Gaussian noise and the RDP
  accountant, over Poisson-sampled batches. Give ``epsilon`` (the noise multiplier is solved for that ε at δ over
  the run's steps) or ``noise_multiplier`` directly; the ε actually spent comes from the accountant.
- ``update``: output perturbation of the released update (organization-level DP). Its L2 norm is clipped to
  ``update_clip`` = C. Adjacency is *replace-one*: the site's data swapped for any other data set, so two clipped
  updates can be 2C apart and the sensitivity is 2C. The Gaussian noise σ = z · 2C takes z from Opacus' RDP
  accountant for one un-sampled Gaussian step at (ε, δ): valid at every ε (the classic
  σ = Δ·sqrt(2 ln(1.25/δ))/ε holds only for ε < 1) and the same mechanism the privacy ledger composes.

Every noise and sampling draw reads a ``fedgt.core.noise.NoiseSource``: secret at a site, seeded only where
reproducibility is wanted and privacy against the seed's holder is not (public shadow data, benchmarks).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedgt.core.noise import NoiseSource

DP_MODES = ("none", "dp-sgd", "update")
Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps): one Opacus accountant history entry


@dataclass(frozen=True)
class DPConfig:
    """Privacy settings of one organization's fine-tune (see the module docstring for the modes)."""

    mode: str = "none"
    epsilon: float | None = None  # dp-sgd: target ε of the whole fine-tune; update: ε of the one release
    delta: float = 1e-5
    noise_multiplier: float | None = None  # dp-sgd only: use this σ instead of solving for epsilon
    max_grad_norm: float = 1.0  # dp-sgd: per-sample gradient clip
    update_clip: float = 1.0  # update: L2 clip C of the update
    poisson_sampling: bool = True  # dp-sgd: Poisson batches (what the accountant assumes; False: tests only)
    accountant: str = "rdp"

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


def rdp_epsilon(history: list[Mechanism], delta: float) -> float:
    """ε of the composition of ``history`` at ``delta`` (0 for an empty history; inf without noise)."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    acc = RDPAccountant()
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    return float(acc.get_epsilon(delta))


def gaussian_noise_multiplier(epsilon: float, delta: float) -> float:
    """z of one Gaussian release at (ε, δ), from Opacus' RDP accountant (no subsampling, one step)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=1,
                                      accountant="rdp", epsilon_tolerance=0.005))


def update_sensitivity(clip: float) -> float:
    """L2 sensitivity of a clipped update under replace-one adjacency: two updates of norm <= C are <= 2C apart."""
    return 2.0 * clip


def update_sigma(dp: DPConfig) -> float:
    """Noise std of the update-level mechanism: z(ε, δ) times the replace-one sensitivity 2C."""
    assert dp.epsilon is not None
    return gaussian_noise_multiplier(dp.epsilon, dp.delta) * update_sensitivity(dp.update_clip)


def privatize_update(update: dict[str, torch.Tensor], dp: DPConfig, noise: NoiseSource
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Clip the update's global L2 norm to C and add N(0, σ²) per coordinate; returns it with its DP parameters.

    The metrics hold only the mechanism's parameters: the raw norm and whether it was clipped depend on the data.
    """
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    if not math.isfinite(norm):  # a non-finite update is released as zero + noise: still within the clip
        update, norm = {k: torch.zeros_like(t) for k, t in update.items()}, 0.0
    scale = min(1.0, dp.update_clip / (norm + 1e-12))
    sigma = update_sigma(dp)
    noisy = {k: t * scale + noise.normal(tuple(t.shape), sigma, t.dtype) for k, t in update.items()}
    metrics = {"dp-clip": dp.update_clip, "dp-sigma": sigma, "dp-epsilon": float(dp.epsilon), "dp-delta": dp.delta}
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


def poisson_batches(num_examples: int, sample_rate: float, noise: NoiseSource) -> Iterator[torch.Tensor]:
    """Endless Poisson-sampled batches of example indices: each example joins each batch with prob. ``sample_rate``."""
    while True:
        yield torch.nonzero(noise.uniform(num_examples) < sample_rate).flatten()


class DPSGD:
    """Opacus DP-SGD around a model and optimizer, its noise and batches drawn from ``noise``.

    Built from Opacus' parts (``GradSampleModule``, ``DPOptimizer``, an accountant) rather than
    ``PrivacyEngine.make_private`` so that the Gaussian noise comes from the site's ``NoiseSource``
    (``PrivacyEngine`` takes only a seeded ``torch.Generator``, or ``torchcsprng`` in secure mode).
    ``close()`` leaves the model as it was.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, num_examples: int, batch_size: int,
                 dp: DPConfig, steps: int, noise: NoiseSource):
        from opacus import GradSampleModule
        from opacus.accountants import create_accountant
        from opacus.validators import ModuleValidator

        ModuleValidator.validate(model, strict=True)  # raises on layers DP-SGD cannot handle (e.g. BatchNorm)
        self.dp, self.noise, self.num_examples = dp, noise, num_examples
        self.sample_rate = dp_sgd_sample_rate(num_examples, batch_size)
        self.noise_multiplier = dp_sgd_noise_multiplier(dp, self.sample_rate, steps)
        self.model = GradSampleModule(model)
        self.optimizer = sourced_dp_optimizer_class()(
            optimizer, noise=noise, noise_multiplier=self.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(self.sample_rate * num_examples)))
        self.accountant = create_accountant(dp.accountant)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))

    def batches(self) -> Iterator[torch.Tensor]:
        """The secret Poisson batches the accountant assumes."""
        return poisson_batches(self.num_examples, self.sample_rate, self.noise)

    def metrics(self) -> dict[str, float]:
        """ε spent so far (from the accountant) and the mechanism's parameters."""
        return {"dp-epsilon": float(self.accountant.get_epsilon(self.dp.delta)), "dp-delta": self.dp.delta,
                "dp-noise-multiplier": float(self.noise_multiplier), "dp-clip": self.dp.max_grad_norm,
                "dp-sample-rate": float(self.sample_rate)}

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample gradient buffers from the wrapped model."""
        self.model._close()


@functools.cache
def sourced_dp_optimizer_class() -> type:
    """Opacus' DPOptimizer with noise from a ``NoiseSource`` (built on first use: Opacus loads only for DP runs)."""
    from opacus.optimizers import DPOptimizer

    class SourcedDPOptimizer(DPOptimizer):
        """Opacus' DPOptimizer whose Gaussian noise comes from a ``NoiseSource`` (computed in float64)."""

        def __init__(self, optimizer: torch.optim.Optimizer, *, noise: NoiseSource, **kwargs):
            super().__init__(optimizer, **kwargs)
            self.noise_source = noise

        def clip_and_accumulate(self) -> None:
            # A sample whose gradient is NaN/inf would poison the clipped sum (0 * inf = NaN) and, through a failed
            # round, leak whether it was sampled: its whole gradient counts as zero instead (still <= C).
            finite = None
            for g in self.grad_samples:
                ok = torch.isfinite(g.flatten(1)).all(dim=1)  # (B,); B may be 0 (an empty Poisson batch)
                finite = ok if finite is None else finite & ok
            if finite is not None and not bool(finite.all()):
                for p in self.params:
                    g = p.grad_sample
                    p.grad_sample = torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g))
            super().clip_and_accumulate()

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                g = p.summed_grad
                p.grad = (g + self.noise_source.normal(tuple(g.shape), std, g.dtype).to(g.device)).view_as(p)

    return SourcedDPOptimizer
