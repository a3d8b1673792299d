import contextlib
import hashlib
import json
import shutil

import pytest
import torch

from limoe.cli import main
from limoe.model.checkpoint import save_checkpoint
from limoe.model.config import get_config, two_tower_counterpart
from limoe.model.transformer import LIMoE, build_model
from limoe.runtime.templates import DEFAULT_TEMPLATES
from limoe.runtime.tokenizer import Tokenizer


@pytest.fixture
def tiny_cfg():
    return get_config("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return LIMoE(tiny_cfg).eval()


def random_batch(cfg, n, seed=0):
    """n random images and n random texts of varied length (padding after <eos>)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(3, cfg.vocab_size, (n, cfg.context_length), generator=g)
    for i in range(n):
        length = 2 + i % (cfg.context_length - 1)
        tokens[i, length:] = cfg.pad_id
    return images, tokens


TOY_EVAL = {"zero_shot": {"toy": {"top1": 0.5, "top5": 1.0, "classes": 3, "images": 4}}, "retrieval": {}}
CAPTIONS = [t.replace("{}", w) for t in DEFAULT_TEMPLATES for w in ("red circle", "blue square", "cat")]


class OnnxExports:
    """Memoised `limoe.export.exporter.export_onnx`, where a test asks for it (`with
    onnx_exports.reuse():`): torch.onnx's export takes ~5 s an encoder on 2 cores and writes the
    same bytes for the same encoder, weights, config, MoE op, example and opset, so each such
    graph is exported once per session and copied after. Whatever differs (another routing, the
    fused op, other weights) is a miss and exported for real; the rest of the export (int8,
    weight sharing, manifest, checks) always runs."""

    def __init__(self, root):
        self.root = root

    @staticmethod
    def key(encoder, example, input_name: str, opset: int) -> str:
        h = hashlib.sha256()
        model = encoder.model
        h.update(json.dumps([type(encoder).__qualname__, type(model).__qualname__, model.cfg.to_dict(), input_name,
                             opset, [getattr(m, "moe_op", None) for m in model.modules()]],
                            sort_keys=True, default=str).encode())
        for name, t in [("example", example), *encoder.state_dict().items()]:
            t = t.detach().cpu().contiguous()
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    @contextlib.contextmanager
    def reuse(self):
        import limoe.export.exporter as exporter  # on use, as limoe.cli imports it

        real = exporter.export_onnx

        def export_onnx(encoder, example, input_name, path, opset=exporter.DEFAULT_OPSET):
            cached = self.root / f"{self.key(encoder, example, input_name, opset)}.onnx"
            if not cached.exists():
                real(encoder, example, input_name, cached, opset)
            shutil.copyfile(cached, path)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(exporter, "export_onnx", export_onnx)
            yield self


@pytest.fixture(scope="session")
def onnx_exports(tmp_path_factory):
    return OnnxExports(tmp_path_factory.mktemp("onnx-exports"))


def _export_tiny(root, inference_routing: str, onnx_exports: OnnxExports):
    """A tiny model (top-2 routing, a peaky router; capacity 0.5 where it applies, tight enough to
    drop) exported through the CLI with int8 graphs."""
    cfg = get_config("tiny", top_k=2, eval_capacity_factor=0.5, depth=3, moe_layers="1,2",
                     inference_routing=inference_routing)
    torch.manual_seed(0)
    model = LIMoE(cfg).eval()
    with torch.no_grad():  # a peaky router, so that capacity routing really drops some choices
        for block in model.blocks[1:]:
            block.mlp.router.weight.mul_(50)
    tok = Tokenizer.train(CAPTIONS, vocab_size=cfg.vocab_size, context_length=cfg.context_length)
    ckpt = save_checkpoint(model, root / "tiny.safetensors", extra={"eval": TOY_EVAL}, tokenizer=tok)
    with onnx_exports.reuse():  # the tests that export this checkpoint again reuse its graphs
        assert main(["export", str(ckpt), "--name", "tiny", "--store", str(root / "store"), "--quantize", "int8"]) == 0
    entry = root / "store" / "tiny" / "1"
    return model, tok, entry, ckpt


@pytest.fixture(scope="session")
def exported(tmp_path_factory, onnx_exports):
    """The tiny model exported as a dropless entry (the default): nothing is dropped."""
    return _export_tiny(tmp_path_factory.mktemp("export"), "dropless", onnx_exports)


@pytest.fixture(scope="session")
def exported_capacity(tmp_path_factory, onnx_exports):
    """The same tiny model exported with capacity routing at inference (factor 0.5): drops."""
    return _export_tiny(tmp_path_factory.mktemp("export-capacity"), "capacity", onnx_exports)


@pytest.fixture(scope="session", params=["dropless", "capacity"])
def exported_any(request):
    """Both entries, for what must hold whatever the inference routing."""
    return request.getfixturevalue("exported" if request.param == "dropless" else "exported_capacity")


@pytest.fixture(scope="session")
def exported_two_tower(tmp_path_factory):
    """A tiny two-tower entry ("tt") exported through the CLI, fp32 and int8 graphs:
    (model, tokenizer, entry directory)."""
    root = tmp_path_factory.mktemp("two_tower")
    torch.manual_seed(0)
    model = build_model(two_tower_counterpart(get_config("tiny"))).eval()
    tok = Tokenizer.train(CAPTIONS, vocab_size=model.cfg.vocab_size, context_length=model.cfg.context_length)
    ckpt = save_checkpoint(model, root / "tt.safetensors", tokenizer=tok)
    assert main(["export", str(ckpt), "--name", "tt", "--store", str(root / "store"), "--quantize", "int8"]) == 0
    return model, tok, root / "store" / "tt" / "1"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """The tiny fixture OpenCLIP checkpoint (tests/fixtures/openclip) and its `limoe import open-clip`
    entry, built once per session: (checkpoint .pt, entry directory). Copy the entry into a store of
    your own before adding to it."""
    import subprocess
    import sys
    from pathlib import Path

    fixture = Path(__file__).resolve().parent / "fixtures" / "openclip"
    sys.path.insert(0, str(fixture))
    from weights import weights

    tmp = tmp_path_factory.mktemp("tiny-clip")
    meta = json.loads((fixture / "reference.json").read_text())
    torch.save({k: torch.from_numpy(v) for k, v in weights({k: tuple(s) for k, s in meta["keys"].items()}).items()},
               tmp / "tiny.pt")
    out = subprocess.run([sys.executable, "-m", "limoe", "import", "open-clip", "--arch",
                          str(fixture / "configs" / "limoe-tiny-clip.json"), "--checkpoint", str(tmp / "tiny.pt"),
                          "--name", "tiny-clip", "--license", "MIT (test weights)", "--store", str(tmp / "store")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return tmp / "tiny.pt", tmp / "store" / "tiny-clip" / "1"
