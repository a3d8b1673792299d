"""The standard evaluation sets over the prepared sources (see docs/DATA.md for what is held out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from limoe.eval.evaluate import EvalSet

# name -> (source, split, filter on item fields)
STANDARD_SETS = {
    "emoji_art/unseen-style (twemoji SVG, seen concepts)": ("emoji_art", "test",
                                                            {"style": "twemoji", "concept_split": "train"}),
    "iconsets/test (unseen icon names)": ("iconsets", "test", {}),
    "emoji/unseen-style (twitter art, seen concepts)": ("emoji", "test", {"style": "twitter", "concept_split": "train"}),
    "emoji/unseen-concepts (google art)": ("emoji", "test", {"style": "google"}),
    "icons/test": ("icons", "test", {}),
    "mnist/test": ("mnist", "test", {}),
    "scenes/held-out colour-shape pairs": ("scenes", "test", {"heldout": "combo"}),
}


def default_eval_sets(enc, cache: str | Path | None = None, limit: int = 2000, seed: int = 0) -> list[EvalSet]:
    """Every standard set whose source is prepared in `cache`, at most `limit` images each
    (a seeded subset, so runs compare on the same images)."""
    from limoe.train.dataset import MixDataset

    preprocess = enc.preprocess
    sets = []
    for name, (source, split, where) in STANDARD_SETS.items():
        try:
            ds = MixDataset(source, split=split, preprocess=preprocess, cache=cache, where=where, seed=seed)
        except (FileNotFoundError, ValueError):
            continue  # not prepared, or nothing matches
        idx = np.random.default_rng(seed).permutation(len(ds))[:limit]
        idx.sort()
        items = [ds.items[i] for i in idx]
        pixels = np.stack([ds[int(i)]["pixels"] for i in idx])
        # Emoji compete within their Unicode category too (the issue's "among all labels of an
        # emoji's category"); an emoji without one forms its own group "other".
        groups = ([it["extras"].get("category") or "other" for it in items] if source.startswith("emoji")
                  else None)
        sets.append(EvalSet(name, pixels, [it["label"] for it in items], [it["captions"][0] for it in items],
                            groups=groups))
    if not sets:
        raise ValueError(f"no prepared evaluation data in {cache or 'the default cache'}; run `limoe data prepare`")
    return sets
