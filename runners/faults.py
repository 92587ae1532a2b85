"""Fault injection for the reliability tests (tests/reliability/): does nothing unless $ABLATE_FAULT is set.

ABLATE_FAULT="SITE:N" kills this process with SIGKILL the N-th time it reaches `fault_point(SITE)`, the way the
OOM killer or a power cut would: no finally blocks, no flushing, no lock release. "SITE:N:enospc" raises the
error of a full disk there instead. The sites:

  write  every atomic file write, after the temporary file is on disk and before it replaces the target
  step   inside an epoch, after a training batch (where the progress display is updated)
  run    between runs, before the next run of the grid is looked at

The tests kill `ablate run` at seeded random points and check that rerunning the same command loses nothing."""
from __future__ import annotations

import errno
import os
import signal

_hits: dict[str, int] = {}


def fault_point(site: str, what: object = "") -> None:
    """Count a visit to `site`; on the visit $ABLATE_FAULT names, SIGKILL this process (or fail as a full disk)."""
    want = os.environ.get("ABLATE_FAULT")
    if not want or want.partition(":")[0] != site:
        return
    _, n, action = (want + "::").split(":")[:3]
    _hits[site] = _hits.get(site, 0) + 1
    if _hits[site] != int(n or 1):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(what))
    os.write(2, f"fault: SIGKILL at {site} {_hits[site]} {what}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
