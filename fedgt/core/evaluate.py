"""Evaluation helpers: target loss / perplexity on a split, and exact-match accuracy of answers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedgt.core.batching import encode, model_device
from fedgt.core.examples import END_OF_ANSWER, Example


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokenizer, examples: Sequence[Example], max_length: int = 96,
                  batch_size: int = 64) -> dict[str, float]:
    """Token-weighted mean cross-entropy over target tokens, and its perplexity."""
    data = encode(tokenizer, examples, max_length)
    total, tokens = 0.0, 0.0
    was_training = model.training
    model.eval()
    for start in range(0, len(data), batch_size):
        batch = data.select(range(start, min(start + batch_size, len(data)))).to(model_device(model))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        mask = batch.loss_mask[:, 1:].float()
        total += float((nll * mask).sum())
        tokens += float(mask.sum())
    model.train(was_training)
    loss = total / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer, contexts: Sequence[str], max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[str]:
    """The greedy continuation of each context, up to its first newline."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    newline = tokenizer(END_OF_ANSWER, add_special_tokens=False).input_ids
    stop = [t for t in (newline[-1:] if len(newline) == 1 else []) + [tokenizer.eos_token_id] if t is not None]
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        prompts = [bos + tokenizer(c, add_special_tokens=False).input_ids for c in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # left padding for generation
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        device = model_device(model)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop, pad_token_id=pad)
        answers += [tokenizer.decode(row, skip_special_tokens=True).split(END_OF_ANSWER)[0]
                    for row in out[:, width:].cpu()]
    model.train(was_training)
    return answers


def exact_match_greedy(model: torch.nn.Module, tokenizer, examples: Sequence[Example], max_new_tokens: int = 32,
                       batch_size: int = 64) -> float:
    """Fraction of task examples whose greedy continuation, up to the first newline, equals the answer."""
    tasks = [ex for ex in examples if ex.is_task]
    if not tasks:
        raise ValueError("exact_match: no task examples (free text has no exact-match answer)")
    answers = greedy_answers(model, tokenizer, [ex.context for ex in tasks], max_new_tokens, batch_size)
    return sum(a == ex.answer for a, ex in zip(answers, tasks, strict=True)) / len(tasks)


@torch.no_grad()
def exact_match_teacher_forced(model: torch.nn.Module, tokenizer, examples: Sequence[Example], max_length: int = 96,
                               batch_size: int = 64) -> float:
    """Exact match in one forward pass: every target token (answer and newline) is the argmax.

    Equals greedy exact match whenever the tokenizer encodes the target the way the model would emit it
    (always true for the character tokenizer); ~max_new_tokens times cheaper than generation.
    """
    tasks = [ex for ex in examples if ex.is_task]
    if not tasks:
        raise ValueError("exact_match: no task examples (free text has no exact-match answer)")
    data = encode(tokenizer, tasks, max_length)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = data.select(range(start, min(start + batch_size, len(data)))).to(model_device(model))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        hit = (logits.argmax(-1) == batch.input_ids[:, 1:]) | (batch.loss_mask[:, 1:] == 0)
        correct += int(hit.all(dim=1).sum())
    model.train(was_training)
    return correct / len(tasks)


def evaluate_split(model: torch.nn.Module, tokenizer, examples: Sequence[Example], max_length: int = 96,
                   greedy: bool = False) -> dict[str, float]:
    """Loss and perplexity on a split, plus exact match when it holds task examples."""
    metrics = evaluate_loss(model, tokenizer, examples, max_length)
    if any(ex.is_task for ex in examples):
        em = exact_match_greedy if greedy else exact_match_teacher_forced
        metrics["exact_match"] = em(model, tokenizer, examples)
    return metrics
