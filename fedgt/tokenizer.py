"""A character-level tokenizer saved as a standard Hugging Face ``PreTrainedTokenizerFast``.

Characters keep string transformations (reverse, first letters, digit sums) learnable by small models,
and the vocabulary small, so almost all parameters are in the transformer layers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
BASE_CHARS = "\n" + "".join(chr(i) for i in range(32, 127))  # newline + printable ASCII


def train_char_tokenizer(texts: Iterable[str] = (), min_count: int = 5, max_extra: int = 64) -> PreTrainedTokenizerFast:
    """Build the tokenizer: specials, printable ASCII, plus the most frequent other characters in texts."""
    counts = Counter(c for t in texts for c in t if c not in BASE_CHARS)
    extra = [c for c, n in counts.most_common(max_extra) if n >= min_count]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in BASE_CHARS + "".join(extra):
        vocab[c] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
