"""Export: ONNX and TorchScript parity with eager PyTorch, batch independence, the torch-free
ONNX path, int8 quantisation, and the manifest the server trusts."""

import json

import numpy as np
import pytest
import torch
from conftest import TOY_EVAL, random_batch
from tools import run_without_torch

from limoe.cli import main
from limoe.export.exporter import ImageEncoder, TextEncoder
from limoe.model.checkpoint import save_checkpoint
from limoe.runtime.encoders import TorchEncoders, batch_independence
from limoe.runtime.model_store import ModelStoreError, verify
from limoe.runtime.onnx_encoder import OnnxEncoders, OnnxGraph
from limoe.runtime.templates import DEFAULT_TEMPLATES
from limoe.runtime.tokenizer import Tokenizer


def _eager(model, images=None, tokens=None):
    with torch.no_grad():
        if images is not None:
            return [t.numpy() for t in ImageEncoder(model)(images)]
        return [t.numpy() for t in TextEncoder(model)(tokens)]


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_onnx_and_torchscript_match_eager(exported_any, batch):
    model, _, entry, _ = exported_any
    pairs = {"onnx": OnnxEncoders.from_entry(entry), "torchscript": TorchEncoders.from_entry(verify(entry), "cpu")}
    images, tokens = random_batch(model.cfg, batch, seed=batch)
    ref_i, ref_t = _eager(model, images=images), _eager(model, tokens=tokens)
    for backend, enc in pairs.items():
        gi, gt = enc.encode_images(images.numpy()), enc.encode_tokens(tokens.numpy())
        for g, (emb, idx, dropped) in ((gi, ref_i), (gt, ref_t)):
            assert g.embeddings.shape == emb.shape
            np.testing.assert_allclose(g.embeddings, emb, atol=1e-5, rtol=0, err_msg=backend)
            np.testing.assert_array_equal(g.expert_index, idx, err_msg=backend)
            np.testing.assert_array_equal(g.dropped, dropped, err_msg=backend)


def test_exported_routing_outputs_have_meaning(exported_any):
    model, _, entry, _ = exported_any
    onnx = OnnxEncoders.from_entry(entry)
    images, tokens = random_batch(model.cfg, 5)
    out_i, out_t = onnx.encode_images(images.numpy()), onnx.encode_tokens(tokens.numpy())
    M, K = 2, 2
    assert out_i.expert_index.shape == (5, M, model.cfg.num_patches, K)
    assert out_i.dropped.dtype == np.bool_
    if model.cfg.inference_routing == "capacity":
        assert out_i.dropped.any() and out_t.dropped.any()  # capacity 0.5 drops some
    else:
        assert not out_i.dropped.any() and not out_t.dropped.any()  # dropless: never
    pad = tokens.numpy() == model.cfg.pad_id
    assert (out_t.expert_index[:, :, :][np.broadcast_to(pad[:, None, :, None], out_t.expert_index.shape)] == -1).all()
    assert (out_t.expert_index[~np.broadcast_to(pad[:, None, :, None], out_t.expert_index.shape)] >= 0).all()


def test_exported_graphs_are_batch_independent(exported_any):
    """A batch of 7 against each item alone: embeddings within 1e-5, the same experts and drops."""
    model, _, entry, _ = exported_any
    images, tokens = random_batch(model.cfg, 7)
    for enc in (OnnxEncoders.from_entry(entry), TorchEncoders.from_entry(verify(entry), "cpu")):
        assert batch_independence(enc.encode_images, images.numpy(), batch=7) <= 1e-5
        assert batch_independence(enc.encode_tokens, tokens.numpy(), batch=7) <= 1e-5


