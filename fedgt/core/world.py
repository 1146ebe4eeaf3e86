"""A seeded fictional world: people and their attributes.

This is the *knowledge* the default LLM memorises in pretraining (the provider pays that once) and the
TinyLM cannot afford to. Task domains (``fedgt.core.tasks``) then query these facts in new formats, so
fine-tuning on a few private examples teaches the format while the answer needs the pretrained facts:
the weak-to-strong premise of the whole system (see docs/premise.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "gold", "brown", "purple")
PETS = ("cat", "dog", "owl", "fox", "eel", "yak", "bat", "cow", "hen", "ant")
JOBS = ("baker", "pilot", "nurse", "judge", "miner", "cook", "poet", "tailor", "guard", "clerk")
TEXT_ATTRIBUTES = ("city", "color", "pet", "job")
NUMERIC_ATTRIBUTES = ("age", "number")
ATTRIBUTES = TEXT_ATTRIBUTES + NUMERIC_ATTRIBUTES
NUMERIC_RANGES = {"age": (18, 89), "number": (1, 99)}
NUMERIC_PHRASES = {"age": "the age of {p}", "number": "the lucky number of {p}"}

_PERSON_SYLLABLES = ("ka", "to", "ri", "me", "lo", "sa", "nu", "vi", "de", "po", "ga", "fe", "mi", "zu", "ha", "be")
_PERSON_ENDINGS = ("", "n", "k", "r", "l", "s")
_CITY_SYLLABLES = ("var", "pel", "dor", "quin", "mar", "tol", "bris", "fen", "gal", "oss", "wen", "cor")
_CITY_ENDINGS = ("o", "ia", "ek", "um", "ton", "a")

# Several phrasings per attribute: knowledge stored in more than one surface form is extractable in
# new formats later (a single fixed phrasing tends to be memorised as a string, not as a fact).
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": ("{p} lives in {v}.", "{p} is from {v}.", "The home town of {p} is {v}."),
    "color": ("{p} likes {v}.", "The favorite color of {p} is {v}.", "{p} always wears {v}."),
    "pet": ("{p} has a pet {v}.", "{p} owns a {v}.", "The pet of {p} is a {v}."),
    "job": ("{p} works as a {v}.", "{p} is a {v} by trade.", "The job of {p} is {v}."),
    "age": ("{p} is {v} years old.", "The age of {p} is {v}.", "{p} turned {v} this year."),
    "number": ("The lucky number of {p} is {v}.", "{p} bets on {v}.", "{p} picks {v} as a lucky number."),
}


@dataclass(frozen=True)
class World:
    """People and their attribute values; identical for the same (num_people, seed)."""

    seed: int
    people: tuple[str, ...]
    cities: tuple[str, ...]
    facts: dict[str, dict[str, str]]  # person -> attribute -> value (numbers as decimal strings)

    def value(self, person: str, attribute: str) -> str:
        """The value of one attribute of one person."""
        return self.facts[person][attribute]


def _unique_names(rng: random.Random, syllables: tuple[str, ...], endings: tuple[str, ...], n: int,
                  parts: tuple[int, int], taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        k = rng.randint(*parts)
        name = ("".join(rng.choice(syllables) for _ in range(k)) + rng.choice(endings)).capitalize()
        if name not in taken and 3 <= len(name) <= 8:
            taken.add(name)
            names.append(name)
    return names


def make_world(num_people: int = 200, num_cities: int = 24, seed: int = 0) -> World:
    """Build the seeded world: unique person and city names, attributes drawn uniformly."""
    if num_people < 4 or num_cities < 2:
        raise ValueError(f"make_world: need num_people >= 4 and num_cities >= 2, got {num_people}, {num_cities}")
    rng = random.Random(f"fedgt-world-{seed}")
    taken: set[str] = set()
    cities = _unique_names(rng, _CITY_SYLLABLES, _CITY_ENDINGS, num_cities, (1, 2), taken)
    people = _unique_names(rng, _PERSON_SYLLABLES, _PERSON_ENDINGS, num_people, (2, 3), taken)
    facts = {
        p: {
            "city": rng.choice(cities),
            "color": rng.choice(COLORS),
            "pet": rng.choice(PETS),
            "job": rng.choice(JOBS),
            "age": str(rng.randint(*NUMERIC_RANGES["age"])),
            "number": str(rng.randint(*NUMERIC_RANGES["number"])),
        }
        for p in people
    }
    return World(seed=seed, people=tuple(people), cities=tuple(cities), facts=facts)


def bio_text(world: World, person: str, attributes: list[str], rng: random.Random) -> str:
    """A short biography line stating the given attributes of a person, in random phrasings."""
    return " ".join(
        rng.choice(BIO_TEMPLATES[a]).format(p=person, v=world.value(person, a)) for a in attributes
    )


def table_row(world: World, person: str, rng: random.Random) -> str:
    """One row of the fact table, attributes in random order: every fact of a person in ~60 characters."""
    order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
    return f"{person}: " + ", ".join(f"{a} {world.value(person, a)}" for a in order)


def sample_bios(world: World, n: int, seed: int, facts_per_bio: int = 2, table_fraction: float = 0.5) -> list[str]:
    """n knowledge lines: fact-table rows (cheap per fact) and short biographies (natural phrasings)."""
    rng = random.Random(f"bios-{world.seed}-{seed}")
    out = []
    for _ in range(n):
        person = rng.choice(world.people)
        if rng.random() < table_fraction:
            out.append(table_row(world, person, rng))
        else:
            out.append(bio_text(world, person, rng.sample(ATTRIBUTES, facts_per_bio), rng))
    return out
