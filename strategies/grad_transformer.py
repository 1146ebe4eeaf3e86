"""GradTransformerStrategy: organizations train a TinyLM, the server updates an LLM through a Grad-Transformer.

A Flower ``FedAvg`` that keeps two shared models on the server (``fedgt.server.global_adapter.GlobalAdapter``): the
TinyLM adapter it sends to organizations, and the LLM adapter nobody outside the server ever trains. Each round:

1. ``configure_train``: every sampled organization gets the TinyLM's folded-in rounds (``base``) and its current
   LoRA factors (``arrays``).
2. ``aggregate_train``: every reply is validated (errors, declines, missing records, wrong keys/shapes/dtypes,
   NaN/Inf, norm above ``max_update_norm``, bad weights); a rejected reply is left out with its reason in the
   round log and the round goes on. The accepted TinyLM updates become one LLM update, either
   ``transform-then-aggregate`` (the GT maps each update, in batches, and a streaming aggregator combines the
   LLM updates: no round ever holds every organization's LLM update at once) or ``aggregate-then-transform``
   (combine the TinyLM updates, one GT pass: the paper's order, and the one secure aggregation allows).
   Optional central DP (clip each organization's TinyLM update, noise the mean once) and a server optimizer.
   Aggregators: the streaming statistics and merge methods of ``strategies.aggregators``, or ``distill``: a
   ``Distill`` callable (``fedgt.server.consolidate``) trains one joint LLM adapter with every organization's
   LLM update as a teacher. With a merge method or ``distill`` the TinyLM adapter stays the plain mean.
   Each organization's own LLM update of the last round is kept (``org_llm``, transform-then-aggregate): its own
   adapter, served next to the shared one.
3. Round schemes (``strategy.rounds``). The GT was trained on updates from the seeded LoRA init on the base
   TinyLM. ``retranslate`` keeps the TinyLM adapter as FedAvg does, and each round sets the LLM to the
   GT's image of the organizations' whole adapters (round start + update, relative to the seeded init): always an
   input of the kind the GT was trained on, and no round is counted twice; but from round 2 on each
   organization's adapter holds the others' mean too, a mix of tasks no curated pair shows. ``fresh`` (the
   default) keeps the TinyLM at the seeded init: every round each organization fine-tunes the base TinyLM on its
   own data again, so every update the GT reads is exactly of its training kind, and the LLM is re-derived from the
   round's updates (``distill`` warm-starts the joint adapter from the previous round's). ``merge`` folds both
   adapters into their base weights and restarts LoRA at the seeded init each round (docs/design.md §2), so each
   round's update is in distribution but the LLM receives a full-size update every round. ``naive`` adds each
   round's LLM update to one accumulating adapter.
4. Spaces (``space``): ``weights`` (the default) aggregates each organization's LLM weight change
   s * B_i @ A_i, exactly, into one dense change per adapted module (memory independent of the number of
   organizations; saved as an exact LoRA by SVD); ``factors`` averages the LoRA factors as FedAvg does, whose
   product is not the mean of the products (retranslate only for ``weights``).
5. Do no harm (docs/federation.md). ``coverage`` scores each organization's update as the GT reads it
   (``fedgt.provider.coverage``: 1 = the edge of the curated updates' spread); above ``coverage_threshold`` τ the
   GT's translation is not trusted: ``skip`` leaves the organization out of the round, ``shrink`` multiplies its
   contribution (its LLM update; in aggregate-then-transform its TinyLM update) by min(1, τ / score), ``apply``
   uses it as is. Each score is logged per node and sent back to that node with its next train message
   (``coverage-last-round``). With ``public_loss``, a round is accepted only if the new LLM's public validation
   loss is at most the last accepted one's plus ``accept_tolerance``; otherwise both shared models, the server
   optimizer and the consolidator's warm start go back to where they were (a central-DP round stays accounted).

Every knob's default is the run config's (``fedgt.core.run_config.StrategySection``): ``distill``, ``fresh``,
``weights``. The default aggregator needs a ``distill`` callable; without one, pass another (``aggregator="mean"``).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedgt.core.identity import to_config
from fedgt.core.lora import LoraSettings
from fedgt.core.run_config import COVERAGE_KEY, OUT_OF_COVERAGE, FederationSection, GTSection, StrategySection
from fedgt.core.updates import (
    UpdateError,
    UpdateSpec,
    flatten,
    from_array_record,
    to_array_record,
    unflatten,
    update_norm,
)
from fedgt.server.global_adapter import GlobalAdapter, dense_change, dense_shapes, dense_to_vector, vector_to_dense
from strategies.aggregators import make_aggregator
from strategies.central_dp import CentralDP
from strategies.server_opt import ServerOptimizer

log = logging.getLogger("fedgt.strategy")
Translate = Callable[[torch.Tensor], torch.Tensor]  # (B, Ls, Ds) TinyLM tokens -> (B, Lt, Dt) LLM tokens
MODES = ("transform-then-aggregate", "aggregate-then-transform")
ROUND_SCHEMES = ("retranslate", "fresh", "merge", "naive")
SPACES = ("factors", "weights")
Contribution = tuple[int, torch.Tensor, float, dict]  # (node id, TinyLM update tokens, weight, client metrics)
# (T, Lt, Dt) LLM updates (teachers), (T, Ls, Ds) the TinyLM updates they came from -> (Lt, Dt) one joint update
Distill = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MERGE_METHODS = ("task_arithmetic", "ties", "dare")
Coverage = Callable[[torch.Tensor], torch.Tensor]  # (B, Ls, Ds) TinyLM tokens as the GT reads them -> (B,) scores
_S = StrategySection  # every knob's default is the run config's (one definition: fedgt.core.run_config)
PublicLoss = Callable[[GlobalAdapter, dict[str, torch.Tensor] | None], float]  # the LLM (adapter, dense change)


def describe_reply(msg: Message, sent_at: float | None = None) -> dict:
    """Everything a reply carried: tensor names, shapes and payload bytes, the metrics released (names and values).

    ``seconds``: from the round's request (``sent_at``, server clock) to the reply's creation (site clock), the site's
    time for the round as the server sees it, queueing and fine-tuning included.
    """
    if msg.has_error():
        return {"node": msg.metadata.src_node_id, "error": True}
    c = msg.content
    out = {"node": msg.metadata.src_node_id,
           "arrays": {name: {k: list(a.shape) for k, a in rec.items()} for name, rec in c.array_records.items()},
           "bytes": sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for rec in c.array_records.values()
                        for a in rec.values()),
           "metrics": {name: sorted(rec.keys()) for name, rec in c.metric_records.items()},
           "values": {name: dict(rec) for name, rec in c.metric_records.items()},
           "configs": {name: dict(rec) for name, rec in c.config_records.items()}}
    if sent_at is not None and msg.metadata.created_at:
        out["seconds"] = max(0.0, msg.metadata.created_at - sent_at)
    return out


def _reject_code(err: Exception) -> str:
    text = str(err)
    if "not finite" in text:
        return "nonfinite"
    if "norm" in text:
        return "norm"
    if isinstance(err, UpdateError):
        return "spec"
    return "malformed"


class TranslationError(RuntimeError):
    """The Grad-Transformer's output cannot be used (not finite): that round's translation is rejected."""


class QuorumLost(RuntimeError):
    """Fewer organizations than the run needs stayed connected for longer than it waits; the run stops cleanly."""


class GradTransformerStrategy(FedAvg):
    """FedAvg whose aggregate is an LLM update generated by a Grad-Transformer from the TinyLM updates."""

    def __init__(self, *, translate: Translate, tiny_spec: UpdateSpec, llm_spec: UpdateSpec,
                 tiny_init: dict[str, torch.Tensor], llm_init: dict[str, torch.Tensor], lora: LoraSettings,
                 mode: str = _S.mode, aggregator: str = _S.aggregator, trim_beta: float = _S.trim_beta,
                 norm_bound: float = _S.norm_bound, rounds: str = _S.rounds, server_opt: ServerOptimizer | None = None,
                 central_dp: CentralDP | None = None, max_update_norm: float = _S.max_update_norm,
                 gt_batch_size: int = GTSection.batch_size, space: str = _S.space,
                 tiny_identity: Mapping[str, str] | None = None, max_num_examples: float = _S.max_num_examples,
                 merge_scale: float = _S.merge_scale, density: float = _S.density, distill: Distill | None = None,
                 coverage: Coverage | None = None, out_of_coverage: str = _S.out_of_coverage,
                 coverage_threshold: float = _S.coverage_threshold, public_loss: PublicLoss | None = None,
                 accept_tolerance: float = _S.accept_tolerance, max_weight_ratio: float = _S.max_weight_ratio,
                 norm_bound_mode: str = _S.norm_bound_mode, min_replies: int = FederationSection.min_replies,
                 wait_s: float = FederationSection.wait_s, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        if out_of_coverage not in OUT_OF_COVERAGE:
            raise ValueError(f"strategy.out-of-coverage must be one of {OUT_OF_COVERAGE}, got {out_of_coverage!r}")
        if not 0 < coverage_threshold < math.inf:
            raise ValueError(f"strategy.coverage-threshold must be a finite number > 0, got {coverage_threshold}")
        if not 0 <= accept_tolerance < math.inf:
            raise ValueError(f"strategy.accept-tolerance must be a finite number >= 0, got {accept_tolerance}")
        # Do no harm: where the GT is trusted (None: unknown, every update applied) and what a round must not worsen.
        self.coverage, self.out_of_coverage, self.coverage_threshold = coverage, out_of_coverage, coverage_threshold
        self.coverage_scores: dict[int, float] = {}  # node -> the coverage score of its update in the last round
        self.public_loss, self.accept_tolerance = public_loss, accept_tolerance
        self.accepted_public_loss: float | None = None  # the public validation loss of the last accepted LLM
        if mode not in MODES:
            raise ValueError(f"strategy.mode must be one of {MODES}, got {mode!r}")
        if central_dp is not None and (mode != "aggregate-then-transform" or aggregator != "mean"):
            raise ValueError("central DP noises the mean of clipped TinyLM updates once: it needs "
                             "strategy.mode='aggregate-then-transform' and strategy.aggregator='mean'")
        self.translate, self.tiny_spec, self.llm_spec = translate, tiny_spec, llm_spec
        if rounds not in ROUND_SCHEMES:
            raise ValueError(f"strategy.rounds must be one of {ROUND_SCHEMES}, got {rounds!r}")
        if space not in SPACES:
            raise ValueError(f"strategy.space must be one of {SPACES}, got {space!r}")
        if space == "weights" and rounds not in ("retranslate", "fresh"):
            raise ValueError("strategy.space='weights' needs strategy.rounds='retranslate' or 'fresh' (the LLM is "
                             "re-derived from the organizations' adapters each round)")
        if aggregator == "distill" and (distill is None or mode != "transform-then-aggregate"):
            raise ValueError("strategy.aggregator='distill' needs a distill callable and "
                             "strategy.mode='transform-then-aggregate' (each organization's LLM update is a teacher)")
        self.rounds, self.space = rounds, space
        self.merge_scale, self.density, self.distill = merge_scale, density, distill
        self.org_llm: dict[int, torch.Tensor] = {}  # node -> its LLM update (layer tokens) of the last round
        self.org_partition: dict[int, int] = {}  # simulation only: node -> the partition it emulates
        self.distill_stats: dict[str, float] = {}
        # weights space: the LLM's change from its base, one dense matrix per LoRA module (flattened)
        self.llm_dense = torch.zeros(sum(o * i for o, i in dense_shapes(llm_spec).values())) \
            if space == "weights" else None
        self.tiny = GlobalAdapter(tiny_spec, tiny_init, lora, "merge" if rounds == "merge" else "naive")
        self.llm = GlobalAdapter(llm_spec, llm_init, lora, "merge" if rounds == "merge" else "naive")
        self.mode, self.aggregator, self.trim_beta, self.norm_bound = mode, aggregator, trim_beta, norm_bound
        self.server_opt = server_opt or ServerOptimizer(_S.server_opt, lr=_S.server_lr)
        self.central_dp, self.max_update_norm, self.gt_batch_size = central_dp, max_update_norm, gt_batch_size
        if not max_num_examples >= 1:
            raise ValueError(f"strategy.max-num-examples must be >= 1, got {max_num_examples}")
        self.max_num_examples = max_num_examples  # a reply's weight is min(num-examples, this): bounded influence
        if not max_weight_ratio >= 1:
            raise ValueError(f"strategy.max-weight-ratio must be >= 1, got {max_weight_ratio}")
        self.max_weight_ratio = max_weight_ratio  # ... and at most this times the round's median weight
        self.norm_bound_mode = norm_bound_mode
        if min_replies < 1 or not wait_s > 0:
            raise ValueError(f"min_replies must be >= 1 and wait_s > 0, got {min_replies}, {wait_s}")
        # Quorum: a round starts with >= min_available_nodes connected (waiting at most wait_s) and changes the
        # models only with >= min_replies accepted replies, so one organization is never a whole round by accident.
        self.min_replies, self.wait_s = min_replies, wait_s
        self.expected_participants: dict[int, float] = {}  # central DP: q * N per round, fixed before replies
        self._round = 0
        self._sent_at: float | None = None  # when the current round's requests went out (server clock)
        self.round_log: dict[int, dict] = {}
        # The TinyLM identity (fedgt.core.identity) every train message carries, so sites can refuse another TinyLM.
        self.tiny_identity = dict(tiny_identity) if tiny_identity else None

    # ------------------------------------------------------------------------------------------ sending

    def current_arrays(self) -> ArrayRecord:
        """The TinyLM LoRA factors organizations start the next round from."""
        return to_array_record(self.tiny.current, self.tiny_spec)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """Sample organizations; send the TinyLM's folded-in rounds and current factors (never the LLM)."""
        if self.tiny_identity:
            for key, value in to_config(self.tiny_identity).items():
                config[key] = value
        self._wait_for_quorum(server_round, grid)
        if self.central_dp is not None:
            messages = self._poisson_sample(server_round, config, grid)
        else:
            messages = list(super().configure_train(server_round, self.current_arrays(), config, grid))
        base = self.tiny.base_factors()
        for m in messages:
            m.content["base"] = ArrayRecord({k: Array(v.numpy()) for k, v in base.items()}) if base else ArrayRecord()
        return [self._with_coverage(m) for m in messages]

    def _wait_for_quorum(self, server_round: int, grid: Grid) -> None:
        """Return once min_available_nodes are connected; ``QuorumLost`` after wait_s (Flower would wait forever)."""
        want = self.min_available_nodes
        deadline = time.monotonic() + self.wait_s
        while (have := len(list(grid.get_node_ids()))) < want:
            if time.monotonic() >= deadline:
                raise QuorumLost(f"round {server_round}: {have} organization(s) connected, fewer than the "
                                 f"{want} a round needs (federation.min-organizations), after waiting "
                                 f"{self.wait_s:g} s (federation.wait-s)")
            log.info("round %d: waiting for organizations: %d connected, %d needed", server_round, have, want)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _with_coverage(self, msg: Message) -> Message:
        """The message with its own config carrying the node's last coverage score (messages share one content)."""
        score = self.coverage_scores.get(msg.metadata.dst_node_id)
        if score is None:
            return msg
        content = RecordDict(dict(msg.content.items()))
        content[self.configrecord_key] = ConfigRecord({**dict(msg.content[self.configrecord_key]), COVERAGE_KEY: score})
        msg.content = content
        return msg

    def _poisson_sample(self, server_round: int, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Central DP: each connected organization takes part independently with probability q, as accounted."""
        node_ids = sorted(grid.get_node_ids())
        self.expected_participants[server_round] = self.fraction_train * len(node_ids)
        sampled = self.central_dp.sample(node_ids, self.fraction_train)
        log.info("configure_train: Poisson-sampled %d of %d organizations (q=%g)", len(sampled), len(node_ids),
                 self.fraction_train)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: self.current_arrays(), self.configrecord_key: config})
        return list(self._construct_messages(record, sampled, MessageType.TRAIN))

    # ------------------------------------------------------------------------------------------ receiving

    def _accept(self, msg: Message) -> tuple[torch.Tensor, float, dict]:
        """(TinyLM update tokens, weight, metrics) of a reply, or an exception saying why it is rejected."""
        if msg.has_error():
            raise ValueError(f"client error: {msg.error.reason}")
        content = msg.content
        metrics = content.metric_records.get("metrics")
        if metrics is None:
            raise ValueError("reply has no 'metrics' MetricRecord")
        weight = metrics.get("num-examples")
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"metrics['num-examples'] must be a positive number, got {weight!r}")
        arrays = content.array_records.get("arrays")
        if arrays is None:
            raise ValueError("reply has no 'arrays' ArrayRecord")
        update = from_array_record(arrays, self.tiny_spec, source=f"node {msg.metadata.src_node_id}")
        norm = update_norm(update)
        if norm > self.max_update_norm:
            raise UpdateError(f"global L2 norm {norm:.6g} > strategy.max-update-norm {self.max_update_norm:g}",
                              None, f"node {msg.metadata.src_node_id}")
        return flatten(update, self.tiny_spec), min(float(weight), self.max_num_examples), dict(metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, transform, aggregate; update both shared models; log every rejection."""
        t0 = time.perf_counter()
        replies = list(replies)
        accepted: list[Contribution] = []
        rejected, declined = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if not msg.has_error() and "decline" in msg.content.config_records:
                declined.append({"node": node, "reason": str(msg.content["decline"].get("reason", "declined"))})
                continue
            try:
                tokens, weight, metrics = self._accept(msg)
            except Exception as err:  # noqa: BLE001 - any malformed reply is left out, the round goes on
                rejected.append({"node": node, "code": _reject_code(err), "reason": str(err)})
                log.warning("round %d: rejected the reply of node %s: %s", server_round, node, err)
                continue
            accepted.append((node, tokens, weight, metrics))
        entry = {"round": server_round, "replies": len(replies), "rejected": rejected, "declined": declined,
                 "received": [describe_reply(m, self._sent_at) for m in replies]}
        return self.apply(server_round, accepted, entry, t0)

    def apply(self, server_round: int, accepted: list[Contribution], entry: dict | None = None,
              t0: float | None = None) -> tuple[ArrayRecord | None, MetricRecord]:
        """Turn validated contributions into one LLM update and apply it (also usable without Flower messages)."""
        t0 = time.perf_counter() if t0 is None else t0
        self._round = server_round
        entry = {"round": server_round, "rejected": [], "declined": [], **(entry or {})}
        entry["accepted"] = [a[0] for a in accepted]
        self.round_log[server_round] = entry
        # retranslate: the GT reads each organization's whole adapter (round start + its update) relative to the
        # seeded init, and the LLM becomes the GT's image of that, not the sum of per-round images.
        offset = self._offset(self.tiny) if self.rounds in ("retranslate", "fresh") else None
        accepted = self._cap_weights(accepted, entry)
        validated = accepted  # the sites' reported scores count even when coverage skips their update
        accepted, scale = self._cover(accepted, offset, entry)  # every update's coverage score, sent back to it
        if len(validated) < self.min_replies and self.central_dp is None:
            entry["skipped"] = (f"{len(validated)} accepted repl{'y' if len(validated) == 1 else 'ies'}, fewer "
                                f"than federation.min-replies = {self.min_replies}")
            log.warning("round %d skipped: %s", server_round, entry["skipped"])
            accepted = []
        if not accepted and self.central_dp is None:  # under central DP an empty round is still noised + accounted
            log.warning("round %d: no usable reply%s; the shared models stay as they were", server_round,
                        " inside the GT's coverage" if entry.get("out-of-coverage") else "")
            entry["llm-unchanged"] = True
            entry["server_s"] = time.perf_counter() - t0
            entry["metrics"] = self._round_metrics(entry, [], validated)
            return None, MetricRecord(entry["metrics"])
        before = None
        if self.public_loss is not None:
            if self.accepted_public_loss is None:  # the untuned LLM's, once
                self.accepted_public_loss = self.public_loss(self.llm, self.llm_weight_change())
            before = self._shared_state()

        t_gt = time.perf_counter()
        try:
            tiny_delta, llm_target, dp_metrics = self._combine(accepted, offset, scale)
        except TranslationError as err:  # the run goes on; this round changes nothing
            log.error("round %d: %s", server_round, err)
            entry.update({"translation-rejected": str(err), "llm-unchanged": True,
                          "server_s": time.perf_counter() - t0})
            entry["metrics"] = self._round_metrics(entry, [], validated)
            return None, MetricRecord(entry["metrics"])
        entry["gt_s"] = time.perf_counter() - t_gt
        if self.llm_dense is not None:  # weights space: the target is a dense change; step towards it
            llm_step = self.server_opt.step(llm_target - self.llm_dense)
            self.llm_dense = self.llm_dense + llm_step
        else:
            llm_delta = llm_target - self._offset(self.llm).reshape(-1) if offset is not None else llm_target
            llm_step = self.server_opt.step(llm_delta)
            self.llm.add(unflatten(llm_step.view(self.llm_spec.num_layers, -1), self.llm_spec))
        if self.rounds != "fresh":  # fresh: organizations always start from the seeded init on the base TinyLM
            self.tiny.add(unflatten(tiny_delta.view(self.tiny_spec.num_layers, -1), self.tiny_spec))
        self.tiny.end_round()
        self.llm.end_round()
        entry.update(dp_metrics)
        entry["llm_step_norm"] = float(llm_step.norm())
        self._accept_or_roll_back(entry, before)
        entry["server_s"] = time.perf_counter() - t0
        entry["metrics"] = self._round_metrics(entry, accepted, validated)
        return self.current_arrays(), MetricRecord(entry["metrics"])

    def _cover(self, accepted: list[Contribution], offset: torch.Tensor | None, entry: dict
               ) -> tuple[list[Contribution], dict[int, float]]:
        """Score each update as the GT reads it; the contributions kept and the shrink factor of each (docs above)."""
        self.coverage_scores = {}
        if self.coverage is None or not accepted:
            entry["coverage"] = None if self.coverage is None else {}
            return accepted, {}
        read = torch.stack([t if offset is None else t + offset for _, t, _, _ in accepted])
        scores = [float(x) for x in self.coverage(read)]
        self.coverage_scores = {a[0]: x for a, x in zip(accepted, scores, strict=True)}
        outside = {a[0] for a, x in zip(accepted, scores, strict=True) if not x <= self.coverage_threshold}
        entry["coverage"], entry["out-of-coverage"] = dict(self.coverage_scores), sorted(outside)
        entry["coverage-action"] = self.out_of_coverage
        if outside:
            log.warning("round %d: %d update(s) outside the GT's coverage (score > %g): %s", self._round,
                        len(outside), self.coverage_threshold, self.out_of_coverage)
        if self.out_of_coverage == "skip":
            return [a for a in accepted if a[0] not in outside], {}
        if self.out_of_coverage == "shrink":
            scale = {n: min(1.0, self.coverage_threshold / self.coverage_scores[n]) for n in outside}
            entry["coverage-scale"] = scale
            return accepted, scale
        return accepted, {}

    def _shared_state(self) -> dict:
        """Everything a round changes that a rejected round must restore."""
        return {"tiny": copy.deepcopy(self.tiny.state_dict()), "llm": copy.deepcopy(self.llm.state_dict()),
                "server_opt": self.server_opt.state_dict(),  # cloned there
                # replaced by a round, never changed in place: the reference is the state
                "llm_dense": self.llm_dense, "distill": getattr(self.distill, "previous", None)}

    def state_dict(self) -> dict:
        """Everything the next round depends on, for exact resume (saved with each round's checkpoint)."""
        return {"round": self._round, **self._shared_state(), "accepted_public_loss": self.accepted_public_loss,
                "central_dp": self.central_dp.state_dict() if self.central_dp is not None else None,
                "org_llm": dict(self.org_llm), "org_partition": dict(self.org_partition),
                "coverage_scores": dict(self.coverage_scores),
                "expected_participants": dict(self.expected_participants)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict()`` of a strategy built with the same settings."""
        self.tiny.load_state_dict(state["tiny"])
        self.llm.load_state_dict(state["llm"])
        self.llm_dense = state["llm_dense"]
        self.server_opt.load_state_dict(state["server_opt"])
        if hasattr(self.distill, "previous"):
            self.distill.previous = state["distill"]
        if (state["central_dp"] is None) != (self.central_dp is None):
            raise ValueError("checkpoint and run disagree on strategy.central-dp")
        if self.central_dp is not None:
            self.central_dp.load_state_dict(state["central_dp"])
        self.accepted_public_loss = state["accepted_public_loss"]
        self.org_llm, self.org_partition = dict(state["org_llm"]), dict(state["org_partition"])
        self.coverage_scores = dict(state["coverage_scores"])
        self.expected_participants = dict(state["expected_participants"])
        self._round = int(state["round"])

    def run_rounds(self, grid: Grid, first_round: int, num_rounds: int, timeout: float,
                   evaluate_fn: Callable[[int], None], train_config: ConfigRecord | None = None) -> None:
        """Rounds ``first_round..num_rounds``: configure, send and receive, aggregate, evaluate on the server.

        Flower's ``Strategy.start`` always counts from round 1; a resumed run continues the round numbers (the sites
        seed their fine-tunes from them). Organizations are not asked to evaluate (fraction_evaluate is 0).
        """
        for rnd in range(first_round, num_rounds + 1):
            log.info("[ROUND %d/%d]", rnd, num_rounds)
            messages = self.configure_train(rnd, self.current_arrays(), ConfigRecord(dict(train_config or {})), grid)
            self._sent_at = time.time()
            self.aggregate_train(rnd, grid.send_and_receive(messages=messages, timeout=timeout))
            evaluate_fn(rnd)

    def _accept_or_roll_back(self, entry: dict, before: dict | None) -> None:
        """Keep the round if the new LLM's public validation loss is no worse than the accepted one's; else restore."""
        if self.public_loss is None or before is None:
            return
        candidate, accepted = self.public_loss(self.llm, self.llm_weight_change()), self.accepted_public_loss
        ok = candidate <= accepted + self.accept_tolerance  # NaN: rejected
        entry.update({"round-accepted": ok, "candidate-public-loss": candidate, "accepted-public-loss": accepted})
        if ok:
            self.accepted_public_loss = candidate
            return
        log.warning("round %d: not accepted, the LLM's public validation loss %.4f > %.4f (accepted) + %g; the shared "
                    "models stay as they were", self._round, candidate, accepted, self.accept_tolerance)
        self.tiny.load_state_dict(before["tiny"])
        self.llm.load_state_dict(before["llm"])
        self.llm_dense = before["llm_dense"]
        self.server_opt.load_state_dict(before["server_opt"])
        entry["llm-unchanged"] = True
        if hasattr(self.distill, "previous"):
            self.distill.previous = before["distill"]

    def _llm_vector(self, tokens: torch.Tensor) -> torch.Tensor:
        """An LLM update (layer tokens) as the vector the aggregator combines: its factors, or its dense change."""
        return tokens.reshape(-1) if self.llm_dense is None else self._dense_vector(tokens)

    def llm_weight_change(self) -> dict[str, torch.Tensor] | None:
        """Weights space: the LLM's dense change per LoRA module (None in factors space)."""
        return vector_to_dense(self.llm_dense, self.llm_spec) if self.llm_dense is not None else None

    def org_weight_change(self, node: int, on_shared: bool = False) -> dict[str, torch.Tensor]:
        """One organization's own LLM: the dense change of its last LLM update, alone or on top of the shared LLM."""
        if node not in self.org_llm:
            raise KeyError(f"no LLM update of node {node} in the last round (transform-then-aggregate keeps them)")
        own = vector_to_dense(self._dense_vector(self.org_llm[node]), self.llm_spec)
        if not on_shared:
            return own
        shared = self.llm_weight_change()
        if shared is None:
            shared = vector_to_dense(self._dense_vector(self._offset(self.llm)), self.llm_spec)
        return {m: shared[m] + own[m] for m in own}

    def _dense_vector(self, tokens: torch.Tensor) -> torch.Tensor:
        """An LLM update (layer tokens, relative to the seeded init) as its flattened dense weight change."""
        delta = unflatten(tokens.reshape(self.llm_spec.num_layers, -1), self.llm_spec)
        absolute = {k: self.llm.init[k] + delta[k] for k in self.llm_spec.keys}
        return dense_to_vector(dense_change(absolute, self.llm_spec, self.llm.lora.scaling), self.llm_spec)

    @staticmethod
    def _offset(adapter: GlobalAdapter) -> torch.Tensor:
        """The adapter's current factors minus its seeded init, as layer tokens."""
        return flatten({k: adapter.current[k] - adapter.init[k] for k in adapter.spec.keys}, adapter.spec)

    def _translate(self, tiny: torch.Tensor, what: str) -> torch.Tensor:
        """The GT's LLM updates for ``tiny``, or ``TranslationError`` when any of them is not finite."""
        out = self.translate(tiny)
        if not bool(torch.isfinite(out).all()):
            raise TranslationError(f"the Grad-Transformer's output for {what} is not finite (NaN or inf); a damaged "
                                   "or diverged GT checkpoint? this round's translation is rejected")
        return out

    def _combine(self, accepted: list[Contribution], offset: torch.Tensor | None = None,
                 scale: Mapping[int, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(TinyLM aggregate, LLM aggregate) as flat vectors, and any central-DP metrics.

        ``offset`` (TinyLM layer tokens) is added to what the GT reads, not to the TinyLM aggregate. ``scale``
        (node -> factor, shrink): that node's LLM update, or in aggregate-then-transform its TinyLM update, is scaled.
        """
        scale = scale or {}
        if self.mode == "aggregate-then-transform" and scale:
            accepted = [(node, t * scale.get(node, 1.0), w, m) for node, t, w, m in accepted]
        shift = (lambda t: t + offset) if offset is not None else (lambda t: t)  # noqa: E731
        n = len(accepted)
        dp_metrics: dict = {}
        if self.central_dp is not None:
            total = torch.zeros(self.tiny_spec.num_params, dtype=torch.float64)
            for _, tokens, _, _ in accepted:
                clipped, _ = self.central_dp.clip_vector(tokens.reshape(-1))
                total += clipped.double()
            # fixed before the round (q * N), never the number of replies: the noise scale is data-independent
            expected = self.expected_participants.get(self._round)
            if expected is None:
                raise ValueError(f"central DP: round {self._round}'s expected participants were not fixed when it "
                                 "was configured (configure_train sets them)")
            tiny_agg = self.central_dp.noisy_mean(total, expected)
            dp_metrics = self.central_dp.record_round(self.fraction_train)
        else:
            tiny_agg = self._aggregate(((t.reshape(-1), w) for _, t, w, _ in accepted), n, tiny=True)
        if self.mode == "aggregate-then-transform":
            llm_agg = self._translate(shift(tiny_agg.view(self.tiny_spec.num_layers, -1)).unsqueeze(0),
                                      "the aggregate")[0]
            return tiny_agg, self._llm_vector(llm_agg), dp_metrics

        self.org_llm = {}

        def llm_updates():  # the GT in batches of gt_batch_size: at most one batch of LLM updates in memory
            for start in range(0, n, self.gt_batch_size):
                chunk = accepted[start:start + self.gt_batch_size]
                out = self._translate(torch.stack([shift(t) for _, t, _, _ in chunk]),
                                      f"nodes {[node for node, _, _, _ in chunk]}")
                for (node, _, w, metrics), row in zip(chunk, out, strict=True):
                    self.org_llm[node] = row  # (Lt, Dt): small (LoRA factors), kept for per-organization adapters
                    if isinstance(metrics.get("sim-partition-id"), int | float):
                        self.org_partition[node] = int(metrics["sim-partition-id"])
                    yield self._llm_vector(row) * scale.get(node, 1.0), w

        if self.aggregator != "distill":
            return tiny_agg, self._aggregate(llm_updates(), n), dp_metrics
        for _ in llm_updates():  # fills org_llm
            pass
        teachers = torch.stack([self.org_llm[a[0]] * scale.get(a[0], 1.0) for a in accepted])  # (T, Lt, Dt)
        try:
            joint = self.distill(teachers, torch.stack([shift(t) for _, t, _, _ in accepted]))
        except ValueError as err:  # e.g. no teacher answered a prompt: this round falls back to the mean
            log.warning("round %d: consolidation failed (%s); the LLM update is the mean of the organizations'",
                        self._round, err)
            self.distill_stats = {"distill-fallback": 1.0}
            mean = self._aggregate(((self._llm_vector(t), a[2]) for t, a in zip(teachers, accepted, strict=True)),
                                   n, tiny=True)
            return tiny_agg, mean, dp_metrics
        self.distill_stats = {**getattr(self.distill, "last_stats", {}), "distill-fallback": 0.0}
        return tiny_agg, self._llm_vector(joint), dp_metrics

    def _aggregate(self, vectors: Iterable[tuple[torch.Tensor, float]], capacity: int, tiny: bool = False
                   ) -> torch.Tensor:
        """Combine (vector, weight) pairs; the TinyLM side of a merge method or ``distill`` is the plain mean."""
        vectors = iter(vectors)
        first = next(vectors)
        name = "mean" if tiny and self.aggregator in (*MERGE_METHODS, "distill") else self.aggregator
        agg = make_aggregator(name, first[0].numel(), capacity, trim_beta=self.trim_beta,
                              norm_bound=self.norm_bound, merge_scale=self.merge_scale, density=self.density,
                              seed=self._round, norm_bound_mode=self.norm_bound_mode)
        try:
            agg.add(first[0].float(), first[1])
            for v, w in vectors:
                agg.add(v.float(), w)
            return agg.result()
        finally:
            close = getattr(agg, "close", None)
            if close is not None:
                close()

    def _cap_weights(self, accepted: list[Contribution], entry: dict) -> list[Contribution]:
        """Self-reported num-examples bounded to max-weight-ratio x the round's median (logged per node)."""
        if len(accepted) < 2 or not math.isfinite(self.max_weight_ratio):
            return accepted
        weights = sorted(w for _, _, w, _ in accepted)
        cap = self.max_weight_ratio * statistics.median(weights)
        capped = {node: w for node, _, w, _ in accepted if w > cap}
        if capped:
            entry["weight-capped"] = {str(n): {"reported": w, "used": cap} for n, w in capped.items()}
            log.warning("round %d: num-examples of nodes %s capped at %g (strategy.max-weight-ratio %g x the median)",
                        self._round, sorted(capped), cap, self.max_weight_ratio)
        return [(node, tokens, min(w, cap), metrics) for node, tokens, w, metrics in accepted]

    def _round_metrics(self, entry: dict, accepted: list, validated: list | None = None) -> dict[str, float]:
        """Counts of the round; the sites' reported scores averaged over every validated reply (``validated``)."""
        out: dict[str, float] = {"accepted": len(accepted), "rejected": len(entry["rejected"]),
                                 "declined": len(entry["declined"]), "server-seconds": entry["server_s"]}
        for r in entry["rejected"]:
            out[f"rejected-{r['code']}"] = out.get(f"rejected-{r['code']}", 0) + 1
        if "gt_s" in entry:
            out["gt-seconds"] = entry["gt_s"]
        if entry.get("coverage"):  # the per-node scores are in the round log (metrics.jsonl)
            out["coverage-max"] = max(entry["coverage"].values())
            out["out-of-coverage"] = len(entry["out-of-coverage"])
        out["llm-unchanged"] = float(bool(entry.get("llm-unchanged")))
        out["round-skipped"] = float("skipped" in entry)
        out["translation-rejected"] = float("translation-rejected" in entry)
        if "round-accepted" in entry:
            out["round-accepted"] = float(entry["round-accepted"])
            out["candidate-public-loss"] = entry["candidate-public-loss"]
            out["accepted-public-loss"] = entry["accepted-public-loss"]
        out.update(self.distill_stats if self.aggregator == "distill" else {})
        for k, v in entry.items():
            if k.startswith("dp-"):
                out[k] = float(v)
        total = sum(w for _, _, w, _ in accepted)
        for key in ("train-loss", "tiny-test-loss", "tiny-test-em"):
            vals = [(m[key], w) for _, _, w, m in (accepted if validated is None else validated)
                    if isinstance(m.get(key), int | float) and math.isfinite(m[key])]  # a NaN loss is not a score
            if vals:
                out[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
        eps = [m["dp-epsilon-total"] for _, _, _, m in accepted
               if isinstance(m.get("dp-epsilon-total"), int | float) and math.isfinite(m["dp-epsilon-total"])]
        if eps:
            out["dp-epsilon-total-max"] = max(eps)
        out["num-examples"] = total
        return out
