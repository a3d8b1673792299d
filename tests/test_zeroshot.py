import numpy as np
import pytest
import torch
from conftest import random_batch

from limoe.runtime.templates import DEFAULT_TEMPLATES
from limoe.runtime.tokenizer import Tokenizer
from limoe.runtime.zeroshot import build_zero_shot_classifier, ensemble, fill_templates


def test_ensemble_normalises_averages_and_renormalises():
    # class 0: templates (3, 4) -> (0.6, 0.8) and (2, 0) -> (1, 0); mean (0.8, 0.4);
    # renormalised (2, 1) / sqrt(5).  class 1: a single direction (0, 5) -> (0, 1) twice.
    emb = np.array([[[3.0, 4.0], [2.0, 0.0]], [[0.0, 5.0], [0.0, 1.0]]])
    w = ensemble(emb)
    assert w.shape == (2, 2)  # (P, C)
    np.testing.assert_allclose(w[:, 0], np.array([2.0, 1.0]) / np.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(w[:, 1], [0.0, 1.0], atol=1e-7)


def test_fill_templates_is_class_major_and_checks_placeholders():
    assert fill_templates(["cat", "dog"], ["{}", "a {}."]) == ["cat", "a cat.", "dog", "a dog."]
    with pytest.raises(ValueError):
        fill_templates(["cat"], ["no placeholder"])
    with pytest.raises(ValueError):
        fill_templates([], ["{}"])


def test_classifier_from_the_model(tiny_model, tiny_cfg):
    tok = Tokenizer.train(["cat", "dog", "a photo of a cat"] * 5, vocab_size=tiny_cfg.vocab_size,
                          context_length=tiny_cfg.context_length)

    def encode(ids):
        with torch.no_grad():
            return tiny_model.encode_text(torch.from_numpy(ids)).numpy()

    w = build_zero_shot_classifier(encode, tok, ["cat", "dog", "bird"], DEFAULT_TEMPLATES)
    assert w.shape == (tiny_cfg.embed_dim, 3)
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-5)
    # a single template gives exactly that prompt's normalised embedding
    w1 = build_zero_shot_classifier(encode, tok, ["cat"], ["{}"])
    np.testing.assert_allclose(w1[:, 0], encode(tok.encode(["cat"]))[0], atol=1e-6)
    images, _ = random_batch(tiny_cfg, 2)
    scores = tiny_model.encode_image(images).detach().numpy() @ w
    assert scores.shape == (2, 3)
