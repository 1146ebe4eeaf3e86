"""Where DP randomness comes from: a secret source at a site (and the server), or a seeded one for reproducibility.

Every Gaussian noise draw and every Poisson batch draw of a DP mechanism reads a ``NoiseSource``:

- ``SecretNoise``: the operating system's CSPRNG (``os.urandom``) turned into uniforms (53 random bits each) and
  Gaussians (Box-Muller in float64). Nothing outside the process (no config value, no seed) determines it, so
  nobody who sees the run config or the released update can regenerate the noise and subtract it.
- ``SeededNoise``: ``torch.Generator`` from a seed. Reproducible, hence *not* private against anyone who knows the
  seed: the provider uses it on public shadow data, benchmarks use it, and a simulation may opt into it through
  the simulation-only site switch ``sim-sites.noise-seed`` (logged as a warning every round).
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import torch


class NoiseSource(Protocol):
    """Uniform and Gaussian draws for DP mechanisms."""

    secret: bool

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` i.i.d. U(0, 1) draws, float64."""
        ...

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """i.i.d. N(0, std²) draws of ``shape``."""
        ...


class SecretNoise:
    """Draws from the OS CSPRNG; cannot be reproduced by anyone, including this process."""

    secret = True

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` uniforms in (0, 1]: 53 bits of ``os.urandom`` each."""
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)  # 53 random bits
        return torch.from_numpy((bits.astype(np.float64) + 1.0) * 2.0**-53)

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Box-Muller over CSPRNG uniforms (float64, then cast)."""
        n = math.prod(shape)
        if n == 0 or std == 0:
            return torch.zeros(shape, dtype=dtype)
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        radius = torch.sqrt(-2.0 * torch.log(u[:half]))  # u in (0, 1]: log finite
        angle = 2.0 * math.pi * u[half:]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return (std * z).reshape(shape).to(dtype)


class SeededNoise:
    """Reproducible draws from ``torch.Generator(seed)``: for public data and opted-in simulations only."""

    secret = False

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(int(seed))

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` uniforms in [0, 1), float64."""
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Gaussians from the seeded generator."""
        return std * torch.randn(shape, generator=self.generator, dtype=dtype)
