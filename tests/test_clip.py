"""The project's own CLIP against open_clip's (issue 26): a tiny architecture whose weights both
sides draw from the same seed, and open_clip's embeddings of 100 images and 50 texts, committed by
tests/fixtures/openclip/make_fixture.py. open_clip itself is not needed here (nor importable beside
this project's CPU torch)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from limoe.model.clip import (
    ARCHITECTURES,
    CLIP,
    architecture,
    infer_config,
    load_openclip_state_dict,
    unwrap_state_dict,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "openclip"
sys.path.insert(0, str(FIXTURE))
from weights import images, weights  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    meta = json.loads((FIXTURE / "reference.json").read_text())
    arrays = np.load(FIXTURE / "reference.npz")
    sd = {k: torch.from_numpy(v) for k, v in weights({k: tuple(s) for k, s in meta["keys"].items()}).items()}
    return meta, arrays, sd


def test_the_architecture_is_read_from_tensor_shapes(reference):
    meta, _, sd = reference
    cfg = infer_config(sd)
    vision, text = meta["config"]["vision_cfg"], meta["config"]["text_cfg"]
    assert (cfg.embed_dim, cfg.image_size, cfg.patch_size) == (32, vision["image_size"], vision["patch_size"])
    assert (cfg.vision_width, cfg.vision_layers, cfg.vision_heads) == (128, 2, 2)
    assert (cfg.text_width, cfg.text_layers, cfg.text_heads) == (text["width"], text["layers"], text["heads"])
    assert (cfg.context_length, cfg.vocab_size) == (text["context_length"], text["vocab_size"])
    assert set(CLIP(cfg).state_dict()) == set(meta["keys"])  # open_clip's layout, key for key


def test_embeddings_match_open_clip(reference):
    _, ref, sd = reference
    model = CLIP(infer_config(sd)).eval()
    load_openclip_state_dict(model, sd)
    with torch.inference_mode():
        img = model.encode_image(torch.from_numpy(images()), normalize=True).numpy()
        txt = model.encode_text(torch.from_numpy(ref["tokens"]), normalize=True).numpy()
    for ours, theirs in ((img, ref["image_embeddings"]), (txt, ref["text_embeddings"])):
        assert ours.shape == theirs.shape
        assert (ours * theirs).sum(-1).min() >= 0.99999
        assert np.abs(ours - theirs).max() <= 1e-4
    # zero-shot top-1 of every image over the 50 texts: identical
    assert np.array_equal((img @ txt.T).argmax(1), (ref["image_embeddings"] @ ref["text_embeddings"].T).argmax(1))
    assert "open_clip" not in sys.modules


def test_known_architectures_match_open_clip_configs():
    b32 = architecture("ViT-B-32")
    assert (b32.vision_width, b32.vision_layers, b32.vision_heads, b32.patch_size) == (768, 12, 12, 32)
    assert (b32.text_width, b32.text_layers, b32.text_heads, b32.embed_dim) == (512, 12, 8, 512)
    assert architecture("ViT-B-32-quickgelu").quick_gelu and not b32.quick_gelu
    assert ARCHITECTURES["ViT-L-14"].vision_heads == 16
    with pytest.raises(KeyError, match="unknown architecture 'ViT-Q-99'"):
        architecture("ViT-Q-99")


def test_mismatched_state_dicts_are_named(reference):
    _, _, sd = reference
    model = CLIP(infer_config(sd))
    broken = dict(sd)
    del broken["visual.proj"]
    broken["visual.extra"] = torch.zeros(1)
    broken["token_embedding.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError, match=r"missing visual\.proj.*unexpected visual\.extra.*wrong shapes token_embedding"):
        load_openclip_state_dict(model, broken)
    with pytest.raises(ValueError, match="not an OpenCLIP ViT checkpoint"):
        infer_config({"foo": torch.zeros(1)})


def test_checkpoint_wrappers_are_unwrapped(reference):
    _, _, sd = reference
    assert unwrap_state_dict({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}).keys() == sd.keys()
    for bad in ([1, 2], {}, {"a": 1}, {"state_dict": "x"}):
        with pytest.raises(ValueError, match="not a CLIP checkpoint"):
            unwrap_state_dict(bad)


def test_the_tokenizer_gives_open_clips_ids():
    from weights import texts, tokenizer_texts

    from limoe.runtime.clip_tokenizer import openclip_tokenizer

    ref = np.load(FIXTURE / "reference.npz")
    tok = openclip_tokenizer()
    assert tok.context_length == 77 and tok.cleaning == "open_clip_lower"
    np.testing.assert_array_equal(tok.encode(texts()), ref["tokens"])
    np.testing.assert_array_equal(tok.encode(tokenizer_texts()), ref["tokenizer_tokens"])
    ids = tok.encode(["a photo of a cat"])[0]
    assert ids[0] == 49406 and ids[list(ids).index(49407)] == ids.max() == 49407  # <start_of_text> ... <end_of_text>
    long = tok.encode(["word " * 100])[0]
    assert long[-1] == 49407 and (long != 0).all()  # truncated to 77, the end kept


def test_resize_then_crop_gives_torchvisions_pixels():
    from PIL import Image
    from weights import CROP_SIZES, crop_source

    from limoe.runtime.preprocess import PreprocessConfig, resize_then_crop

    ref = np.load(FIXTURE / "reference.npz")["crops"]
    for (w, h), expected in zip(CROP_SIZES, ref):
        np.testing.assert_array_equal(np.asarray(resize_then_crop(Image.fromarray(crop_source(w, h)), 32)), expected,
                                      err_msg=f"{w}x{h}")
    cfg = PreprocessConfig.from_dict({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop": "resize_crop"})
    assert cfg.crop == "resize_crop" and cfg.to_dict()["crop"] == "resize_crop"
    with pytest.raises(ValueError, match="'crop' 'squash' is not supported"):
        PreprocessConfig.from_dict({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop": "squash"})
    # a 1 x 100,000 strip is sampled as a box, never resized whole
    assert resize_then_crop(Image.new("RGB", (1, 100_000)), 32).size == (32, 32)
