"""Evaluation: zero-shot classification, image-text retrieval and routing analysis.

Everything works on an encoder pair (limoe.runtime.encoders.Encoders: numpy in, EncoderOutput out), so
a torch checkpoint (`limoe.export.torch_encoders.checkpoint_encoders`) and an exported store entry
(`OnnxEncoders.from_entry`, no torch) are evaluated by the same code.

Routing analysis (the paper's Section 5): per MoE layer, each expert's share of image versus
text tokens (normalised per modality, since images have more tokens than texts), the usage
entropy per modality, the dropped-token rate per modality, and how many experts are
image-only, text-only or shared.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from limoe.runtime.encoders import Encode, EncoderOutput, Encoders
from limoe.runtime.routing_counts import expert_counts
from limoe.runtime.templates import DEFAULT_TEMPLATES
from limoe.runtime.zeroshot import build_zero_shot_classifier

MODALITY_ONLY = 0.9  # an expert is "image-only" when >= 90% of its normalised load is image tokens


def encode_batched(encode: Encode, x: np.ndarray, batch: int = 64) -> EncoderOutput:
    """`encode` over `x` in batches of `batch`, the outputs concatenated."""
    parts = [encode(x[i:i + batch]) for i in range(0, len(x), batch)]
    return EncoderOutput(*(np.concatenate(field) for field in zip(*parts)))


# -- metrics -------------------------------------------------------------------------------------
def topk_accuracy(scores: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """scores (N, C), targets (N,) -> {"top1": ..., "top5": ...}; k is capped at C."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return {f"top{k}": float((order[:, :min(k, scores.shape[1])] == targets[:, None]).any(1).mean()) for k in ks}


def n_way_accuracy(scores: np.ndarray, targets: np.ndarray, n: int = 10, seed: int = 0) -> float:
    """Top-1 among the true class and n-1 other classes drawn at random per image (seeded): what a
    user sees who sends a short list of candidate labels. Ties count as wrong. With C <= n
    classes it is plain top-1 over all of them."""
    N, C = scores.shape
    if C <= n:
        return topk_accuracy(scores, targets, ks=(1,))["top1"]
    rng = np.random.default_rng(seed)
    # n-1 distinct distractors per row: a random permutation of the other C-1 classes, cut.
    others = np.argsort(rng.random((N, C - 1)), axis=1)[:, :n - 1]  # (N, n-1) in [0, C-1)
    others += others >= targets[:, None]  # skip the true class
    true = scores[np.arange(N), targets]  # (N,)
    return float((true[:, None] > np.take_along_axis(scores, others, axis=1)).all(1).mean())


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Pair i is (image i, text i). Recall@k both ways."""
    sim = image_emb @ text_emb.T  # (N, N)
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        rank = (s > np.diag(s)[:, None]).sum(1)  # how many candidates beat the true pair
        for k in ks:
            out[f"{name}_r@{k}"] = float((rank < k).mean())
    return out


def routing_analysis(per_modality: dict[str, tuple[np.ndarray, np.ndarray]], layers: Sequence[int],
                     num_experts: int) -> dict:
    """per_modality[m] = (expert_index (N, M, T, K), dropped) over an eval set."""
    report = {"layers": []}
    counted = {m: expert_counts(index, dropped, num_experts) for m, (index, dropped) in per_modality.items()}
    for li, layer in enumerate(layers):
        usage, dropped_rate, entropy = {}, {}, {}
        for modality, (routed, lost) in counted.items():
            counts = routed[li].astype(np.float64)
            usage[modality] = counts / max(1.0, counts.sum())
            dropped_rate[modality] = float(lost[li].sum() / max(1, routed[li].sum() + lost[li].sum()))
            p = usage[modality][usage[modality] > 0]
            entropy[modality] = float(-(p * np.log(p)).sum())
        image, text = usage.get("image", np.zeros(num_experts)), usage.get("text", np.zeros(num_experts))
        total = image + text
        share = np.divide(image, total, out=np.full(num_experts, np.nan), where=total > 0)
        kinds = ["unused" if t < 1e-3 else "image" if s >= MODALITY_ONLY else "text" if s <= 1 - MODALITY_ONLY
                 else "shared" for s, t in zip(share, total)]
        report["layers"].append({
            "layer": layer,
            "usage": {m: u.round(4).tolist() for m, u in usage.items()},
            "image_share": [None if math.isnan(s) else round(float(s), 4) for s in share],
            "usage_entropy": {m: round(v, 4) for m, v in entropy.items()},
            "max_entropy": round(math.log(num_experts), 4),
            "dropped_rate": {m: round(v, 4) for m, v in dropped_rate.items()},
            "experts": {k: kinds.count(k) for k in ("image", "text", "shared", "unused")},
        })
    return report


# -- the evaluation ------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One zero-shot task: images with a class label each (and a caption for retrieval)."""

    name: str
    pixels: np.ndarray  # (N, 3, R, R)
    labels: list[str]  # (N,) class names, used as the zero-shot class prompts
    captions: list[str] | None = None  # (N,) for retrieval; None skips it
    groups: list[str] | None = None  # (N,) e.g. the emoji category: also top-1 among the group's classes


