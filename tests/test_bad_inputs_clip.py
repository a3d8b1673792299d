"""The whole bad-input corpus (tests/test_bad_inputs.py) against a server whose default model is an
imported OpenCLIP entry (the tiny fixture architecture, `limoe import open-clip`), beside the shipped
`limoe-small`: every bad request still gets its documented 4xx and the server keeps serving (issue 26)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from servers import ROOT

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "openclip"
sys.path.insert(0, str(FIXTURE))
from weights import weights  # noqa: E402


def test_the_bad_input_corpus_passes_against_an_imported_clip(tmp_path):
    meta = json.loads((FIXTURE / "reference.json").read_text())
    torch.save({k: torch.from_numpy(v) for k, v in weights({k: tuple(s) for k, s in meta["keys"].items()}).items()},
               tmp_path / "tiny.pt")
    store = tmp_path / "store"
    out = subprocess.run([sys.executable, "-m", "limoe", "import", "open-clip", "--arch",
                          str(FIXTURE / "configs" / "limoe-tiny-clip.json"), "--checkpoint", str(tmp_path / "tiny.pt"),
                          "--name", "tiny-clip", "--license", "MIT (test weights)", "--store", str(store)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    shutil.copytree(ROOT / "model_store" / "limoe-small", store / "limoe-small")  # the corpus's second model
    env = {**os.environ, "LIMOE_CORPUS_MODEL": "tiny-clip", "LIMOE_CORPUS_STORE": str(store)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_inputs.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
