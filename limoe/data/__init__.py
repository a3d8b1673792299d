"""Training data for LIMoE: built-in sources (emoji, icons, mnist, scenes, and the SVG-rendered
emoji_art and iconsets) prepared into a common on-disk format, readers for users' CSV/JSONL
indexes and WebDataset shards, and one weighted-mix loader (limoe.data.dataset.MixDataset).
See docs/DATA.md.

Importing this package does not import torch; `limoe.data.dataset` does.
"""

from limoe.data.format import SPLITS, default_cache_dir, split_for
from limoe.data.licenses import LICENSES, attribution_markdown, licenses_for
from limoe.data.prepare import SOURCES, format_info, info, prepare

_LAZY = {"MixDataset", "MixEntry", "parse_mix"}


def __getattr__(name: str):
    if name in _LAZY:
        from limoe.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'limoe.data' has no attribute {name!r}")


__all__ = ["LICENSES", "SOURCES", "SPLITS", "MixDataset", "MixEntry", "attribution_markdown", "default_cache_dir",
           "format_info", "info", "licenses_for", "parse_mix", "prepare", "split_for"]
