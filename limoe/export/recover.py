"""A store entry's graphs -> a PyTorch checkpoint (`limoe recover`).

For entries whose checkpoint is gone: the ONNX graphs hold every weight, so the model can be
rebuilt from them, exported again (for example with another `inference_routing`) or trained on.
int8 weights are dequantised, w = (q - zero_point) * scale (per tensor, or per channel along the
DequantizeLinear node's axis): these are exactly the weights the int8 graphs compute with, so
the recovered model is what the entry serves, with fp32 activations.

Weights keep their PyTorch names in the graphs when the exporter kept them ("model.<name>",
"model.<name>_Transposed"); the others (torch.onnx gives linear weights names like "val_87")
are found by the bias their MatMul's output is added to, and the routers (no bias) by the
order of the MoE layers. A dropless export cuts every expert out of its layer's stacked
(E, ...) weights: those pieces go back to the layer whose router precedes them, in graph order,
each w1 with the w2 its output flows into. `recover_checkpoint` then checks the rebuilt model against the graphs
on the export's example inputs, so a wrong match cannot pass silently.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from limoe.model.config import LIMoEConfig
from limoe.model.transformer import LIMoE, build_model
from limoe.runtime.model_store import Manifest, read_manifest
from limoe.runtime.tokenizer import Tokenizer

MATMULS = ("MatMul", "MatMulInteger", "Gemm", "Conv", "ConvInteger", "Gather")


def _dequantised(graph) -> dict[str, np.ndarray]:
    """Every initializer as fp32, int8 ones dequantised and named without their `_quantized`."""
    from onnx import numpy_helper

    raw = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    axes = {n.input[0]: next((a.i for a in n.attribute if a.name == "axis"), 1)
            for n in graph.node if n.op_type == "DequantizeLinear"}
    out: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        if not name.endswith("_quantized"):
            if value.dtype == np.float32:
                out.setdefault(name, value)
            continue
        base = name[: -len("_quantized")]
        scale = raw[base + "_scale"].astype(np.float32)
        zero = raw[base + "_zero_point"].astype(np.float32)
        q = value.astype(np.float32)
        if scale.ndim:  # per channel, along the DequantizeLinear node's axis
            shape = [1] * q.ndim
            shape[axes.get(name, 1)] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        out[base] = (q - zero) * scale
        out[name] = out[base]  # the name the graph's nodes use
    return out


def _consumers(graph) -> dict[str, list]:
    users = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _matmuls(users, weight: str) -> list:
    """The nodes that multiply by `weight`, directly or through its DequantizeLinear."""
    direct = users[weight]
    through = [m for n in direct if n.op_type == "DequantizeLinear" for m in users[n.output[0]]]
    return [n for n in direct + through if n.op_type in MATMULS]


def _added(users, weight: str, accept, hops: int = 6) -> str | None:
    """The first initializer that `accept`s, among the inputs of the Add that the output of the
    MatMul reading `weight` flows into (through casts, scales and reshapes)."""
    frontier = _matmuls(users, weight)
    for _ in range(hops):
        following = []
        for node in frontier:
            for out in node.output:
                for user in users[out]:
                    found = [i for i in user.input if accept(i)]
                    if user.op_type == "Add" and found:
                        return found[0]
                    if user.op_type in ("Cast", "Mul", "Reshape", "DequantizeLinear", "QuantizeLinear"):
                        following.append(user)
        frontier = following
    return None


def _bias_of(users, weight: str) -> str | None:
    """The module whose "model.<module>.bias" is added to the output of `weight`'s MatMul, if any."""
    bias = _added(users, weight, lambda i: i.startswith("model.") and i.endswith(".bias"))
    return None if bias is None else bias[len("model."):-len(".bias")]