def test_manifest_describes_the_entry(exported):
    model, tok, entry, ckpt = exported
    m = json.loads((entry / "manifest.json").read_text())
    assert m["format"] == "limoe-model-store/1" and m["name"] == "tiny" and m["version"] == "1"
    assert m["config"] == model.cfg.to_dict()
    assert m["context_length"] == model.cfg.context_length and m["embedding_size"] == model.cfg.embed_dim
    assert m["logit_scale"] == pytest.approx(float(np.exp(model.cfg.logit_scale_init)), rel=1e-5)
    assert m["preprocessing"] == {"image_size": 16, "mean": list(model.cfg.image_mean),
                                  "std": list(model.cfg.image_std), "resample": "bicubic",
                                  "background": [255, 255, 255], "crop": "center"}
    assert m["templates"] == list(DEFAULT_TEMPLATES)
    assert m["onnx"]["opset"] == 18 and {"torch", "onnx", "onnxruntime", "limoe"} <= set(m["libraries"])
    assert m["evaluation"] == TOY_EVAL
    assert m["moe"] == {"layers": [1, 2], "num_experts": 4, "top_k": 2, "inference_routing": "dropless",
                        "onnx_op": "standard", "eval_capacity_factor": 0.5, "batch_priority": True}
    assert set(m["files"]) == {"image_encoder.onnx", "text_encoder.onnx", "encoders.torchscript.pt",
                               "tokenizer.json", "image_encoder.int8.onnx", "text_encoder.int8.onnx", "MODEL_CARD.md",
                               "encoders.weights", "encoders.int8.weights"}
    assert m["roles"]["onnx_weights"] == "encoders.weights" and m["roles"]["onnx_weights_int8"] == "encoders.int8.weights"
    assert m["stats"]["total_params"] == sum(p.numel() for p in model.parameters())
    card = (entry / "MODEL_CARD.md").read_text()
    assert card.startswith("# tiny version 1") and "No training run recorded" in card
    assert "| toy | 50.0% | 100.0% | - | 3 | 4 |" in card  # the checkpoint's stored evaluation
    for file, record in m["files"].items():
        assert record["size"] == (entry / file).stat().st_size and len(record["sha256"]) == 64
    assert Tokenizer.load(entry / "tokenizer.json").encode(["cat"]).tolist() == tok.encode(["cat"]).tolist()


def test_int8_graphs_agree_with_fp32(exported):
    model, _, entry, _ = exported
    m = json.loads((entry / "manifest.json").read_text())
    int8 = m["quantization"]["int8"]
    assert int8["scheme"] == "static" and int8["calibration"] == {"source": "synthetic", "count": 256, "seed": 0}
    for modality in ("image", "text"):
        agreement = int8[modality]
        assert agreement["embedding_cosine_mean"] > 0.98 and agreement["examples"] == 32
        assert agreement["batch_independence_max_diff"] <= 1e-5
    fp32, int8 = OnnxEncoders.from_entry(entry), OnnxEncoders.from_entry(entry, quantized=True)
    images, _ = random_batch(model.cfg, 4)
    cos = (fp32.encode_images(images.numpy()).embeddings * int8.encode_images(images.numpy()).embeddings).sum(-1)
    assert cos.min() > 0.95


def test_onnx_path_runs_where_torch_cannot_be_imported(exported, tmp_path):
    model, _, entry, _ = exported
    images, tokens = random_batch(model.cfg, 3)
    np.save(tmp_path / "images.npy", images.numpy())
    expected = _eager(model, images=images)[0]
    expected_text = _eager(model, tokens=torch.from_numpy(
        Tokenizer.load(entry / "tokenizer.json").encode(["red circle", "cat"])))[0]
    script = f"""
        import numpy as np
        from limoe.runtime.onnx_encoder import OnnxEncoders
        enc = OnnxEncoders.from_entry({str(entry)!r})
        np.save({str(tmp_path / "img_out.npy")!r}, enc.encode_images(np.load({str(tmp_path / "images.npy")!r})).embeddings)
        ids = enc.tokenizer.encode(["red circle", "cat"])
        np.save({str(tmp_path / "txt_out.npy")!r}, enc.encode_tokens(ids).embeddings)
        print("torch" in sys.modules, enc.providers)
    """
    out = run_without_torch(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False ['CPUExecutionProvider']"
    np.testing.assert_allclose(np.load(tmp_path / "img_out.npy"), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "txt_out.npy"), expected_text, atol=1e-4, rtol=0)


