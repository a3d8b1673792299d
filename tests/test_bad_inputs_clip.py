"""The whole bad-input corpus (tests/test_bad_inputs.py) against a server whose default model is an
imported OpenCLIP entry (the tiny fixture architecture, `limoe import open-clip`), beside the shipped
`limoe-small`: every bad request still gets its documented 4xx and the server keeps serving (issue 26)."""

import os
import shutil
import subprocess
import sys

from servers import ROOT


def test_the_bad_input_corpus_passes_against_an_imported_clip(tmp_path, tiny_clip):
    store = tmp_path / "store"
    shutil.copytree(tiny_clip[1], store / "tiny-clip" / "1")
    shutil.copytree(ROOT / "model_store" / "limoe-small", store / "limoe-small")  # the corpus's second model
    env = {**os.environ, "LIMOE_CORPUS_MODEL": "tiny-clip", "LIMOE_CORPUS_STORE": str(store)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_inputs.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
