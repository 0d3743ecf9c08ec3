"""A character-level tokenizer made in code, saved and loaded as ``PreTrainedTokenizerFast``.

The offline default policy has no hub to fetch a tokenizer from. One token per printable
ASCII character keeps every task's text round-trippable (spaces included) and the
vocabulary small (~100), which is what a tiny model learns arithmetic on quickly.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# printable ASCII without \t \r \x0b \x0c; "\n" kept for multi-line prompts
CHARSET = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")


def char_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """One token per character of ``charset`` plus <pad>, <s>, </s>, <unk>.

    encode/decode round-trips any text over ``charset``; other characters become <unk>.
    """
    chars = list(dict.fromkeys(charset))  # stable, no duplicates
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split between every character and keep each one (spaces included) as its own token.
    # [\s\S], not ".": the regex engine's "." skips "\n", which left a run of newlines as
    # one unsplit piece that became a single <unk>.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Join tokens with no separator so that decode(encode(s)) == s.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
