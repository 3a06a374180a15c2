"""Hugging Face `tokenizers` tokenizers: load a tokenizer.json, or build a small word-level one offline.

Real runs use the Molmo2 (Qwen3-based) tokenizer.json a user downloads; its special tokens carry the ids in
`stts_jax.config.MOLMO2_TOKENS`. Tests, the demo and the synthetic benchmark build a word-level tokenizer with
the same special-token strings at the ids of the model config (`build_word_tokenizer`), so nothing is
downloaded.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from stts_jax import paths
from stts_jax.data.processor import SPECIAL_TOKENS

CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen's pad / turn tokens (bos = eos = <|im_end|>)
UNKNOWN = "[UNK]"
_WORD = re.compile(r"\d|[^\W\d]+|[^\w\s]+")  # what the pre-tokeniser splits text into


def load_tokenizer(path: str):
    """Returns a `tokenizers.Tokenizer` from a tokenizer.json file or a directory holding one."""
    from tokenizers import Tokenizer

    if paths.as_path(path).is_dir():
        path = paths.join(path, "tokenizer.json")
    if not paths.as_path(path).exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_str(paths.read_text(path))  # local or gs://


def words_of(texts: Iterable[str]) -> list[str]:
    """Returns the sorted distinct words/punctuation runs of `texts` as the Whitespace pre-tokeniser splits them."""
    return sorted({w for text in texts for w in _WORD.findall(text)})


def build_word_tokenizer(words: Iterable[str], tokens: Mapping[str, int], vocab_size: int | None = None):
    """Returns a WordLevel `tokenizers.Tokenizer`: [UNK], the chat tokens, then `words` at ids 0, 1, ...

    `tokens` maps the config's special-token fields (image_patch_id, frame_start_id, ...) to ids, exactly as
    `cfg.tokens`; the Molmo2 special-token strings are registered at those ids. Text is split on whitespace
    and punctuation, digits one by one ("10.5" -> "1", "0", ".", "5"). Raises ValueError if the words do not
    fit below `vocab_size`.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for word in [UNKNOWN, *CHAT_TOKENS, *words]:
        if word not in vocab:
            vocab[word] = len(vocab)
    special = {text: int(tokens[field]) for text, field in SPECIAL_TOKENS.items() if field in tokens}
    limit = vocab_size if vocab_size is not None else min(special.values(), default=len(vocab))
    if len(vocab) > limit:
        raise ValueError(f"{len(vocab)} words (incl. [UNK] and {len(CHAT_TOKENS)} chat tokens) do not fit below "
                         f"id {limit}; enlarge the vocabulary or use fewer words")
    clash = [t for t, i in special.items() if i in vocab.values()]
    if clash:
        raise ValueError(f"special tokens {clash} collide with word ids; place them above the {len(vocab)} words")
    vocab.update(special)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*CHAT_TOKENS, *special]])
    return tokenizer
