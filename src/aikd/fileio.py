"""Writing files so that a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from aikd.errors import AikdError, DiskFullError


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via temp file + fsync + rename (:func:`atomic_write_stream`)."""
    atomic_write_stream(path, lambda fh: fh.write(payload), len(payload))


def atomic_write_stream(path: Path, write: Callable[[BinaryIO], object], size: int) -> None:
    """Let ``write`` write ``size`` bytes, piece by piece, to a temporary file beside ``path``, then fsync it and
    rename it onto ``path``: a file too large to hold in memory twice is never built as one bytes object.

    A full disk (ENOSPC, or EDQUOT for a quota) raises :class:`DiskFullError` naming the file
    and the space it needs; the temporary file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _disk_full(err, path, size) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results get the mode of every other file
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _disk_full(err, path, size) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` (a library's own saver: an ONNX program, a matplotlib figure) write a temporary file beside
    ``path``, then give it the umask's mode, fsync it and rename it onto ``path``, as :func:`atomic_write_bytes`
    does: a crash or a failing writer leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _disk_full(err, path, 0) from None
        raise


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no other way to read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(err: OSError, path: Path, needed: int) -> OSError | DiskFullError:
    """A DiskFullError for a full disk or quota, the error itself otherwise."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return err
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"No space left on the device of '{path.parent}' to write '{path.name}': it needs "
                         f"{needed / 2**20:,.1f} MiB ({free}); '{path}' was not changed.")


def check_output_folder(path: str | Path, what: str = "output folder", subfolders: tuple[str, ...] = ()) -> None:
    """Before any compute: ``path`` is, or can become, a folder this process can write, and so is each of
    ``subfolders`` inside it (a run's checkpoints/). Raises AikdError naming the path and the cause."""
    path = Path(path)
    for folder in (path, *(path / sub for sub in subfolders)):
        if folder.exists() and not folder.is_dir():
            raise AikdError(f"The {what} '{folder}' is a file; a folder is needed there. Choose another path.")
        _check_writable(folder, what)


def check_output_file(path: str | Path, what: str = "output file", example: str = "out.json") -> None:
    """Before any compute: ``path`` can be written as a file (not an existing folder, in a writable folder).
    ``example`` is the file name a refusal suggests inside a folder given instead (tables.md for a report)."""
    path = Path(path)
    if path.is_dir():
        raise AikdError(f"The {what} '{path}' is a folder; a file name is needed there (for example "
                        f"'{path / example}').")
    _check_writable(path.parent, what, file=path)


def _check_writable(folder: Path, what: str, file: Path | None = None) -> None:
    """Try what the run will do: create a file in ``folder``, or in the nearest folder above it that exists."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AikdError(f"Cannot create the {what} '{file or folder}': '{existing}' is a file, not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".aikd-write-check.", dir=existing)
    except OSError as err:
        raise AikdError(f"Cannot write the {what} '{file or folder}': {err.strerror.lower()} in '{existing}'."
                        ) from None
    os.close(fd)
    os.unlink(probe)
