"""Parametric task generator: hundreds of fine-grained task domains over the world's facts.

A domain is (family, op, attribute, template, answer format). Two of the four prompt templates hide the
op, and the answer format is never shown in the prompt, so the only way to learn a domain is to
fine-tune on its examples: that is the domain signal an update carries (docs/design.md §1b). Every
family queries facts from ``fedgt.core.world``, so answering needs the knowledge only the LLM memorised.

Examples are sampled per split from disjoint sets of people, so public (pretraining / shadow) samples,
private training samples and private test samples of the same domain never share a question, and a
test question is never answerable by memorising the private training set.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from fedgt.core.examples import Example, task_example
from fedgt.core.world import ATTRIBUTES, NUMERIC_ATTRIBUTES, NUMERIC_PHRASES, TEXT_ATTRIBUTES, World

ANSWER_FORMATS = ("{x}", "= {x}", "[{x}]", "ans {x}")
SPLITS = ("public", "train", "test")
SPLIT_FRACTIONS = (0.5, 0.25, 0.25)  # of the people, per domain

# --- string family: op name -> (phrase shown in the prompt, function)
STRING_OPS: dict[str, tuple[str, Callable[[str], str]]] = {
    "reverse": ("reversed", lambda s: s[::-1]),
    "upper": ("in capitals", str.upper),
    "first3": ("first three letters", lambda s: s[:3]),
    "last2": ("last two letters", lambda s: s[-2:]),
    "length": ("letter count", lambda s: str(len(s))),
    "initials": ("first and last letter", lambda s: s[0] + s[-1]),
}
STRING_TEMPLATES = ("{op} {attr} of {p}", "{attr} of {p}, {op}?", "{p}.{attr} ~", "{p} ~")

# --- arith family (on a numeric attribute): op name -> (choices of k or None, question, function -> answer).
# Digit-level operations: answering needs the recalled number (the LLM's knowledge), and the operation itself
# is learnable by a small character-level model from a few hundred public examples. Multi-digit addition
# with carries is not (both models scored ~2% on it: docs/premise.md), so it would only add noise.
ARITH_OPS: dict[str, tuple[tuple[int, ...] | None, str, Callable[[int, int], str]]] = {
    "add_one": ((1,), "What is {thing} plus {k}?", lambda a, k: str(a + k)),
    "add_tens": ((10, 20, 30), "What is {thing} plus {k}?", lambda a, k: str(a + k)),
    "sub_tens": ((10, 20, 30), "What is {thing} minus {k}?", lambda a, k: str(a - k)),
    "last_digit": (None, "What is the last digit of {thing}?", lambda a, k: str(a % 10)),
    "first_digit": (None, "What is the first digit of {thing}?", lambda a, k: str(a)[0]),
    "swap_digits": (None, "What is {thing} written backwards?", lambda a, k: str(a)[::-1]),
    "round_tens": (None, "What is {thing} rounded down to tens?", lambda a, k: str(a // 10 * 10)),
    "tens_count": (None, "How many full tens are in {thing}?", lambda a, k: str(a // 10)),
}
ARITH_TEMPLATES = ("{question}", "{attr} of {p} {op} {k}", "{p} {k}?", "{p} & {k}")

LOOKUP_TEMPLATES = ("{attr} of {p}?", "What is the {attr} of {p}?", "{p}?", "Tell me about {p}.")
COMPOSE_TEMPLATES = ("{a} and {b} of {p}?", "{p}: {a}, {b}", "{p} both?", "{p} pair")
COMPOSE_PAIRS = tuple((a, b) for i, a in enumerate(ATTRIBUTES) for b in ATTRIBUTES[i + 1:])

FAMILIES = ("lookup", "string", "arith", "compose")


@dataclass(frozen=True, order=True)
class TaskDomain:
    """One fine-grained task domain; its name is its identity (e.g. ``string/reverse/city/t2/f1``)."""

    family: str
    op: str  # the lookup attribute, string op, arith op, or "a+b" attribute pair
    attr: str  # the attribute the op reads ("-" where the op itself names the attribute)
    template: int
    fmt: int

    @property
    def name(self) -> str:
        """Stable, human-readable identity of the domain."""
        return f"{self.family}/{self.op}/{self.attr}/t{self.template}/f{self.fmt}"

    @property
    def combination(self) -> tuple[str, str, str]:
        """The (family, op, attr) the domain's hidden behaviour comes from."""
        return (self.family, self.op, self.attr)


