"""Encoding with a target-only loss mask, the per-example loss, and the evaluation helpers."""

from __future__ import annotations

import math

import pytest
import torch

from fedgt.core.batching import encode, per_example_loss
from fedgt.core.evaluate import evaluate_loss, evaluate_split, exact_match_greedy, exact_match_teacher_forced
from fedgt.core.examples import task_example, text_example
from fedgt.core.models import build_model, get_preset
from fedgt.core.tokenizer import train_char_tokenizer

TOK = train_char_tokenizer()


def test_loss_mask_covers_exactly_the_target() -> None:
    data = encode(TOK, [task_example("hi?", "yo"), text_example("abc")], max_length=32)
    assert data.input_ids[0, 0] == TOK.bos_token_id
    context_len = 1 + 5  # <s>, "Q: ", h, i, ?, "\nA: " (the layout markers are single tokens)
    assert data.loss_mask[0].tolist()[: context_len + 3] == [0] * context_len + [1, 1, 1]  # "yo\n"
    assert int(data.loss_mask[1].sum()) == len("abc\n")
    assert data.attention_mask.sum(1).tolist() == [context_len + 3, 1 + 4]


def test_encode_truncates_and_select_trims_padding() -> None:
    data = encode(TOK, [text_example("x" * 50), text_example("y")], max_length=10)
    assert data.input_ids.shape == (2, 10)
    assert data.select([1]).input_ids.shape == (1, 3)  # <s> y \n


def test_per_example_loss_matches_a_manual_computation() -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("toy"), len(TOK))
    exs = [task_example("a", "bc"), task_example("dd", "e")]
    data = encode(TOK, exs, 32)
    losses = per_example_loss(model, data)
    for i, ex in enumerate(exs):
        ids = encode(TOK, [ex], 32).input_ids
        logits = model(input_ids=ids).logits[0, :-1]
        n = len(ex.target)
        manual = torch.nn.functional.cross_entropy(logits[-n:], ids[0, -n:])
        assert losses[i].item() == pytest.approx(manual.item(), abs=1e-5)


def _overfit_toy(examples, steps: int = 300):
    torch.manual_seed(0)
    model = build_model(get_preset("toy"), len(TOK))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = encode(TOK, examples, 32)
    for _ in range(steps):
        loss = per_example_loss(model, data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_greedy_and_teacher_forced_exact_match_agree() -> None:
    train = [task_example(f"n{i}", str(i * 7 % 10)) for i in range(12)]
    model = _overfit_toy(train, steps=600)  # 300 left the loss at 0.52 on one CPU: memorise for sure
    probe = train + [task_example(f"n{i}", "9") for i in range(12)]  # some right, some wrong
    greedy = exact_match_greedy(model, TOK, probe, max_new_tokens=4)
    assert 0 < greedy < 1  # both outcomes occur, so the equality below compares something (CPU-dependent memorising)
    assert exact_match_teacher_forced(model, TOK, probe) == greedy


def test_exact_match_needs_task_examples() -> None:
    model = build_model(get_preset("toy"), len(TOK))
    with pytest.raises(ValueError, match="no task examples"):
        exact_match_teacher_forced(model, TOK, [text_example("free")])


def test_evaluate_loss_is_token_weighted_and_gives_perplexity() -> None:
    model = build_model(get_preset("toy"), len(TOK))
    exs = [task_example("a", "bcd"), task_example("b", "e")]
    m = evaluate_loss(model, TOK, exs)
    per = per_example_loss(model, encode(TOK, exs, 96)).detach()
    assert m["tokens"] == 4 + 2
    assert m["loss"] == pytest.approx((per[0] * 4 + per[1] * 2).item() / 6, abs=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert "exact_match" in evaluate_split(model, TOK, exs) and "exact_match" not in evaluate_split(
        model, TOK, [text_example("x")])


def test_word_tokens_match_whole_words_only_and_decode_back() -> None:
    text = "Q: page of Bo, city Varo; the age of Kim\nA: x"
    ids = TOK(text, add_special_tokens=False).input_ids
    tokens = TOK.convert_ids_to_tokens(ids)
    assert "Q: " in tokens and ", " in tokens and "city" in tokens and " age" in tokens and "\nA: " in tokens
    assert "age" not in tokens  # "page" stays characters
    assert TOK.decode(ids) == text
