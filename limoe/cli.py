"""The `limoe` command. Subcommands import their (possibly heavy) dependencies lazily."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from limoe.config import PRESETS, get_config
    from limoe.stats import format_table

    names = list(PRESETS) if args.preset == ["all"] else args.preset
    try:
        configs = [get_config(n) for n in names]
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    print(format_table(names, configs))
    print("\nactive = all parameters but the experts a token skips; GFLOPs count a multiply-add as 2,"
          "\nper image / per text at K experts per token.")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    import torch

    from limoe.checkpoint import save_checkpoint
    from limoe.config import get_config
    from limoe.model import LIMoE
    from limoe.templates import DEFAULT_TEMPLATES
    from limoe.tokenizer import Tokenizer

    cfg = get_config(args.preset)
    if args.captions:
        with open(args.captions, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    else:  # the prompt templates around a few generic words: enough for a placeholder vocabulary
        words = ["object", "shape", "circle", "square", "triangle", "face", "animal", "red", "green", "blue"]
        texts = [t.replace("{}", w) for t in DEFAULT_TEMPLATES for w in words]
    tokenizer = Tokenizer.train(texts, vocab_size=cfg.vocab_size, context_length=cfg.context_length)
    torch.manual_seed(args.seed)
    path = save_checkpoint(LIMoE(cfg), args.output, extra={"init": {"preset": args.preset, "seed": args.seed}},
                           tokenizer=tokenizer)
    print(f"wrote an untrained {args.preset} checkpoint to {path} (tokenizer: {tokenizer.vocab_size} ids)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from limoe.export import export_entry
    from limoe.model_store import ModelStoreError
    from limoe.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    try:
        manifest = export_entry(args.checkpoint, args.store, args.name, args.version, args.quantize,
                                tokenizer=tokenizer, force=args.force,
                                **({"opset": args.opset} if args.opset else {}))
    except (ModelStoreError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {manifest.name} version {manifest.version} to {manifest.path} "
          f"in {manifest.data['export_seconds']:.1f}s")
    for file, record in manifest.data["files"].items():
        print(f"  {file:28s} {record['size'] / 1e6:8.2f} MB  sha256 {record['sha256'][:16]}")
    for modality, agreement in manifest.data["quantization"].get("int8", {}).items():
        print(f"  int8 {modality}: cosine mean {agreement['embedding_cosine_mean']:.5f}, "
              f"min {agreement['embedding_cosine_min']:.5f}, same experts {agreement['expert_choice_agreement']:.2%}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.cli import serve

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("model", args.model),
                                   ("model_version", args.version), ("backend", args.backend)) if v is not None}
    return serve(overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="limoe", description="LIMoE: Language-Image Mixture of Experts")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="total and active parameters and FLOPs of model presets")
    info.add_argument("preset", nargs="*", default=["all"], help="preset names (default: all)")
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
    export.add_argument("--quantize", choices=["int8"], help="also write int8 dynamically quantised ONNX graphs")
    export.add_argument("--tokenizer", help="tokenizer.json, when the checkpoint holds none")
    export.add_argument("--opset", type=int, help="ONNX opset (default: limoe.export.DEFAULT_OPSET)")
    export.add_argument("--force", action="store_true", help="replace an existing version")
    export.set_defaults(func=_cmd_export)

    serve = sub.add_parser("serve", help="run the HTTP service (settings from LIMOE_* variables)")
    serve.add_argument("--host", help="bind address (LIMOE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (LIMOE_PORT, default 8000)")
    serve.add_argument("--model", help="model name in the store, or an entry directory (LIMOE_MODEL)")
    serve.add_argument("--version", help="model version (LIMOE_MODEL_VERSION, default latest)")
    serve.add_argument("--backend", choices=["onnx", "torchscript"], help="LIMOE_BACKEND (default onnx)")
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
