"""The one routing summary: how many token choices each expert took and how many were dropped.

Torch-free (numpy), so the service, evaluation and training logs count the same way:

    routed, dropped = expert_counts(expert_index, dropped, num_experts)

expert_index (..., M, T, K) holds each token's chosen experts per MoE layer (-1 for padding,
which is never routed), dropped (..., M, T, K) whether that choice found its expert full. Both
results are (M, E): choices per layer and expert, summed over every leading axis, tokens and
choices. A dropless model's `dropped` counts are all zero.
"""

from __future__ import annotations

import numpy as np


def expert_counts(expert_index: np.ndarray, dropped: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(routed (M, E), dropped (M, E)) int64 counts of real token choices, per layer and expert."""
    idx = np.asarray(expert_index)
    drop = np.asarray(dropped, dtype=bool)
    M = idx.shape[-3]
    if M == 0 or idx.size == 0:
        empty = np.zeros((M, num_experts), np.int64)
        return empty, empty.copy()
    idx = np.moveaxis(idx, -3, 0).reshape(M, -1)  # (M, N) with N = everything else
    drop = np.moveaxis(drop, -3, 0).reshape(M, -1)
    real = idx >= 0
    # One bincount over (layer, expert) pairs: id = m * E + e.
    ids = idx + (np.arange(M) * num_experts)[:, None]
    routed = np.bincount(ids[real & ~drop], minlength=M * num_experts).reshape(M, num_experts)
    lost = np.bincount(ids[real & drop], minlength=M * num_experts).reshape(M, num_experts)
    return routed, lost


__all__ = ["expert_counts"]
