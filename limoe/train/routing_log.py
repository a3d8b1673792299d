"""How routing changes over a training run, read from its `log.jsonl`.

Each logged step records, per MoE layer and modality ("image/layer1", "text/layer3", ...), the share
of that modality's kept expert choices that went to each expert (`usage`, E numbers summing to 1).
From it, per layer and step:

    effective experts  exp(H(usage)),  H(p) = -sum_e p_e log p_e      (1 .. E: E when use is even)
    top share          max_e usage_e                                   (1/E .. 1)

An upcycled model (every expert a copy of one dense MLP) starts with whatever split its fresh
router gives; as the copies diverge, the experts specialise and the split moves: this is the
"experts diverging" table of a model card and of `bench/upcycle.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence


def effective_experts(usage: Sequence[float]) -> float:
    """exp of the entropy of an expert-use distribution (zeros contribute nothing)."""
    total = sum(usage)
    if total <= 0:
        return 0.0
    return math.exp(-sum(p / total * math.log(p / total) for p in usage if p > 0))


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """log.jsonl's records by step, the last line of each step (a resumed run replays some)."""
    by_step = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def sample_steps(steps: Sequence[int], points: int) -> list[int]:
    """About `points` steps spread evenly over `steps`, the first and last among them."""
    if len(steps) <= points:
        return list(steps)
    picks = {steps[round(i * (len(steps) - 1) / (points - 1))] for i in range(points)}
    return sorted(picks)


def routing_history(records: Iterable[dict[str, Any]], points: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Per MoE layer key: [{step, usage, effective_experts, top_share}] at about `points` logged
    steps (first and last included). Records without routing (a dense run) give {}."""
    records = [r for r in records if r.get("routing")]
    if not records:
        return {}
    chosen = set(sample_steps([r["step"] for r in records], points))
    history: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["step"] not in chosen:
            continue
        for layer, stats in r["routing"].items():
            usage = stats["usage"]
            history.setdefault(layer, []).append({
                "step": r["step"], "usage": usage, "effective_experts": round(effective_experts(usage), 3),
                "top_share": round(max(usage), 4) if usage else 0.0})
    return dict(sorted(history.items(), key=lambda kv: (kv[0].split("/")[0], int(kv[0].rsplit("layer", 1)[1]))))


def history_table(history: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown rows: one per MoE layer and modality, one column per sampled step, each cell
    'effective experts / top share'."""
    if not history:
        return []
    steps = sorted({p["step"] for points in history.values() for p in points})
    lines = ["| layer | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for layer, points in history.items():
        at = {p["step"]: p for p in points}
        cells = [f"{at[s]['effective_experts']:.2f} / {at[s]['top_share']:.0%}" if s in at else "-" for s in steps]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines
