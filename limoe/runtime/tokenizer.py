"""Subword tokenizer: byte-level BPE (Hugging Face `tokenizers`), one JSON file, fixed length.

Torch-free: the server imports this module. Every text becomes exactly `context_length` ids:
<bos> subwords... <eos> then <pad> (id 0); long texts are truncated but keep their <eos>.
Byte-level BPE has no unknown token: any Unicode label encodes.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Iterable, Sequence

import ftfy
import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


def clean_lower(text: str) -> str:
    """open_clip.tokenizer._clean_lower: ftfy.fix_text, html.unescape twice, strip, whitespace runs
    to one space, lower(). Imported CLIP entries tokenize this way (limoe.runtime.clip_tokenizer)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


# Text cleaning that runs in Python before the tokenizer file's own steps, by the name a manifest records.
CLEANERS: dict[str, Callable[[str], str]] = {"open_clip_lower": clean_lower}


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, cleaning: str | None = None):
        if cleaning is not None and cleaning not in CLEANERS:
            raise ValueError(f"unknown text cleaning {cleaning!r}; known: {', '.join(CLEANERS)}")
        self.cleaning = cleaning
        self._clean = CLEANERS[cleaning] if cleaning else None
        self._tk = tokenizer
        padding = tokenizer.padding
        if not padding or not isinstance(padding.get("length"), int):
            raise ValueError("tokenizer file has no fixed-length padding; was it made by limoe?")
        self.context_length: int = padding["length"]
        self.pad_id: int = padding["pad_id"]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, context_length: int) -> "Tokenizer":
        """Learn a byte-level BPE vocabulary of at most `vocab_size` ids from caption text."""
        tk = _HFTokenizer(models.BPE())
        tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer)
        tk.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}",
            special_tokens=[(BOS, tk.token_to_id(BOS)), (EOS, tk.token_to_id(EOS))],
        )
        tk.enable_truncation(max_length=context_length)
        tk.enable_padding(length=context_length, pad_id=tk.token_to_id(PAD), pad_token=PAD)
        return cls(tk)

    @classmethod
    def load(cls, path: str | Path, cleaning: str | None = None) -> "Tokenizer":
        return cls(_HFTokenizer.from_file(str(path)), cleaning)

    @classmethod
    def from_str(cls, text: str, cleaning: str | None = None) -> "Tokenizer":
        return cls(_HFTokenizer.from_str(text), cleaning)

    def save(self, path: str | Path) -> None:
        self._tk.save(str(path))

    def to_str(self) -> str:
        return self._tk.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) strings -> (N, context_length) int64 ids."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text in a list")
        texts = [self._clean(t) for t in texts] if self._clean else list(texts)
        encodings = self._tk.encode_batch(texts)
        return np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.context_length)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=True).strip()