def group_top1(scores: np.ndarray, targets: np.ndarray, classes: Sequence[str], labels: Sequence[str],
               groups: Sequence[str]) -> tuple[float, float]:
    """Top-1 among only the classes of each image's group (e.g. all labels of an emoji's
    category), and the mean number of classes an image competes with. A class belongs to the
    group of the images labelled with it."""
    class_group = {label: group for label, group in zip(labels, groups)}
    cg = np.array([class_group[c] for c in classes])  # (C,)
    same = cg[None, :] == np.asarray(groups)[:, None]  # (N, C)
    masked = np.where(same, scores, -np.inf)
    return float((masked.argmax(1) == targets).mean()), float(same.sum(1).mean())


def evaluate(enc: Encoders, sets: Sequence[EvalSet], templates: Sequence[str] = DEFAULT_TEMPLATES,
             max_retrieval: int = 1000) -> dict:
    results: dict = {"zero_shot": {}, "retrieval": {}}
    routing_images, routing_texts = [], []
    for s in sets:
        classes = sorted(set(s.labels))
        targets = np.array([classes.index(label) for label in s.labels])
        img_emb, img_idx, img_drop = encode_batched(enc.encode_images, s.pixels)
        routing_images.append((img_idx, img_drop))
        w = build_zero_shot_classifier(lambda ids: encode_batched(enc.encode_tokens, ids).embeddings, enc.tokenizer,
                                       classes, templates)
        scores = img_emb @ w  # (N, C)
        results["zero_shot"][s.name] = {**topk_accuracy(scores, targets), "top1_of_10": n_way_accuracy(scores, targets),
                                        "classes": len(classes), "images": len(s.labels)}
        if s.groups:
            top1, per_group = group_top1(scores, targets, classes, s.labels, s.groups)
            results["zero_shot"][s.name].update(top1_in_group=top1, classes_per_group=round(per_group, 1))
        if s.captions:
            n = min(max_retrieval, len(s.captions))
            txt_emb, txt_idx, txt_drop = encode_batched(enc.encode_tokens, enc.tokenizer.encode(s.captions[:n]))
            routing_texts.append((txt_idx, txt_drop))
            results["retrieval"][s.name] = {**retrieval_recall(img_emb[:n], txt_emb), "pairs": n}
    if enc.moe.layers and routing_images:
        per_modality = {"image": tuple(np.concatenate([r[j] for r in routing_images]) for j in range(2))}
        if routing_texts:
            per_modality["text"] = tuple(np.concatenate([r[j] for r in routing_texts]) for j in range(2))
        results["routing"] = routing_analysis(per_modality, enc.moe.layers, enc.moe.num_experts)
    return results


def with_capacity(results: dict, capacity: dict, factor: float) -> dict:
    """`results` (dropless) plus, under "capacity", the zero-shot results and drop rates of the
    same weights at capacity routing with inference capacity factor `factor`, for side by side."""
    drops = {}
    for r in capacity.get("routing", {}).get("layers", []):
        for m, v in r["dropped_rate"].items():
            drops.setdefault(m, []).append(v)
    return {**results, "capacity": {"eval_capacity_factor": factor, "zero_shot": capacity["zero_shot"],
                                    "dropped_rate": {m: round(float(np.mean(v)), 4) for m, v in drops.items()}}}


