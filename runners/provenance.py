"""Where the running code came from: the suite's version and its git commit (with a dirty flag). Torch-free, so
`ablate --version` stays instant; every run records the same (runners/train.py)."""
from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def suite_version() -> str:
    try:
        return importlib.metadata.version("alexnet-ablate")
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.cache
def git_state() -> tuple[str, bool | None]:
    """(full commit hash, whether tracked code differs from it); ("", None) outside a git checkout. The results
    folders are left out of the comparison: runs rewrite their own tracked aggregates as they finish, which says
    nothing about the code that made them."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
        return (commit, bool(changed)) if commit else ("", None)
    except (OSError, subprocess.SubprocessError):
        return "", None
