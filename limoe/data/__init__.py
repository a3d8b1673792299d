"""Training data for LIMoE: built-in sources (emoji, icons, mnist, scenes, and the SVG-rendered
emoji_art and iconsets) prepared into a common on-disk format, readers for users' CSV/JSONL
indexes and WebDataset shards. Torch-free: the weighted-mix loader that training reads them
through is limoe.train.dataset.MixDataset. See docs/DATA.md.
"""

from limoe.data.format import SPLITS, default_cache_dir, split_for
from limoe.data.licenses import LICENSES, attribution_markdown, licenses_for
from limoe.data.prepare import SOURCES, format_info, info, prepare

__all__ = ["LICENSES", "SOURCES", "SPLITS", "attribution_markdown", "default_cache_dir", "format_info", "info",
           "licenses_for", "prepare", "split_for"]