def test_export_refuses_to_overwrite_and_needs_a_tokenizer(exported, tmp_path, capsys):
    model, _, entry, ckpt = exported
    store = entry.parent.parent
    assert main(["export", str(ckpt), "--name", "tiny", "--version", "1", "--store", str(store)]) == 1
    assert "already exists" in capsys.readouterr().err
    bare = save_checkpoint(model, tmp_path / "bare.safetensors")
    assert main(["export", str(bare), "--name", "other", "--store", str(store)]) == 1
    assert "holds no tokenizer" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--name", "../evil", "--store", str(store)]) == 1
    assert "invalid model name" in capsys.readouterr().err
    assert not (store / "other").exists() or not any((store / "other").iterdir())


def test_onnx_session_options_do_not_change_results(exported):
    model, _, entry, _ = exported
    images, _ = random_batch(model.cfg, 3)
    default = OnnxEncoders.from_entry(entry).encode_images(images.numpy()).embeddings
    tuned = OnnxEncoders.from_entry(entry, threads=1, spinning=False).encode_images(images.numpy()).embeddings
    np.testing.assert_allclose(tuned, default, atol=1e-6, rtol=0)


def test_the_two_graphs_share_one_copy_of_the_tower(exported):
    """Image and text graphs point at the same bytes of encoders.weights for every tower weight."""
    import onnx

    _, _, entry, _ = exported
    graphs = [onnx.load(str(entry / f"{m}_encoder.onnx"), load_external_data=False) for m in ("image", "text")]
    places = [{tuple((e.key, e.value) for e in t.external_data) for t in g.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL} for g in graphs]
    nbytes = lambda ps: sum(int(dict(p)["length"]) for p in ps)  # noqa: E731
    both = places[0] & places[1]
    assert nbytes(both) > nbytes(places[0] - both)  # the tower is shared; the heads and embeddings are not
    assert all(dict(p)["location"] == "encoders.weights" for p in places[0] | places[1])
    stored = (entry / "encoders.weights").stat().st_size
    unique = places[0] | places[1]
    assert nbytes(unique) <= stored < nbytes(unique) + 4096 * len(unique)  # each tensor once (plus alignment)
    assert stored < nbytes(places[0]) + nbytes(places[1]) - nbytes(both) // 2


def test_int8_only_entry_is_small_and_served_without_choosing(exported, tmp_path, onnx_exports):
    """`--formats int8` (the shipped default's format): the int8 graphs alone, picked automatically."""
    model, _, entry, ckpt = exported
    store = tmp_path / "store"
    with onnx_exports.reuse():  # the fp32 graphs `exported` made; quantised here again
        assert main(["export", str(ckpt), "--name", "small8", "--store", str(store), "--formats", "int8"]) == 0
    small = store / "small8" / "1"
    m = json.loads((small / "manifest.json").read_text())
    assert set(m["roles"]) == {"image_onnx_int8", "text_onnx_int8", "onnx_weights_int8", "tokenizer", "model_card"}
    assert not (small / "image_encoder.onnx").exists() and not (small / "encoders.torchscript.pt").exists()
    assert m["quantization"]["int8"]["image"]["embedding_cosine_mean"] > 0.98  # checked against fp32 first
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(small) < size(entry)

    auto = OnnxEncoders.from_entry(small)
    assert auto.quantized
    images, _ = random_batch(model.cfg, 2)
    reference = OnnxEncoders.from_entry(entry, quantized=True).encode_images(images.numpy()).embeddings
    np.testing.assert_allclose(auto.encode_images(images.numpy()).embeddings, reference, atol=1e-6)
    with pytest.raises(ModelStoreError, match="int8 graphs only"):
        OnnxEncoders.from_entry(small, quantized=False)
    assert not OnnxEncoders.from_entry(entry).quantized  # fp32 wins when both are there


