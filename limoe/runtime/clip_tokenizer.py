"""OpenCLIP's tokenizer (`open_clip.SimpleTokenizer`, clean="lower"), reproduced torch-free.

    text -> ftfy.fix_text -> html.unescape twice -> strip -> whitespace runs become one space -> lower
         -> OpenCLIP's regex (specials, contractions, letter runs, single digits, other runs)
         -> bytes to GPT-2's printable alphabet -> BPE with "</w>" ending each word
         -> <start_of_text> ids... <end_of_text>, truncated to 77 with <end_of_text> kept, padded with 0

The BPE part (vocabulary, merges, regex, byte alphabet, specials, truncation, padding) is one
Hugging Face `tokenizers` file; the cleaning runs in Python before it (`clean_lower`), because ftfy
and HTML unescaping are not tokenizer normalizers. An entry records that cleaning in its manifest
("text_cleaning": "open_clip_lower"), and `Tokenizer.load(..., cleaning=...)` applies it.

The vocabulary `data/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's, as open_clip's wheel ships it
(MIT licence; see NOTICE).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from limoe.runtime.tokenizer import Tokenizer

SOT, EOT = "<start_of_text>", "<end_of_text>"
# open_clip.tokenizer.SimpleTokenizer.pat, less the specials (added tokens split those out first)
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLEANING = "open_clip_lower"  # limoe.runtime.tokenizer.CLEANERS
VOCAB = "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (CLIP uses the same)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def default_vocab() -> Path:
    return Path(str(resources.files("limoe.runtime") / "data" / VOCAB))


@lru_cache(maxsize=4)
def _vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # as SimpleTokenizer slices it
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(vocab)}, merges


def openclip_tokenizer(context_length: int = 77, vocab: str | Path | None = None) -> Tokenizer:
    """The Tokenizer that gives open_clip.get_tokenizer(arch)'s ids for OpenCLIP's ViT architectures."""
    encoder, merges = _vocab_and_merges(str(vocab or default_vocab()))
    tk = _HFTokenizer(models.BPE(vocab=encoder, merges=merges, end_of_word_suffix="</w>", fuse_unk=False))
    tk.add_special_tokens([AddedToken(SOT, normalized=False), AddedToken(EOT, normalized=False)])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.BPEDecoder(suffix="</w>")])
    tk.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}",
                                                      special_tokens=[(SOT, encoder[SOT]), (EOT, encoder[EOT])])
    tk.enable_truncation(max_length=context_length)
    # open_clip pads with id 0 (the byte "!"); the EOT position is found by argmax, so padding never matters
    tk.enable_padding(length=context_length, pad_id=0, pad_token="!")
    return Tokenizer(tk, cleaning=CLEANING)


__all__ = ["openclip_tokenizer", "CLEANING", "bytes_to_unicode", "default_vocab"]