def format_results(results: dict) -> str:
    cap = results.get("capacity")
    extra = f" {'cap top-1':>9s} {'cap 10-way':>10s}" if cap else ""
    lines = [f"{'zero-shot':50s} {'top-1':>7s} {'top-5':>7s} {'10-way':>7s} {'classes':>8s} {'images':>7s}{extra}"]
    for name, r in results["zero_shot"].items():
        ten = f"{r['top1_of_10']:7.2%}" if "top1_of_10" in r else f"{'-':>7s}"
        c = (cap or {}).get("zero_shot", {}).get(name)
        side = f" {c['top1']:9.2%} {c.get('top1_of_10', float('nan')):10.2%}" if c else ""
        lines.append(f"{name:50s} {r['top1']:7.2%} {r['top5']:7.2%} {ten} {r['classes']:8d} {r['images']:7d}{side}")
        if "top1_in_group" in r:
            lines.append(f"{'':4s}top-1 among the labels of the image's category "
                         f"({r['classes_per_group']:.0f} on average): {r['top1_in_group']:.2%}")
    if cap:
        dropped = ", ".join(f"{m} {v:.1%}" for m, v in cap.get("dropped_rate", {}).items())
        lines.append(f"(top-1 / 10-way on the left: this model's inference routing; 'cap': capacity routing at "
                     f"factor {cap['eval_capacity_factor']}, which drops {dropped or 'nothing'} of token choices)")
    if results["retrieval"]:
        lines.append(f"\n{'retrieval':50s} {'i->t@1':>7s} {'i->t@5':>7s} {'t->i@1':>7s} {'t->i@5':>7s}")
        for name, r in results["retrieval"].items():
            lines.append(f"{name:50s} {r['image_to_text_r@1']:7.2%} {r['image_to_text_r@5']:7.2%} "
                         f"{r['text_to_image_r@1']:7.2%} {r['text_to_image_r@5']:7.2%}")
    if "routing" in results:
        lines.append(f"\n{'routing layer':14s} {'H(img)':>7s} {'H(txt)':>7s} {'drop img':>9s} {'drop txt':>9s} "
                     f"{'img-only':>9s} {'txt-only':>9s} {'shared':>7s} {'unused':>7s}")
        for r in results["routing"]["layers"]:
            e, d, k = r["usage_entropy"], r["dropped_rate"], r["experts"]
            lines.append(f"{r['layer']:<14d} {e.get('image', 0):7.3f} {e.get('text', 0):7.3f} "
                         f"{d.get('image', 0):9.2%} {d.get('text', 0):9.2%} {k['image']:9d} {k['text']:9d} "
                         f"{k['shared']:7d} {k['unused']:7d}")
    return "\n".join(lines)


def write_results(results: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


PLOT_FILES = {"plot_expert_usage": "expert_usage.png", "plot_routing_maps": "routing_maps.png"}


def record_evaluation(target: str | Path, results: dict) -> None:
    """Keep the results with the model: in a store entry's manifest ("evaluation"), or in a
    checkpoint's metadata (extra["eval"]), from where `limoe export` copies them. An entry's
    routing plots (PLOT_FILES, written next to the manifest) join its checked files and its card."""
    target = Path(target)
    if target.is_dir():
        from limoe.export.model_card import rewrite_entry
        from limoe.runtime.model_store import file_record

        def change(manifest: dict) -> None:
            manifest["evaluation"] = results
            for role, file in PLOT_FILES.items():
                if (target / file).is_file():
                    manifest["roles"][role] = file
                    manifest["files"][file] = file_record(target / file)

        rewrite_entry(target, change)
    else:
        from limoe.model.checkpoint import load_checkpoint, read_tokenizer, save_checkpoint

        model, extra = load_checkpoint(target)
        save_checkpoint(model, target, extra={**extra, "eval": results}, tokenizer=read_tokenizer(target))


# -- plots ---------------------------------------------------------------------------------------
def plot_expert_usage(routing: dict, path: str | Path) -> Path:
    """One panel per MoE layer: each expert's share of image tokens and of text tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = routing["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 2.8), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], layers):
        e = np.arange(len(r["usage"]["image"]))
        ax.bar(e - 0.2, r["usage"]["image"], 0.4, label="image tokens", color="#1f77b4")
        if "text" in r["usage"]:
            ax.bar(e + 0.2, r["usage"]["text"], 0.4, label="text tokens", color="#ff7f0e")
        k = r["experts"]
        ax.set_title(f"layer {r['layer']}: {k['image']} img / {k['text']} txt / {k['shared']} shared", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_xticks(e)
    axes[0][0].set_ylabel("share of the modality's tokens")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_routing_maps(pixels: np.ndarray, expert_index: np.ndarray, dropped: np.ndarray, layers: Sequence[int],
                      num_experts: int, mean: Sequence[float], std: Sequence[float], path: str | Path) -> Path:
    """Rows: sample images; columns: the image, then each MoE layer's top-1 expert per patch
    (white: the patch was dropped at capacity and skipped the expert layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, m = len(pixels), len(layers)
    side = int(round(math.sqrt(expert_index.shape[2])))
    cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20", num_experts)
    fig, axes = plt.subplots(n, m + 1, figsize=(1.6 * (m + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        img = pixels[i].transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
        axes[i][0].imshow(np.clip(img, 0, 1))
        for j in range(m):
            grid = expert_index[i, j, :, 0].reshape(side, side).astype(float)
            grid[(grid < 0) | dropped[i, j, :, 0].reshape(side, side)] = np.nan
            axes[i][j + 1].imshow(grid, cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5)
            if i == 0:
                axes[i][j + 1].set_title(f"layer {layers[j]}", fontsize=8)
        if i == 0:
            axes[i][0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