def parse_domain(name: str) -> TaskDomain:
    """Inverse of ``TaskDomain.name``; raises ValueError naming the bad part."""
    parts = name.split("/")
    if len(parts) != 5 or not parts[3].startswith("t") or not parts[4].startswith("f"):
        raise ValueError(f"not a task domain name: {name!r} (expected family/op/attr/tN/fN)")
    domain = TaskDomain(parts[0], parts[1], parts[2], int(parts[3][1:]), int(parts[4][1:]))
    if domain not in set(all_domains()):
        raise ValueError(f"unknown task domain: {name!r}")
    return domain


def all_domains() -> list[TaskDomain]:
    """Every domain the generator can make, in a fixed order (976 with the defaults)."""
    combos: list[tuple[str, str, str]] = [("lookup", a, "-") for a in ATTRIBUTES]
    combos += [("string", op, a) for op in STRING_OPS for a in TEXT_ATTRIBUTES]
    combos += [("arith", op, a) for op in ARITH_OPS for a in NUMERIC_ATTRIBUTES]
    combos += [("compose", f"{a}+{b}", "-") for a, b in COMPOSE_PAIRS]
    formats = range(len(ANSWER_FORMATS))
    return [TaskDomain(f, op, attr, t, fmt) for f, op, attr in combos for t in range(4) for fmt in formats]


def split_people(world: World, domain: TaskDomain, split: str) -> list[str]:
    """The people whose questions belong to ``split`` of this domain (disjoint across splits)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # Keyed by (family, template), not by domain: domains that differ only in a hidden op can render the
    # same text for a person (e.g. age == lucky number), so they must agree on which split a person is in.
    key = f"{domain.family}/t{domain.template}"
    people = sorted(world.people, key=lambda p: hashlib.sha256(f"{key}|{p}".encode()).digest())
    n_public = int(len(people) * SPLIT_FRACTIONS[0])
    n_train = int(len(people) * SPLIT_FRACTIONS[1])
    bounds = {"public": (0, n_public), "train": (n_public, n_public + n_train),
              "test": (n_public + n_train, len(people))}
    lo, hi = bounds[split]
    return people[lo:hi]


def _prompt_and_answer(world: World, d: TaskDomain, p: str, rng: random.Random) -> tuple[str, str]:
    if d.family == "lookup":
        return LOOKUP_TEMPLATES[d.template].format(attr=d.op, p=p), world.value(p, d.op)
    if d.family == "string":
        phrase, fn = STRING_OPS[d.op]
        return STRING_TEMPLATES[d.template].format(op=phrase, attr=d.attr, p=p), fn(world.value(p, d.attr))
    if d.family == "arith":
        choices, question, fn = ARITH_OPS[d.op]
        k = rng.choice(choices) if choices else 0
        shown_k = str(k) if choices else "?"
        question = question.format(thing=NUMERIC_PHRASES[d.attr].format(p=p), k=k)
        prompt = ARITH_TEMPLATES[d.template].format(question=question, attr=d.attr, p=p, op=d.op, k=shown_k)
        return prompt, fn(int(world.value(p, d.attr)), k)
    if d.family == "compose":
        a, b = d.op.split("+")
        return COMPOSE_TEMPLATES[d.template].format(a=a, b=b, p=p), f"{world.value(p, a)}, {world.value(p, b)}"
    raise ValueError(f"unknown task family {d.family!r}")


def arithmetic_practice(n: int, seed: int = 0) -> list[Example]:
    """n public arithmetic drills on bare numbers ("What is 34 plus 1?" -> "35"): the ops without the facts."""
    rng = random.Random(f"arith-practice-{seed}")
    out = []
    for _ in range(n):
        choices, question, fn = ARITH_OPS[rng.choice(sorted(ARITH_OPS))]
        a, k = rng.randint(1, 99), rng.choice(choices) if choices else 0
        out.append(task_example(question.format(thing=str(a), k=k), fn(a, k)))
    return out


def generate(world: World, domain: TaskDomain, split: str, n: int, seed: int = 0) -> list[Example]:
    """n examples of a domain drawn from its ``split`` people (with replacement when n exceeds them)."""
    people = split_people(world, domain, split)
    rng = random.Random(f"{domain.name}|{split}|{seed}")
    out = []
    for i in range(n):
        # Cycle through a shuffled list first so small n gives distinct people.
        if i % len(people) == 0:
            order = rng.sample(people, len(people))
        prompt, answer = _prompt_and_answer(world, domain, order[i % len(people)], rng)
        out.append(task_example(prompt, ANSWER_FORMATS[domain.fmt].format(x=answer)))
    return out
