"""The miniature's word-level tokenizers (its T5 and its Mllama): lowercase words and punctuation marks, one id each,
over the texts the world uses."""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    """The tokens of `text`: lowercase runs of letters and digits, and single punctuation marks."""
    return re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", text.lower())


def word_level_tokenizer(texts: list[str], first: list[str], last: list[str] = (), append: str | None = None,
                         **named_tokens):
    """A transformers fast tokenizer: ids for `first` (e.g. pad, eos, unk), then every word of `texts` in order of
    appearance, then `last` as special tokens (never split, never lowercased). `append`: a token of `first` added
    after every text (T5's tokenizers end each text with </s>). `named_tokens` go to `PreTrainedTokenizerFast`
    (pad_token=..., model_max_length=...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(first)}
    for text in texts:
        for w in words(text):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(s, normalized=False) for s in last])
    if append is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {append}", pair=f"$A {append} $B {append}",
                                                           special_tokens=[(append, vocab[append])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **named_tokens)
