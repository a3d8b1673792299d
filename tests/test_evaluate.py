"""Evaluation metrics by hand, and the whole evaluation on a checkpoint and its export."""

import json

import numpy as np
import pytest
import torch

from limoe.eval.evaluate import (
    EvalSet,
    evaluate,
    format_results,
    n_way_accuracy,
    retrieval_recall,
    routing_analysis,
    topk_accuracy,
)
from limoe.export.torch_encoders import checkpoint_encoders
from limoe.runtime.onnx_encoder import OnnxEncoders


def test_topk_accuracy_by_hand():
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    # argmax: 1, 0, 2; targets 1, 2, 0 -> top-1 1/3; top-2: row 1 ranks (0, 1|2), row 2 ranks (2, 1)
    assert topk_accuracy(scores, np.array([1, 2, 0]), ks=(1, 2)) == {"top1": pytest.approx(1 / 3),
                                                                      "top2": pytest.approx(1 / 3)}
    assert topk_accuracy(scores, np.array([1, 0, 2]), ks=(1, 5))["top5"] == 1.0  # k capped at C


def test_n_way_accuracy_by_hand():
    # 12 classes. Row 0: its class (0) beats every other -> right whatever the 9 distractors.
    # Row 1: its class (5) is beaten by class 11 only -> right iff 11 is not drawn among the
    # 9 of the 11 others, so wrong in 9/11 of draws. Row 2: its class (3) is lowest -> always wrong.
    scores = np.zeros((3, 12))
    scores[0, 0] = 1.0
    scores[1, 5], scores[1, 11] = 1.0, 2.0
    scores[2] = np.arange(12)
    scores[2, 3] = -1.0
    targets = np.array([0, 5, 3])
    assert n_way_accuracy(scores[[0, 2]], targets[[0, 2]]) == 0.5
    many = np.repeat(scores[1:2], 2000, 0)
    assert n_way_accuracy(many, np.full(2000, 5)) == pytest.approx(2 / 11, abs=0.03)  # 11 drawn in 9/11
    assert n_way_accuracy(scores, targets, n=12) == topk_accuracy(scores, targets, ks=(1,))["top1"]  # all classes
    ties = np.ones((4, 20))  # a tie is not a win
    assert n_way_accuracy(ties, np.arange(4)) == 0.0


def test_retrieval_recall_by_hand():
    img = np.eye(3)
    txt = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # texts 1 and 2 swapped
    r = retrieval_recall(img, txt, ks=(1, 2))
    # image 1's true text (0, 0, 1) scores 0 and is beaten only by text 2 (score 1): rank 1, so
    # it is found at k=2 but not k=1; the same for image 2. Ties do not beat the true pair.
    assert r["image_to_text_r@1"] == pytest.approx(1 / 3) and r["image_to_text_r@2"] == 1.0
    assert r["text_to_image_r@1"] == pytest.approx(1 / 3)


def test_routing_analysis_by_hand():
    # 1 layer, 2 experts, K=1. Images: 4 tokens on e0, none dropped. Texts: 1 token on e0,
    # 3 on e1, one more on e1 dropped, one padding (-1).
    img = np.array([[[[0], [0], [0], [0]]]])  # (N=1, M=1, T=4, K=1)
    txt = np.array([[[[0], [1], [1], [1], [1], [-1]]]])
    txt_drop = np.zeros_like(txt, bool)
    txt_drop[0, 0, 4, 0] = True
    r = routing_analysis({"image": (img, np.zeros_like(img, bool)), "text": (txt, txt_drop)}, [1], 2)["layers"][0]
    assert r["usage"] == {"image": [1.0, 0.0], "text": [0.25, 0.75]}
    # e0: image 1.0 vs text 0.25 -> share 0.8 (shared); e1: 0 vs 0.75 -> share 0 (text-only)
    assert r["image_share"] == [0.8, 0.0]
    assert r["experts"] == {"image": 0, "text": 1, "shared": 1, "unused": 0}
    assert r["dropped_rate"] == {"image": 0.0, "text": 0.2}  # 1 of 5 real text tokens
    assert r["usage_entropy"]["image"] == 0.0
    assert r["usage_entropy"]["text"] == pytest.approx(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), abs=1e-4)