def graph_state(path: str | Path, model: LIMoE) -> dict[str, torch.Tensor]:
    """The model's parameters that the ONNX graph at `path` holds, by PyTorch name."""
    import onnx

    graph = onnx.load(str(path)).graph
    values = _dequantised(graph)
    users = _consumers(graph)
    params = dict(model.named_parameters())
    shared = sorted(n for n in values if n.startswith("model.") and len(users.get(n, ())) > 1)
    if shared:  # the exporter stored identical tensors once (an untrained model's ones and zeros)
        raise ValueError(f"{path}: {shared[0]} is used by {len(users[shared[0]])} nodes; identical tensors "
                         "were merged at export, so their PyTorch names cannot be told apart")
    state: dict[str, np.ndarray] = {}
    routers: list[tuple[str, np.ndarray]] = []
    experts: list[tuple[str, np.ndarray, np.ndarray]] = []  # (what the nodes read, weight, bias)
    for name, value in values.items():
        if name.endswith("_quantized"):
            continue
        read = name + "_quantized" if name + "_quantized" in values else name  # what the nodes read
        if not users.get(read):
            continue
        if name.startswith("model."):  # the exporter kept the PyTorch name
            key = name[len("model."):]
            if key.endswith("_Transposed"):
                key, value = key[: -len("_Transposed")], value.T
            if key in params:
                state[key] = value
        elif value.ndim == 2:  # a linear layer's (in, out) weight, named by the bias added to its output
            module = _bias_of(users, read)
            if module is not None and module + ".weight" in params:
                state[module + ".weight"] = value.T
            elif value.shape[1] == model.cfg.num_experts:  # a router (no bias)
                routers.append((read, value))
            elif _matmuls(users, read):  # one expert's w1 or w2, cut out of (E, ...) by a dropless export
                bias = _added(users, read, lambda i: i in values and values[i].ndim == 2 and values[i].shape[0] == 1)
                if bias is not None:
                    experts.append((read, value, values[bias]))
        elif value.ndim == 3 and value.shape[0] == 1:  # the position table, renamed by the exporter
            key = "image_pos" if graph.input[0].name == "images" else "text_pos"
            if tuple(params[key].shape) == value.shape:
                state.setdefault(key, value)
    order = {id(n): i for i, n in enumerate(graph.node)}  # the graph's nodes are topologically sorted

    def position(read: str) -> int:
        return min(order[id(n)] for n in _matmuls(users, read))

    routers.sort(key=lambda r: position(r[0]))  # in MoE layer order
    moe = [f"blocks.{i}.mlp.router.weight" for i in range(model.cfg.depth) if f"blocks.{i}.mlp.router.weight" in params]
    if len(routers) != len(moe):
        return _tensors(state)
    state.update({key: value.T for key, (_, value) in zip(moe, routers)})
    starts = [position(read) for read, _ in routers]
    for key, found in zip(moe, _experts_by_layer(users, experts, starts, position, model.cfg)):
        if len(found) == model.cfg.num_experts:
            prefix = key[: -len("router.weight")] + "experts."
            for part, items in (("1", [w1 for w1, _ in found]), ("2", [w2 for _, w2 in found])):
                state[prefix + "w" + part] = np.stack([w for _, w, _ in items])  # (E, in, out)
                state[prefix + "b" + part] = np.stack([b for _, _, b in items])  # (E, 1, out)
    return _tensors(state)


def _experts_by_layer(users, experts: list, starts: list[int], position, cfg) -> list[list]:
    """A dropless export's expert pieces, as (w1, w2) pairs per MoE layer in expert order.

    A layer's experts come after its router (`starts`: the routers' places in the graph),
    unrolled in expert order. An expert's w2 is the nearest (H, D) expert MatMul that its (D, H)
    w1's output reaches, through the bias, the GELU and any QDQ nodes."""
    D, H = cfg.width, cfg.mlp_dim
    second = {id(n): item for item in experts if item[1].shape == (H, D) for n in _matmuls(users, item[0])}
    layers: list[list] = [[] for _ in starts]
    for w1 in sorted((item for item in experts if item[1].shape == (D, H)), key=lambda item: position(item[0])):
        w2 = [second[id(n)] for n in _reached(users, _matmuls(users, w1[0])) if id(n) in second]
        after = [m for m, start in enumerate(starts) if start < position(w1[0])]
        if w2 and w2[0] is not w1 and after:
            layers[after[-1]].append((w1, w2[0]))
    return layers


