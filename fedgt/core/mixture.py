"""What the public pretraining mixture is made of: the world, the domain split and the mix of line kinds."""

from __future__ import annotations

from dataclasses import dataclass

from fedgt.core.tokenizer import WORD_TOKENS


@dataclass(frozen=True)
class PretrainData:
    """What the pretraining mixture is made of (part of a prepared model's fingerprint)."""

    world_seed: int = 0
    num_people: int = 200
    splits_seed: int = 0
    knowledge_fraction: float = 0.75  # lines stating facts: fact-table rows and short biographies
    table_fraction: float = 0.85  # of the knowledge lines, fact-table rows (the rest natural-language bios)
    text_fraction: float = 0.05  # real public text (chatterbot-corpus); the rest is task examples
    arithmetic_fraction: float = 0.0  # public arithmetic drills on bare numbers (no facts)
    max_length: int = 96
    tokenizer: str = "char+words"  # "char": one token per character; "char+words": plus tokenizer.WORD_TOKENS

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"PretrainData.tokenizer must be one of {sorted(TOKENIZERS)}, got {self.tokenizer!r}")


TOKENIZERS = {"char": (), "char+words": WORD_TOKENS}
