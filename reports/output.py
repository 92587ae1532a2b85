"""Report files are written whole or not at all: each goes to a temporary file in its folder, then os.replace()s
the old one, so a killed `ablate report` or a full disk leaves the previous file, never half a figure."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

from ablations.errors import UserError


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call write(f) on a temporary file next to `path`, fsync it, and rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path} ({err.strerror or err}); free some space or choose another "
                            f"folder with --out (the previous report is kept)") from None
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8", errors="backslashreplace")))
