"""What the serving benchmarks (bench/serve_*.py, bench/http_overhead.py) share besides the
server, the bodies and the load (bench/_server.py, _payloads.py, _load.py): their command line,
the model they serve (the shipped default, or with --fresh an untrained fp32 `small` exported
once into a cache), the raw encoder in process, and a few report helpers.

Not a benchmark itself; the scripts import it from their own directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _server import ROOT, unwind_on_sigterm

MODEL = "limoe-small"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "limoe-bench-small"


def log(msg: str) -> None:
    """Progress goes to stderr; results go to stdout."""
    print(msg, file=sys.stderr, flush=True)


# -- the model ----------------------------------------------------------------------------------------
def add_model_args(p) -> None:
    p.add_argument("--store", default=str(ROOT / "model_store"),
                   help="model store root holding --model (default: the repository's, with the shipped default)")
    p.add_argument("--model", default=MODEL, help=f"model name in the store (default {MODEL}, the shipped default)")
    p.add_argument("--fresh", action="store_true",
                   help="instead, serve a freshly initialised fp32 `small` (ONNX + TorchScript, same compute as a "
                        "trained one), exported once into --cache")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help="where --fresh exports its model once and reuses it (default: %(default)s)")


def bench_parser(doc: str, max_requests: int = 5000, load: bool = True):
    """A serving benchmark's argument parser: its docstring as help, the model and server options,
    and (with `load`) the closed-loop load options. From here on, SIGTERM unwinds the benchmark,
    so that its servers are stopped."""
    import argparse

    unwind_on_sigterm()
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc.splitlines()[1:]))
    add_model_args(p)
    p.add_argument("--wait-ms", type=float, default=5.0, help="LIMOE_MAX_BATCH_WAIT_MS")
    p.add_argument("--threads", type=int, default=0,
                   help="LIMOE_THREADS: ONNX Runtime intra-op threads of the raw encoder and of each of the "
                        "server's passes; 0 (default) = the raw encoder on every core (the runtime's default), "
                        "the server's cores shared out among its passes, as it runs unless told otherwise")
    if load:
        p.add_argument("--max-requests", type=int, default=max_requests, help="requests per timed round at most")
        p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds of load first")
        p.add_argument("--format", choices=["json", "multipart"], default="json", help="request encoding")
    return p


def ensure_store(store: str | None, model: str, cache: str | Path, fresh: bool = False) -> Path:
    """The store root to serve `model` from. With `fresh`, a `small` model initialised with a
    fixed seed is exported once (about 25 s) into `cache` and reused by later runs."""
    from limoe.runtime.model_store import ModelStore, ModelStoreError

    if store and not fresh:
        ModelStore(store).load(model)  # fail early, naming the problem
        return Path(store)
    cache = Path(cache)
    root = cache / "store"
    try:
        ModelStore(root).load(model)
        return root
    except (ModelStoreError, OSError, ValueError):
        pass
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=cache))
    try:
        log(f"exporting a fresh `small` model as {model} into {root} (once, ~25 s)")
        ckpt = work / "small.safetensors"
        for cmd in (["init", "small", str(ckpt), "--seed", "0"],
                    ["export", str(ckpt), "--name", model, "--store", str(work / "store")]):
            subprocess.run([sys.executable, "-m", "limoe", *cmd], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
        if root.exists():  # a concurrent run won the race, or a damaged leftover
            try:
                ModelStore(root).load(model)
                return root
            except (ModelStoreError, OSError, ValueError):
                shutil.rmtree(root)
        os.replace(work / "store", root)
        ModelStore(root).load(model)
        return root
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the machine, the raw encoder in process, the report ----------------------------------------------
def machine_load() -> str:
    """Other work on the machine skews every figure here (they share its cores): say how much."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) before the run"


def threads_label(threads: int) -> str:
    return f"{threads}" if threads else "0 (ONNX Runtime default)"


def load_encoders(store: Path, model: str, threads: int):
    """The store entry's ONNX graphs on the CPU, run one pass at a time on `threads` intra-op threads
    (0: ONNX Runtime's default, every core): the raw encoder the benchmarks hold the server to.
    (The server runs LIMOE_ENCODER_PASSES passes at once, on the cores shared out among them.)"""
    from limoe.runtime.onnx_encoder import OnnxEncoders

    return OnnxEncoders.from_store(store, model, providers=["CPUExecutionProvider"], threads=threads or None)


def listing(values, spec: str = ".0f") -> str:
    """'12, 13, 14': per-round figures for the report."""
    return ", ".join(format(v, spec) for v in values)
