"""The per-round metrics also written where researchers already look: TensorBoard (``output.tracking``).

Off by default. ``output.tracking = "tensorboard"`` writes event files to ``<output.dir>/tensorboard`` (a local
store: no server, no account) through ``torch.utils.tensorboard``; it needs the ``tracking`` extra
(``pip install -e ".[tracking]"``). ``tensorboard --logdir runs/`` then shows every run side by side. The scalars
are the ones ``metrics.jsonl`` holds: the shared LLM's scores, each organization's own adapter, the replies' fates,
time, and the largest ε an organization reported; the run config is logged once as text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedgt.core.run_config import TRACKERS


def round_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` row, by TensorBoard tag."""
    out: dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = float(value)

    for key, value in row.get("eval", {}).items():
        if key == "orgs":
            for org, scores in value.items():
                for name, v in scores.items():
                    put(f"org/{org}/{name}", v)
        else:
            put(f"llm/{key}", value)
    for key, value in (row.get("own") or {}).items():
        put(f"own_adapter/{key}", value)
    log = row.get("log") or {}
    for key in ("accepted", "rejected", "declined"):
        if key in log:
            put(f"replies/{key}", len(log[key]))
    metrics = log.get("metrics", {})
    for key in ("tiny-test-loss", "tiny-test-em", "train-loss"):
        put(f"own_tinylm/{key}", metrics.get(key))
    put("privacy/dp-epsilon-total-max", metrics.get("dp-epsilon-total-max"))
    put("time/server_s", log.get("server_s"))
    put("time/gt_s", log.get("gt_s"))
    put("time/eval_s", row.get("eval_s"))
    return out


class Tracker:
    """Writes each round's scalars to the configured trackers; with none configured it does nothing."""

    def __init__(self, kind: str, out: Path, run_config: Mapping[str, Any], first_round: int = 0):
        if kind not in TRACKERS:
            raise ValueError(f"output.tracking must be one of {TRACKERS}, got {kind!r}")
        self.writer = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("output.tracking = 'tensorboard' needs the tensorboard package: "
                                  "pip install -e '.[tracking]'") from err
            # purge_step: a resumed run drops the events a killed run wrote from first_round on
            self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=first_round or None)
            if not first_round:
                table = "\n".join(f"| {k} | {v} |" for k, v in sorted(run_config.items()))
                self.writer.add_text("run_config", "| key | value |\n|---|---|\n" + table, 0)

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Write one ``metrics.jsonl`` row at its round."""
        if self.writer is None:
            return
        for tag, value in round_scalars(row).items():
            self.writer.add_scalar(tag, value, row["round"])
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event files."""
        if self.writer is not None:
            self.writer.close()
