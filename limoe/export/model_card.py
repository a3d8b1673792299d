"""MODEL_CARD.md for a model-store entry, rendered from what the entry knows about itself:
its config and parameter counts, the training run recorded in the checkpoint, the evaluation
results and the data sources' licences. Torch-free."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from limoe.runtime.templates import DEFAULT_TEMPLATES


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _evaluation(ev: dict[str, Any]) -> list[str]:
    if not ev or not ev.get("zero_shot"):
        return ["No evaluation recorded (run `limoe eval` on the checkpoint before exporting, or on this entry)."]
    prompts = ", ".join(f"`{t}`" for t in ev.get("templates") or []) or "the default prompt templates"
    lines = [f"Zero-shot classification (prompts: {prompts}; over all the set's classes; 10-way: the true "
             "class against 9 random others, like a user sending a short label list):", ""]
    cap = ev.get("capacity") or {}
    cap_sets = cap.get("zero_shot", {})
    head = ["set", "top-1", "top-5", "10-way top-1", "classes", "images"]
    if cap_sets:
        head += [f"top-1 at capacity {cap['eval_capacity_factor']}", "10-way at capacity"]
    lines += _table(head,
                    [[n, f"{r['top1']:.1%}", f"{r['top5']:.1%}",
                      f"{r['top1_of_10']:.1%}" if "top1_of_10" in r else "-", str(r["classes"]), str(r["images"])]
                     + ([f"{cap_sets[n]['top1']:.1%}" if n in cap_sets else "-",
                         f"{cap_sets[n].get('top1_of_10', 0):.1%}" if n in cap_sets else "-"] if cap_sets else [])
                     for n, r in ev["zero_shot"].items()])
    grouped = [(n, r) for n, r in ev["zero_shot"].items() if "top1_in_group" in r]
    if grouped:
        lines += [""] + [f"- {n}: top-1 among the labels of the image's category ({r['classes_per_group']:.0f} on "
                         f"average) **{r['top1_in_group']:.1%}**" for n, r in grouped]
    if cap_sets:
        dropped = ", ".join(f"{m} {v:.1%}" for m, v in cap.get("dropped_rate", {}).items())
        lines += ["", f"The last two columns run the same weights with capacity routing (one routing group per "
                      f"example, capacity factor {cap['eval_capacity_factor']}), which drops {dropped} of the token "
                      "choices; the others are the entry's own (dropless) inference."]
    if ev.get("retrieval"):
        lines += ["", "Image-text retrieval (recall):", ""]
        lines += _table(["set", "image->text @1", "@5", "text->image @1", "@5"],
                        [[n, f"{r['image_to_text_r@1']:.1%}", f"{r['image_to_text_r@5']:.1%}",
                          f"{r['text_to_image_r@1']:.1%}", f"{r['text_to_image_r@5']:.1%}"]
                         for n, r in ev["retrieval"].items()])
    if ev.get("routing"):
        lines += ["", "Routing (per MoE layer; entropies in nats, max log E):", ""]
        lines += _table(["layer", "usage entropy image / text", "dropped image / text", "experts image / text / shared / unused"],
                        [[str(r["layer"]),
                          f"{r['usage_entropy'].get('image', 0):.2f} / {r['usage_entropy'].get('text', 0):.2f}",
                          f"{r['dropped_rate'].get('image', 0):.1%} / {r['dropped_rate'].get('text', 0):.1%}",
                          " / ".join(str(r["experts"][k]) for k in ("image", "text", "shared", "unused"))]
                         for r in ev["routing"]["layers"]])
    return lines


def _plots(roles: dict[str, str]) -> list[str]:
    captions = {"plot_expert_usage": "Expert usage by modality, per MoE layer",
                "plot_routing_maps": "Each patch's expert per MoE layer for sample images (white: dropped)"}
    return [line for role, caption in captions.items() if role in roles
            for line in ("", f"{caption}:", "", f"![{caption}]({roles[role]})")]


def _reproduce(manifest: dict[str, Any], training: dict[str, Any] | None) -> list[str]:
    """The commands that rebuild this entry from its recorded training run."""
    from limoe.model.config import (
        PRESETS,
        LIMoEConfig,
        dense_counterpart,
        two_tower_counterpart,
    )

    if not training or "train" not in training:
        return []
    t = training["train"]
    cfg = LIMoEConfig.from_dict(manifest["config"]).to_dict()  # fields added later take their defaults
    variants = {"": lambda c: c, " --dense": dense_counterpart, " --arch two_tower": two_tower_counterpart}

    def differing(base: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if base.get(k) != v}

    # The preset and variant the config is closest to; the fields it changes become --set flags.
    diff, preset, flag = min(((differing(make(c).to_dict()), n, f) for n, c in PRESETS.items()
                              for f, make in variants.items()), key=lambda x: len(x[0]))
    sets = "".join(f" --set {k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in diff.items())
    roles = manifest.get("roles", {})
    formats = [f for f, role in (("onnx", "image_onnx"), ("torchscript", "torchscript"), ("int8", "image_onnx_int8"))
               if role in roles]
    init = training.get("init")  # a fine-tuning run: the config and vocabulary came with the checkpoint
    start = f"--init {shlex.quote(init['checkpoint'])}" if init else f"--preset {preset}{flag}{sets}"
    recipe_flags = ("template_prob", "unmasked_steps") + (("teacher", "teacher_weight") if t.get("teacher") else ())
    recipe = "".join(f" --{k.replace('_', '-')} {t[k]}" for k in recipe_flags if t.get(k))
    recipe += " --multi-positive" if t.get("multi_positive") else ""
    averaged = training.get("averaged")  # the weights are the mean of the run's last kept checkpoints
    recipe += f" --keep-every {t.get('keep_every')}" if averaged else ""
    train = (f"limoe train {start} --data {training.get('data', 'MIX')} --out run "
             f"--steps {t.get('steps')} --batch-size {t.get('batch_size')} --lr {t.get('lr')} "
             f"--warmup {t.get('warmup_steps')} --seed {t.get('seed')}{recipe}")
    weights = "run/averaged.safetensors" if averaged else "run/model.safetensors"
    average = ["limoe average " + " ".join(f"run/{'' if n == 'model.safetensors' else 'steps/'}{n}"
                                          for n in averaged["checkpoints"]) + f" --out {weights}"] if averaged else []
    templates = manifest.get("templates") or list(DEFAULT_TEMPLATES)
    flags = "" if tuple(templates) == tuple(DEFAULT_TEMPLATES) else "".join(f" --template {shlex.quote(t)}"
                                                                             for t in templates)
    lines = ["", "Reproduce (same data, seed and batches; floating-point results vary slightly across machines):", "",
             "```bash", "limoe data prepare", *_upcycle_command(init), train, *average,
             f"limoe eval {weights}{flags}  # dropless and capacity 1.0 side by side, kept for the card",
             f"limoe export {weights} --name {manifest['name']} --formats {','.join(formats)}"
             + (f" --calibration-data {training['data']}" if "int8" in formats and training.get("data") else "")
             + flags,
             f"limoe eval model_store/{manifest['name']}/{manifest['version']}", "```"]
    if averaged:
        lines[1:1] = [f"The weights are the mean of the run's checkpoints at steps {averaged['steps']} "
                      "(latest weight averaging, `limoe average`).", ""]
    recovered = (manifest.get("source_checkpoint") or {}).get("recovered_from")
    if recovered:  # the shipped weights are an earlier entry's graphs', not the run's checkpoint
        lines += ["", f"The training run's fp32 checkpoint was not kept: this entry's weights are "
                      f"those of `{recovered['entry']}`'s {recovered['graphs']} graphs as exported on "
                      f"{str(recovered.get('created'))[:10]}, rebuilt with `limoe recover` "
                      f"(against those graphs: embedding cosine mean {recovered['agreement']['image_cosine_mean']:.5f} "
                      f"image, {recovered['agreement']['text_cosine_mean']:.5f} text) and exported as above. The "
                      "commands above retrain the model; its weights then differ from these by the int8 rounding "
                      "and the run's floating-point noise."]
    if init and init.get("upcycled_from"):
        up = init["upcycled_from"]
        lines.insert(1, f"Sparse upcycling: `{init['checkpoint']}` is the dense `{up['checkpoint']}`"
                        + (f" (trained {up['step']} steps)" if up.get("step") else "")
                        + f" with its MLPs in blocks `{up['moe_layers']}` copied into {up['experts']} experts each, "
                        f"top-{up['top_k']} renormalised, then trained on.")
    elif init:
        lines.insert(1, f"Fine-tuned from `{init['checkpoint']}` (trained {init.get('step', '?')} steps"
                        + (f" on `{init['data']}`" if init.get("data") else "") + "): pass the config fields "
                        "that changed with `--set FIELD=VALUE` (see `config` in the manifest).")
    elif preset is None:
        lines.insert(1, "The config is no preset: pass the fields that differ (see `config` in the manifest) "
                        "with `--set FIELD=VALUE`.")
    return lines


def _upcycle_command(init: dict[str, Any] | None) -> list[str]:
    up = (init or {}).get("upcycled_from")
    if not up:
        return []
    every = str(up["moe_layers"]).removeprefix("every_")
    return [f"limoe upcycle {shlex.quote(up['checkpoint'])} --experts {up['experts']} --top-k {up['top_k']} "
            f"--moe-every {every} --out {shlex.quote(init['checkpoint'])}"]


def routing_over_training(training: dict[str, Any] | None) -> list[str]:
    """The run's routing at a few logged steps: how far the experts' use moved apart."""
    from limoe.train.routing_log import history_table

    history = (training or {}).get("routing_history")
    if not history:
        return []
    return ["", "## Routing over training", "",
            "Per MoE layer and modality, at a few of the run's logged steps: the effective number of experts "
            "(exp of the entropy of the expert-use split; the expert count when use is even) / the busiest expert's "
            "share of the token choices (at most 1/K with top-K routing). In an upcycled model every expert starts "
            "as the same MLP: the split moving away from the router's first one is the experts diverging. Every "
            "expert's share at each of these steps is in manifest.json (`routing_history`).", ""
            ] + history_table(history)


def score_over_training(training: dict[str, Any] | None) -> list[str]:
    """The kept weights' mean 10-way against the run's minutes of steps (bench/small2_report.py --entry)."""
    curve = (training or {}).get("score_curve")
    if not curve:
        return []
    sets = sorted(curve[-1].get("sets", {}))
    return ["", "## Score against training minutes", "",
            "Mean 10-way top-1 over the held-out sets" + (f" ({', '.join(sets)})" if sets else "")
            + " of the weights the run kept along the way, evaluated dropless, against the run's own minutes of "
            "steps on the machine that trained it:", ""
            ] + _table(["step", "minutes of steps", "mean 10-way top-1"],
                       [[str(c["step"]), f"{c['step_minutes']:.1f}", f"{c['mean_10way']:.1%}"] for c in curve])


def _weak_spots(ev: dict[str, Any]) -> list[str]:
    """Evaluation sets where top-1 is under twice chance: say so plainly."""
    out = []
    for name, r in (ev.get("zero_shot") or {}).items():
        chance = 1 / max(1, r["classes"])
        if r["top1"] < 2 * chance and r["classes"] <= 20:
            out.append(f"- **{name}: at chance** ({r['top1']:.1%} top-1 with {r['classes']} classes, chance "
                       f"{chance:.1%}): the model has not learned to tell these classes apart.")
    return out


def _drops(moe: dict[str, Any]) -> bool:
    return moe.get("inference_routing", "capacity") == "capacity"


def _inference(moe: dict[str, Any]) -> str:
    """Entries written before dropless inference existed have no `inference_routing`: capacity."""
    if moe.get("inference_routing", "capacity") == "dropless":
        op = " (ONNX Runtime's fused `com.microsoft.MoE` op)" if moe.get("onnx_op") == "fused" else ""
        return f"dropless: every token's {moe['top_k']} choice(s) computed, nothing dropped{op}"
    return (f"capacity factor {moe['eval_capacity_factor']} per example (tokens over an expert's capacity "
            "are dropped)")


def _what(cfg: dict[str, Any], moe: dict[str, Any]) -> str:
    """One sentence: what kind of model the entry is (LIMoE, or one of its baselines)."""
    if cfg.get("arch", "one_tower") == "two_tower":
        return ("A two-tower (CLIP-style) zero-shot image classifier, the baseline LIMoE (Mustafa et al. 2022) is "
                "compared with: an image transformer and a text transformer that share no weight, trained "
                "contrastively.")
    if not moe["layers"]:
        return ("A dense one-tower zero-shot image classifier, the baseline LIMoE (Mustafa et al. 2022) is compared "
                "with: one transformer shared by image patches and text tokens, every MLP dense, trained contrastively.")
    return ("A LIMoE (Language-Image Mixture of Experts, Mustafa et al. 2022) zero-shot image classifier: one "
            "transformer shared by image patches and text tokens, with sparse expert layers, trained contrastively.")


def _architecture(cfg: dict[str, Any], moe: dict[str, Any]) -> list[str]:
    """The config lines of the Model section that depend on towers and experts."""
    if not moe["layers"]:
        towers = ("two towers of this shape, one for images and one for texts" if cfg.get("arch") == "two_tower"
                  else "one tower for both modalities")
        return [f"- {towers}; no expert layers (every MLP dense), so nothing is routed"]
    return [f"- MoE in blocks {', '.join(map(str, moe['layers']))}: {moe['num_experts']} experts, top-{moe['top_k']}; "
            f"training capacity factor {cfg['train_capacity_factor']} with Batch Priority Routing "
            f"{'on' if moe['batch_priority'] else 'off'}; auxiliary loss `{cfg['aux_loss']}`",
            f"- inference: {_inference(moe)}"]


def render_model_card(manifest: dict[str, Any], training: dict[str, Any] | None = None,
                      stats: dict[str, Any] | None = None) -> str:
    """Markdown for the entry described by `manifest` (see model_store/README.md)."""
    from limoe.data.licenses import attribution_markdown

    cfg, moe = manifest["config"], manifest["moe"]
    lines = [f"# {manifest['name']} version {manifest['version']}", "", _what(cfg, moe), "", "## Model", ""]
    lines += [f"- width {cfg['width']}, depth {cfg['depth']}, {cfg['num_heads']} heads, MLP {cfg['mlp_dim']}, "
              f"embedding {cfg['embed_dim']}",
              f"- images {cfg['image_size']} px in {cfg['patch_size']} px patches; texts {cfg['context_length']} tokens, "
              f"vocabulary {cfg['vocab_size']}",
              *_architecture(cfg, moe)]
    if stats:
        lines.append(f"- {stats['total_params'] / 1e6:.2f}M parameters, {stats['active_params'] / 1e6:.2f}M active per "
                     f"token; {stats['image_flops'] / 1e9:.3f} GFLOPs per image, {stats['text_flops'] / 1e9:.4f} per text")
    lines += ["", "## Training", ""]
    if training:
        t = training.get("train", {})
        lines.append(f"- {training.get('step', '?')} steps of batch {t.get('batch_size', '?')} "
                     f"(= {int(training.get('step', 0)) * int(t.get('batch_size', 0)):,} image-text pairs), AdamW "
                     f"lr {t.get('lr', '?')}, warmup {t.get('warmup_steps', '?')}, cosine decay, seed {t.get('seed', '?')}")
        if training.get("data"):
            lines.append(f"- data mix `{training['data']}`" + (
                f": {', '.join(f'{k} {v:,} items' for k, v in training.get('sources', {}).items())}"
                if training.get("sources") else ""))
        recipe = [f"{k} {t[k]}" for k in ("unmasked_steps", "template_prob") if t.get(k)]
        if cfg.get("image_mask_ratio"):
            recipe.insert(0, f"masked patches (FLIP): {cfg['image_mask_ratio']:.0%} of each image's patches dropped")
        if cfg.get("contrastive_loss", "softmax") != "softmax":
            recipe.append(f"contrastive loss `{cfg['contrastive_loss']}`")
        if recipe:
            lines.append("- recipe: " + "; ".join(recipe))
        if teacher := training.get("teacher"):
            lines.append(f"- text teacher (training only; the entry holds no teacher): {teacher['attribution']}, "
                         f"weights licence {teacher['license']}, checksum {teacher['checksum'][:16]}, loss weight "
                         f"{teacher['weight']}; <{teacher['url']}>")
    else:
        lines.append("No training run recorded: this entry was exported from an untrained (initialised) checkpoint, "
                     "and its predictions are meaningless.")
    lines += _reproduce(manifest, training)
    lines += ["", "## Evaluation", ""] + _evaluation(manifest.get("evaluation") or {})
    lines += _plots(manifest.get("roles", {}))
    lines += routing_over_training(training)
    lines += score_over_training(training)
    sources = list((training or {}).get("sources") or {})
    lines += ["", attribution_markdown(sources).strip() if sources else
              "## Training data licences\n\nNo training data: the weights are as initialised.",
              "", "## Limitations and known biases", ""]
    lines += _weak_spots(manifest.get("evaluation") or {})
    lines += [
              "- Trained on small, narrow data (emoji, icons, handwritten digits, rendered shapes): it knows nothing "
              "of photographs, and labels outside these domains get arbitrary scores.",
              "- Emoji captions come from Unicode/CLDR English names: other languages, and the skin-tone and gender "
              "variants' names, reflect those naming conventions, not a neutral description.",
              "- Scores are a softmax over the labels you send: they rank those labels and always sum to 1, even when "
              "none of them fits.",
              "- Tokens over an expert's capacity are dropped (residual only); the `dropped` rates above show how much."
              if moe["layers"] and _drops(moe) else
              "- Inference is dropless: every token reaches the experts it chose, and an image's result never depends "
              "on the other images in its batch (int8 graphs included)." if moe["layers"] else
              "- An image's result never depends on the other images in its batch (int8 graphs included)."]
    return "\n".join(lines) + "\n"


def rewrite_entry(target: str | Path, change) -> None:
    """Apply `change(manifest)` to a store entry's manifest, then re-render its card (which shows the
    manifest) and the card's checksum, and replace the manifest atomically."""
    from limoe.runtime.model_store import MANIFEST, file_record, read_manifest

    target = Path(target)
    manifest = read_manifest(target).data
    change(manifest)
    card = manifest["roles"].get("model_card")
    if card:
        (target / card).write_text(render_model_card(manifest, manifest.get("training"), manifest.get("stats")),
                                   encoding="utf-8")
        manifest["files"][card] = file_record(target / card)
    tmp = target / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(target / MANIFEST)
