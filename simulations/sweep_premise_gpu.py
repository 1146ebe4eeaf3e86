"""Exploration only (not a benchmark of record): pretrain pair variants on a GPU and compare fact recall and
the fine-tuned EM gap, to choose the CPU default quickly (results: docs/premise.md, "How the pair was chosen").

    python -m simulations.sweep_premise_gpu PEOPLE KNOWLEDGE_FRACTION TINY_HIDDEN STEPS LLM_HIDDEN LLM_FFN [llmonly]
"""

from __future__ import annotations

import copy
import os
import random
import statistics
import sys
import time
from dataclasses import replace

import torch

from fedgt import models, pretrain
from fedgt.core.data import task_domain_data
from fedgt.core.evaluate import evaluate_split
from fedgt.core.examples import Example
from fedgt.core.finetune import FinetuneConfig, finetune
from fedgt.core.lora import LoraSettings, attach_lora
from fedgt.core.splits import make_domain_splits
from fedgt.core.world import make_world

people, know, tiny_h, steps = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dev = "cuda" if torch.cuda.is_available() else "cpu"


data = pretrain.PretrainData(num_people=people, knowledge_fraction=know,
                             arithmetic_fraction=float(os.environ.get("ARITH", "0")))
LR = float(os.environ.get("LLM_LR", "2e-3"))
presets = {"tinylm": replace(models.PRESETS["tinylm"], hidden_size=tiny_h, intermediate_size=3 * tiny_h,
                             pretrain_steps=steps),
           "llm": replace(models.PRESETS["llm"], pretrain_steps=steps, hidden_size=int(sys.argv[5]), pretrain_lr=LR,
                          intermediate_size=int(sys.argv[6]))}
if len(sys.argv) > 7:
    presets.pop("tinylm")
world = make_world(people)
splits = make_domain_splits()
rng = random.Random(0)
doms = rng.sample(list(splits.shadow), 4) + rng.sample(list(splits.held_out_combination), 4) + rng.sample(
    list(splits.held_out_family), 4)
res = {}
FT = [(100, 3e-3)]
pre_doms = [d for d in splits.pretrain if d.template == 0][:: 12]
for name, preset in presets.items():
    tok = pretrain.make_tokenizer(data)
    m = models.build_model(preset, len(tok)).to(dev)
    t = time.time()
    pretrain.pretrain(m, tok, preset, pretrain.pretraining_corpus(data, steps * 32, 0), 96, 0, progress=False)
    probe = [Example(f"{p}: {a} ", world.value(p, a) + ",", True) for p in world.people for a in ["city", "pet", "age"]]
    recall = evaluate_split(m, tok, probe)["exact_match"]
    pre_em = statistics.mean(evaluate_split(m, tok, task_domain_data(world, d, 1, 64).test)["exact_match"]
                             for d in pre_doms)
    print(f"{name} people={people} know={know} steps={steps}: pretrain {time.time() - t:.0f}s recall {recall:.3f} "
          f"pretrain-domain test-people EM {pre_em:.3f}", flush=True)
    for ft_steps, lr in FT:
        ems, losses = [], []
        for d in doms:
            dd = task_domain_data(world, d, 128, 128)
            tuned = attach_lora(copy.deepcopy(m), LoraSettings())
            r = finetune(tuned, tok, dd.train, FinetuneConfig(steps=ft_steps, lr=lr))
            ev = evaluate_split(tuned, tok, dd.test)
            ems.append(ev["exact_match"])
            losses.append(ev["loss"])
        res[(name, ft_steps, lr)] = ems
        res[(name, "loss")] = losses
        fam = {f: round(statistics.mean(e for e, d in zip(ems, doms, strict=True) if d.family == f), 3)
               for f in sorted({d.family for d in doms})}
        print(f"  {name} ft {ft_steps}@{lr}: EM {statistics.mean(ems):.3f} groups "
              f"{[round(statistics.mean(ems[i:i + 4]), 3) for i in (0, 4, 8)]} families {fam} "
              f"last train loss {r.metrics['train-loss']:.3f}", flush=True)
for ft_steps, lr in FT if "tinylm" in presets else []:
    gap = statistics.mean(res[("llm", ft_steps, lr)]) - statistics.mean(res[("tinylm", ft_steps, lr)])
    print("GAP", people, know, steps, ft_steps, lr, round(100 * gap, 1), "loss by domain (tiny, llm):",
          [(d.name, round(a, 2), round(b, 2)) for d, a, b in zip(doms, res[("tinylm", "loss")], res[("llm", "loss")],
                                                                  strict=True)])
