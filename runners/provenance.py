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
    """(full commit hash, whether tracked files differ from it); ("", None) outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return (commit, bool(git("status", "--porcelain", "--untracked-files=no"))) if commit else ("", None)
    except (OSError, subprocess.SubprocessError):
        return "", None
