"""Public text for real models: standard-library docstrings and chatterbot conversations as shadow domains, the
language reference topics held out, prompts cut from free text."""

from __future__ import annotations

import pytest

from fedgt.core.examples import Example, prompt_of, text_example
from fedgt.core.python_text import reference_topic_domains, stdlib_text_domains
from fedgt.provider.public_data import builtin_shadow_source, shadow_domains, text_shadow_domains


def test_stdlib_domains_are_deterministic_split_and_disjoint() -> None:
    a, b = stdlib_text_domains(), stdlib_text_domains()
    assert [d.name for d in a] == [d.name for d in b] and a[0].train == b[0].train
    assert len(a) >= 20 and all(d.name.startswith("stdlib/") and d.source == "text" for d in a)
    for d in a:
        assert len(d.train) + len(d.test) >= 32
        assert not {ex.text for ex in d.train} & {ex.text for ex in d.test}
    assert "stdlib/test" not in {d.name for d in a}


def test_reference_topics_are_dealt_into_domains_and_never_in_the_shadow_text() -> None:
    ref = reference_topic_domains(4)
    assert [d.name for d in ref] == [f"reference/{i}" for i in range(4)]
    assert all(len(d.train) > 100 and d.test for d in ref)
    shadow = {ex.text for d in text_shadow_domains(n_examples=10_000) for ex in d.train + d.test}
    assert not shadow & {ex.text for d in ref for ex in d.train + d.test}
    with pytest.raises(ValueError, match="num_domains"):
        reference_topic_domains(0)


def test_text_shadow_domains_cap_examples_and_sample_a_seeded_subset() -> None:
    full = text_shadow_domains(n_examples=16)
    assert any(d.name.startswith("chat/") for d in full) and any(d.name.startswith("stdlib/") for d in full)
    assert all(len(d.train) <= 16 for d in full)
    some = text_shadow_domains(n_examples=16, limit=5, seed=3)
    assert len(some) == 5 and [d.name for d in some] == [d.name for d in text_shadow_domains(16, limit=5, seed=3)]
    assert {d.name for d in some} <= {d.name for d in full}


@pytest.mark.parametrize("model, source", [("tinylm", "tasks"), ("toy-large", "tasks"),
                                           ("/cache/models/tinylm-0123456789ab", "tasks"),
                                           ("smollm2-tiny", "text"), ("/models/Qwen2.5-0.5B", "text"),
                                           ("/cache/models/smollm2-tiny-0123456789ab", "text")])
def test_builtin_shadow_source_follows_the_tinylm(model: str, source: str) -> None:
    assert builtin_shadow_source(model) == source


def test_shadow_domains_for_a_real_tinylm_are_text() -> None:
    domains = shadow_domains(8, limit=4, tiny_model="smollm2-tiny")
    assert len(domains) == 4 and all(d.source == "text" for d in domains)
    assert all(d.source == "task" for d in shadow_domains(8, limit=4, tiny_model="tinylm"))


def test_prompt_of_a_task_is_its_context_and_of_a_text_its_first_half() -> None:
    assert prompt_of(Example("Q: who? A:", " Ada\n", True)) == "Q: who? A:"
    assert prompt_of(text_example("one two three four five six")) == "one two three"
    assert prompt_of(text_example("single")) == "single"
