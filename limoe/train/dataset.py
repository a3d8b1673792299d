"""The one loader for every source: a weighted mix of prepared sources and users' data.

    ds = MixDataset("emoji:2,scenes:1,mnist:0.5", split="train", cache="/tmp/limoe-data")
    ds[i]  -> {"pixels": float32 (3, R, R), "caption": str, "label": str, "source": str,
               "style": str, "index": int}

A map-style Dataset: random access (`ds[i]`, `len(ds)`) is what deterministic, resumable
training needs. The trainer's step sampler (limoe.train.trainer.StepSampler, the one sampler) draws the
indices of step s from (seed, s) and `ds.sample_weights` (per item: source weight / source size,
so sources are drawn in proportion to their mix weights); torch's DistributedSampler works on it
unchanged.

Everything is a pure function of the seed: caption choice included.
Images go through limoe.runtime.preprocess (open_image, preprocess_image) exactly as at serving time.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from limoe.data.format import SPLITS, default_cache_dir
from limoe.data.readers import describe_ref, load_source, read_ref
from limoe.model.config import get_config
from limoe.runtime.preprocess import ImageError, PreprocessConfig, open_image, preprocess_image


@dataclass(frozen=True)
class MixEntry:
    source: str  # a prepared source's name, a directory, an index file or a shard pattern
    weight: float = 1.0


MixSpec = str | Mapping[str, float] | Sequence[str | tuple[str, float] | MixEntry]


def _split_top_level(s: str) -> list[str]:
    """Split on commas outside {...} (shard patterns such as "a-{000,001}.tar" contain commas)."""
    parts, depth, cur = [], 0, []
    for ch in s:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _entry_from_text(text: str) -> MixEntry:
    m = re.fullmatch(r"(.+?)(?::|=)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*", text)
    return MixEntry(m.group(1).strip(), float(m.group(2))) if m else MixEntry(text.strip(), 1.0)


def parse_mix(mix: MixSpec) -> list[MixEntry]:
    """"emoji:2,scenes:1,mnist:0.5" | {"emoji": 2, ...} | ["emoji", ("my.csv", 0.5)] -> [MixEntry]."""
    if isinstance(mix, str):
        entries = [_entry_from_text(p) for p in _split_top_level(mix)]
    elif isinstance(mix, Mapping):
        entries = [MixEntry(str(k), float(v)) for k, v in mix.items()]
    else:
        entries = []
        for e in mix:
            if isinstance(e, MixEntry):
                entries.append(e)
            elif isinstance(e, (str, Path)):
                entries.append(_entry_from_text(str(e)))
            else:
                entries.append(MixEntry(str(e[0]), float(e[1])))
    if not entries:
        raise ValueError("the data mix is empty")
    for e in entries:
        if not (e.weight >= 0 and math.isfinite(e.weight)):
            raise ValueError(f"mix weight of {e.source!r} must be a finite number >= 0, not {e.weight}")
    if sum(e.weight for e in entries) <= 0:
        raise ValueError("at least one mix weight must be positive")
    return entries


@dataclass
class SourceInfo:
    name: str  # what the items' "source" says (from the source's SOURCE.json or file name)
    spec: str  # as given in the mix
    weight: float
    start: int  # items [start, stop) of the dataset
    stop: int
    skipped: Counter = field(default_factory=Counter)

    @property
    def size(self) -> int:
        return self.stop - self.start


def _wanted(value: Any, allowed: Any) -> bool:
    if isinstance(allowed, (list, tuple, set, frozenset)):
        return value in allowed
    return value == allowed


class MixDataset(Dataset):
    """Every item of the mix's sources in the given split(s), as one map-style dataset.

    mix        what MixSpec allows (see parse_mix); names are looked up in `cache`
    split      "train" | "val" | "test" | "all" | a list of them
    preprocess PreprocessConfig (default: the `small` preset's: 64 px, CLIP mean/std)
    seed       for caption choice
    where      {"field": value or [values]} filters on item fields and extras, e.g.
               {"style": "twitter"} or {"heldout": [None, "style"]}
    verify     image check when loading users' data: "header" (default), "decode" or "none"
    return_captions  also return "captions" (all of them; default_collate cannot batch those)
    """

    def __init__(self, mix: MixSpec, split: str | Sequence[str] = "train", preprocess: PreprocessConfig | None = None,
                 cache: str | Path | None = None, seed: int = 0, where: Mapping[str, Any] | None = None,
                 verify: str | None = None, return_captions: bool = False):
        self.entries = parse_mix(mix)
        self.splits = tuple(SPLITS) if split == "all" else ((split,) if isinstance(split, str) else tuple(split))
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            raise ValueError(f"unknown split(s) {bad}; use {SPLITS} or 'all'")
        self.preprocess = preprocess or PreprocessConfig.from_model_config(get_config("small"))
        self.cache = Path(cache).expanduser() if cache is not None else default_cache_dir()
        self.seed, self.epoch, self.return_captions = int(seed), 0, return_captions
        self.where = dict(where or {})
        self.items: list[dict[str, Any]] = []
        self.sources: list[SourceInfo] = []
        self.decode_failures: Counter = Counter()
        names: Counter = Counter()
        for entry in self.entries:
            name, records, skipped = load_source(entry.source, self.cache, verify)
            names[name] += 1
            if names[name] > 1:
                name = f"{name}-{names[name]}"
            start = len(self.items)
            for r in records:
                if r["split"] in self.splits and all(
                        _wanted(r.get(k, r["extras"].get(k)), v) for k, v in self.where.items()):
                    self.items.append(r)
            self.sources.append(SourceInfo(name, entry.source, entry.weight, start, len(self.items), skipped))
        if not self.items:
            raise ValueError(f"no items in split {self.splits} of mix {[e.source for e in self.entries]}"
                             + (f" where {self.where}" if self.where else ""))
        self._source_of = np.zeros(len(self.items), np.int64)
        for k, s in enumerate(self.sources):
            self._source_of[s.start:s.stop] = k

    # -- map-style access ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Changes which caption __getitem__ picks."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Item i with its caption drawn by np.random.default_rng([seed, epoch, i])."""
        i = int(i)
        j, pixels = self._pixels(i)
        item = self.items[j]
        caps = item["captions"]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        out = {"pixels": pixels, "caption": caps[int(rng.integers(len(caps)))] if len(caps) > 1 else caps[0],
               "label": item["label"], "source": item["source"], "style": item["style"], "index": j}
        if self.return_captions:
            out["captions"] = list(caps)
        return out

    def load_image(self, i: int):
        """The decoded Pillow image of item i (raises limoe.runtime.preprocess.ImageError)."""
        return open_image(read_ref(self.items[i]["ref"]))

    def _pixels(self, i: int) -> tuple[int, np.ndarray]:
        """(index actually used, pixels). An image that fails to decode is replaced by the next
        decodable item of the same source (deterministic), with a warning and a count."""
        src = self.sources[int(self._source_of[i])]
        j = i
        for _ in range(src.size):
            try:
                return j, preprocess_image(self.load_image(j), self.preprocess)
            except (ImageError, OSError) as e:
                self.decode_failures[src.name] += 1
                warnings.warn(f"{src.name}: skipping undecodable image {describe_ref(self.items[j]['ref'])} ({e}); "
                              f"{sum(self.decode_failures.values())} so far in this process", stacklevel=3)
                j = src.start + (j - src.start + 1) % src.size
        raise ImageError(f"{src.name}: no image of this source can be decoded")

    # -- mixing ----------------------------------------------------------------------------------
    @property
    def sample_weights(self) -> np.ndarray:
        """Per-item probabilities (summing to 1) under which each source is drawn in proportion
        to its mix weight, uniformly within the source (what limoe.train.trainer.StepSampler uses)."""
        w = np.zeros(len(self.items), np.float64)
        active = [s for s in self.sources if s.size and s.weight > 0]
        total = sum(s.weight for s in active)
        for s in active:
            w[s.start:s.stop] = s.weight / total / s.size
        return w

    # -- reporting -------------------------------------------------------------------------------
    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Items dropped while loading (bad records, missing or unreadable images), per source and reason."""
        return {s.name: dict(s.skipped) for s in self.sources if s.skipped}

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}×{s.weight:g}: {s.size}" for s in self.sources)
        return f"MixDataset(split={'+'.join(self.splits)}, {len(self)} items; {parts})"


__all__ = ["MixDataset", "MixEntry", "MixSpec", "SourceInfo", "parse_mix"]
