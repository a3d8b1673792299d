"""The torch-free part of the package (limoe.runtime, limoe.data, limoe.bulk) and the whole
service import and work where importing torch is impossible."""

from pathlib import Path

from tools import run_without_torch

STORE = Path(__file__).resolve().parent.parent / "model_store"

SCRIPT = """
    import sys
    import io
    import numpy as np
    from PIL import Image
    from limoe.runtime.preprocess import PreprocessConfig, open_image, preprocess_image
    from limoe.runtime.templates import DEFAULT_TEMPLATES
    from limoe.runtime.tokenizer import Tokenizer
    from limoe.runtime.zeroshot import build_zero_shot_classifier
    from limoe.runtime.onnx_encoder import OnnxEncoders
    import service.app  # the whole service, whose default backend is ONNX Runtime

    buf = io.BytesIO(); Image.new("RGB", (5, 7), (1, 2, 3)).save(buf, "PNG")
    x = preprocess_image(open_image(buf.getvalue()), PreprocessConfig(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    tok = Tokenizer.train(["a cat", "a dog"], vocab_size=300, context_length=16)
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


TORCH_FREE = ("limoe/runtime", "limoe/data", "limoe/bulk", "service")  # the layout's line (limoe/__init__.py)
TORCH_SIDE = ("limoe.model", "limoe.train", "limoe.export", "limoe.eval")

IMPORT_ALL = """
    import importlib, sys
    for name in sys.argv[1:]:
        importlib.import_module(name)
    print(len(sys.argv) - 1, sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
          sorted(m for m in sys.modules if m.startswith(%r)))
"""


def torch_free_modules() -> list[str]:
    root = STORE.parent
    names = []
    for top in TORCH_FREE:
        for path in sorted((root / top).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            if not name.endswith("__main__"):
                names.append(name)
    return names


def test_every_torch_free_module_imports_without_torch():
    """Every module of the torch-free part, and of the service, imports with torch blocked, and
    none of them pulls in the torch side of the package (model, train, export, eval)."""
    names = torch_free_modules()
    assert {"limoe.runtime.onnx_encoder", "limoe.bulk.classify", "limoe.data.readers", "service.app",
            "service.command"} <= set(names)
    out = run_without_torch(IMPORT_ALL % (TORCH_SIDE,), *names, cwd=STORE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == f"{len(names)} [] []"
