"""Atomic file writes and hashing: nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


class WriteError(UserError):
    """An output file that cannot be created (its folder is missing, a file, or not writable)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. ``suffix``
    (default: the final suffix) lets writers that pick a format from the name keep working.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.",
                                   suffix=(path.suffix if suffix is None else suffix) + ".part", dir=path.parent)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({_why(path, e)}); choose another output path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual permissions
        try:
            os.replace(tmp_path, path)
        except IsADirectoryError:
            raise WriteError(f"{path}: cannot write, a folder of that name exists") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    _fsync_dir(path.parent)


#: Names :func:`atomic_path` gives its temporary files: ``.<final name>.<8 random chars><suffix>.part``.
_PART_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}(\.[^.]*)?\.part$")


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike) -> Iterator[list[Path]]:
    """Holds ``folder`` (created if missing) as an output folder for the duration of a run.

    Every run holds a shared ``flock`` on the folder itself. When no other run holds it, temporary
    files that :func:`atomic_path` left in the tree (a run killed mid-write) are removed first; their
    paths are yielded. The kernel drops the lock of a killed process, so a crash never blocks a re-run.
    Where ``flock`` does not exist (Windows) nothing is removed.
    """
    folder = make_dirs(folder)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield []
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        removed: list[Path] = []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another run is writing here: its temporary files are live
            pass
        else:
            for root, _dirs, files in os.walk(folder):
                for name in files:
                    if _PART_NAME.match(name):
                        path = Path(root) / name
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                            removed.append(path)
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield removed
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; a path that cannot be a folder raises :class:`WriteError` naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path}: cannot create this output folder ({_why(path / 'x', e)}); "
                         "choose another output path") from None
    return path


def _why(path: Path, e: OSError) -> str:
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    return e.strerror or str(e)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
