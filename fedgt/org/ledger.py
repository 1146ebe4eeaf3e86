"""An organization's privacy ledger: what it has spent across rounds, persisted, composed with RDP.

Each round's release is one or more Gaussian mechanisms, recorded as Opacus accountant history entries
``(noise_multiplier, sample_rate, steps)``: a DP-SGD fine-tune is ``(σ, q, steps)``; an update-level
release (clip C, sensitivity 2C, noise std s) is ``(s / 2C, 1.0, 1)``. The total ε over all rounds is Opacus' RDP
accountant over the whole history — tighter than adding per-round ε. Before a round runs, the organization
charges it (``spend``: under a file lock, re-reading what concurrent runs spent); a round that would go over the
budget is declined, saying why.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedgt.core.dp import (
    DPConfig,
    Mechanism,
    dp_sgd_noise_multiplier,
    dp_sgd_sample_rate,
    gaussian_noise_multiplier,
    rdp_epsilon,
)
from fedgt.core.durable import write_durably


class BudgetExceeded(RuntimeError):
    """The next round would spend more ε than the organization allows."""


def round_mechanisms(dp: DPConfig, num_examples: int, batch_size: int, steps: int) -> list[Mechanism]:
    """The mechanisms one round's fine-tune will run, known before it runs (as ``fedgt.core.dp`` sets them up)."""
    if dp.mode == "none":
        return []
    if dp.mode == "update":
        assert dp.epsilon is not None
        return [(gaussian_noise_multiplier(dp.epsilon, dp.delta), 1.0, 1)]  # σ / sensitivity (2C)
    sample_rate = dp_sgd_sample_rate(num_examples, batch_size)
    return [(dp_sgd_noise_multiplier(dp, sample_rate, steps), sample_rate, steps)]


@dataclass
class PrivacyLedger:
    """ε spent by one organization, stored as a JSON file that survives restarts."""

    path: Path
    budget: float
    delta: float

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.budget > 0 or not 0 < self.delta < 1:
            raise ValueError(f"ledger: budget must be > 0 and delta in (0, 1), got {self.budget}, {self.delta}")
        self.history: list[Mechanism] = []
        self.rounds: list[dict] = []
        self._load()

    def _load(self) -> None:
        """Read what was spent (by any process: several runs may share a site's ledger)."""
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            self.history = [tuple(h) for h in data["history"]]  # type: ignore[misc]
            self.rounds = list(data["rounds"])
            stored_delta = float(data["delta"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path}: corrupt privacy ledger ({err}); refusing to guess what was spent") from err
        if stored_delta != self.delta:
            raise ValueError(f"{self.path}: ledger kept at delta={stored_delta}, asked for delta={self.delta}")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the ledger across processes (concurrent runs at one site), then a fresh read."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def spend(self, mechanisms: list[Mechanism], server_round: int, note: dict | None = None) -> float:
        """Charge a round *before* it runs, atomically against concurrent runs; the total ε or ``BudgetExceeded``.

        Charging on attempt means a round that fails afterwards still counts: the ledger never under-counts.
        """
        with self._locked():
            self.check(mechanisms)
            return self._append(mechanisms, server_round, note)

    def spent(self) -> float:
        """ε spent so far."""
        return rdp_epsilon(self.history, self.delta)

    def projected(self, mechanisms: list[Mechanism]) -> float:
        """ε after also running ``mechanisms``."""
        return rdp_epsilon(self.history + list(mechanisms), self.delta)

    def check(self, mechanisms: list[Mechanism]) -> float:
        """The projected ε, or ``BudgetExceeded`` if it is over the budget."""
        after = self.projected(mechanisms)
        if after > self.budget:
            raise BudgetExceeded(f"privacy budget: this round would bring ε from {self.spent():.3f} to {after:.3f} "
                                 f"(δ={self.delta:g}), over the budget ε={self.budget:g}; declining the round")
        return after

    def record(self, mechanisms: list[Mechanism], server_round: int, note: dict | None = None) -> float:
        """Add one round's mechanisms (no budget check), under the lock and durably; the total ε."""
        with self._locked():
            return self._append(mechanisms, server_round, note)

    def _append(self, mechanisms: list[Mechanism], server_round: int, note: dict | None) -> float:
        """Append to what was just re-read under the lock and write the file durably."""
        self.history += [tuple(m) for m in mechanisms]  # type: ignore[misc]
        total = self.spent()
        self.rounds.append({"round": server_round, "mechanisms": [list(m) for m in mechanisms],
                            "epsilon_total": total, **(note or {})})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(self.path, json.dumps({"budget": self.budget, "delta": self.delta, "history": self.history,
                                             "rounds": self.rounds}, indent=1).encode())
        return total

