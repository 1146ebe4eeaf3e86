"""Server-side consolidation: routing public prompts, teachers labelling them, one joint adapter trained."""

from __future__ import annotations

import pytest
import torch

from fedgt.core.finetune import FinetuneConfig
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings
from fedgt.core.tasks import generate, parse_domain
from fedgt.core.world import make_world
from fedgt.provider.prompt_pool import PromptPool
from fedgt.provider.shadow import LoraTuner
from fedgt.server.consolidate import Consolidator, DistillConfig

LORA = LoraSettings()
WORLD = make_world(40, seed=0)
NAMES = ["string/upper/pet/t1/f2", "lookup/city/-/t0/f0"]


def _pool(keys: torch.Tensor) -> PromptPool:
    prompts = [[ex.context for ex in generate(WORLD, parse_domain(n), "public", 12, seed=0)] for n in NAMES]
    return PromptPool(NAMES, prompts, keys)


def test_each_update_gets_prompts_of_its_nearest_shadow_domain_only() -> None:
    keys = torch.tensor([[[1.0, 0.0, 0.2]], [[-1.0, 0.1, 0.0]]])  # (2 domains, 1 layer, 3)
    pool = _pool(keys)
    routed = pool.route(torch.tensor([[[-0.9, 0.1, 0.0]], [[1.1, 0.0, 0.1]]]), n=20, k=1, seed=0)
    assert [len(r) for r in routed] == [20, 20]
    assert set(routed[0]) <= set(pool.prompts[1]) and set(routed[1]) <= set(pool.prompts[0])
    assert set(routed[0]) == set(pool.prompts[1])  # 20 draws over 12 prompts cover them all
    assert pool.route(keys, 5, 1, seed=3) == pool.route(keys, 5, 1, seed=3)


def test_teachers_answer_greedily_and_the_student_learns_their_answers(toy_pair) -> None:
    _, llm = toy_pair
    train = generate(WORLD, parse_domain(NAMES[0]), "train", 32, seed=0)
    tuner = LoraTuner(str(llm), LORA)
    teacher = tuner.tokens(tuner.run(train, FinetuneConfig(steps=60, lr=3e-2, batch_size=8)).update)
    teachers = torch.stack([teacher, torch.zeros_like(teacher)])  # a fine-tuned teacher and the base LLM
    pool = _pool(torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(0)))
    c = Consolidator(str(llm), LORA, pool, DistillConfig(steps=40, lr=1e-2, batch_size=8, max_answer_tokens=24))

    labelled = c.label(teachers, [pool.prompts[0][:6], pool.prompts[1][:4]])
    assert 0 < len(labelled) <= 10 and all(ex.is_task and ex.target.endswith("\n") for ex in labelled)
    # Batches holding only some teachers' rows (batch 1: teacher 0, batch 2: teacher 1) label the same.
    four = [pool.prompts[0][:4], pool.prompts[1][:4]]
    assert c.label(teachers, four, batch_rows=4) == c.label(teachers, four)
    # Greedy labels are the teacher's own argmax: scoring them teacher-forced gives exact match 1 (left padding
    # and grouped LoRA in generate change nothing), and the base LLM's answers differ from the teacher's.
    mine = [ex for ex in labelled if ex.context in pool.prompts[0][:6]]
    judge = LLMJudge(str(llm), LORA)
    assert judge.score(teacher.unsqueeze(0), [mine])[0]["exact_match"] == 1.0

    joint = c.distil(teachers[:1], [pool.prompts[0]])
    assert joint.shape == teacher.shape and c.last_stats["distill-examples"] > 0
    before, after = judge.score(torch.stack([torch.zeros_like(joint), joint]), [mine, mine])
    assert after["loss"] < before["loss"]  # the student moved towards the teacher's answers


def test_bad_distill_settings_name_the_knob() -> None:
    with pytest.raises(ValueError, match="distill.steps"):
        DistillConfig(steps=0)
    with pytest.raises(ValueError, match="distill.lr"):
        DistillConfig(lr=float("inf"))


def test_a_warm_start_continues_from_the_previous_joint_adapter(toy_pair) -> None:
    _, llm = toy_pair
    pool = _pool(torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(0)))
    tuner = LoraTuner(str(llm), LORA)
    train = generate(WORLD, parse_domain(NAMES[0]), "train", 32, seed=0)
    teachers = tuner.tokens(tuner.run(train, FinetuneConfig(steps=60, lr=3e-2, batch_size=8)).update).unsqueeze(0)
    prompts = [pool.prompts[0][:8]]
    cfg = DistillConfig(steps=3, lr=1e-2, batch_size=4, max_answer_tokens=24)
    cold = Consolidator(str(llm), LORA, pool, DistillConfig(**{**cfg.__dict__, "warm_start": False}))
    warm = Consolidator(str(llm), LORA, pool, cfg)
    if not cold.label(teachers, prompts):
        pytest.skip("the toy teacher ended no answer within 24 tokens")
    first_cold, second_cold = cold.distil(teachers, prompts), cold.distil(teachers, prompts)
    torch.testing.assert_close(first_cold, second_cold)  # seeded: a cold start repeats itself
    first_warm = warm.distil(teachers, prompts)
    torch.testing.assert_close(first_warm, first_cold)
    second_warm = warm.distil(teachers, prompts)
    assert not torch.allclose(second_warm, first_warm)  # it went on from the first round's adapter
    torch.testing.assert_close(warm.previous, second_warm)
