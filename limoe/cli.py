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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="limoe", description="LIMoE: Language-Image Mixture of Experts")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="total and active parameters and FLOPs of model presets")
    info.add_argument("preset", nargs="*", default=["all"], help="preset names (default: all)")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
