"""The MoE layer as a whole: equivalence to a dense MLP, groups, gradients."""

import torch

from limoe.model import MLP
from limoe.moe import MoELayer, examples_per_group


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
    moe = MoELayer(8, 16, num_experts=4, top_k=1, eval_capacity_factor=0.25).eval()
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
    moe = MoELayer(8, 16, num_experts=4, top_k=1, train_group_size=4)
    x = torch.randn(8, 5, 8)
    _, info = moe.train()(x)
    assert info.plan.probs.shape == (2, 20, 4)  # G = 8 / 4, S = 4 * 5
    assert info.plan.capacity == 5  # ceil(20 / 4)
    assert info.probs.shape == (8, 5, 4)  # per-example view
    _, info = moe.eval()(x)
    assert info.plan.probs.shape == (8, 5, 4)
    assert info.plan.capacity == 2  # ceil(5 / 4)


def test_inference_output_does_not_depend_on_batch_neighbours():
    torch.manual_seed(2)
    moe = MoELayer(8, 16, num_experts=4, top_k=2, eval_capacity_factor=1.0).eval()
    x = torch.randn(5, 7, 8)
    together, _ = moe(x)
    alone = torch.cat([moe(x[i:i + 1])[0] for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)


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
