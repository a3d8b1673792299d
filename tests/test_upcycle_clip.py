"""Sparse upcycling of an OpenCLIP model (issue 26): the chosen blocks of both towers become MoE
layers of copies of their MLP (GELU or QuickGELU), so at step 0, dropless, the embeddings equal the
dense model's; `limoe upcycle` does it to an OpenCLIP checkpoint file."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from limoe.cli import main
from limoe.model.checkpoint import load_clip_checkpoint, save_clip_checkpoint
from limoe.model.clip import CLIP, CLIPConfig
from limoe.model.config import moe_layer_ids
from limoe.model.moe import MoELayer
from limoe.model.upcycle import upcycle_clip


def tiny(quick_gelu=False, heads=2, vision_layers=2, text_layers=2) -> CLIPConfig:
    return CLIPConfig(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=vision_layers,
                      vision_heads=heads, context_length=16, vocab_size=64, text_width=32, text_layers=text_layers,
                      text_heads=heads, quick_gelu=quick_gelu)


def dense_clip(cfg: CLIPConfig) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    with torch.no_grad():  # make the MLPs matter: random biases too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(cfg: CLIPConfig):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, cfg.vocab_size - 1, (6, cfg.context_length), generator=g)
    tokens[torch.arange(6), torch.tensor([3, 5, 8, 15, 2, 10])] = cfg.vocab_size - 1  # end of text: the largest id
    return torch.randn(6, 3, cfg.image_size, cfg.image_size, generator=g), tokens


def max_diff(a: CLIP, b: CLIP) -> tuple[float, float]:
    images, tokens = inputs(a.cfg)
    with torch.no_grad():
        return (float((a.encode_image(images) - b.encode_image(images)).abs().max()),
                float((a.encode_text(tokens) - b.encode_text(tokens)).abs().max()))


@pytest.mark.parametrize("quick_gelu", [False, True])
@pytest.mark.parametrize("top_k,moe_every", [(1, 1), (2, 1), (2, 2)])
def test_step_zero_embeddings_equal_the_dense_models(quick_gelu, top_k, moe_every):
    dense = dense_clip(tiny(quick_gelu))
    sparse = upcycle_clip(dense, num_experts=4, top_k=top_k, moe_every=moe_every)
    layers = [m for m in sparse.modules() if isinstance(m, MoELayer)]
    assert len(layers) == (4 if moe_every == 1 else 2) and not sparse.training
    assert all(m.experts.activation == ("quick_gelu" if quick_gelu else "gelu") for m in layers)
    image_diff, text_diff = max_diff(sparse, dense)
    assert image_diff <= 1e-5 and text_diff <= 1e-5
    images, tokens = inputs(dense.cfg)
    with torch.no_grad():
        _, routing = sparse.encode_image(images, return_routing=True)
    assert [info.layer for info in routing] == list(sparse.cfg.vision_moe_ids)
    assert routing[0].expert_index.shape == (6, sparse.cfg.num_patches + 1, top_k)
    assert len(routing[0].expert_index.unique()) > 1  # different tokens go to different (identical) experts


def test_equality_needs_copies_renormalised_gates_and_the_right_activation():
    dense = dense_clip(tiny())
    sparse = upcycle_clip(dense, num_experts=4, top_k=2, moe_every=1)
    raw = CLIP(sparse.cfg.replace(renormalize_gates=False)).eval()
    raw.load_state_dict(sparse.state_dict())
    assert min(max_diff(raw, dense)) > 1e-3  # gates summing to p1 + p2 < 1 shrink every MLP's output
    quick = CLIP(sparse.cfg.replace(quick_gelu=True)).eval()
    quick.load_state_dict(sparse.state_dict())
    assert min(max_diff(quick, dense)) > 1e-3
    with torch.no_grad():
        sparse.transformer.resblocks[0].mlp.experts.w1[1:] += 0.1  # experts that are not copies
    assert max_diff(sparse, dense)[1] > 1e-3


def test_every_nth_block_of_each_tower_as_the_projects_every_n():
    dense = dense_clip(tiny(vision_layers=4, text_layers=3))
    sparse = upcycle_clip(dense, num_experts=4, top_k=2, moe_every=2)
    assert sparse.cfg.vision_moe_ids == moe_layer_ids(4, "every_2") == (1, 3)
    assert sparse.cfg.text_moe_ids == moe_layer_ids(3, "every_2") == (1,)
    for blocks, ids in ((sparse.visual.transformer.resblocks, (1, 3)), (sparse.transformer.resblocks, (1,))):
        assert tuple(i for i, b in enumerate(blocks) if isinstance(b.mlp, MoELayer)) == ids
    keys = set(sparse.state_dict())
    assert "visual.transformer.resblocks.1.mlp.router.weight" in keys
    assert "visual.transformer.resblocks.1.mlp.c_fc.weight" not in keys
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in keys  # the dense blocks keep OpenCLIP's keys
    assert max(max_diff(sparse, dense)) <= 1e-5


def test_an_already_sparse_model_is_refused():
    sparse = upcycle_clip(dense_clip(tiny()), num_experts=4)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle_clip(sparse, 4)


def test_gradients_reach_every_router():
    sparse = upcycle_clip(dense_clip(tiny(True)), num_experts=4, top_k=2, moe_every=1).train()
    images, tokens = inputs(sparse.cfg)
    img, txt = sparse.encode_image(images, normalize=True), sparse.encode_text(tokens, normalize=True)
    logits = sparse.logit_scale.exp() * img @ txt.t()  # (B, B)
    labels = torch.arange(len(logits))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2).backward()
    routers = [m.router.weight for m in sparse.modules() if isinstance(m, MoELayer)]
    assert len(routers) == 4
    for weight in routers:
        assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_a_sparse_clip_checkpoint_round_trips(tmp_path):
    sparse = upcycle_clip(dense_clip(tiny(True)), num_experts=4, top_k=2)
    save_clip_checkpoint(sparse, tmp_path / "s.safetensors", extra={"note": 1})
    loaded, extra = load_clip_checkpoint(tmp_path / "s.safetensors")
    assert loaded.cfg == sparse.cfg and extra == {"note": 1} and max(max_diff(loaded, sparse)) == 0


def _arch_json(tmp_path, cfg: CLIPConfig):
    """The tiny architecture as an open_clip model config, for --arch."""
    path = tmp_path / "tiny-clip.json"
    path.write_text(json.dumps({
        "embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu,
        "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
                       "layers": cfg.vision_layers, "head_width": cfg.vision_width // cfg.vision_heads},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
                     "layers": cfg.text_layers, "heads": cfg.text_heads}}))
    return str(path)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_the_command_upcycles_an_openclip_checkpoint(tmp_path, capsys, quick_gelu):
    dense = dense_clip(tiny(quick_gelu))
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    out = tmp_path / "sparse.safetensors"
    assert main(["upcycle", str(tmp_path / "dense.pt"), "--arch", _arch_json(tmp_path, dense.cfg), "--experts", "4",
                 "--top-k", "2", "--moe-every", "2", "--out", str(out)]) == 0
    assert "image blocks 1 and text blocks 1" in capsys.readouterr().out
    sparse, extra = load_clip_checkpoint(out)
    assert (sparse.cfg.num_experts, sparse.cfg.top_k, sparse.cfg.quick_gelu) == (4, 2, quick_gelu)
    assert extra["upcycled_from"]["format"] == "open_clip" and extra["upcycled_from"]["moe_layers"] == "every_2"
    assert max(max_diff(sparse, dense)) <= 1e-5


def test_without_arch_the_shapes_give_the_architecture(tmp_path, capsys):
    dense = dense_clip(tiny(heads=1))  # infer_config's heads: OpenCLIP's head width 64, at least 1
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    assert main(["upcycle", str(tmp_path / "dense.safetensors"), "--experts", "2", "--top-k", "1",
                 "--out", str(tmp_path / "sparse.safetensors")]) == 0
    assert "inferred from tensor shapes" in capsys.readouterr().out
    sparse, _ = load_clip_checkpoint(tmp_path / "sparse.safetensors")
    assert sparse.cfg == dense.cfg.replace(moe_layers="every_2", num_experts=2, top_k=1, renormalize_gates=True)
    assert max(max_diff(sparse, dense)) <= 1e-5


def _refused(capsys, *argv) -> str:
    assert main(["upcycle", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_bad_sources_are_refused_by_name(tmp_path, capsys):
    dense = dense_clip(tiny())
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    out = ["--out", tmp_path / "x.safetensors"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert "not a checkpoint that torch or safetensors can read" in _refused(capsys, tmp_path / "junk.pt", *out)
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    err = _refused(capsys, tmp_path / "other.safetensors", *out)
    assert "neither a checkpoint of this project nor an OpenCLIP one" in err and "visual.conv1.weight" in err
    assert "no such file" in _refused(capsys, tmp_path / "missing.pt", *out)
    assert "is not a ViT-B-32" in _refused(capsys, tmp_path / "dense.pt", "--arch", "ViT-B-32", *out)
    assert "top_k 5 must be in [1, num_experts=4]" in _refused(capsys, tmp_path / "dense.pt", "--experts", 4,
                                                                 "--top-k", 5, *out)
    sparse = upcycle_clip(dense, 4)
    save_clip_checkpoint(sparse, tmp_path / "sparse.safetensors")
    assert "already has MoE layers" in _refused(capsys, tmp_path / "sparse.safetensors", *out)
    assert "--arch is for OpenCLIP checkpoints" in _refused(capsys, tmp_path / "sparse.safetensors", "--arch",
                                                            "ViT-B-32", *out)
    torch.save(sparse.state_dict(), tmp_path / "sparse.pt")  # open_clip's layout, but routers and experts
    assert "already has MoE layers (router weights)" in _refused(capsys, tmp_path / "sparse.pt", *out)
    assert not (tmp_path / "x.safetensors").exists()
