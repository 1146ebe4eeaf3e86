"""Server optimizer: treats the aggregated update as a pseudo-gradient (Reddi et al., "Adaptive Federated
Optimization"; Hsu et al. for FedAvgM), as Flower's FedAvgM and FedAdam do.

``delta`` is the aggregate of the organizations' updates (new - old, so it points downhill); ``step``
returns what the server adds to the global weights. FedAdam has no bias correction, as in the paper's
Algorithm 2; Flower 1.41's FedAdam differs here: it scales lr by sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)).
"""

from __future__ import annotations

import math

import torch

SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam")


class ServerOptimizer:
    """Stateful server update rule: "none" (lr * delta), "fedavgm" (momentum) or "fedadam" (Adam, no bias fix)."""

    def __init__(self, kind: str = "none", lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, momentum: float = 0.9):
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer kind {kind!r}; choose one of {SERVER_OPTIMIZERS}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {lr}")
        for name, value in (("beta1", beta1), ("beta2", beta2), ("momentum", momentum)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be finite and > 0, got {tau}")
        self.kind, self.lr, self.beta1, self.beta2, self.tau, self.momentum = kind, lr, beta1, beta2, tau, momentum
        self.steps = 0
        self._m: torch.Tensor | None = None  # fedavgm: momentum buffer; fedadam: first moment   (dim,)
        self._v: torch.Tensor | None = None  # fedadam: second moment                           (dim,)

    def step(self, delta: torch.Tensor) -> torch.Tensor:
        """The update to add to the global weights for this round's aggregated ``delta`` (dim,)."""
        self._check(delta)
        delta = delta.detach().to(torch.float32)
        self.steps += 1
        if self.kind == "none":
            return self.lr * delta
        if self._m is None:
            self._m = torch.zeros_like(delta)
        if self.kind == "fedavgm":
            self._m.mul_(self.momentum).add_(delta)
            return self.lr * self._m
        if self._v is None:
            self._v = torch.zeros_like(delta)
        self._m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._v.mul_(self.beta2).addcmul_(delta, delta, value=1.0 - self.beta2)
        return self.lr * self._m / (self._v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, object]:
        """Checkpointable state: kind, step count and the moment buffers (None before the first step)."""
        return {"kind": self.kind, "steps": self.steps,
                "m": None if self._m is None else self._m.clone(),
                "v": None if self._v is None else self._v.clone()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a ``state_dict()`` taken from an optimizer of the same kind."""
        if state.get("kind") != self.kind:
            raise ValueError(f"state is for kind {state.get('kind')!r}, this optimizer is {self.kind!r}")
        m, v = state.get("m"), state.get("v")
        self.steps = int(state.get("steps", 0))
        self._m = None if m is None else m.detach().to(torch.float32).clone()
        self._v = None if v is None else v.detach().to(torch.float32).clone()

    def _check(self, delta: torch.Tensor) -> None:
        if not isinstance(delta, torch.Tensor) or delta.dim() != 1:
            raise ValueError(f"delta must be a 1-D tensor, got {getattr(delta, 'shape', type(delta).__name__)}")
        if self._m is not None and delta.numel() != self._m.numel():
            raise ValueError(f"delta has length {delta.numel()}, optimizer state has {self._m.numel()}")
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("delta contains NaN or infinite values")
