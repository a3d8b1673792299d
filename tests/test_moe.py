"""The MoE layer as a whole: equivalence to a dense MLP, groups, gradients."""

import pytest
import torch

from limoe.model.moe import MoELayer, examples_per_group
from limoe.model.transformer import MLP


def _identical_experts(renormalize: bool, E: int = 4, D: int = 8, H: int = 16):
    torch.manual_seed(0)
    dense = MLP(D, H)
    moe = MoELayer(D, H, num_experts=E, top_k=1, eval_capacity_factor=E, renormalize_gates=renormalize)
    with torch.no_grad():  # every expert is a copy of the dense MLP
        moe.experts.w1.copy_(dense.fc1.weight.t().expand(E, D, H))
        moe.experts.b1.copy_(dense.fc1.bias.expand(E, 1, H))
        moe.experts.w2.copy_(dense.fc2.weight.t().expand(E, H, D))
        moe.experts.b2.copy_(dense.fc2.bias.expand(E, 1, D))
        moe.router.weight.normal_()  # a non-trivial router
    return dense.eval(), moe.eval()


def test_identical_experts_equal_the_dense_mlp_scaled_by_the_gate():
    dense, moe = _identical_experts(renormalize=False)
    x = torch.randn(3, 5, 8)
    y, info = moe(x)
    gate = info.probs.max(-1).values  # K=1: the top-1 probability
    torch.testing.assert_close(y, gate.unsqueeze(-1) * dense(x), atol=1e-6, rtol=1e-5)
    assert not info.dropped.any()  # capacity factor E: nothing can drop


def test_identical_experts_with_renormalized_gates_equal_the_dense_mlp_exactly():
    dense, moe = _identical_experts(renormalize=True)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(moe(x)[0], dense(x), atol=1e-6, rtol=1e-5)


def test_dropped_tokens_get_zero_output():
    torch.manual_seed(1)
    moe = MoELayer(8, 16, num_experts=4, top_k=1, eval_capacity_factor=0.25, inference_routing="capacity").eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # positive inputs all prefer expert 0
    x = torch.rand(1, 6, 8) + 0.1
    y, info = moe(x)
    assert info.plan.capacity == 1  # ceil(K * S * f / E) = ceil(1 * 6 * 0.25 / 4) = ceil(0.375)
    dropped = info.dropped[0, :, 0]
    assert dropped.tolist().count(True) == 5  # one slot, six tokens
    assert y[0, dropped].abs().max() == 0  # residual only
    assert y[0, ~dropped].abs().max() > 0


def test_examples_per_group_tiles_the_batch():
    assert examples_per_group(32, 8) == 8
    assert examples_per_group(12, 8) == 6
    assert examples_per_group(7, 8) == 7
    assert examples_per_group(7, 4) == 1  # 7 is prime
    assert examples_per_group(3, 1) == 1


def test_training_groups_several_examples_and_inference_one():
    moe = MoELayer(8, 16, num_experts=4, top_k=1, train_group_size=4, inference_routing="capacity")
    x = torch.randn(8, 5, 8)
    _, info = moe.train()(x)
    assert info.plan.probs.shape == (2, 20, 4)  # G = 8 / 4, S = 4 * 5
    assert info.plan.capacity == 5  # ceil(20 / 4)
    assert info.probs.shape == (8, 5, 4)  # per-example view
    _, info = moe.eval()(x)
    assert info.plan.probs.shape == (8, 5, 4)
    assert info.plan.capacity == 2  # ceil(5 / 4)


