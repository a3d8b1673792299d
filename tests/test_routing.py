"""Routing worked out by hand: which token lands in which expert slot, and which is dropped."""

import math

import pytest
import torch

from limoe.model.routing import combine, dispatch, expert_capacity, route, route_dropless


def _logits(probs):
    """Logits whose softmax is exactly `probs` (one group)."""
    return torch.tensor(probs, dtype=torch.float64).log().unsqueeze(0)  # (1, S, E)


# The scenario (3 tokens, 3 experts, K=2, capacity 2):
#
#   token   p(e0)  p(e1)  p(e2)   1st choice  2nd choice   priority (top-1 prob)
#   t0      0.40   0.35   0.25    e0 (0.40)   e1 (0.35)    0.40
#   t1      0.80   0.05   0.15    e0 (0.80)   e2 (0.15)    0.80
#   t2      0.60   0.30   0.10    e0 (0.60)   e1 (0.30)    0.60
#
# Everyone's 1st choice is e0, which has only 2 slots.
SCENARIO = [[0.40, 0.35, 0.25], [0.80, 0.05, 0.15], [0.60, 0.30, 0.10]]


def test_plain_routing_serves_tokens_in_index_order():
    # Round 1 (1st choices, order t0 t1 t2): e0 <- t0 (slot 0), t1 (slot 1); t2 finds e0 full.
    # Round 2 (2nd choices, same order):     e1 <- t0 (slot 0); e2 <- t1 (slot 0); e1 <- t2 (slot 1).
    plan = route(_logits(SCENARIO), top_k=2, capacity=2, batch_priority=False)
    assert plan.expert_index[0].tolist() == [[0, 1], [0, 2], [0, 1]]
    assert plan.position[0].tolist() == [[0, 0], [1, 0], [-1, 1]]
    assert plan.dropped[0].tolist() == [[False, False], [False, False], [True, False]]
    # slot = e * C + c, and E * C = 6 means "dropped"
    assert plan.slot[0].tolist() == [[0, 2], [1, 4], [6, 3]]
    # The confident t2 (0.60) lost its top choice to the hesitant t0 (0.40).
    torch.testing.assert_close(plan.gates[0], torch.tensor([[0.40, 0.35], [0.80, 0.15], [0.0, 0.30]]))


def test_batch_priority_routing_serves_confident_tokens_first():
    # Priority order t1 (0.80) > t2 (0.60) > t0 (0.40), for both rounds.
    # Round 1: e0 <- t1 (slot 0), t2 (slot 1); t0 finds e0 full.
    # Round 2: e2 <- t1 (slot 0); e1 <- t2 (slot 0); e1 <- t0 (slot 1).
    plan = route(_logits(SCENARIO), top_k=2, capacity=2, batch_priority=True)
    assert plan.position[0].tolist() == [[-1, 1], [0, 0], [1, 0]]
    assert plan.dropped[0].tolist() == [[True, False], [False, False], [False, False]]
    assert plan.slot[0].tolist() == [[6, 3], [0, 4], [1, 2]]
    # Now the dropped choice is the least confident token's.
    torch.testing.assert_close(plan.gates[0], torch.tensor([[0.0, 0.35], [0.80, 0.15], [0.60, 0.30]]))


def test_top1_choices_are_served_before_any_second_choice():
    # 2 tokens, 2 experts, K=2, capacity 1:  t0 = (e0 0.6, e1 0.4),  t1 = (e1 0.7, e0 0.3).
    # Choice-major (what we do): t0 -> e0[0], t1 -> e1[0]; then both 2nd choices find their
    # expert full. Token-major would have let t0's 2nd choice take e1 before t1's 1st choice.
    for bpr in (False, True):
        plan = route(_logits([[0.6, 0.4], [0.3, 0.7]]), top_k=2, capacity=1, batch_priority=bpr)
        assert plan.expert_index[0].tolist() == [[0, 1], [1, 0]]
        assert plan.slot[0].tolist() == [[0, 2], [1, 2]]
        assert plan.dropped[0].tolist() == [[False, True], [False, True]]


def test_capacity_formula():
    # C = ceil(K * S * factor / E), clipped to [1, S]
    assert expert_capacity(64, 8, 1, 1.0) == 8
    assert expert_capacity(64, 8, 1, 1.25) == 10
    assert expert_capacity(64, 8, 2, 1.0) == 16
    assert expert_capacity(10, 8, 1, 1.0) == 2  # ceil(1.25)
    assert expert_capacity(64, 8, 1, 100.0) == 64
    assert expert_capacity(3, 8, 1, 0.01) == 1


def test_skewed_router_drops_exactly_the_overflow():
    # 16 tokens, 4 experts, K=1, capacity factor 1 -> C = 4 slots each.
    # 10 tokens prefer e0, 6 prefer e1: e0 keeps 4 and drops 6; e1 keeps 4 and drops 2.
    probs = [[0.7, 0.1, 0.1, 0.1]] * 10 + [[0.1, 0.7, 0.1, 0.1]] * 6
    C = expert_capacity(16, 4, 1, 1.0)
    assert C == 4
    plan = route(_logits(probs), top_k=1, capacity=C)
    assert int(plan.dropped.sum()) == 8
    assert plan.dropped[0, :10, 0].sum() == 6 and plan.dropped[0, 10:, 0].sum() == 2
    # Enough capacity (factor E/K) drops nothing.
    plan = route(_logits(probs), top_k=1, capacity=expert_capacity(16, 4, 1, 4.0))
    assert int(plan.dropped.sum()) == 0


