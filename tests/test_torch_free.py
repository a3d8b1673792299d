"""The serving path's modules import and work where importing torch is impossible."""

from pathlib import Path

from tools import run_without_torch

STORE = Path(__file__).resolve().parent.parent / "model_store"

SCRIPT = """
    import sys
    import io
    import numpy as np
    from PIL import Image
    from limoe.config import get_config
    from limoe.preprocess import PreprocessConfig, open_image, preprocess_image
    from limoe.templates import DEFAULT_TEMPLATES
    from limoe.tokenizer import Tokenizer
    from limoe.zeroshot import build_zero_shot_classifier
    from limoe.onnx_encoder import OnnxEncoders
    import service.app  # the whole service, whose default backend is ONNX Runtime

    cfg = get_config("small")
    buf = io.BytesIO(); Image.new("RGB", (5, 7), (1, 2, 3)).save(buf, "PNG")
    x = preprocess_image(open_image(buf.getvalue()), PreprocessConfig.from_model_config(cfg))
    tok = Tokenizer.train(["a cat", "a dog"], vocab_size=300, context_length=cfg.context_length)
    w = build_zero_shot_classifier(lambda ids: np.ones((len(ids), 4)) + ids[:, :4], tok,
                                   ["cat", "dog"], DEFAULT_TEMPLATES)
    enc = OnnxEncoders.from_store(sys.argv[1], "limoe-tiny")  # the encoder pair the service runs
    size = enc.preprocess.image_size
    out = enc.encode_images(np.zeros((1, 3, size, size), np.float32))
    assert out.embeddings.shape == (1, enc.manifest.embedding_size) and out.expert_index.shape[1] == len(enc.moe.layers)
    try:
        import torch
    except ImportError:
        print("ok", x.shape, w.shape, "torch" in sys.modules)
"""


def test_serving_modules_work_without_torch():
    out = run_without_torch(SCRIPT, str(STORE))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok (3, 64, 64) (4, 2) False"
