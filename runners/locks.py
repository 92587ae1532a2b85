"""Locks that never hang and never race: a run's lock (an exclusive flock whose holder is recorded, taken over
only from a dead process) and a grid's aggregate lock; files opened without following a planted link."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ablations.errors import UserError


@dataclass
class RunLock:
    """A run's lock: an exclusive `fcntl.flock` on results/<grid>/runs/<id>/run.lock.

    The kernel releases a flock when its holder exits, however it exits, so a lock can never outlive its process
    and a reused PID can never look like the holder; taking a free lock is one atomic flock call, so of any number
    of processes exactly one wins. The file records who holds it (pid, host, process start time, since) for the
    waiting message only. The lock file is opened with O_NOFOLLOW: a planted link is refused, never followed."""

    path: Path
    _fd: int | None = None

    def acquire(self) -> bool:
        while True:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # the file we locked must still be the one at the path (a releaser unlinks it)
                here = os.stat(self.path, follow_symlinks=False)
                mine = os.fstat(fd)
                same = (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                     "start": _start_time(os.getpid())}).encode())
            self._fd = fd
            return True

    def heartbeat(self) -> None:
        if self._fd is not None:
            os.utime(self._fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            here = os.stat(self.path, follow_symlinks=False)
            mine = os.fstat(self._fd)
            if (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> str:
        """Who holds the lock, in words, for a waiting process's message."""
        try:
            h = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(h.get("since", 0))))
            return f"pid {h.get('pid')} on {h.get('host')} since {since}"
        except (OSError, ValueError, TypeError):
            return "another process"


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symlink at the path (the suite never makes one) with one clear line."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link, which the suite never creates; remove it and rerun "
                            f"(results are never written through links)") from None
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"cannot write {path} ({err.strerror}); make the results folder writable or choose "
                            f"another with --out") from None
        raise


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), which tells a reused PID
    from the process that wrote a record."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) holds no lock
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@contextmanager
def grid_lock(grid_dir: Path) -> Iterator[None]:
    """Serialises aggregate regeneration between processes sharing a grid folder."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    fd = open_nofollow(grid_dir / ".aggregate.lock", os.O_RDWR | os.O_CREAT)  # never truncated, never followed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