def test_export_rejects_unknown_formats(exported, tmp_path, capsys):
    _, _, _, ckpt = exported
    assert main(["export", str(ckpt), "--name", "x", "--store", str(tmp_path), "--formats", "onnx,tflite"]) == 1
    assert "formats must be a non-empty subset of onnx, torchscript, int8" in capsys.readouterr().err


def test_int8_graphs_are_batch_independent(exported_any):
    """Static int8: fixed activation scales, so an item's answer does not depend on its batch
    (dynamic quantisation's per-batch scales moved embeddings by ~1e-2)."""
    model, _, entry, _ = exported_any
    int8 = OnnxEncoders.from_entry(entry, quantized=True)
    images, tokens = random_batch(model.cfg, 5, seed=3)
    assert batch_independence(int8.encode_images, images.numpy()) <= 1e-5  # and the same experts (a miss is >= 1)
    assert batch_independence(int8.encode_tokens, tokens.numpy()) <= 1e-5


def test_dropless_graphs_hold_every_expert_and_no_capacity(exported):
    """The tracing pitfall: every expert's branch is in the graph (NonZero per expert and layer),
    whatever experts the example input happened to reach, and an expert that no token picks works."""
    import onnx

    model, _, entry, _ = exported
    g = onnx.load(str(entry / "image_encoder.onnx"), load_external_data=False)
    ops = [n.op_type for n in g.graph.node]
    E, M = model.cfg.num_experts, len(model.cfg.moe_layer_ids)
    assert ops.count("NonZero") == E * M and "ScatterND" in ops
    assert "MoE" not in ops
    onnx_enc = OnnxEncoders.from_entry(entry)
    with torch.no_grad():  # one image whose patches all pick the same expert in every layer
        images = torch.zeros(1, 3, model.cfg.image_size, model.cfg.image_size)
        out = onnx_enc.encode_images(images.numpy())
        ref = _eager(model, images=images)
    assert len(np.unique(out.expert_index[0, 0, :, 0])) < E  # some experts got no token
    np.testing.assert_allclose(out.embeddings, ref[0], atol=1e-5, rtol=0)


def test_fused_moe_op_option_matches_pytorch(exported, tmp_path):
    """`--moe-op fused`: ONNX Runtime's com.microsoft.MoE, checked against PyTorch dropless (its
    GELU is the tanh approximation, so the tolerance is looser than for standard ops)."""
    import onnx

    model, _, _, ckpt = exported
    store = tmp_path / "store"
    assert main(["export", str(ckpt), "--name", "fused", "--store", str(store), "--moe-op", "fused"]) == 0
    entry = store / "fused" / "1"
    g = onnx.load(str(entry / "image_encoder.onnx"), load_external_data=False)
    assert [n.op_type for n in g.graph.node].count("MoE") == len(model.cfg.moe_layer_ids)
    assert json.loads((entry / "manifest.json").read_text())["moe"]["onnx_op"] == "fused"
    enc = OnnxEncoders.from_entry(entry)
    images, tokens = random_batch(model.cfg, 4)
    ref_i, ref_t = _eager(model, images=images), _eager(model, tokens=tokens)
    got_i, got_t = enc.encode_images(images.numpy()), enc.encode_tokens(tokens.numpy())
    np.testing.assert_allclose(got_i.embeddings, ref_i[0], atol=1e-3, rtol=0)
    np.testing.assert_allclose(got_t.embeddings, ref_t[0], atol=1e-3, rtol=0)
    np.testing.assert_array_equal(got_i.expert_index, ref_i[1])
    np.testing.assert_array_equal(got_t.expert_index, ref_t[1])


