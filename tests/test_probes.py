"""Probe features: the rebuilt tuned TinyLM's log-probs along its own greedy answers to public prompts."""

from __future__ import annotations

import torch

from fedgt.core.evaluate import greedy_answers
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings, attach_lora
from fedgt.core.models import load_model
from fedgt.core.updates import apply_update, unflatten
from fedgt.provider.probes import probe_features, probe_prompts
from fedgt.provider.public_data import task_shadow_domains


def test_probe_features_follow_the_tuned_models_greedy_answers(toy_pair) -> None:
    tiny = LLMJudge(str(toy_pair[0]), LoraSettings())
    prompts = probe_prompts(task_shadow_domains(8, limit=6), n=4)
    assert len(prompts) == 4 and all(p.startswith("Q: ") for p in prompts)
    g = torch.Generator().manual_seed(0)
    updates = torch.randn(3, tiny.spec.num_layers, tiny.spec.token_dim, generator=g) * 0.5
    feats = probe_features(tiny, updates, prompts, positions=2, batch_updates=2)
    vocab = len(tiny.tokenizer)
    assert feats.shape == (3, 4, 2 * vocab)
    rebuilt = attach_lora(load_model(str(toy_pair[0]))[0], LoraSettings())
    for i in range(3):  # rebuild update i through peft and generate: the features' argmaxes are its answers
        apply_update(rebuilt, tiny.init, unflatten(updates[i], tiny.spec))
        answers = greedy_answers(rebuilt, tiny.tokenizer, prompts, max_new_tokens=2)
        for j, answer in enumerate(answers):
            steps = feats[i, j].view(2, vocab).argmax(-1).tolist()
            decoded = tiny.tokenizer.decode(steps).split("\n")[0]
            assert decoded == answer[: len(decoded)] and (len(decoded) == 2 or decoded == answer)
    # Different updates read differently; the same update reads the same.
    assert not torch.allclose(feats[0], feats[1])
    torch.testing.assert_close(probe_features(tiny, updates[:1], prompts, positions=2), feats[:1])
