"""Secure aggregation: the organizations' TinyLM updates are summed under Flower's SecAgg+; the server sees the mean.

Aggregate-then-transform needs only the (weighted) mean of the TinyLM updates, so that mean can be computed under
SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` at the sites): every site masks its quantised,
weighted update with pairwise and private masks, and the server unmasks only the sum of the sites that finished.
The workflow drives Flower's legacy strategy API, so ``SecAggFit`` is a thin legacy strategy around the same
``GradTransformerStrategy``: it sends the TinyLM's current factors as ``FitIns`` and hands the unmasked mean to
``GradTransformerStrategy.apply`` as the round's one contribution (coverage, GT, server optimizer, round
acceptance: unchanged).

What SecAgg+ needs, and costs: a site with ``n`` examples sends its update scaled by its weight
``w = min(n, max_weight) / max_weight`` (``max_weight`` = ``strategy.max-num-examples``), each coordinate of that
clipped to ``[-clip, clip]`` (``strategy.secagg-clip``, 8 by default) and quantised to 2^22 levels (a step of
``2 * clip / 2^22`` ≈ 3.8e-6 at clip 8) before masking; the server divides the unmasked sum by the sum of the
weights. In the update's own units the clip is ``clip / w`` and the step ``2 * clip / (2^22 * w)``: a
``max-num-examples`` far above the sites' sizes loosens the clip and coarsens the quantisation (at 16 examples and
1000: clip 500, step 2.4e-4). Per-update validation (norm bound, NaN checks, coverage of each update, weight caps
relative to the round's median) is impossible by design: the server never holds an individual update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedgt.core.identity import to_config
from fedgt.core.updates import flatten
from strategies.grad_transformer import GradTransformerStrategy

log = logging.getLogger("fedgt.server")
KEYS = "fedgt-keys"  # FitIns config: the TinyLM LoRA parameter names, in the order of FitIns.parameters


def check_secagg(strategy: GradTransformerStrategy) -> None:
    """Refuse strategy settings that need individual updates (SecAgg+ only ever reveals their weighted mean)."""
    if strategy.mode != "aggregate-then-transform" or strategy.aggregator != "mean":
        raise ValueError("strategy.secure-aggregation sums TinyLM updates: it needs strategy.mode = "
                         "'aggregate-then-transform' and strategy.aggregator = 'mean'")
    if strategy.central_dp is not None:
        raise ValueError("strategy.secure-aggregation and strategy.central-dp both change how updates are summed; "
                         "choose one")
    if strategy.tiny.base_factors():
        raise ValueError("strategy.secure-aggregation sends the TinyLM's factors only: strategy.rounds = 'merge' "
                         "(rounds folded into the base) is not supported")


class SecAggFit(Strategy):
    """Flower legacy strategy for ``SecAggPlusWorkflow``: FitIns out, the unmasked mean into the GT strategy."""

    def __init__(self, strategy: GradTransformerStrategy):
        self.strategy = strategy
        self.aggregated: set[int] = set()  # rounds whose mean reached the strategy

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Unused: every round sends the strategy's current TinyLM factors."""
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        """Every connected organization gets the TinyLM's current factors, the round and the TinyLM identity."""
        factors = dict(self.strategy.tiny.current)
        keys = list(self.strategy.tiny_spec.keys)
        config: dict[str, Scalar] = {"server-round": server_round, KEYS: "\n".join(keys)}
        if self.strategy.tiny_identity:
            config.update(to_config(self.strategy.tiny_identity))
        fitins = FitIns(ndarrays_to_parameters([factors[k].numpy() for k in keys]), config)
        return [(proxy, fitins) for proxy in client_manager.all().values()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The SecAgg+ mean (the same in every result) as the round's one contribution to the GT strategy."""
        ok = [(proxy, res) for proxy, res in results if res.status.code == Code.OK]
        entry = {"secagg": {"participants": len(ok), "dropped": len(failures)}, "received": []}
        if len(ok) < self.strategy.min_replies:  # apply() skips the round and logs why
            self.strategy.apply(server_round, [], entry)
            return None, {}
        arrays = parameters_to_ndarrays(ok[0][1].parameters)
        spec = self.strategy.tiny_spec
        mean = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(s)
                for k, a, s in zip(spec.keys, arrays, spec.shapes, strict=True)}
        entry["secagg"]["max-abs"] = max(float(np.abs(a).max()) for a in arrays)
        entry["secagg"]["num-examples"] = [res.num_examples for _, res in ok]  # sent in plain text, as always
        weight = float(sum(min(res.num_examples, self.strategy.max_num_examples) for _, res in ok))
        metrics = _mean_metrics([res.metrics for _, res in ok])
        self.aggregated.add(server_round)
        self.strategy.min_replies, saved = 1, self.strategy.min_replies  # the one contribution is the whole round
        try:
            self.strategy.apply(server_round, [(0, flatten(mean, spec), weight, metrics)], entry)
        finally:
            self.strategy.min_replies = saved
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Organizations are not asked to evaluate (the server scores the LLM)."""
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        """Nothing to aggregate."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """The ServerApp evaluates after each round itself."""
        return None


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    """The mean of each finite metric the sites released (their plain-text metrics, not the update)."""
    keys = {k for r in rows for k in r}
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r and isinstance(r[k], int | float) and np.isfinite(r[k])]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def run_secagg_rounds(strategy: GradTransformerStrategy, grid: Grid, context: Context, first_round: int,
                      num_rounds: int, evaluate_fn: Callable[[int], None], *, clip: float = 8.0,
                      max_weight: float = 1000.0, num_shares: int | float = 1.0,
                      threshold: int | float = 0.67, timeout: float | None = None) -> None:
    """Rounds ``first_round..num_rounds`` with the TinyLM updates summed under SecAgg+, evaluating after each."""
    check_secagg(strategy)
    fit = SecAggFit(strategy)
    legacy = LegacyContext(context, ServerConfig(num_rounds=num_rounds), fit, SimpleClientManager())
    workflow = SecAggPlusWorkflow(num_shares, threshold, max_weight=max_weight, clipping_range=clip,
                                  timeout=timeout)
    thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
    registered.wait()
    cfg = ConfigRecord()
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
    try:
        for rnd in range(first_round, num_rounds + 1):
            log.info("[ROUND %d/%d] secure aggregation (SecAgg+)", rnd, num_rounds)
            strategy._wait_for_quorum(rnd, grid)
            cfg[Key.CURRENT_ROUND] = rnd
            legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
            workflow(grid, legacy)
            if rnd not in fit.aggregated and rnd not in strategy.round_log:  # halted before the unmask stage
                strategy.apply(rnd, [], {"secagg": {"halted": "fewer than 2 organizations, or too many dropped out "
                                                    "to unmask the sum"}})
            evaluate_fn(rnd)
    finally:
        stop.set()
        thread.join(timeout=10)

