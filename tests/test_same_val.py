"""Same-domain validation of the Grad-Transformer: fresh TinyLM runs on its training domains, scored elsewhere."""

from __future__ import annotations

import math

import pytest

from fedgt.core.finetune import FinetuneConfig
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings
from fedgt.core.tasks import generate, parse_domain
from fedgt.core.world import make_world
from fedgt.provider.same_val import pick_domains, same_domain_val
from fedgt.provider.shadow import CurationConfig, curate, load_pairs
from fedgt.provider.train_gt import TrainConfig, gt_config_for, split_domains, train_gt

WORLD = make_world(40, seed=0)
NAMES = ["lookup/city/-/t0/f0", "string/upper/pet/t1/f2", "arith/last_digit/age/t0/f1", "lookup/pet/-/t2/f3"]
LORA = LoraSettings()
FT = FinetuneConfig(steps=4, batch_size=4, snapshot_steps=(3, 4))


def _examples(split_seed: int) -> dict:
    return {n: generate(WORLD, parse_domain(n), "public", 16, seed=split_seed) for n in NAMES}


def test_pick_domains_is_seeded_and_bounded() -> None:
    names = [f"d{i}" for i in range(10)]
    assert pick_domains(names, 4, 0) == pick_domains(list(reversed(names)), 4, 0)
    assert len(pick_domains(names, 4, 0)) == 4
    assert pick_domains(names, 50, 0) == sorted(names)


def test_inputs_and_scored_examples_are_disjoint_halves(toy_pair) -> None:
    tiny, _ = toy_pair
    test = _examples(1)
    sv = same_domain_val(str(tiny), LORA, FT, test, NAMES[:3], n=2, seed=0)
    assert len(sv.names) == 2 and set(sv.names) <= set(NAMES[:3])
    assert sv.tiny.shape[0] == 2 and sv.tiny.abs().sum() > 0  # real fine-tuning moved the adapter
    for name, scored in zip(sv.names, sv.examples, strict=True):
        assert scored == test[name][8:]  # the second half scores; the first half was tuned on


def test_too_few_examples_are_refused(toy_pair) -> None:
    tiny, _ = toy_pair
    with pytest.raises(ValueError, match=">= 4 test examples"):
        same_domain_val(str(tiny), LORA, FT, {NAMES[0]: _examples(1)[NAMES[0]][:3]}, NAMES[:1], n=1)


def test_train_gt_selects_on_the_mean_of_both_validations(toy_pair, tmp_path) -> None:
    tiny, llm = toy_pair
    cfg = CurationConfig(tiny_model=str(tiny), llm_model=str(llm), lora=LORA, finetune=FT, n_examples=16)
    train_ex = _examples(0)
    curate(list(train_ex.items()), cfg, tmp_path / "pairs", workers=1, progress=False)
    pairs = load_pairs(tmp_path / "pairs")
    tcfg = TrainConfig(epochs=2, batch_size=4, seed=0)
    test_ex = _examples(1)
    train_names, val_names = split_domains(pairs.names, tcfg.val_fraction, tcfg.seed)
    judge = LLMJudge(str(llm), LORA)
    gcfg = gt_config_for(pairs, d_model=32, n_heads=2, ffn=64, enc_layers=1, dec_layers=1)

    outside = same_domain_val(str(tiny), LORA, FT, test_ex, val_names, n=1)
    with pytest.raises(ValueError, match="training domains"):
        train_gt(pairs, gcfg, tcfg, judge, train_ex, test_ex, tmp_path / "bad", progress=False, same_val=outside)

    sv = same_domain_val(str(tiny), LORA, FT, test_ex, train_names, n=2)
    record = train_gt(pairs, gcfg, tcfg, judge, train_ex, test_ex, tmp_path / "gt", progress=False, same_val=sv)
    assert record["same_val_domains"] == 2
    best = record["history"][record["best_epoch"]]
    assert math.isfinite(best["val_same_functional"])
    assert record["best_val"] == pytest.approx((best["val_functional"] + best["val_same_functional"]) / 2)
