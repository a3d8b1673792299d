"""`limoe data prepare` and `limoe data info`. Wire into limoe/cli.py with add_data_parser(sub)."""

from __future__ import annotations

import argparse
import json
import sys

from limoe.data.prepare import SOURCES


def _cmd_prepare(args: argparse.Namespace) -> int:
    from limoe.data.prepare import format_info, prepare

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    style = None if args.emoji_holdout_style in ("none", "") else args.emoji_holdout_style
    concepts = [c for c in (args.emoji_holdout_concepts or "").split(",") if c.strip()]
    art_held = None
    if args.emoji_art_holdout_styles is not None:
        art_held = [s.strip() for s in args.emoji_art_holdout_styles.split(",") if s.strip() and s.strip() != "none"]
    try:
        metas = prepare(sources, args.cache, args.force, scenes_count=args.scenes_count, scenes_seed=args.scenes_seed,
                        emoji_holdout_style=style, emoji_holdout_concepts=concepts,
                        emoji_art_holdout_styles=art_held, workers=args.workers)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_info(metas))
    for name, meta in metas.items():
        print(f"{name}: {meta['items']} items in {meta['seconds']:.1f}s")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from limoe.data.format import default_cache_dir
    from limoe.data.prepare import format_info, info

    metas = info(args.cache)
    if args.json:
        print(json.dumps(metas, indent=2, ensure_ascii=False))
    elif not metas:
        print(f"no prepared sources in {args.cache or default_cache_dir()} (run `limoe data prepare`)")
    else:
        print(format_info(metas))
    return 0


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Add `data` (with `prepare` and `info`) to an argparse subparsers object; each leaf sets
    `func` (returns an exit code), as limoe/cli.py's commands do."""
    data = subparsers.add_parser("data", help="prepare and inspect training data (emoji, icons, mnist, scenes, "
                                              "emoji_art, iconsets)")
    sub = data.add_subparsers(dest="data_command", required=True)

    prep = sub.add_parser("prepare", help="fetch/render the built-in sources into the cache (idempotent)")
    prep.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated (default {','.join(SOURCES)})")
    prep.add_argument("--cache", help="cache directory (default $LIMOE_DATA_CACHE or ~/.cache/limoe/data)")
    prep.add_argument("--force", action="store_true", help="rebuild sources that are already prepared")
    prep.add_argument("--scenes-count", type=int, default=10_000, help="number of procedural scenes (default 10000)")
    prep.add_argument("--scenes-seed", type=int, default=0)
    prep.add_argument("--emoji-holdout-style", default="twitter", choices=["twitter", "google", "none"],
                      help="art style kept entirely in 'test' (default twitter)")
    prep.add_argument("--emoji-holdout-concepts", default="",
                      help="comma-separated emoji labels, codes or categories forced into 'test'")
    prep.add_argument("--emoji-art-holdout-styles", default=None,
                      help="comma-separated emoji_art styles kept entirely in 'test', or 'none' (default: the "
                           "art of --emoji-holdout-style: twemoji for twitter, noto for google)")
    prep.add_argument("--workers", type=int, default=None,
                      help="processes rendering SVG for emoji_art and iconsets (default: 2, or 1 on one core)")
    prep.set_defaults(func=_cmd_prepare)

    inf = sub.add_parser("info", help="items per source, style and split in the cache")
    inf.add_argument("--cache", help="cache directory (default $LIMOE_DATA_CACHE or ~/.cache/limoe/data)")
    inf.add_argument("--json", action="store_true", help="print every SOURCE.json")
    inf.set_defaults(func=_cmd_info)
    return data


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: python -m limoe.data.cli data prepare ..."""
    parser = argparse.ArgumentParser(prog="limoe")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
