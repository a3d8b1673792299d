import numpy as np
import pytest

from limoe.runtime.tokenizer import Tokenizer

CAPTIONS = ["grinning face", "red apple", "a photo of a red apple", "smiling face with heart eyes",
            "green apple", "a cat face", "dog face", "thumbs up sign"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CAPTIONS, vocab_size=300, context_length=8)


def test_fixed_length_with_bos_eos_and_padding(tok):
    ids = tok.encode(["red apple", "a photo of a red apple with many many more words added"])
    assert ids.shape == (2, 8) and ids.dtype == np.int64
    bos, eos = 1, 2
    assert ids[0, 0] == bos
    n = int((ids[0] != tok.pad_id).sum())
    assert ids[0, n - 1] == eos and (ids[0, n:] == tok.pad_id).all()
    assert ids[1, 0] == bos and ids[1, -1] == eos  # truncated, but still closed by <eos>


def test_learned_merges_make_known_words_short(tok):
    assert int((tok.encode(["apple"])[0] != 0).sum()) == 3  # <bos> apple <eos>


def test_any_unicode_encodes_and_case_is_ignored(tok):
    a, b = tok.encode(["Red APPLE", "red apple"])
    assert (a == b).all()
    ids = tok.encode(["🙂 çà"])
    assert (ids[0, 1:] != tok.pad_id).sum() >= 2  # bytes fall back to the byte alphabet


def test_save_and_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = Tokenizer.load(path)
    assert again.context_length == 8 and again.vocab_size == tok.vocab_size
    texts = ["grinning face", "thumbs up"]
    assert (again.encode(texts) == tok.encode(texts)).all()
    assert again.decode(again.encode(["grinning face"])[0]) == "grinning face"


def test_single_string_is_refused(tok):
    with pytest.raises(TypeError):
        tok.encode("red apple")
