"""Loss functions against values worked out by hand (natural logs throughout)."""

import math

import pytest
import torch

from limoe.model.config import get_config
from limoe.model.losses import (
    auxiliary_losses,
    contrastive_loss,
    entropy,
    global_entropy_loss,
    importance_loss,
    limoe_loss,
    load_loss,
    local_entropy_loss,
)
from limoe.model.transformer import LIMoE

LN2, LN4 = math.log(2), math.log(4)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_entropy_handles_zero_probabilities():
    assert entropy(t([0.5, 0.5])).item() == pytest.approx(LN2)
    assert entropy(t([1.0, 0.0])).item() == 0.0  # 0 log 0 = 0, not nan


def test_local_entropy_is_the_mean_token_entropy():
    # token a: (0.5, 0.5) -> H = ln 2;  token b: (1, 0) -> H = 0;  mean = ln 2 / 2 = 0.34657
    probs = t([[[0.5, 0.5], [1.0, 0.0]]])
    mask = torch.tensor([[True, True]])
    assert local_entropy_loss(probs, mask).item() == pytest.approx(LN2 / 2)


def test_local_entropy_ignores_padding():
    probs = t([[[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]])
    mask = torch.tensor([[True, True, False]])  # the third token is padding
    assert local_entropy_loss(probs, mask).item() == pytest.approx(LN2 / 2)


def test_global_entropy_hand_value():
    # mean p = (0.75, 0.25); H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.21576 + 0.34657 = 0.56233
    # with S = 2: max(0, ln 2 - 0.56233) = 0.69315 - 0.56233 = 0.13082
    probs = t([[[0.5, 0.5], [1.0, 0.0]]])
    mask = torch.tensor([[True, True]])
    assert global_entropy_loss(probs, mask, min_experts=2).item() == pytest.approx(0.13082, abs=1e-5)


def test_global_entropy_is_zero_for_uniform_usage_and_log_s_for_collapse():
    eye = torch.eye(4).unsqueeze(0)  # 4 decisive tokens, one per expert -> mean p uniform
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert global_entropy_loss(eye, mask, min_experts=4).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.zeros(1, 4, 4)
    collapsed[..., 0] = 1.0  # every token on expert 0 -> mean p one-hot -> H = 0
    assert global_entropy_loss(collapsed, mask, min_experts=4).item() == pytest.approx(LN4)
    # The sign: collapse is penalised more than uniform use, never the other way round.
    assert global_entropy_loss(collapsed, mask, 4) > global_entropy_loss(eye, mask, 4)
    # Using 2 of 4 experts evenly satisfies a threshold of S = 2 but not of S = 4.
    half = t([[[1, 0, 0, 0], [0, 1, 0, 0]]])
    m2 = torch.ones(1, 2, dtype=torch.bool)
    assert global_entropy_loss(half, m2, 2).item() == pytest.approx(0.0, abs=1e-7)
    assert global_entropy_loss(half, m2, 4).item() == pytest.approx(LN4 - LN2)


def test_global_entropy_is_computed_per_group_then_averaged():
    # group 0 collapsed (loss ln 2 with S = 2), group 1 balanced (loss 0) -> mean ln 2 / 2.
    probs = t([[[1, 0], [1, 0]], [[1, 0], [0, 1]]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert global_entropy_loss(probs, mask, 2).item() == pytest.approx(LN2 / 2)


def test_importance_loss_is_cv_squared_of_summed_probabilities():
    # importance = (0.5 + 1.0, 0.5 + 0.0) = (1.5, 0.5); mean 1, variance 0.25 -> CV^2 = 0.25
    probs = t([[[0.5, 0.5], [1.0, 0.0]]])
    assert importance_loss(probs, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(0.25)
    assert importance_loss(t([[[0.5, 0.5]]]), torch.ones(1, 1, dtype=torch.bool)).item() == 0.0


def test_load_loss_hand_value():
    # noise std 1, K = 1.
    # token 0: logits (1, 0), noisy (1.2, 0.1): threshold 1.2
    #   P(e0) = 1 - Phi(1.2 - 1) = 1 - Phi(0.2) = 0.42074;  P(e1) = 1 - Phi(1.2) = 0.11507
    # token 1: logits (0, 0), noisy (0, 0): threshold 0 -> P = 0.5, 0.5
    # load = (0.92074, 0.61507): mean 0.76790, var 0.15284^2 = 0.023359 -> CV^2 = 0.039612
    logits = t([[[1.0, 0.0], [0.0, 0.0]]])
    noisy = t([[[1.2, 0.1], [0.0, 0.0]]])
    loss = load_loss(logits, noisy, noise_std=1.0, top_k=1, mask=torch.ones(1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.039612, rel=1e-3)


def test_contrastive_loss_hand_values():
    eye = torch.eye(2)
    # aligned, scale 1: logits = I; CE per row = log(1 + e^-1) = 0.31326
    assert contrastive_loss(eye, eye, t(0.0)).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # swapped texts: logits = [[0, 1], [1, 0]]; CE = log(1 + e^1) = 1.31326
    swapped = eye.flip(0)
    assert contrastive_loss(eye, swapped, t(0.0)).item() == pytest.approx(math.log(1 + math.e), abs=1e-6)


def test_multi_positive_contrastive_hand_values():
    # Pairs 0 and 1 show one text: t0 = t1 = e0, and t2 = e1; images equal their texts.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = img.clone()
    pos = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    # logits (scale 1) = [[1,1,0],[1,1,0],[0,0,1]] in both directions. Rows 0, 1 target (1/2, 1/2, 0):
    # CE = log(2e + 1) - 1; row 2 targets itself: CE = log(2 + e) - 1.
    row01, row2 = math.log(2 * math.e + 1) - 1, math.log(2 + math.e) - 1
    expected = (2 * row01 + row2) / 3
    assert contrastive_loss(img, txt, t(0.0), pos).item() == pytest.approx(expected, abs=1e-6)
    # With the identity as target, rows 0 and 1 pay for the duplicate: CE = log(2e + 1) - 1 as well,
    # but the gradient pushes t0 away from image 1; the multi-positive loss is lower.
    assert contrastive_loss(img, txt, t(0.0), pos) < contrastive_loss(img, txt, t(0.0)) + 1e-6
    # No positive besides the diagonal: exactly the classic loss.
    torch.manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(5, 4), dim=-1) for _ in range(2))
    none = torch.zeros(5, 5, dtype=torch.bool)
    assert contrastive_loss(a, b, t(1.0), none).item() == pytest.approx(contrastive_loss(a, b, t(1.0)).item(), abs=1e-6)


def test_contrastive_loss_prefers_aligned_pairs():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    scale = t(math.log(10))
    assert contrastive_loss(z, z, scale) < contrastive_loss(z, z[torch.randperm(16)], scale)


def _forward(cfg):
    torch.manual_seed(0)
    model = LIMoE(cfg).train()
    out = model(torch.randn(4, 3, cfg.image_size, cfg.image_size),
                torch.randint(3, cfg.vocab_size, (4, cfg.context_length)))
    return model, out


def test_limoe_loss_names_every_term_and_weights_them():
    cfg = get_config("tiny", local_entropy_weight_image=2.0)
    _, out = _forward(cfg)
    terms = limoe_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.image_routing,
                       out.text_routing, cfg)
    assert set(terms) == {"contrastive", "local_entropy_image", "global_entropy_image",
                          "local_entropy_text", "global_entropy_text", "total"}
    info = out.image_routing[0]
    expected = 2.0 * local_entropy_loss(info.plan.probs, info.plan.mask)
    assert terms["local_entropy_image"].item() == pytest.approx(expected.item())
    parts = sum(v for k, v in terms.items() if k != "total")
    assert terms["total"].item() == pytest.approx(parts.item())


def test_classic_and_no_aux_loss_variants():
    _, out = _forward(get_config("tiny", aux_loss="classic", router_noise_std=0.25))
    terms = auxiliary_losses(out.image_routing, "image", get_config("tiny", aux_loss="classic",
                                                                      router_noise_std=0.25))
    assert set(terms) == {"importance_image", "load_image"}
    assert auxiliary_losses(out.image_routing, "image", get_config("tiny", aux_loss="none")) == {}
    with pytest.raises(ValueError, match="router_noise_std"):
        get_config("tiny", aux_loss="classic")


def test_gradients_reach_the_router_through_every_loss():
    cfg = get_config("tiny")
    model, out = _forward(cfg)
    terms = limoe_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.image_routing,
                       out.text_routing, cfg)
    router = model.blocks[1].mlp.router.weight
    for name in ("contrastive", "global_entropy_image", "local_entropy_text"):
        model.zero_grad()
        # global entropy may be exactly 0 (above threshold); force it active with a huge S
        if name == "global_entropy_image":
            info = out.image_routing[0]
            loss = global_entropy_loss(info.plan.probs, info.plan.mask, min_experts=1000)
        else:
            loss = terms[name]
        loss.backward(retain_graph=True)
        assert router.grad is not None and router.grad.abs().sum() > 0, name
