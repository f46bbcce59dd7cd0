"""Locks on run folders and phase-1 cache entries, so that concurrent processes never share one.

A lock is an advisory ``flock`` on a small file next to what it guards
(``OUT/.aikd.lock``, ``CACHE/<key>/.phase1.lock``), holding the holder's pid, host,
start time and command for the message a refused process prints. The kernel
drops a flock when its process dies, however it dies, so a lock left by a dead
process is simply free for the next one: nothing to clean up, no race between
two processes that both find it stale.

* :func:`run_folder_lock` refuses at once: two trainings in one folder would
  write their epochs into one metrics.jsonl.
* :func:`cache_entry_lock` waits: two pipelines that need the same superior
  model train it once; the second finds it finished and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aikd.errors import AikdError

LOCK_NAME = ".aikd.lock"


class FolderInUse(AikdError):
    """Another live process holds the lock."""


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"process {holder.get('pid')} on host {holder.get('host')} (since {started}: "
            f"{holder.get('command', '?')})")


@contextlib.contextmanager
def file_lock(path: Path, wait: bool) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing); ``wait=False`` raises FolderInUse if taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a folder, or something else unopenable, where the lock file belongs
        raise AikdError(f"Cannot open the lock file '{path}': {(err.strerror or type(err).__name__).lower()}. "
                        f"It must be a plain file aikd can write; remove what is there and run the same "
                        f"command again.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise FolderInUse(_describe(_holder(path))) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv[:1] + sys.argv[1:])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: nothing left to name as the holder
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Exclusive use of a run folder for this process, or a clear error naming the process that has it."""
    try:
        with file_lock(out / LOCK_NAME, wait=False):
            yield
    except FolderInUse as err:
        raise FolderInUse(f"Output folder '{out}' is in use by {err}. Wait for that run to finish (or stop it), "
                          f"or choose another -o OUTDIR.") from None


@contextlib.contextmanager
def cache_entry_lock(entry: Path, log=None) -> Iterator[None]:
    """Exclusive use of a phase-1 cache entry; waits (saying for whom) while another pipeline trains it."""
    lock = entry / ".phase1.lock"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(lock, wait=False))
        except FolderInUse as err:
            if log is not None:
                log(f"aikd: phase-1 model {entry.name} is being trained by {err}; waiting for it")
            stack.enter_context(file_lock(lock, wait=True))
        yield
