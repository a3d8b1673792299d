"""The real command-line tools some tests drive (linters, validators, promtool, kubectl): found
on PATH, or the test fails, never skips, saying how to install the tool."""

from __future__ import annotations

import shutil

import pytest


def require(name: str, install_hint: str) -> str:
    """The path of `name` on PATH; fails the test with `install_hint` when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; these checks need the real tool. Install it with: {install_hint}",
                    pytrace=False)
    return path
