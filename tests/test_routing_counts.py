"""The single routing summary, against counts worked out by hand."""

import numpy as np

from limoe.runtime.routing_counts import expert_counts


def test_counts_per_layer_and_expert_skip_padding_and_split_dropped():
    # 2 examples, M=2 layers, T=3 tokens, K=1; E=3 experts. Example 1's last token is padding (-1).
    index = np.array([[[[0], [2], [2]], [[1], [1], [0]]],
                      [[[2], [0], [-1]], [[0], [1], [-1]]]])  # (B=2, M=2, T=3, K=1)
    dropped = np.zeros_like(index, dtype=bool)
    dropped[0, 0, 2, 0] = True  # layer 0: example 0's third token lost its choice of expert 2
    dropped[1, 1, 2, 0] = True  # padding: never counted, even if flagged
    routed, lost = expert_counts(index, dropped, 3)
    # layer 0 kept choices: ex0 -> 0, 2 ; ex1 -> 2, 0  => e0: 2, e1: 0, e2: 2; dropped: e2: 1
    # layer 1 kept choices: ex0 -> 1, 1, 0 ; ex1 -> 0, 1 => e0: 2, e1: 3, e2: 0
    assert routed.tolist() == [[2, 0, 2], [2, 3, 0]]
    assert lost.tolist() == [[0, 0, 1], [0, 0, 0]]


def test_one_example_and_top2_choices():
    index = np.array([[[0, 1], [1, 0]]])  # (M=1, T=2, K=2): one example without a batch axis
    routed, lost = expert_counts(index, np.zeros_like(index, dtype=bool), 2)
    assert routed.tolist() == [[2, 2]] and lost.tolist() == [[0, 0]]


def test_a_model_without_moe_layers_has_nothing_to_count():
    routed, lost = expert_counts(np.zeros((4, 0, 5, 1), np.int64), np.zeros((4, 0, 5, 1), bool), 8)
    assert routed.shape == lost.shape == (0, 8)