def test_export_can_override_the_inference_routing(exported, tmp_path, onnx_exports):
    model, _, _, ckpt = exported
    store = tmp_path / "store"
    # Overridden, the model is `exported_capacity`'s (the same weights): its graphs, when made
    # already; were the override lost, the key would be the dropless graphs', which drop nothing.
    with onnx_exports.reuse():
        assert main(["export", str(ckpt), "--name", "cap", "--store", str(store), "--formats", "onnx",
                     "--inference-routing", "capacity"]) == 0
    m = json.loads((store / "cap" / "1" / "manifest.json").read_text())
    assert m["moe"]["inference_routing"] == "capacity" and m["config"]["inference_routing"] == "capacity"
    images, _ = random_batch(model.cfg, 3)
    assert OnnxEncoders.from_entry(store / "cap" / "1").encode_images(images.numpy()).dropped.any()


def test_freezing_dynamic_int8_makes_it_batch_independent(exported, tmp_path):
    """Entries from before static int8 (dynamic quantisation, checkpoint gone) get fixed activation
    scales: dynamic int8 moves an item with its batch; frozen, it does not, and it stays close."""
    from limoe.export.quantize import freeze_dynamic_int8, quantize

    model, _, entry, _ = exported
    images, _ = random_batch(model.cfg, 5, seed=4)
    images[0] *= 4  # one item with a wider range than the rest sets a dynamic scale for all
    dynamic, frozen = tmp_path / "dynamic.onnx", tmp_path / "frozen.onnx"
    quantize(entry / "image_encoder.onnx", dynamic, "dynamic")
    calibration, _ = random_batch(model.cfg, 64, seed=5)
    assert freeze_dynamic_int8(dynamic, frozen, [{"images": calibration.numpy()}]) > 0
    x = images.numpy()
    assert batch_independence(OnnxGraph(dynamic), x) > 1e-4
    assert batch_independence(OnnxGraph(frozen), x) <= 1e-6
    ref = _eager(model, images=images)[0]
    assert (OnnxGraph(frozen)(x).embeddings[1:] * ref[1:]).sum(-1).min() > 0.98  # in the calibrated range: near fp32


def test_freeze_int8_command_rewrites_an_entry_in_place(exported, tmp_path, monkeypatch, capsys, onnx_exports):
    """`limoe freeze-int8 ENTRY` on an entry with dynamic int8 graphs (made here as the old
    exporter did): afterwards it verifies, records the freezing, and answers batch-independently."""
    import limoe.export.exporter
    from limoe.export.exporter import export_entry
    from limoe.export.quantize import SCHEMES

    model, _, _, ckpt = exported
    monkeypatch.setattr(limoe.export.exporter, "EXPORT_SCHEMES", SCHEMES)  # the old exporter's dynamic int8
    with onnx_exports.reuse():  # the fp32 graphs `exported` made
        export_entry(ckpt, tmp_path / "store", "old", formats=["int8"], int8_scheme="dynamic")
    entry = tmp_path / "store" / "old" / "1"
    images, _ = random_batch(model.cfg, 5, seed=6)
    images[0] *= 4
    assert batch_independence(OnnxGraph(entry / "image_encoder.int8.onnx"), images.numpy()) > 1e-4
    assert main(["freeze-int8", str(entry)]) == 0
    assert "DynamicQuantizeLinear nodes" in capsys.readouterr().out
    m = json.loads((entry / "manifest.json").read_text())
    assert m["quantization"]["int8"]["scheme"] == "static-frozen"
    assert min(m["quantization"]["int8"]["frozen_nodes"].values()) > 0
    assert batch_independence(OnnxGraph(entry / "image_encoder.int8.onnx"), images.numpy()) <= 1e-6
    assert OnnxEncoders.from_entry(entry).quantized  # verifies and loads
    assert sorted(p.name for p in entry.parent.iterdir()) == ["1"]  # no temporary or old copy left behind