def _reached(users, nodes: list, hops: int = 12) -> list:
    """The nodes within `hops` steps downstream of `nodes`, nearest first, each once."""
    seen: dict[int, object] = {}
    frontier = list(nodes)
    for _ in range(hops):
        frontier = [user for node in frontier for out in node.output for user in users[out] if id(user) not in seen]
        seen.update((id(n), n) for n in frontier)
    return list(seen.values())


def _tensors(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def recover_model(entry: str | Path) -> tuple[LIMoE, Tokenizer, Manifest]:
    """Rebuild an entry's model from its graphs: the fp32 ones where the entry has them, else
    the int8 ones. Returns (model in eval mode at the entry's routing, tokenizer, manifest)."""
    entry = Path(entry)
    manifest = read_manifest(entry)
    # the manifest's routing: entries from before dropless inference say nothing, and drop
    cfg = LIMoEConfig.from_dict(manifest.data["config"]).replace(inference_routing=manifest.moe.inference_routing)
    model = build_model(cfg)
    suffix = "" if manifest.has("image_onnx") else "_int8"
    state: dict[str, torch.Tensor] = {}
    for part in ("image_onnx", "text_onnx"):
        for key, value in graph_state(manifest.file(part + suffix), model).items():
            if key in state and not torch.allclose(state[key], value, atol=1e-6):
                raise ValueError(f"{entry}: the two graphs disagree on {key}")
            state[key] = value
    state["logit_scale"] = torch.tensor(math.log(manifest.logit_scale))  # the manifest holds exp(scale)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{entry}: the graphs do not hold {', '.join(missing)}")
    model.load_state_dict(state, strict=True)
    tokenizer = manifest.tokenizer()
    return model.eval(), tokenizer, manifest


def agreement_with_graphs(model: LIMoE, entry: str | Path, batch: int = 16) -> dict[str, float]:
    """Mean and least cosine between the rebuilt model's embeddings and the entry's graphs' (the
    ones it was rebuilt from), on the export's deterministic example inputs."""
    from limoe.export.exporter import example_inputs
    from limoe.runtime.onnx_encoder import OnnxEncoders

    graphs = OnnxEncoders.from_entry(entry)  # fp32 graphs where the entry has them, as recover_model
    images, tokens = example_inputs(model, batch=batch)
    with torch.no_grad():
        out = model(images, tokens)
    result = {}
    for modality, mine, theirs in (("image", out.image_embeds, graphs.encode_images(images.numpy()).embeddings),
                                   ("text", out.text_embeds, graphs.encode_tokens(tokens.numpy()).embeddings)):
        mine = torch.nn.functional.normalize(mine.float(), dim=-1).numpy()
        cosine = (mine * theirs).sum(-1)
        result[f"{modality}_cosine_mean"], result[f"{modality}_cosine_min"] = float(cosine.mean()), float(cosine.min())
    return result


def recover_checkpoint(entry: str | Path, out: str | Path, inference_routing: str | None = None,
                       min_cosine: float = 0.98) -> tuple[Path, dict[str, float]]:
    """`recover_model`, checked against the graphs (mean cosine >= `min_cosine` in both
    modalities, at the entry's own routing), then saved as a checkpoint with the tokenizer and
    `inference_routing` (default: the entry's). Returns (path, agreement)."""
    from limoe.model.checkpoint import save_checkpoint

    model, tokenizer, manifest = recover_model(entry)
    agreement = agreement_with_graphs(model, entry)
    if min(agreement["image_cosine_mean"], agreement["text_cosine_mean"]) < min_cosine:
        raise ValueError(f"{entry}: the rebuilt model does not match the graphs ({agreement})")
    if inference_routing is not None:
        model = model.with_config(inference_routing=inference_routing)
    source = {"entry": f"{manifest.name}/{manifest.version}", "created": manifest.data.get("created"),
              "graphs": "fp32" if manifest.has("image_onnx") else "int8 (dequantised)", "agreement": agreement}
    extra = {**(manifest.data.get("training") or {}), "recovered_from": source}  # as the lost checkpoint's
    return save_checkpoint(model, out, extra=extra, tokenizer=tokenizer), agreement
