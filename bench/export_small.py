"""Export the `small` preset and measure the artifacts, side by side in one run.

    python bench/export_small.py [--checkpoint CKPT] [--rounds 7]

Without --checkpoint it exports a freshly initialised `small` model (same shapes and cost as a
trained one). Prints the export time and file sizes, the largest ONNX/TorchScript-vs-eager
differences at batch 1, 3 and 17, and the int8 image encoder's speed-up over fp32 at batch 32
(interleaved rounds, medians) with its agreement. The last line is the int8/fp32 speed ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from limoe.cli import main as cli
from limoe.export.exporter import ImageEncoder, TextEncoder, agreement, example_inputs, export_entry
from limoe.model.checkpoint import load_checkpoint
from limoe.runtime.encoders import TorchEncoders
from limoe.runtime.onnx_encoder import OnnxEncoders, OnnxGraph

from _timing import images_per_second


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="limoe-export-"))
    ckpt = args.checkpoint or str(work / "small.safetensors")
    if not args.checkpoint:
        cli(["init", "small", ckpt])

    manifest = export_entry(ckpt, work / "store", "small", quantize="int8")
    print(f"export (ONNX x2, TorchScript, int8 x2, checks): {manifest.data['export_seconds']:.1f} s")
    for file, record in manifest.files.items():
        print(f"  {file:26s} {record.size / 1e6:7.2f} MB")

    model, _ = load_checkpoint(ckpt)
    pairs = {"onnx": OnnxEncoders(manifest), "torchscript": TorchEncoders.from_entry(manifest, "cpu")}
    for batch in (1, 3, 17):
        images, tokens = example_inputs(model, batch=batch, seed=batch)
        with torch.no_grad():
            ref = {"image": [t.numpy() for t in ImageEncoder(model)(images)],
                   "text": [t.numpy() for t in TextEncoder(model)(tokens)]}
        got = {backend: {"image": enc.encode_images(images.numpy()), "text": enc.encode_tokens(tokens.numpy())}
               for backend, enc in pairs.items()}
        for modality in ("image", "text"):
            r = ref[modality]
            line = []
            for backend in pairs:
                g = got[backend][modality]
                err = float(np.abs(g[0] - r[0]).max())
                same = bool((g[1] == r[1]).all() and (g[2] == r[2]).all())
                line.append(f"{backend} max|diff| {err:.2e}, experts equal {same}")
            print(f"batch {batch:2d} {modality:5s}: " + "; ".join(line))

    images, _ = example_inputs(model, batch=32, seed=7)
    x = images.numpy()
    graphs = {"fp32": pairs["onnx"].image, "int8": OnnxGraph(manifest.file("image_onnx_int8"))}
    fp32, int8 = graphs["fp32"].session, graphs["int8"].session
    for s in (fp32, int8):
        images_per_second(s, x, 2)
    rates = {"fp32": [], "int8": []}
    for _ in range(args.rounds):
        rates["fp32"].append(images_per_second(fp32, x, 5))
        rates["int8"].append(images_per_second(int8, x, 5))
    med = {k: statistics.median(v) for k, v in rates.items()}
    close = agreement(graphs["fp32"], graphs["int8"], x)
    print(f"image encoder, batch 32, ONNX Runtime CPU: fp32 {med['fp32']:.1f} images/s, int8 {med['int8']:.1f} images/s")
    print(f"int8 agreement on these 32 images: cosine mean {close['embedding_cosine_mean']:.5f}, "
          f"min {close['embedding_cosine_min']:.5f}, same experts {close['expert_choice_agreement']:.2%}")
    print(f"ratio int8/fp32 images/s: {med['int8'] / med['fp32']:.2f}")


if __name__ == "__main__":
    main()
