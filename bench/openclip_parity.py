"""An imported OpenCLIP entry against open_clip itself, at a real architecture (ViT-B-32 by default),
on a random-initialised model (pretrained=None: nothing is downloaded).

    python bench/openclip_parity.py --openclip-python /path/to/venv/bin/python [--arch ViT-B-32]
        [--images 100] [--work /tmp/openclip-parity]

open_clip cannot be imported beside this project's CPU torch (its torchvision wheels are CUDA
builds), so it runs in another environment (`pip install torch==2.14.1 torchvision==0.29.1
open-clip-torch==3.3.0` in a venv): that interpreter builds the model, perturbs every weight (so no
symmetry of the init hides a bug), saves the checkpoint and writes open_clip's embeddings of seeded
images and of the 50 fixture texts (tokenized by open_clip). This process then runs
`limoe import open-clip` on the checkpoint and compares the entry's fp32 and int8 graphs, with the
entry's own tokenizer, against them: cosine, max abs difference, zero-shot top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "openclip"

# Run by open_clip's interpreter with `arch` and `out` set: the random-initialised model, every weight
# perturbed (so no symmetry of the init hides a bug), saved as OUT/model.bin; `size` its image size.
BUILD_MODEL = r'''
torch.manual_seed(0)
model = open_clip.create_model(arch, pretrained=None).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.02 * torch.randn_like(p))
torch.save(model.state_dict(), out + "/model.bin")
size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
'''

REFERENCE = r'''
import sys, numpy as np, torch, open_clip
sys.path.insert(0, sys.argv[4])
from weights import texts
arch, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
''' + BUILD_MODEL + r'''
g = np.random.default_rng(0)
yy, xx = np.mgrid[0:size, 0:size] / size
base = g.standard_normal((n, 3, 3, 1, 1))
images = (base[:, :, 0] + base[:, :, 1] * xx + base[:, :, 2] * yy + 0.3 * g.standard_normal((n, 3, size, size))).astype(np.float32)
tokens = open_clip.get_tokenizer(arch)(texts())
with torch.inference_mode():
    img = model.encode_image(torch.from_numpy(images), normalize=True).numpy()
    txt = model.encode_text(tokens, normalize=True).numpy()
np.savez(out + "/reference.npz", images=images, image_embeddings=img, text_embeddings=txt, tokens=tokens.numpy())
print(open_clip.__version__, torch.__version__)
'''


def compare(ours_img, ours_txt, ref_img, ref_txt) -> dict:
    return {"image_cosine_min": float((ours_img * ref_img).sum(-1).min()),
            "image_max_abs": float(np.abs(ours_img - ref_img).max()),
            "text_cosine_min": float((ours_txt * ref_txt).sum(-1).min()),
            "text_max_abs": float(np.abs(ours_txt - ref_txt).max()),
            "top1_agreement": float(((ours_img @ ours_txt.T).argmax(1) == (ref_img @ ref_txt.T).argmax(1)).mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--openclip-python", required=True, help="a python where `import open_clip` works")
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--work", default="/tmp/openclip-parity")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    versions = subprocess.run([args.openclip_python, "-c", REFERENCE, args.arch, str(work), str(args.images),
                               str(FIXTURE)], check=True, capture_output=True, text=True).stdout.strip()
    ref = np.load(work / "reference.npz")
    t1 = time.perf_counter()
    from limoe.export.openclip_import import import_openclip
    from limoe.runtime.onnx_encoder import OnnxEncoders

    sys.path.insert(0, str(FIXTURE))
    from weights import texts

    manifest = import_openclip(args.arch, work / "model.bin", "parity", "random weights (parity test)",
                               store=work / "store", version="1", force=True)
    t2 = time.perf_counter()
    results = {"arch": args.arch, "images": args.images, "texts": len(texts()), "open_clip_and_torch": versions,
               "reference_seconds": round(t1 - t0, 1), "import_seconds": round(t2 - t1, 1)}
    for name, quantized in (("fp32", False), ("int8", True)):
        enc = OnnxEncoders(manifest, quantized=quantized)
        tokens = enc.tokenizer.encode(texts())
        results[f"{name}_tokens_equal"] = bool(np.array_equal(tokens, ref["tokens"]))
        img = np.concatenate([enc.encode_images(ref["images"][i:i + 16]).embeddings
                              for i in range(0, args.images, 16)])
        txt = enc.encode_tokens(tokens).embeddings
        results[name] = compare(img, txt, ref["image_embeddings"], ref["text_embeddings"])
    sizes = {f: r.size for f, r in manifest.files.items()}
    results["entry_bytes"] = sizes
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
