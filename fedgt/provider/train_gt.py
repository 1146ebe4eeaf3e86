"""Training the Grad-Transformer (``fedgt train-gt``) on curated shadow pairs.

Objectives:
- ``mse``: the paper's — MSE to the normalised LLM update (teacher forcing for the autoregressive decoder);
- ``functional``: through the LLM — the generated update is applied to the LLM and the LLM's loss on the
  shadow domain's own examples is back-propagated into the GT (``fedgt.core.judge``), so the GT learns what
  the update must *do*, not the seed and batch-order noise of one fine-tuning run;
- ``mix``: both (``mse_weight`` times the MSE).
Validation uses the decoding used at inference on held-out shadow *domains* (skills the GT never saw) and,
when given, fresh fine-tuning runs on its training domains (``fedgt.provider.same_val``: the paper's same-distribution
setting); the functional criterion is the mean of the two. The best checkpoint by the chosen criterion is
kept, training stops early after ``patience`` epochs without improvement, and a killed run resumes from
``train_state.pt``. ``coverage.safetensors`` (``fedgt.provider.coverage``) records where the GT is trustworthy: its
training domains' final TinyLM updates in its normalised input space, and their spread.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fedgt.core.batching import Encoded
from fedgt.core.examples import Example
from fedgt.core.judge import LLMJudge
from fedgt.provider.coverage import Coverage
from fedgt.provider.grad_transformer import GTConfig, build_gt, num_parameters, predict, save_gt
from fedgt.provider.same_val import SameDomainVal
from fedgt.provider.shadow import ShadowPairs

OBJECTIVES = ("mse", "functional", "mix")
SELECT_ON = ("functional", "mse")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, validation and stopping of one GT training run."""

    objective: str = "functional"
    mse_weight: float = 1.0  # mix only
    select_on: str = "functional"  # validation criterion for the best checkpoint and early stopping
    epochs: int = 60
    batch_size: int = 32  # pairs per step
    lr: float = 1e-3
    weight_decay: float = 0.05
    examples_per_pair: int = 4  # functional loss: shadow examples drawn per pair per step
    val_fraction: float = 0.1  # of the shadow domains, held out for validation
    val_examples: int = 32  # per validation domain
    patience: int = 10
    seed: int = 0  # initialisation and batch order
    split_seed: int | None = None  # which shadow domains validate (None: ``seed``)
    anchor_dropout: float = 0.5  # residual GT: chance a training pair's own domain is hidden from retrieval

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"train.select_on must be one of {SELECT_ON}, got {self.select_on!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.examples_per_pair < 1 or self.patience < 1:
            raise ValueError(f"train: epochs, batch_size, examples_per_pair, patience must be >= 1, got {self}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"train.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.anchor_dropout <= 1.0:
            raise ValueError(f"train.anchor_dropout must be in [0, 1], got {self.anchor_dropout}")


def split_domains(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Train / validation shadow domains (by domain, so validation pairs are never near-duplicates of training)."""
    order = sorted(names)
    random.Random(f"gt-val-{seed}").shuffle(order)
    n_val = max(1, int(round(len(order) * val_fraction)))
    if n_val >= len(order):
        raise ValueError(f"train-gt needs at least 2 shadow domains, got {len(order)}")
    return sorted(order[n_val:]), sorted(order[:n_val])


class DomainExamples:
    """Every domain's examples encoded once; rows are drawn per domain."""

    def __init__(self, judge: LLMJudge, examples: Mapping[str, Sequence[Example]], names: Sequence[str]):
        missing = [n for n in names if not examples.get(n)]
        if missing:
            raise ValueError(f"no shadow examples for domains {missing[:3]} (the functional objective needs them)")
        flat = [ex for n in names for ex in examples[n]]
        self.data: Encoded = judge.encode(flat).to(judge.device)
        self.rows: list[torch.Tensor] = []
        start = 0
        for n in names:
            self.rows.append(torch.arange(start, start + len(examples[n])))
            start += len(examples[n])

    def draw(self, domains: Sequence[int], k: int, gen: torch.Generator) -> tuple[Encoded, torch.Tensor]:
        """k random rows of each listed domain; returns the batch and each row's position in ``domains``."""
        picks, groups = [], []
        for i, d in enumerate(domains):
            rows = self.rows[d]
            picks.append(rows[torch.randint(len(rows), (k,), generator=gen)])
            groups.append(torch.full((k,), i))
        return self.data.select(torch.cat(picks)), torch.cat(groups)


def _fit_norms(model, pairs: ShadowPairs) -> None:
    model.src_norm.fit(pairs.tiny)
    model.tgt_norm.fit(pairs.llm)
    if model.cfg.probe_tokens:
        if pairs.probes is None:
            raise ValueError("this GT config reads probe features: compute pairs.probes first (fedgt.provider.probes)")
        model.probe_norm.fit(pairs.probes)
    if model.cfg.anchor_k:
        final = pairs.final()
        model.fit_anchors(final.tiny, final.llm, final.domain)


def functional_val_loss(judge: LLMJudge, llm_tokens: torch.Tensor, val: Sequence[Sequence[Example]]) -> float:
    """Mean over validation domains of the LLM's loss with each domain's generated update applied."""
    return sum(r["loss"] for r in judge.score(llm_tokens, val)) / len(val)


def train_gt(pairs: ShadowPairs, gt_cfg: GTConfig, cfg: TrainConfig, judge: LLMJudge | None,
             train_examples: Mapping[str, Sequence[Example]] | None, val_examples: Mapping[str, Sequence[Example]],
             out: Path, progress: bool = True, log=print, same_val: SameDomainVal | None = None) -> dict:
    """Train, validate, keep the best checkpoint in ``out``; returns the training record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    needs_judge = cfg.objective != "mse" or cfg.select_on == "functional"
    if needs_judge and judge is None:
        raise ValueError(f"objective {cfg.objective!r} / select_on {cfg.select_on!r} needs the LLM (a judge)")
    device = judge.device if judge is not None else torch.device("cpu")
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_names, val_names = split_domains(pairs.names, cfg.val_fraction, split_seed)
    train, val = pairs.select_domains(train_names), pairs.select_domains(val_names).final()
    if gt_cfg.anchor_k:  # the retrieval table: one row per training domain (its final pair)
        gt_cfg = replace(gt_cfg, anchor_rows=len(train.final().tiny))
    torch.manual_seed(cfg.seed)
    model = build_gt(gt_cfg)
    _fit_norms(model, train)
    coverage = Coverage.fit(model.src_norm.mean, model.src_norm.std, train.final().tiny)
    coverage.save(out)  # where the GT is trustworthy: its training domains' final TinyLM updates
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train.tiny) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.1)
    shadow = DomainExamples(judge, train_examples, train.names) if cfg.objective != "mse" else None
    val_sets = [list(val_examples[n])[:cfg.val_examples] for n in val.names]
    if same_val is not None:
        if judge is None:
            raise ValueError("same-domain validation scores through the LLM: it needs a judge")
        if gt_cfg.probe_tokens and same_val.probes is None:
            raise ValueError("this GT reads probe features: fill same_val.probes first (fedgt.provider.probes)")
        outside = sorted(set(same_val.names) - set(train.names))
        if outside:
            raise ValueError(f"same-domain validation must use the GT's training domains; {outside[:3]} are not")
        same_sets = [ex[:cfg.val_examples] for ex in same_val.examples]
    state_path = out / "train_state.pt"
    record = {"config": asdict(cfg), "gt": asdict(gt_cfg), "train_domains": len(train.names),
              "val_domains": len(val.names), "same_val_domains": len(same_val.names) if same_val else 0,
              "train_pairs": len(train.tiny), "history": [], "best_epoch": -1,
              "best_val": float("inf"), "seconds": 0.0, "parameters": num_parameters(model), "device": str(device),
              "coverage": {"reference": coverage.reference, "quantile": coverage.quantile,
                           "rows": len(coverage.keys)}}
    start_epoch, bad_epochs = 0, 0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["record"]["config"] == record["config"] and state["record"]["gt"] == record["gt"]:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            record, start_epoch, bad_epochs = state["record"], state["epoch"] + 1, state["bad_epochs"]
            log(f"resuming GT training at epoch {start_epoch}")
    gen = torch.Generator().manual_seed(cfg.seed)
    tiny_all, llm_all = train.tiny.to(device), train.llm.to(device)
    probes_all = train.probes.to(device) if gt_cfg.probe_tokens else None
    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience:
            break
        t0 = time.time()
        gen.manual_seed(cfg.seed * 100_003 + epoch)  # resumable: an epoch's randomness depends on its index only
        model.train()
        order = torch.randperm(len(train.tiny), generator=gen)
        totals = {"mse": 0.0, "functional": 0.0}
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            src, tgt = model.src_norm(tiny_all[idx]), model.tgt_norm(llm_all[idx])
            probe_z = model.probe_norm(probes_all[idx]) if probes_all is not None else None
            extra = {}
            if gt_cfg.anchor_k:  # sometimes hide the pair's own domain: retrieval at inference may miss it too
                hide = torch.rand(len(idx), generator=gen) < cfg.anchor_dropout
                extra["exclude"] = torch.where(hide, train.domain[idx], -1).to(device)
            loss = torch.zeros((), device=device)
            if cfg.objective in ("mse", "mix"):
                mse = F.mse_loss(model(src, tgt, probe_z, **extra), tgt)
                loss = loss + (cfg.mse_weight if cfg.objective == "mix" else 1.0) * mse
                totals["mse"] += float(mse.detach())
            if cfg.objective in ("functional", "mix"):
                out_z = model(src, probe_z=probe_z, **extra) if gt_cfg.anchor_k else model.generate(src, probe_z)
                generated = model.tgt_norm.inverse(out_z)
                batch, groups = shadow.draw(train.domain[idx].tolist(), cfg.examples_per_pair, gen)
                func = judge.example_losses(generated, batch.to(device), groups).mean()
                loss = loss + func
                totals["functional"] += float(func.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        # Validation with the inference decoding.
        pred = predict(model, val.tiny, val.probes)
        val_mse = float(F.mse_loss(model.tgt_norm(pred.to(device)), model.tgt_norm(val.llm.to(device))))
        val_func = functional_val_loss(judge, pred, val_sets) if judge is not None else float("nan")
        val_same = float("nan")
        if same_val is not None:
            same_pred = predict(model, same_val.tiny, same_val.probes if gt_cfg.probe_tokens else None)
            val_same = functional_val_loss(judge, same_pred, same_sets)
        if cfg.select_on == "functional":
            current = val_func if same_val is None else (val_func + val_same) / 2
        else:
            current = val_mse
        entry = {"epoch": epoch, "train_mse": totals["mse"] / steps_per_epoch,
                 "train_functional": totals["functional"] / steps_per_epoch, "val_mse": val_mse,
                 "val_functional": val_func, "val_same_functional": val_same, "seconds": time.time() - t0}
        record["history"].append(entry)
        record["seconds"] += entry["seconds"]
        if current < record["best_val"]:
            record["best_val"], record["best_epoch"], bad_epochs = current, epoch, 0
            save_gt(model, out, {"training": {k: v for k, v in record.items() if k != "history"}})
        else:
            bad_epochs += 1
        if progress:
            log(f"epoch {epoch:3d}  train mse {entry['train_mse']:.4f} func {entry['train_functional']:.4f}  "
                f"val mse {val_mse:.4f} func {val_func:.4f} same {val_same:.4f}  ({entry['seconds']:.1f}s)"
                + ("  *" if record["best_epoch"] == epoch else ""))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "record": record, "epoch": epoch, "bad_epochs": bad_epochs}, state_path)
    (out / "history.json").write_text(json.dumps(record, indent=1))
    return record


def gt_config_for(pairs: ShadowPairs, **overrides) -> GTConfig:
    """A GT config shaped for a curation's update spaces."""
    base = GTConfig(src_tokens=pairs.tiny_spec.num_layers, src_dim=pairs.tiny_spec.token_dim,
                    tgt_tokens=pairs.llm_spec.num_layers, tgt_dim=pairs.llm_spec.token_dim)
    return replace(base, **overrides)
