"""The federation's run config: every ``[tool.flwr.app.config]`` knob, typed and validated in one place.

Flower hands both apps ``context.run_config`` as a flat dict of dotted keys (``"dp.mode"``); this module
turns it into frozen dataclasses, one per group (``model.*``, ``lora.*``, ``train.*``, ``dp.*``, ``gt.*``,
``strategy.*``, ``data.*``, ``eval.*``, ``output.*``). A missing key takes its default below; an unknown key,
a wrong type or a bad value raises ``ConfigError`` naming the key, before any round starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedgt.core.dp import DP_MODES, DPConfig
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.lora import LoraSettings

MODES = ("transform-then-aggregate", "aggregate-then-transform")
ROUND_SCHEMES = ("retranslate", "fresh", "merge", "naive")
AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bounded_mean", "task_arithmetic", "ties", "dare", "distill")
SPACES = ("weights", "factors")
SERVER_OPTS = ("none", "fedavgm", "fedadam")
SETTINGS = ("same_distribution", "held_out_combination", "held_out_family")
PARTITIONS = ("domain", "iid", "dirichlet")
OUT_OF_COVERAGE = ("skip", "shrink", "apply")
NORM_BOUND_MODES = ("relative", "absolute")
TRACKERS = ("", "tensorboard")
COVERAGE_KEY = "coverage-last-round"  # a train message's config: the coverage score of the node's previous update


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class FederationSection:
    num_organizations: int = 8  # the SuperNodes the server waits for (simulation: num-supernodes)
    wait_s: float = 120.0  # how long to wait for them (and, each round, for min-organizations) before giving up
    num_server_rounds: int = 3
    min_organizations: int = 0  # a round starts with at least this many connected (0: num-organizations)
    min_replies: int = 2  # accepted replies a round needs, else it is skipped (capped at num-organizations)
    round_timeout_s: float = 3600.0  # a round stops waiting for replies after this long


@dataclass(frozen=True)
class ModelSection:
    pair: str = "default"  # a preset pair (fedgt.core.models.PAIRS); model.tiny / model.llm override either side
    tiny: str = ""  # a prepared preset name or a local Hugging Face model directory
    llm: str = ""


@dataclass(frozen=True)
class LoraSection:
    r: int = LoraSettings.r
    alpha: int = LoraSettings.alpha
    targets: str = ",".join(LoraSettings.target_modules)
    init_seed: int = LoraSettings.init_seed


@dataclass(frozen=True)
class TrainSection:
    steps: int = FinetuneConfig.steps
    lr: float = FinetuneConfig.lr
    batch_size: int = FinetuneConfig.batch_size
    max_length: int = FinetuneConfig.max_length
    seed: int = FinetuneConfig.seed


@dataclass(frozen=True)
class DPSection:
    """What the server *requests*; each site grants it only within its own policy (``fedgt.org.policy``)."""

    mode: str = "none"  # none | dp-sgd | update
    epsilon: float = 8.0  # per round: DP-SGD target of one round's fine-tune, or ε of one update release
    delta: float = DPConfig.delta
    max_grad_norm: float = DPConfig.max_grad_norm  # dp-sgd per-sample clip
    update_clip: float = DPConfig.update_clip  # update-mode L2 clip


@dataclass(frozen=True)
class SimSitesSection:
    """Simulation only: the policy of every emulated organization (a real site's comes from its node config)."""

    dp_mode: str = "none"  # the DP mode a site requires; "none" grants any request
    max_epsilon: float = 8.0  # the largest ε per round it grants
    max_delta: float = 1e-5
    budget: float = 24.0  # ε over all rounds (RDP); then it declines
    release: str = "train-loss,tiny-test-loss,tiny-test-em,sim-partition-id"  # sent besides the always-sent ones
    policy_file: str = ""  # a TOML file: [default] and [org-N] tables of site-policy keys, per organization
    noise_seed: int = -1  # -1: secret noise; >= 0: reproducible DP noise (never private; logged as a warning)


@dataclass(frozen=True)
class GTSection:
    checkpoint: str = ""  # a Grad-Transformer dir; "" = the provider default (curated + trained + cached on first use)
    shadow_domains: int = 320  # provider default: how many built-in shadow domains it curates
    epochs: int = 20  # provider default: GT training epochs
    anchor_k: int = 3  # provider default: the GT is residual on the k nearest shadow updates (0: a plain GT)
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 16  # organizations per GT forward pass (and per aggregation chunk)


@dataclass(frozen=True)
class StrategySection:
    mode: str = "transform-then-aggregate"
    aggregator: str = "distill"
    trim_beta: float = 0.1
    norm_bound: float = 1.0  # norm_bounded_mean: L2 bound of each contribution (relative: x the round's median norm)
    norm_bound_mode: str = "relative"  # relative | absolute (norm-bound in the aggregated space's own units)
    rounds: str = "fresh"  # fresh | retranslate | merge | naive (strategies/grad_transformer.py explains)
    space: str = "weights"  # aggregate the LLM updates' weight changes (exact) or their LoRA factors
    server_opt: str = "none"
    server_lr: float = 1.0
    max_update_norm: float = 100.0  # replies whose TinyLM update has a larger L2 norm are rejected
    max_num_examples: int = 1000  # an organization's aggregation weight is min(num-examples, this)
    max_weight_ratio: float = 2.0  # ... and at most this times the round's median weight (self-reported sizes)
    fraction_train: float = 1.0
    central_dp: bool = False
    central_dp_clip: float = 1.0
    central_dp_noise_multiplier: float = 1.0
    merge_scale: float = 1.0  # task_arithmetic / ties / dare: lambda, the scale of the merged task vectors
    density: float = 0.5  # ties / dare: the fraction of each task vector kept
    out_of_coverage: str = "skip"  # skip | shrink | apply: an update the GT does not cover (docs/federation.md)
    coverage_threshold: float = 1.0  # coverage score above which an update is outside the GT's coverage
    accept_rounds: bool = False  # true: keep a round only if the LLM's public validation loss does not get worse
    accept_tolerance: float = 0.0  # ... by more than this (absolute loss)
    secure_aggregation: bool = False  # SecAgg+: the server learns only the mean TinyLM update (strategies/secagg.py)
    secagg_clip: float = 8.0  # SecAgg+: each update coordinate is clipped to [-this, this] before quantisation


@dataclass(frozen=True)
class DistillSection:
    """strategy.aggregator = "distill": one joint LLM adapter distilled from the organizations' LLM updates."""

    prompts_per_teacher: int = 256  # public prompts each organization's LLM answers
    neighbours: int = 1  # shadow domains (nearest to its TinyLM update) those prompts come from
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 32
    warm_start: bool = True  # each round's joint adapter starts from the previous round's


@dataclass(frozen=True)
class DataSection:
    path: str = ""  # a folder with one subfolder of .txt/.jsonl files per organization; "" = built-in domains
    setting: str = "same_distribution"
    partition: str = "domain"
    alpha: float = 0.5
    n_train: int = 128
    n_test: int = 128
    seed: int = 0


@dataclass(frozen=True)
class EvalSection:
    test_examples: int = 64  # per organization per round (server-side, simulation only)
    public_examples: int = 128
    client_test: bool = True  # ask for TinyLM test scores (sent only where policy releases them)
    org_tests: bool = True  # simulation: the server rebuilds each organization's test split to score the LLM
    ceiling: bool = True  # simulation: fine-tune the LLM on each organization's data once, for LGR


@dataclass(frozen=True)
class OutputSection:
    dir: str = ""  # "" = $FEDGT_CACHE/runs/<timestamp>
    merged: bool = False  # also save a merged copy of the final LLM
    org_adapters: bool = True  # also save each organization's own LLM adapter (alone and on the shared LLM)
    resume: bool = False  # continue the run in output.dir from its last good checkpoint (else a used dir is refused)
    tracking: str = ""  # "" | tensorboard: also log each round's scalars to <output.dir>/tensorboard (tracking extra)


@dataclass(frozen=True)
class FedConfig:
    """Every knob of a federation run."""

    federation: FederationSection = field(default_factory=FederationSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    dp: DPSection = field(default_factory=DPSection)
    sim_sites: SimSitesSection = field(default_factory=SimSitesSection)
    gt: GTSection = field(default_factory=GTSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    distill: DistillSection = field(default_factory=DistillSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)

    # ---------------------------------------------------------------- derived library configs

    def quorum(self) -> tuple[int, int]:
        """(organizations a round needs connected, accepted replies it needs), both within num-organizations."""
        f = self.federation
        return f.min_organizations or f.num_organizations, min(f.min_replies, f.num_organizations)

    def model_names(self) -> tuple[str, str]:
        """(TinyLM, LLM): presets or local model directories."""
        from fedgt.core.models import PAIRS

        if self.model.pair and self.model.pair not in PAIRS:
            raise ConfigError(f"run config 'model.pair' = {self.model.pair!r}: must be one of {sorted(PAIRS)}")
        tiny, llm = PAIRS[self.model.pair] if self.model.pair else ("", "")
        return self.model.tiny or tiny, self.model.llm or llm

    def lora_settings(self) -> LoraSettings:
        """The LoRA settings both models use."""
        targets = tuple(t.strip() for t in self.lora.targets.split(",") if t.strip())
        return LoraSettings(r=self.lora.r, alpha=self.lora.alpha, target_modules=targets,
                            init_seed=self.lora.init_seed)

    def finetune_config(self, round_seed: int = 0) -> FinetuneConfig:
        """An organization's local fine-tune of one round."""
        t = self.train
        return FinetuneConfig(steps=t.steps, lr=t.lr, batch_size=t.batch_size, max_length=t.max_length,
                              seed=t.seed + round_seed)

    def dp_config(self) -> DPConfig:
        """The DP this run requests of each organization (a site grants it only within its policy)."""
        d = self.dp
        if d.mode == "none":
            return DPConfig()
        return DPConfig(mode=d.mode, epsilon=d.epsilon, delta=d.delta, max_grad_norm=d.max_grad_norm,
                        update_clip=d.update_clip)


# Flat run-config key -> (section, field). "num-server-rounds" is Flower's conventional top-level key.
_SECTIONS = {f.name: f.type for f in fields(FedConfig)}
_SPECIAL = {"num-server-rounds": ("federation", "num_server_rounds")}


def _key_map() -> dict[str, tuple[str, str]]:
    out = dict(_SPECIAL)
    for sec in fields(FedConfig):
        for f in fields(sec.default_factory()):  # type: ignore[misc]
            if (sec.name, f.name) in _SPECIAL.values():
                continue
            out[f"{sec.name.replace('_', '-')}.{f.name.replace('_', '-')}"] = (sec.name, f.name)
    return out


KEYS = _key_map()


def _coerce(key: str, value: Any, default: Any) -> Any:
    """The value in the type of the field's default, or a ConfigError naming the key."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"run config '{key}': must be a finite number, got {value!r}")
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"run config '{key}': expected {kind.__name__}, got {value!r} ({type(value).__name__})")


# Upper bounds on sizes, times and rates: a value past these is a typo (1e9 tokens per example), not a setting.
UPPER = {
    "federation.num-organizations": 100_000, "federation.wait-s": 7 * 86_400.0, "num-server-rounds": 100_000,
    "federation.min-replies": 100_000, "federation.round-timeout-s": 7 * 86_400.0,
    "lora.r": 1024, "lora.alpha": 65_536, "train.steps": 1_000_000, "train.lr": 1.0, "train.batch-size": 65_536,
    "train.max-length": 131_072, "dp.epsilon": 1e4, "dp.max-grad-norm": 1e6, "dp.update-clip": 1e6,
    "sim-sites.max-epsilon": 1e4, "sim-sites.budget": 1e6, "gt.shadow-domains": 1_000_000, "gt.epochs": 100_000,
    "gt.batch-size": 65_536, "strategy.norm-bound": 1e6, "strategy.server-lr": 100.0,
    "strategy.max-update-norm": 1e9, "strategy.max-num-examples": 1_000_000_000,
    "strategy.max-weight-ratio": 1e6, "strategy.central-dp-clip": 1e6,
    "strategy.central-dp-noise-multiplier": 1e6, "strategy.merge-scale": 100.0, "strategy.coverage-threshold": 1e6,
    "data.n-train": 10_000_000, "data.n-test": 10_000_000, "data.alpha": 1e6, "eval.test-examples": 1_000_000,
    "eval.public-examples": 1_000_000,
}


def _check(cfg: FedConfig, check_paths: bool = True) -> None:
    """Value checks; each failure names its key."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            section, name = KEYS[key]
            value = getattr(getattr(cfg, section), name)
            raise ConfigError(f"run config '{key}' = {value!r}: {what}")

    f, t, d, g, s, da, e = cfg.federation, cfg.train, cfg.dp, cfg.gt, cfg.strategy, cfg.data, cfg.eval
    need(f.num_organizations >= 1, "federation.num-organizations", "must be >= 1")
    need(f.wait_s > 0, "federation.wait-s", "must be > 0")
    need(f.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
    need(0 <= f.min_organizations <= f.num_organizations, "federation.min-organizations",
         "must be in [0, federation.num-organizations] (0: all of them)")
    need(f.min_replies >= 1, "federation.min-replies", "must be >= 1")
    need(f.round_timeout_s > 0, "federation.round-timeout-s", "must be > 0")
    need(bool(cfg.model.pair) or (bool(cfg.model.tiny) and bool(cfg.model.llm)), "model.pair",
         "give a pair or both model.tiny and model.llm")
    cfg.model_names()
    need(cfg.lora.r >= 1, "lora.r", "must be >= 1")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(any(x.strip() for x in cfg.lora.targets.split(",")), "lora.targets", "name at least one module")
    need(t.steps >= 1, "train.steps", "must be >= 1")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(t.batch_size >= 1, "train.batch-size", "must be >= 1")
    need(t.max_length >= 2, "train.max-length", "must be >= 2")
    need(d.mode in DP_MODES, "dp.mode", f"must be one of {DP_MODES}")
    need(d.epsilon > 0, "dp.epsilon", "must be > 0")
    need(0 < d.delta < 1, "dp.delta", "must be in (0, 1)")
    need(d.max_grad_norm > 0, "dp.max-grad-norm", "must be > 0")
    need(d.update_clip > 0, "dp.update-clip", "must be > 0")
    ss = cfg.sim_sites
    need(s.aggregator != "distill" or s.mode == "transform-then-aggregate", "strategy.aggregator",
         "'distill' needs strategy.mode = 'transform-then-aggregate' (each organization's LLM update is a teacher)")
    need(s.merge_scale > 0 and math.isfinite(s.merge_scale), "strategy.merge-scale", "must be a finite number > 0")
    need(0 < s.density <= 1, "strategy.density", "must be in (0, 1]")
    need(s.out_of_coverage in OUT_OF_COVERAGE, "strategy.out-of-coverage", f"must be one of {OUT_OF_COVERAGE}")
    need(cfg.output.tracking in TRACKERS, "output.tracking", f"must be one of {TRACKERS}")
    need(not check_paths or cfg.output.tracking != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
         "output.tracking", "needs the tensorboard package: pip install -e '.[tracking]'")
    need(s.coverage_threshold > 0 and math.isfinite(s.coverage_threshold), "strategy.coverage-threshold",
         "must be a finite number > 0")
    need(s.accept_tolerance >= 0 and math.isfinite(s.accept_tolerance), "strategy.accept-tolerance",
         "must be a finite number >= 0")
    need(s.secagg_clip > 0 and math.isfinite(s.secagg_clip), "strategy.secagg-clip", "must be a finite number > 0")
    need(not s.secure_aggregation or (s.mode == "aggregate-then-transform" and s.aggregator == "mean"
                                      and not s.central_dp and s.rounds != "merge"),
         "strategy.secure-aggregation", "sums TinyLM updates: it needs strategy.mode = 'aggregate-then-transform', "
         "strategy.aggregator = 'mean', strategy.central-dp = false and strategy.rounds other than 'merge'")
    ds = cfg.distill
    for key, value in (("prompts-per-teacher", ds.prompts_per_teacher), ("neighbours", ds.neighbours),
                       ("steps", ds.steps), ("batch-size", ds.batch_size)):
        need(1 <= value <= 1_000_000, f"distill.{key}", "must be in [1, 1e6]")
    need(0 < ds.lr < 1, "distill.lr", "must be in (0, 1)")
    need(ss.dp_mode in DP_MODES, "sim-sites.dp-mode", f"must be one of {DP_MODES}")
    need(ss.max_epsilon > 0, "sim-sites.max-epsilon", "must be > 0")
    need(0 < ss.max_delta < 1, "sim-sites.max-delta", "must be in (0, 1)")
    need(ss.budget > 0, "sim-sites.budget", "must be > 0")
    need(ss.noise_seed >= -1, "sim-sites.noise-seed", "must be -1 (secret) or a seed >= 0")
    need(not check_paths or not ss.policy_file or Path(ss.policy_file).is_file(), "sim-sites.policy-file",
         "is not a file")
    need(g.shadow_domains >= 4, "gt.shadow-domains", "must be >= 4")
    need(g.epochs >= 1, "gt.epochs", "must be >= 1")
    need(0 <= g.anchor_k <= 16, "gt.anchor-k", "must be in [0, 16] (0: a plain GT)")
    need(g.device in ("auto", "cpu", "cuda"), "gt.device", "must be auto, cpu or cuda")
    need(g.batch_size >= 1, "gt.batch-size", "must be >= 1")
    need(not check_paths or not g.checkpoint or Path(g.checkpoint).is_dir(), "gt.checkpoint",
         "is not a directory (a `fedgt train-gt` or `fedgt provide` output)")
    need(s.mode in MODES, "strategy.mode", f"must be one of {MODES}")
    need(s.aggregator in AGGREGATORS, "strategy.aggregator", f"must be one of {AGGREGATORS}")
    need(0 <= s.trim_beta < 0.5, "strategy.trim-beta", "must be in [0, 0.5)")
    need(s.norm_bound > 0, "strategy.norm-bound", "must be > 0")
    need(s.norm_bound_mode in NORM_BOUND_MODES, "strategy.norm-bound-mode", f"must be one of {NORM_BOUND_MODES}")
    need(s.max_weight_ratio >= 1, "strategy.max-weight-ratio", "must be >= 1")
    need(s.rounds in ROUND_SCHEMES, "strategy.rounds", f"must be one of {ROUND_SCHEMES}")
    need(s.space in SPACES, "strategy.space", f"must be one of {SPACES}")
    need(s.space == "factors" or s.rounds in ("retranslate", "fresh"), "strategy.space",
         "'weights' needs strategy.rounds = 'retranslate' or 'fresh'")
    need(s.server_opt in SERVER_OPTS, "strategy.server-opt", f"must be one of {SERVER_OPTS}")
    need(s.server_lr > 0, "strategy.server-lr", "must be > 0")
    need(s.max_update_norm > 0, "strategy.max-update-norm", "must be > 0")
    need(s.max_num_examples >= 1, "strategy.max-num-examples", "must be >= 1")
    need(0 < s.fraction_train <= 1, "strategy.fraction-train", "must be in (0, 1]")
    need(s.central_dp_clip > 0, "strategy.central-dp-clip", "must be > 0")
    need(s.central_dp_noise_multiplier > 0, "strategy.central-dp-noise-multiplier", "must be > 0")
    need(not s.central_dp or s.aggregator == "mean", "strategy.central-dp",
         "central DP needs strategy.aggregator = 'mean' (its noise is calibrated to a clipped plain mean)")
    need(da.setting in SETTINGS, "data.setting", f"must be one of {SETTINGS}")
    need(da.partition in PARTITIONS, "data.partition", f"must be one of {PARTITIONS}")
    need(da.alpha > 0, "data.alpha", "must be > 0")
    need(da.n_train >= 1, "data.n-train", "must be >= 1")
    need(da.n_test >= 1, "data.n-test", "must be >= 1")
    need(not check_paths or not da.path or Path(da.path).is_dir(), "data.path", "is not a directory")
    need(e.test_examples >= 1, "eval.test-examples", "must be >= 1")
    need(e.public_examples >= 1, "eval.public-examples", "must be >= 1")
    for key, hi in UPPER.items():
        section, name = KEYS[key]
        need(getattr(getattr(cfg, section), name) <= hi, key, f"must be <= {hi:g}")


def from_run_config(run_config: Mapping[str, Any], check_paths: bool = True) -> FedConfig:
    """Typed, validated config from Flower's flat ``run_config`` (missing keys take defaults).

    ``check_paths=False`` skips checking that configured paths exist: a site must not let the server probe its disk.
    """
    unknown = sorted(k for k in run_config if k not in KEYS)
    if unknown:
        raise ConfigError(f"unknown run config key(s) {unknown}; known keys: {sorted(KEYS)}")
    defaults = FedConfig()
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in run_config.items():
        section, name = KEYS[key]
        values[section][name] = _coerce(key, value, getattr(getattr(defaults, section), name))
    cfg = FedConfig(**{name: dataclasses.replace(getattr(defaults, name), **v) for name, v in values.items()})
    _check(cfg, check_paths)
    return cfg


def to_run_config(cfg: FedConfig) -> dict[str, Any]:
    """The flat run config of a FedConfig (inverse of ``from_run_config``)."""
    return {key: getattr(getattr(cfg, section), name) for key, (section, name) in KEYS.items()}


def load_toml(path: str | Path, base: Mapping[str, Any] | None = None) -> FedConfig:
    """A scenario file (flat ``key = value`` lines, as for ``flwr run --run-config FILE``) over ``base``."""
    path = Path(path)
    try:
        overrides = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read run config: {err}") from err
    flat = _flatten(overrides)
    try:
        return from_run_config({**(base or {}), **flat})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def pyproject_run_config(path: str | Path = "pyproject.toml") -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` as Flower flattens it."""
    data = tomllib.loads(Path(path).read_text())
    return _flatten(data["tool"]["flwr"]["app"]["config"])


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