def test_bpr_keeps_the_most_confident_tokens_of_an_overfull_expert():
    # 4 tokens all prefer e0 (capacity 2) with confidences 0.5, 0.9, 0.6, 0.8: BPR keeps t1, t3.
    probs = [[0.5, 0.5 - 1e-3, 1e-3], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.8, 0.1, 0.1]]
    bpr = route(_logits(probs), top_k=1, capacity=2, batch_priority=True)
    plain = route(_logits(probs), top_k=1, capacity=2, batch_priority=False)
    assert bpr.dropped[0, :, 0].tolist() == [True, False, True, False]
    assert bpr.position[0, :, 0].tolist() == [-1, 0, -1, 1]
    assert plain.dropped[0, :, 0].tolist() == [False, False, True, True]


def test_padding_tokens_take_no_slot():
    # Same as above but t1 and t3 are padding: they are neither routed nor counted as dropped,
    # so t0 and t2 fit into e0's two slots.
    probs = [[0.5, 0.5 - 1e-3, 1e-3], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.8, 0.1, 0.1]]
    mask = torch.tensor([[True, False, True, False]])
    plan = route(_logits(probs), top_k=1, capacity=2, mask=mask)
    assert plan.dropped.sum() == 0
    assert plan.position[0, :, 0].tolist() == [1, -1, 0, -1]  # t2 (0.6) before t0 (0.5)
    assert plan.gates[0, [1, 3]].abs().sum() == 0


def test_renormalized_gates_sum_to_one():
    plan = route(_logits(SCENARIO), top_k=2, capacity=3, renormalize=True)
    assert plan.gates.sum(-1)[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # t0: 0.40 / (0.40 + 0.35)
    assert plan.gates[0, 0, 0].item() == pytest.approx(0.40 / 0.75)


def test_dispatch_and_combine_match_a_token_by_token_loop():
    torch.manual_seed(0)
    G, S, E, D, K, C = 3, 10, 4, 5, 2, 3
    x = torch.randn(G, S, D)
    logits = torch.randn(G, S, E)
    plan = route(logits, top_k=K, capacity=C)
    scale = torch.arange(1, E + 1, dtype=torch.float32)  # expert e multiplies by e + 1
    buffers = dispatch(x, plan)  # (E, G*C, D)
    assert buffers.shape == (E, G * C, D)
    y = combine(buffers * scale[:, None, None], plan)
    expected = torch.zeros(G, S, D)
    for g in range(G):
        for s in range(S):
            for k in range(K):
                if not plan.dropped[g, s, k]:
                    e = plan.expert_index[g, s, k]
                    expected[g, s] += plan.gates[g, s, k] * (e + 1) * x[g, s]
    torch.testing.assert_close(y, expected)
    # Each kept choice sits in its expert's buffer at its slot; every other slot is empty.
    filled = 0
    for g, s, k in plan.kept.nonzero().tolist():
        e, c = plan.expert_index[g, s, k], plan.position[g, s, k]
        torch.testing.assert_close(buffers[e, g * C + c], x[g, s])
        filled += 1
    assert int((buffers.abs().sum(-1) > 0).sum()) == filled


def test_router_softmax_is_float32_for_half_inputs():
    plan = route(torch.randn(1, 4, 3).to(torch.bfloat16), top_k=1, capacity=4)
    assert plan.probs.dtype == torch.float32
    assert plan.probs.sum(-1).tolist()[0] == pytest.approx([1.0] * 4, abs=1e-6)
    assert math.isclose(float(plan.gates.max()), float(plan.probs.max()))


def test_dropless_routing_keeps_every_choice_of_the_scenario():
    # The same 3 tokens, K=2: no capacity, so t2's first choice e0 (lost to t0 in plain routing,
    # and t0's lost in BPR) is kept too; the gates are exactly the top-2 probabilities.
    plan = route_dropless(_logits(SCENARIO), top_k=2)
    assert plan.dropless and plan.capacity is None and plan.slot is None
    assert plan.expert_index[0].tolist() == [[0, 1], [0, 2], [0, 1]]
    assert not plan.dropped.any()
    assert plan.kept.all()
    torch.testing.assert_close(plan.gates[0], torch.tensor([[0.40, 0.35], [0.80, 0.15], [0.60, 0.30]]))


def test_dropless_routing_never_routes_padding():
    mask = torch.tensor([[True, False, True]])
    plan = route_dropless(_logits(SCENARIO), top_k=2, mask=mask)
    assert plan.kept[0].tolist() == [[True, True], [False, False], [True, True]]
    assert plan.gates[0, 1].tolist() == [0.0, 0.0]
    assert not plan.dropped.any()  # padding is not "dropped" either
