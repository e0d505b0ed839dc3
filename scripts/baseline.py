"""Benchmarks side by side with an earlier revision: this checkout's benchmark script, run with
that revision's package.

This machine's speed drifts by up to 1.5x within minutes, so a comparison runs both in turn,
round by round, each in a process of its own. ``source_tree`` lays out a revision's
``proxyclient/`` and ``adapters/`` as the installed package is (``adapters/`` is
``proxyclient.adapters``); ``package_env`` puts it ahead of the editable install of this
checkout. A benchmark run as a file appends the repository root to ``sys.path`` (for
``scripts.`` imports) rather than putting it first, so that the baseline package stays first.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def source_tree(revision: str, into: Path) -> Path:
    """``revision``'s proxyclient/ and adapters/ laid out as the installed package is."""
    archive = into / "src.tar"
    subprocess.run(
        ["git", "archive", "-o", str(archive), revision, "proxyclient", "adapters"],
        cwd=REPO,
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    tree = into / "tree"
    tree.mkdir()
    (into / "src" / "proxyclient").rename(tree / "proxyclient")
    (into / "src" / "adapters").rename(tree / "proxyclient" / "adapters")
    return tree


def package_env(tree: Path | None) -> dict[str, str]:
    """The environment for a process that imports ``proxyclient`` from ``tree`` (None: this
    checkout's)."""
    env = dict(os.environ)
    if tree is not None:  # ahead of the editable install of this checkout
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    return env