@pytest.mark.parametrize("routing", ["dropless", "capacity"])
def test_inference_output_does_not_depend_on_batch_neighbours(routing):
    torch.manual_seed(2)
    moe = MoELayer(8, 16, num_experts=4, top_k=2, eval_capacity_factor=1.0, inference_routing=routing).eval()
    x = torch.randn(5, 7, 8)
    together, _ = moe(x)
    alone = torch.cat([moe(x[i:i + 1])[0] for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)


def _token_by_token(moe: MoELayer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The dropless definition, one token and one choice at a time: y_t = sum_k g_tk * expert_{e_tk}(x_t)."""
    B, T, D = x.shape
    probs = torch.softmax(x @ moe.router.weight.t(), dim=-1)  # (B, T, E)
    gates, index = probs.topk(moe.top_k, dim=-1)
    if moe.renormalize_gates:
        gates = gates / gates.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            if mask is not None and not mask[b, t]:
                continue  # padding is never routed
            for k in range(moe.top_k):
                e = int(index[b, t, k])
                h = torch.nn.functional.gelu(x[b, t] @ moe.experts.w1[e] + moe.experts.b1[e, 0])
                y[b, t] += gates[b, t, k] * (h @ moe.experts.w2[e] + moe.experts.b2[e, 0])
    return y


@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True)])
def test_dropless_equals_a_token_by_token_loop_over_the_chosen_experts(top_k, renormalize):
    torch.manual_seed(4)
    moe = MoELayer(8, 16, num_experts=4, top_k=top_k, renormalize_gates=renormalize).eval()
    with torch.no_grad():
        moe.experts.b1.normal_()
        moe.experts.b2.normal_()
        moe.router.weight.normal_()
    x = torch.randn(3, 6, 8)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False  # two padding tokens
    with torch.no_grad():
        y, info = moe(x, mask)
        torch.testing.assert_close(y, _token_by_token(moe, x, mask), atol=1e-5, rtol=1e-5)
    assert not info.dropped.any()
    assert info.plan.dropless and info.plan.capacity is None
    assert y[1, 4:].abs().max() == 0  # padding: no expert output, residual only
    assert info.plan.kept.tolist() == mask.unsqueeze(-1).expand(3, 6, top_k).tolist()


def test_dropless_keeps_what_capacity_drops():
    # The skewed router of test_dropped_tokens_get_zero_output: all six tokens choose expert 0,
    # which has one slot at capacity factor 0.25. Dropless computes all six; an expert that no
    # token chose (1, 2, 3) runs on zero rows without error.
    torch.manual_seed(1)
    capacity = MoELayer(8, 16, num_experts=4, top_k=1, eval_capacity_factor=0.25, inference_routing="capacity")
    dropless = MoELayer(8, 16, num_experts=4, top_k=1)
    dropless.load_state_dict(capacity.state_dict())
    with torch.no_grad():
        for m in (capacity, dropless):
            m.router.weight.zero_()
            m.router.weight[0] = 1.0
    x = torch.rand(1, 6, 8) + 0.1
    with torch.no_grad():
        y_cap, info_cap = capacity.eval()(x)
        y_all, info_all = dropless.eval()(x)
    assert (info_all.expert_index == 0).all()
    assert int(info_cap.dropped.sum()) == 5 and int(info_all.dropped.sum()) == 0
    kept = ~info_cap.dropped[0, :, 0]  # the one token capacity kept gets the same output
    torch.testing.assert_close(y_all[0, kept], y_cap[0, kept])
    assert y_all.abs().amin(dim=-1).min() > 0  # and every other token now has one too
    torch.testing.assert_close(y_all, _token_by_token(dropless, x), atol=1e-6, rtol=1e-5)


def test_dropless_is_only_for_inference_training_keeps_capacity_and_bpr():
    moe = MoELayer(8, 16, num_experts=4, top_k=1, train_group_size=4)
    _, info = moe.train()(torch.randn(8, 5, 8))
    assert info.plan.capacity == 5 and not info.plan.dropless
    _, info = moe.eval()(torch.randn(8, 5, 8))
    assert info.plan.dropless


def test_inference_routing_is_checked():
    with pytest.raises(ValueError, match="inference_routing"):
        MoELayer(8, 16, num_experts=4, inference_routing="sometimes")


def test_gradients_reach_router_and_chosen_experts_only():
    torch.manual_seed(3)
    moe = MoELayer(8, 16, num_experts=4, top_k=1, train_capacity_factor=4.0).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0  # large first feature -> expert 2
    x = torch.zeros(2, 3, 8)
    x[..., 0] = 1.0
    y, info = moe(x)
    assert (info.expert_index == 2).all()
    y.pow(2).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0  # the gate p_top1 carries the gradient
    grads = moe.experts.w1.grad.abs().sum(dim=(1, 2))
    assert grads[2] > 0 and grads[[0, 1, 3]].sum() == 0
