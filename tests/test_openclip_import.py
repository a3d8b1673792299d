"""`limoe import open-clip` (issue 26): a tiny OpenCLIP checkpoint (the fixture's seeded weights, in
open_clip's training-checkpoint wrapper and as safetensors) becomes a verified two-tower entry whose
ONNX graphs give open_clip's embeddings; every bad input is refused with a named reason and leaves
nothing in the store."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "openclip"
ARCH = str(FIXTURE / "configs" / "limoe-tiny-clip.json")
sys.path.insert(0, str(FIXTURE))
from weights import images, texts, weights  # noqa: E402


def _state_dict():
    meta = json.loads((FIXTURE / "reference.json").read_text())
    return {k: torch.from_numpy(v) for k, v in weights({k: tuple(s) for k, s in meta["keys"].items()}).items()}


def limoe(*args):
    return subprocess.run([sys.executable, "-m", "limoe", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import")
    ckpt = tmp / "tiny.pt"  # as open_clip's training saves: {"state_dict": {"module.<key>": ...}, "epoch": ...}
    torch.save({"state_dict": {f"module.{k}": v for k, v in _state_dict().items()}, "epoch": 3}, ckpt)
    out = limoe("import", "open-clip", "--arch", ARCH, "--checkpoint", str(ckpt), "--name", "tiny-clip",
                "--license", "MIT (test weights)", "--store", str(tmp / "store"))
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "int8 image cosine mean" in out.stdout
    return tmp / "store" / "tiny-clip" / "1"


def test_the_entry_gives_open_clips_embeddings_torch_free(entry):
    from limoe.runtime.model_store import verify
    from limoe.runtime.onnx_encoder import OnnxEncoders

    manifest = verify(entry)
    assert manifest.data["license"] == "MIT (test weights)" and manifest.text_cleaning == "open_clip_lower"
    assert manifest.preprocess.crop == "resize_crop" and manifest.preprocess.resample == "bicubic"
    assert manifest.moe.layers == () and manifest.context_length == 77
    ref = np.load(FIXTURE / "reference.npz")
    ri, rt = ref["image_embeddings"], ref["text_embeddings"]
    enc = OnnxEncoders(manifest, quantized=False)
    img = enc.encode_images(images()).embeddings
    txt = enc.encode_tokens(enc.tokenizer.encode(texts())).embeddings  # the entry's own tokenizer
    assert (img * ri).sum(-1).min() >= 0.99999 and np.abs(img - ri).max() <= 1e-4
    assert (txt * rt).sum(-1).min() >= 0.99999 and np.abs(txt - rt).max() <= 1e-4
    assert np.array_equal((img @ txt.T).argmax(1), (ri @ rt.T).argmax(1))
    int8 = OnnxEncoders(manifest, quantized=True)
    i8, t8 = int8.encode_images(images()).embeddings, int8.encode_tokens(int8.tokenizer.encode(texts())).embeddings
    assert (i8 * ri).sum(-1).mean() > 0.999 and ((i8 @ t8.T).argmax(1) == (ri @ rt.T).argmax(1)).mean() >= 0.95
    card = (entry / "MODEL_CARD.md").read_text()
    assert "MIT (test weights)" in card and "limoe import open-clip" in card


def test_safetensors_and_a_plain_state_dict_import_alike(tmp_path, entry):
    from safetensors.torch import save_file

    save_file(_state_dict(), tmp_path / "tiny.safetensors")
    out = limoe("import", "open-clip", "--arch", ARCH, "--checkpoint", str(tmp_path / "tiny.safetensors"),
                "--name", "tiny-clip", "--license", "MIT", "--store", str(tmp_path / "store"), "--no-int8")
    assert out.returncode == 0, out.stderr
    a = json.loads((entry / "manifest.json").read_text())["files"]["encoders.weights"]
    b = json.loads((tmp_path / "store" / "tiny-clip" / "1" / "manifest.json").read_text())["files"]["encoders.weights"]
    assert a == b  # the same weights, byte for byte


def _refused(tmp_path, *args, checkpoint=None):
    store = tmp_path / "store"
    out = limoe("import", "open-clip", "--checkpoint", str(checkpoint), "--name", "m", "--store", str(store), *args)
    assert out.returncode == 2, out.stdout + out.stderr
    left = list(store.rglob("*")) if store.exists() else []
    assert not [p for p in left if p.name != "m"], left  # nothing half-written (no version, no .tmp-*)
    return out.stderr


def test_bad_inputs_are_refused_by_name(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    assert "not a checkpoint that torch or safetensors can read" in _refused(
        tmp_path, "--arch", ARCH, "--license", "MIT", checkpoint=junk)
    good = tmp_path / "good.pt"
    torch.save(_state_dict(), good)
    assert "unknown architecture 'ViT-Q-99'" in _refused(tmp_path, "--arch", "ViT-Q-99", "--license", "MIT",
                                                         checkpoint=good)
    assert "--license is required" in _refused(tmp_path, "--arch", ARCH, checkpoint=good)
    assert "is not a ViT-B-32" in _refused(tmp_path, "--arch", "ViT-B-32", "--license", "MIT", checkpoint=good)
    sd = _state_dict()
    del sd["visual.proj"]
    torch.save(sd, tmp_path / "missing.pt")
    assert "visual.proj" in _refused(tmp_path, "--arch", ARCH, "--license", "MIT", checkpoint=tmp_path / "missing.pt")
    sd = _state_dict()
    sd["visual.extra_head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pt")
    assert "unexpected visual.extra_head.weight" in _refused(tmp_path, "--arch", ARCH, "--license", "MIT",
                                                             checkpoint=tmp_path / "extra.pt")
    sd = _state_dict()
    sd["ln_final.weight"] = torch.ones(5)
    torch.save(sd, tmp_path / "shape.pt")
    assert "wrong shapes ln_final.weight" in _refused(tmp_path, "--arch", ARCH, "--license", "MIT",
                                                      checkpoint=tmp_path / "shape.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "not a CLIP checkpoint" in _refused(tmp_path, "--arch", ARCH, "--license", "MIT",
                                               checkpoint=tmp_path / "list.pt")
    assert "--arch is required for an OpenCLIP checkpoint" in _refused(tmp_path, "--license", "MIT", checkpoint=good)


def test_an_upcycled_sparse_clip_imports_and_routes(tmp_path):
    """`limoe upcycle` then `limoe import open-clip` (no --arch: the sparse checkpoint records it):
    an MoE entry whose graphs still give open_clip's embeddings (the experts are copies, step 0)
    and report each patch's and each text token's experts."""
    from limoe.runtime.model_store import verify
    from limoe.runtime.onnx_encoder import OnnxEncoders

    torch.save(_state_dict(), tmp_path / "tiny.pt")
    up = limoe("upcycle", str(tmp_path / "tiny.pt"), "--arch", ARCH, "--experts", "4", "--top-k", "2",
               "--moe-every", "1", "--out", str(tmp_path / "sparse.safetensors"))
    assert up.returncode == 0, up.stderr
    assert "limoe import open-clip --checkpoint" in up.stdout
    out = limoe("import", "open-clip", "--checkpoint", str(tmp_path / "sparse.safetensors"), "--name", "tiny-moe",
                "--license", "MIT (test weights)", "--store", str(tmp_path / "store"))
    assert out.returncode == 0, out.stderr
    manifest = verify(tmp_path / "store" / "tiny-moe" / "1")
    moe = manifest.moe
    assert (moe.layers, moe.num_experts, moe.top_k, moe.inference_routing) == ((0, 1), 4, 2, "dropless")
    assert manifest.image_tokens == 16  # (32 / 8) ** 2 patches; the class token's choices are left out
    stats = manifest.data["stats"]
    assert stats["active_params"] < stats["total_params"]
    assert manifest.data["source_checkpoint"]["upcycled_from"]["experts"] == 4

    ref = np.load(FIXTURE / "reference.npz")
    ri, rt = ref["image_embeddings"], ref["text_embeddings"]
    enc = OnnxEncoders(manifest, quantized=False)
    img = enc.encode_images(images())
    ids = enc.tokenizer.encode(texts())
    txt = enc.encode_tokens(ids)
    assert (img.embeddings * ri).sum(-1).min() >= 0.99999 and np.abs(img.embeddings - ri).max() <= 1e-4
    assert (txt.embeddings * rt).sum(-1).min() >= 0.99999 and np.abs(txt.embeddings - rt).max() <= 1e-4
    assert img.expert_index.shape == (len(ri), 2, 16, 2) and (img.expert_index >= 0).all()
    assert (img.expert_index < 4).all() and len(np.unique(img.expert_index)) > 1
    assert not img.dropped.any() and not txt.dropped.any()  # dropless
    eot = ids.argmax(-1)  # positions after a text's end-of-text token are padding: -1
    for row, end in zip(txt.expert_index, eot):
        assert (row[:, : end + 1] >= 0).all() and (row[:, end + 1:] == -1).all()
    int8 = OnnxEncoders(manifest, quantized=True)
    i8 = int8.encode_images(images()).embeddings
    assert (i8 * ri).sum(-1).mean() > 0.999
    card = (manifest.path / "MODEL_CARD.md").read_text()
    assert "upcycled (`limoe upcycle`)" in card and "mixture of 4 experts, top-2" in card
    assert f"limoe upcycle {tmp_path / 'tiny.pt'} --arch {ARCH} --experts 4 --top-k 2 --moe-every 1" in card
    assert "M active per token" in card


def test_an_upcycled_clip_trains_on_with_the_entropy_losses_and_imports(tmp_path):
    """`limoe train --init` on a sparse CLIP: open_clip's tokenizer and preprocessing, the contrastive
    and LIMoE entropy losses, routing in the log, a CLIP checkpoint whose expert copies have moved
    apart; its entry's card says how to rebuild it and shows routing over the run."""
    from limoe.data.scenes import prepare_scenes
    from limoe.model.checkpoint import load_clip_checkpoint
    from limoe.runtime.model_store import verify

    torch.save(_state_dict(), tmp_path / "tiny.pt")
    prepare_scenes(tmp_path / "cache", count=120)
    sparse = tmp_path / "sparse.safetensors"
    assert limoe("upcycle", str(tmp_path / "tiny.pt"), "--arch", ARCH, "--experts", "4", "--top-k", "2",
                 "--moe-every", "1", "--out", str(sparse)).returncode == 0
    run = tmp_path / "run"
    out = limoe("train", "--init", str(sparse), "--data", "scenes", "--cache", str(tmp_path / "cache"), "--out",
                str(run), "--steps", "4", "--batch-size", "8", "--workers", "0", "--warmup", "1", "--lr", "1e-3")
    assert out.returncode == 0, out.stderr[-3000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and {"contrastive", "local_entropy_image", "global_entropy_text"} <= set(log[-1])
    assert {"image/layer0", "image/layer1", "text/layer0", "text/layer1"} <= set(log[-1]["routing"])
    trained, extra = load_clip_checkpoint(run / "model.safetensors")
    start, _ = load_clip_checkpoint(sparse)
    assert extra["step"] == 4 and extra["init"]["upcycled_from"]["experts"] == 4
    w = trained.visual.transformer.resblocks[0].mlp.experts.w1
    assert torch.equal(start.visual.transformer.resblocks[0].mlp.experts.w1[0],
                       start.visual.transformer.resblocks[0].mlp.experts.w1[1])
    assert not torch.equal(w[0], w[1])  # the copies have started to diverge
    imported = limoe("import", "open-clip", "--checkpoint", str(run / "model.safetensors"), "--name", "trained",
                     "--license", "MIT (test weights)", "--store", str(tmp_path / "store"), "--no-int8")
    assert imported.returncode == 0, imported.stderr
    manifest = verify(tmp_path / "store" / "trained" / "1")
    training = manifest.data["source_checkpoint"]["training"]
    assert training["step"] == 4 and [p["step"] for p in training["routing_history"]["text/layer1"]] == [1, 2, 3, 4]
    card = (manifest.path / "MODEL_CARD.md").read_text()
    assert f"--out {sparse}" in card and f"limoe train --init {sparse} --data scenes --out run --steps 4" in card
    assert "limoe import open-clip --checkpoint run/model.safetensors" in card
    assert "## Routing over training" in card and "| image/layer0 |" in card