def test_checkpoint_and_export_evaluate_the_same(exported):
    model, _, entry, ckpt = exported
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(12, 3, cfg.image_size, cfg.image_size, generator=g).numpy()
    labels = ["red circle", "blue square", "cat"] * 4
    sets = [EvalSet("toy", pixels, labels, captions=[f"a {x}" for x in labels])]
    a = evaluate(checkpoint_encoders(ckpt), sets)
    b = evaluate(OnnxEncoders.from_entry(entry), sets)
    assert a["zero_shot"] == b["zero_shot"] and a["retrieval"] == b["retrieval"]
    assert a["routing"]["layers"][0]["usage"] == b["routing"]["layers"][0]["usage"]
    assert a["zero_shot"]["toy"]["classes"] == 3 and a["retrieval"]["toy"]["pairs"] == 12
    table = format_results(a)
    assert "toy" in table and "routing layer" in table


def test_plots_are_written(tmp_path):
    from PIL import Image

    from limoe.eval.evaluate import plot_expert_usage, plot_routing_maps

    img = np.random.default_rng(0).integers(-1, 3, (2, 2, 16, 1))
    txt = np.random.default_rng(1).integers(-1, 3, (2, 2, 8, 1))
    routing = routing_analysis({"image": (img, img < -5), "text": (txt, txt < -5)}, [1, 3], 3)
    a = plot_expert_usage(routing, tmp_path / "usage.png")
    b = plot_routing_maps(np.zeros((2, 3, 16, 16), np.float32), img, img == 2, [1, 3], 3, (0.5,) * 3, (0.5,) * 3,
                          tmp_path / "maps.png")
    for path in (a, b):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_dropless_and_capacity_are_reported_side_by_side(exported):
    """`limoe eval CHECKPOINT` evaluates the same weights dropless and at capacity routing; the
    table and the model card show both, with the capacity run's drop rates."""
    from limoe.eval.evaluate import with_capacity
    from limoe.export.model_card import render_model_card

    model, _, entry, ckpt = exported
    cfg = model.cfg
    pixels = torch.randn(12, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)).numpy()
    labels = ["red circle", "blue square", "cat"] * 4
    sets = [EvalSet("toy", pixels, labels, captions=[f"a {x}" for x in labels])]
    dropless = evaluate(checkpoint_encoders(ckpt), sets)
    capacity = evaluate(checkpoint_encoders(ckpt, inference_routing="capacity", eval_capacity_factor=0.5),
                        sets)
    assert all(r["dropped_rate"]["image"] == 0 for r in dropless["routing"]["layers"])
    assert all(r["dropped_rate"]["image"] > 0 for r in capacity["routing"]["layers"])  # the peaky router overflows
    both = with_capacity(dropless, capacity, 0.5)
    assert both["zero_shot"] == dropless["zero_shot"] and both["capacity"]["zero_shot"] == capacity["zero_shot"]
    layers = capacity["routing"]["layers"]
    expected = round(float(np.mean([r["dropped_rate"]["image"] for r in layers])), 4)
    assert both["capacity"]["dropped_rate"]["image"] == expected
    table = format_results(both)
    assert "cap top-1" in table and f"image {expected:.1%}" in table
    manifest = json.loads((entry / "manifest.json").read_text())
    card = render_model_card({**manifest, "evaluation": both})
    assert "top-1 at capacity 0.5" in card and "dropless: every token's 2 choice(s) computed" in card


def test_group_top1_competes_only_within_the_images_category():
    from limoe.eval.evaluate import group_top1

    classes = ["cat", "dog", "car", "bus"]  # animals: cat, dog; vehicles: car, bus
    labels = ["cat", "dog", "car", "bus"]
    groups = ["animal", "animal", "vehicle", "vehicle"]
    targets = np.array([0, 1, 2, 3])
    # image 0 (cat): best overall is "car" (0.9), but within animals "cat" (0.5) beats "dog" (0.1) -> right
    # image 1 (dog): within animals "cat" 0.6 > "dog" 0.4 -> wrong; image 2 (car): right; image 3 (bus): right
    scores = np.array([[0.5, 0.1, 0.9, 0.0], [0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.7, 0.2], [0.9, 0.0, 0.1, 0.3]])
    top1, per_group = group_top1(scores, targets, classes, labels, groups)
    assert top1 == 0.75 and per_group == 2.0
