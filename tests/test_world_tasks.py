"""The fact world, the parametric task generator and the domain splits."""

from __future__ import annotations

import re

import pytest

from fedgt.core.splits import make_domain_splits
from fedgt.core.tasks import (
    ARITH_OPS,
    FAMILIES,
    SPLITS,
    TaskDomain,
    all_domains,
    generate,
    parse_domain,
    split_people,
)
from fedgt.core.world import ATTRIBUTES, make_world, sample_bios

WORLD = make_world()


def test_world_is_deterministic_and_names_are_unique() -> None:
    again, other = make_world(), make_world(seed=1)
    assert again.facts == WORLD.facts
    assert other.facts != WORLD.facts
    assert len(set(WORLD.people)) == len(WORLD.people) == 200
    assert not set(WORLD.people) & set(WORLD.cities)
    assert all(set(f) == set(ATTRIBUTES) for f in WORLD.facts.values())


def person_in(text: str) -> str:
    """The one person a text is about (whole-word match: some names are prefixes of others)."""
    (person,) = [p for p in WORLD.people if re.search(rf"\b{p}\b", text)]
    return person


def test_knowledge_lines_state_true_facts() -> None:
    lines = sample_bios(WORLD, 60, seed=0)
    assert any(": " in line for line in lines) and any(line.endswith(".") for line in lines)  # rows and bios
    for line in lines:
        facts = WORLD.facts[person_in(line)]
        assert sum(f" {value}" in line for value in facts.values()) >= 2


def test_hundreds_of_uniquely_named_domains_that_parse_back() -> None:
    domains = all_domains()
    assert len(domains) == 976
    assert len({d.name for d in domains}) == len(domains)
    assert {d.family for d in domains} == set(FAMILIES)
    assert all(parse_domain(d.name) == d for d in domains[::37])


@pytest.mark.parametrize("bad", ["lookup/city", "nope/city/-/t0/f0", "lookup/city/-/t9/f0", "lookup/city/-/x0/f0"])
def test_bad_domain_names_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="domain"):
        parse_domain(bad)


@pytest.mark.parametrize(
    ("name", "answer_of"),
    [
        ("lookup/city/-/t0/f0", lambda f: f["city"]),
        ("string/reverse/pet/t0/f1", lambda f: "= " + f["pet"][::-1]),
        ("string/length/job/t3/f2", lambda f: f"[{len(f['job'])}]"),
        ("arith/swap_digits/number/t0/f3", lambda f: f"ans {f['number'][::-1]}"),
        ("arith/first_digit/age/t2/f0", lambda f: f["age"][0]),
        ("arith/round_tens/age/t1/f2", lambda f: f"[{int(f['age']) // 10 * 10}]"),
        ("compose/color+pet/-/t1/f0", lambda f: f"{f['color']}, {f['pet']}"),
    ],
)
def test_answers_are_computed_from_the_person_in_the_prompt(name, answer_of) -> None:
    domain = parse_domain(name)
    for ex in generate(WORLD, domain, "train", 20):
        person = person_in(ex.context)
        assert person in split_people(WORLD, domain, "train")
        assert ex.answer == answer_of(WORLD.facts[person])


def test_add_ops_show_k_and_use_it() -> None:
    for op, sign in (("add_tens", 1), ("sub_tens", -1), ("add_one", 1)):
        domain = parse_domain(f"arith/{op}/age/t2/f0")
        ks = set()
        for ex in generate(WORLD, domain, "test", 20):
            person, k = ex.context.removeprefix("Q: ").split("?")[0].split()
            assert int(ex.answer) == int(WORLD.facts[person]["age"]) + sign * int(k)
            ks.add(int(k))
        assert ks == set(ARITH_OPS[op][0])


def test_hidden_templates_give_identical_prompts_across_ops() -> None:
    a, b = parse_domain("string/reverse/city/t3/f0"), parse_domain("string/upper/city/t3/f2")
    n = len(split_people(WORLD, a, "public"))
    pa = sorted(ex.context for ex in generate(WORLD, a, "public", n))
    pb = sorted(ex.context for ex in generate(WORLD, b, "public", n))
    assert pa == pb  # same people, same prompts: only fine-tuning data tells the two domains apart


def test_split_people_are_disjoint_and_cover_everyone() -> None:
    domain = all_domains()[100]
    parts = [set(split_people(WORLD, domain, s)) for s in SPLITS]
    assert sum(map(len, parts)) == len(WORLD.people)
    assert set().union(*parts) == set(WORLD.people)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    with pytest.raises(ValueError, match="split"):
        split_people(WORLD, domain, "validation")


def test_generate_is_deterministic_and_seeded() -> None:
    domain = all_domains()[5]
    assert generate(WORLD, domain, "train", 30, seed=1) == generate(WORLD, domain, "train", 30, seed=1)
    assert generate(WORLD, domain, "train", 30, seed=1) != generate(WORLD, domain, "train", 30, seed=2)


def test_domain_splits_are_disjoint_and_hold_out_recombinations() -> None:
    s = make_domain_splits()
    groups = [set(s.pretrain), set(s.shadow), set(s.held_out_combination), set(s.held_out_family)]
    assert sum(map(len, groups)) == len(all_domains())
    assert set().union(*groups) == set(all_domains())
    assert {d.family for d in s.held_out_family} == {"compose"}
    assert not {d.family for d in s.pretrain + s.shadow} & {"compose"}
    kept = {d.combination for d in s.pretrain + s.shadow}
    held = {d.combination for d in s.held_out_combination}
    assert held and not held & kept
    for family, op, attr in held:  # every parameter value of a held-out combination is seen elsewhere
        if family != "lookup":
            assert any(c[0] == family and c[1] == op for c in kept)
        assert attr == "-" or any(c[2] == attr for c in kept)
    assert make_domain_splits() == s
    assert make_domain_splits(seed=1) != s


def test_domain_splits_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="held_out_family"):
        make_domain_splits(held_out_family="poetry")
    with pytest.raises(ValueError, match="pretrain_fraction"):
        make_domain_splits(pretrain_fraction=1.5)


def test_task_domain_is_ordered_and_named() -> None:
    d = TaskDomain("string", "reverse", "city", 2, 1)
    assert d.name == "string/reverse/city/t2/f1"
    assert d.combination == ("string", "reverse", "city")


def test_arithmetic_drills_are_correct_and_never_name_a_person() -> None:
    from fedgt.core.tasks import arithmetic_practice

    drills = arithmetic_practice(200, seed=0)
    assert drills == arithmetic_practice(200, seed=0)
    for ex in drills:
        question = ex.context.removeprefix("Q: ").removesuffix("\nA: ")
        assert not any(re.search(rf"\b{p}\b", question) for p in WORLD.people)
        if question.startswith("What is twice "):
            assert int(ex.answer) == 2 * int(question.split()[-1].rstrip("?"))
        if " plus " in question:
            a, k = question.removeprefix("What is ").rstrip("?").split(" plus ")
            assert int(ex.answer) == int(a) + int(k)
