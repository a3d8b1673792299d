"""`limoe recover`: a store entry's graphs back to a checkpoint, for entries whose checkpoint is
gone (the shipped default's was not kept). fp32 graphs give the weights exactly; int8 graphs give
them to within the int8 rounding, and the rebuilt model answers as the graphs do."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CAPTIONS, random_batch

from limoe.cli import main
from limoe.export.exporter import export_entry
from limoe.export.recover import recover_checkpoint, recover_model
from limoe.model.checkpoint import load_checkpoint, read_metadata, read_tokenizer, save_checkpoint
from limoe.model.config import get_config
from limoe.model.transformer import LIMoE
from limoe.runtime.onnx_encoder import OnnxEncoders
from limoe.runtime.tokenizer import Tokenizer

SHIPPED = Path(__file__).resolve().parent.parent / "model_store"
TRAINING = {"step": 7, "train": {"steps": 7, "batch_size": 8, "lr": 0.001, "warmup_steps": 1, "seed": 0},
            "data": "scenes", "sources": {"scenes": 200}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, onnx_exports):
    """A tiny model whose every tensor differs from its initial value, as after training (an
    untrained model's ones and zeros are merged into one tensor by the exporter), exported with
    capacity routing, as the old default was (versions 1: fp32 and int8, 2: int8 only), and
    dropless, which cuts every expert out of its layer's stacked weights (3 and 4, the same)."""
    root = tmp_path_factory.mktemp("recover")
    cfg = get_config("tiny", depth=3, moe_layers="1,2", inference_routing="capacity")
    torch.manual_seed(0)
    model = LIMoE(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tok = Tokenizer.train(CAPTIONS, vocab_size=cfg.vocab_size, context_length=cfg.context_length)
    ckpt = save_checkpoint(model, root / "model.safetensors", extra=TRAINING, tokenizer=tok)
    with onnx_exports.reuse():  # 2 and 4 quantise the fp32 graphs of 1 and 3 (traced once each)
        export_entry(ckpt, root / "store", "t", "1", formats=["onnx", "int8"])
        export_entry(ckpt, root / "store", "t", "2", formats=["int8"])
        export_entry(ckpt, root / "store", "t", "3", formats=["onnx", "int8"], inference_routing="dropless")
        export_entry(ckpt, root / "store", "t", "4", formats=["int8"], inference_routing="dropless")
    return model, root / "store" / "t"


def _max_diff(a: LIMoE, b: LIMoE) -> dict[str, float]:
    return {k: float((v - b.state_dict()[k]).abs().max()) for k, v in a.state_dict().items()}


@pytest.mark.parametrize("version, routing", [("1", "capacity"), ("3", "dropless")])
def test_fp32_graphs_give_back_every_weight_exactly(trained, version, routing):
    model, entries = trained
    rebuilt, tokenizer, manifest = recover_model(entries / version)
    worst = _max_diff(model, rebuilt)
    assert set(worst) == set(model.state_dict())
    assert max(v for k, v in worst.items() if k != "logit_scale") == 0.0, worst
    assert worst["logit_scale"] < 1e-6  # stored as exp(scale) in the manifest
    assert rebuilt.cfg == model.cfg.replace(inference_routing=routing)
    assert tokenizer.to_str() == Tokenizer.load(entries / version / "tokenizer.json").to_str()


@pytest.mark.parametrize("version", ["2", "4"])
def test_int8_graphs_give_back_the_weights_to_within_their_rounding(trained, version):
    """An int8-only entry: per output channel, a weight moves by at most half its channel's scale,
    itself at most the tensor's largest magnitude / 127."""
    model, entries = trained
    rebuilt, _, _ = recover_model(entries / version)
    ref = model.state_dict()
    quantised = 0
    for key, value in rebuilt.state_dict().items():
        diff = float((value - ref[key]).abs().max())
        if diff > 0:  # a weight int8 stored; the rest (norms, biases, positions) are fp32 and exact
            assert diff <= float(ref[key].abs().max()) / 127 / 2 + 1e-7, key
            quantised += 1
        elif key != "logit_scale":
            assert diff == 0.0, key
    assert quantised >= 3 * 5  # q, kv, proj and the MLP or router and experts of every block, at least


def test_the_rebuilt_model_answers_as_the_graphs_do(trained):
    model, entries = trained
    rebuilt, _, _ = recover_model(entries / "2")
    images, tokens = random_batch(model.cfg, 6, seed=3)
    graphs = OnnxEncoders.from_entry(entries / "2")
    with torch.no_grad():
        out = rebuilt(images, tokens)
    for mine, theirs in ((out.image_embeds, graphs.encode_images(images.numpy())),
                         (out.text_embeds, graphs.encode_tokens(tokens.numpy()))):
        mine = torch.nn.functional.normalize(mine, dim=-1).numpy()
        assert (mine * theirs.embeddings).sum(-1).min() > 0.99


def test_entries_of_the_old_exporter_are_recovered(trained, tmp_path, monkeypatch, onnx_exports):
    """The shipped default's kind of graphs: dynamic int8 (one scale per tensor, MatMulInteger,
    the token table quantised too) whose activation scales were later frozen."""
    import limoe.export.exporter
    from limoe.export.quantize import SCHEMES

    model, entries = trained
    ckpt = entries.parent.parent / "model.safetensors"
    monkeypatch.setattr(limoe.export.exporter, "EXPORT_SCHEMES", SCHEMES)
    with onnx_exports.reuse():  # version 1's fp32 graphs, quantised the old way
        export_entry(ckpt, tmp_path / "store", "old", formats=["int8"], int8_scheme="dynamic")
    assert main(["freeze-int8", str(tmp_path / "store" / "old" / "1")]) == 0
    rebuilt, _, _ = recover_model(tmp_path / "store" / "old" / "1")
    ref = model.state_dict()
    for key, value in rebuilt.state_dict().items():
        assert float((value - ref[key]).abs().max()) <= float(ref[key].abs().max()) / 127 + 1e-6, key
    assert float((rebuilt.state_dict()["token_embed.weight"] - ref["token_embed.weight"]).abs().max()) > 0  # quantised


def test_recover_command_writes_a_checkpoint_that_exports_with_its_provenance(trained, tmp_path, capsys):
    model, entries = trained
    out = tmp_path / "recovered.safetensors"
    assert main(["recover", str(entries / "2"), str(out), "--inference-routing", "dropless"]) == 0
    assert "embedding cosine mean" in capsys.readouterr().out
    cfg, extra = read_metadata(out)
    assert cfg.inference_routing == "dropless" and cfg.replace(inference_routing="capacity") == model.cfg
    assert extra["recovered_from"]["entry"] == "t/2" and extra["recovered_from"]["graphs"] == "int8 (dequantised)"
    assert min(extra["recovered_from"]["agreement"].values()) > 0.98
    assert {k: extra[k] for k in TRAINING} == TRAINING  # the original run, for the model card
    assert read_tokenizer(out) is not None
    loaded, _ = load_checkpoint(out)
    assert loaded.cfg.inference_routing == "dropless"

    assert main(["export", str(out), "--name", "again", "--store", str(tmp_path / "store"), "--formats", "onnx"]) == 0
    entry = tmp_path / "store" / "again" / "1"
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["source_checkpoint"]["recovered_from"]["entry"] == "t/2"
    assert manifest["moe"]["inference_routing"] == "dropless" and manifest["training"]["data"] == "scenes"
    card = (entry / "MODEL_CARD.md").read_text()
    assert "those of `t/2`'s int8 (dequantised) graphs as exported on 20" in card and "`limoe recover`" in card
    images, _ = random_batch(model.cfg, 3)
    assert not OnnxEncoders.from_entry(entry).encode_images(images.numpy()).dropped.any()


def test_the_shipped_default_is_recovered_from_its_own_graphs(tmp_path, capsys):
    """limoe-small/1: dropless, static int8. Its weights come back to within their int8 rounding,
    so the rebuilt model answers as the shipped graphs do."""
    out = tmp_path / "default.safetensors"
    assert main(["recover", str(SHIPPED / "limoe-small" / "1"), str(out)]) == 0
    capsys.readouterr()
    _, extra = read_metadata(out)
    assert extra["recovered_from"]["entry"] == "limoe-small/1" and extra["data"] == "emoji:2,icons:1,mnist:0.5,scenes:1"
    assert min(extra["recovered_from"]["agreement"][k] for k in ("image_cosine_mean", "text_cosine_mean")) > 0.99
    assert load_checkpoint(out)[0].cfg.inference_routing == "dropless"


def test_recover_refuses_what_it_cannot_tell_apart(tmp_path, capsys):
    """The shipped limoe-tiny/1 is untrained: the exporter merged its equal tensors."""
    assert main(["recover", str(SHIPPED / "limoe-tiny" / "1"), str(tmp_path / "x.safetensors")]) == 1
    assert "identical tensors were merged at export" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["recover", str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors")]) == 1


def test_a_wrong_match_cannot_pass_silently(trained, tmp_path, monkeypatch):
    """Were two same-shaped weights matched the wrong way round (block 0's query and output
    projections here), the rebuilt model would disagree with the graphs, and nothing is written."""
    import limoe.export.recover

    _, entries = trained
    right = limoe.export.recover.graph_state

    def swapped(path, model):
        state = right(path, model)
        if "blocks.0.attn.q.weight" in state:
            state["blocks.0.attn.q.weight"], state["blocks.0.attn.proj.weight"] = (
                state["blocks.0.attn.proj.weight"], state["blocks.0.attn.q.weight"])
        return state

    monkeypatch.setattr(limoe.export.recover, "graph_state", swapped)
    with pytest.raises(ValueError, match="does not match the graphs"):
        recover_checkpoint(entries / "1", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
