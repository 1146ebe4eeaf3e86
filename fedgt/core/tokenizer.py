"""A character-level tokenizer (plus a few whole-word tokens) saved as a standard ``PreTrainedTokenizerFast``.

Characters keep string transformations (reverse, first letters, digit ops) learnable by small models,
and the vocabulary small, so almost all parameters are in the transformer layers. The attribute names and
the Q/A layout are single tokens: they are never the *values* string ops act on, and they make up a quarter
of the characters of the pretraining data, so merging them cuts every step's compute by about that much.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fedgt.core.world import ATTRIBUTES

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
BASE_CHARS = "\n" + "".join(chr(i) for i in range(32, 127))  # newline + printable ASCII
# Whole-word tokens: the Q/A layout, the list separator, and each attribute name (with and without a space).
WORD_TOKENS = ("Q: ", "\nA: ", ", ") + tuple(w for a in ATTRIBUTES for w in (a, " " + a))


def train_char_tokenizer(texts: Iterable[str] = (), min_count: int = 5, max_extra: int = 64,
                         words: Iterable[str] = WORD_TOKENS) -> PreTrainedTokenizerFast:
    """Build the tokenizer: specials, printable ASCII, word tokens, plus the most frequent other characters."""
    counts = Counter(c for t in texts for c in t if c not in BASE_CHARS)
    extra = [c for c, n in counts.most_common(max_extra) if n >= min_count]
    words = sorted(set(words), key=lambda w: (-len(w), w))  # longest first: the regex takes the first match
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for tok in [*BASE_CHARS, *extra, *words]:
        vocab.setdefault(tok, len(vocab))
    # A word token only matches a whole word (an attribute name inside "page" stays characters).
    alternatives = [re.escape(w) + (r"\b" if w[-1].isalnum() else "") for w in words]
    pattern = "|".join([(r"\b" if w[0].isalnum() else "") + a for w, a in zip(words, alternatives, strict=True)]
                       + [r"[\s\S]"])
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")  # a word token or one char
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
