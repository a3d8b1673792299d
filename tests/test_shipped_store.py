"""The model store committed to the repository is sound and runs on ONNX Runtime."""

from pathlib import Path

import numpy as np

from limoe.model_store import ModelStore
from limoe.onnx_encoder import OnnxEncoders

STORE = Path(__file__).resolve().parent.parent / "model_store"


def test_every_shipped_entry_verifies_and_encodes():
    store = ModelStore(STORE)
    assert store.names(), "the shipped model store must never be empty"
    for name in store.names():
        for version in store.versions(name):
            enc = OnnxEncoders(store.load(name, version))
            size = enc.preprocess.image_size
            out = enc.encode_images(np.zeros((2, 3, size, size), np.float32))
            text = enc.encode_texts(["a red circle", "a blue square"])
            assert out.embeddings.shape == text.embeddings.shape == (2, enc.manifest.data["embedding_size"])
            np.testing.assert_allclose(np.linalg.norm(text.embeddings, axis=-1), 1.0, rtol=1e-5)


def test_shipped_models_stay_small():
    """Everything committed under model_store/ (the issue's budget: under 25 MB)."""
    total = sum(f.stat().st_size for f in STORE.rglob("*") if f.is_file())
    assert total < 25e6, f"model_store/ holds {total / 1e6:.1f} MB"
