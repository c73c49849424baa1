"""Atomic file writes and hashing: nothing half-written is ever left under a final name."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

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


#: The random part :func:`atomic_path`'s temporary names carry (``tempfile.mkstemp``: 8 of ``[a-z0-9_]``).
_TEMP_RANDOM = re.compile(r"[a-z0-9_]{8}(\.[^.]*)?")


#: The file in a folder held by :func:`exclusive_folder` that names the holder's PID.
HOLDER_FILE = ".holder.pid"


class FolderBusyError(UserError):
    """A folder that another live process holds (:func:`exclusive_folder`); the message names its PID."""


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike) -> Iterator[bool]:
    """Creates ``folder`` and holds a shared ``flock`` on it for the duration of a run.

    Yields True when no other run held the folder at the start: then temporary files that an earlier,
    killed run left for this run's outputs are not live and :func:`remove_temporaries` may remove them.
    The kernel drops a killed process's lock, so a crash never blocks a re-run. False where ``flock``
    does not exist or does not work (Windows, some network filesystems): nothing should be removed.
    A folder that a process holds with :func:`exclusive_folder` (a training run directory) raises
    :class:`FolderBusyError` naming that process.
    """
    folder = make_dirs(folder)
    fd = _open_for_flock(folder)
    if fd is None:
        yield False
        return
    import fcntl

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except OSError:  # another run is writing here (or no flock): its temporaries may be live
            alone = False
        try:
            _flock_shared(fd, folder)
        except OSError:
            alone = False
        yield alone
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike, advice: str) -> Iterator[int | None]:
    """Creates ``folder`` and holds an exclusive ``flock`` on it (the lock :func:`output_folder` shares)
    for the duration of a run, with this process's PID in ``folder/.holder.pid``.

    A folder that another live process holds raises :class:`FolderBusyError`: one line with the holder's
    PID and ``advice``. The kernel drops the lock of a process that died, even by ``kill -9``, so its stale
    lock is simply taken over: the context then yields the dead holder's PID (else None). A folder this
    call created and leaves empty is removed again. Where ``flock`` does not work nothing is locked.

    Args:
        folder: the folder to hold.
        advice: what the user can do when it is busy, e.g. "wait for it or choose another --name".
    """
    folder = Path(folder)
    created = not folder.exists()
    folder = make_dirs(folder)
    fd = _open_for_flock(folder)
    holder = folder / HOLDER_FILE
    mine = False
    try:
        if fd is not None:
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mine = True
            except BlockingIOError:
                raise FolderBusyError(f"{folder}: in use by {_holder_text(folder)}; {advice}") from None
            except OSError:  # no flock on this filesystem: run unlocked
                pass
        previous = _holder_pid(folder) if mine else None
        if mine:
            atomic_write_text(holder, f"{os.getpid()}\n")
        yield previous if previous != os.getpid() else None
    finally:
        if mine:  # still held: nobody else can be writing the file now
            with contextlib.suppress(OSError):
                holder.unlink()
        if fd is not None:
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds if the run wrote nothing


def _open_for_flock(folder: Path) -> int | None:
    """A read-only descriptor of ``folder`` to ``flock``, or None where that is not possible (not POSIX)."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        return os.open(folder, os.O_RDONLY)
    except OSError:
        return None


def _flock_shared(fd: int, folder: Path, wait_s: float = 2.0) -> None:
    """A shared lock; an exclusive holder (another run converting its probe, briefly, or a training run for
    its whole length) is waited for at most ``wait_s``, then named in a :class:`FolderBusyError`."""
    import fcntl
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise FolderBusyError(f"{folder}: in use by {_holder_text(folder)}; wait for it to end or choose "
                                      "another output folder") from None
            time.sleep(0.05)


def _holder_pid(folder: Path) -> int | None:
    try:
        return int((folder / HOLDER_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _holder_text(folder: Path) -> str:
    """Who holds ``folder``: the PID in its holder file, or what is known when that process is gone."""
    pid = _holder_pid(folder)
    if pid is None:
        return "another running process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        # The lock outlives its holder while children it forked (DataLoader workers) still run, and for an
        # instant after it changed hands; both pass within seconds.
        return (f"a process that PID {pid} (no longer running) started, or one taking it over; try again in a "
                "few seconds")
    except OSError:  # alive, another user's
        pass
    return f"another running process (PID {pid})"


def remove_temporaries(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Removes the temporary files :func:`atomic_path` left beside any of ``paths`` (an interrupted write
    of exactly that file: ``.<name>.<8 random chars><suffix>.part``); returns what it removed.

    Only call it while holding the outputs' folder alone (:func:`output_folder` yielded True).
    """
    wanted: dict[Path, set[str]] = {}
    for p in map(Path, paths):
        wanted.setdefault(p.parent, set()).add(p.name)
    removed = []
    for parent, names in wanted.items():
        try:
            entries = list(os.scandir(parent))
        except OSError:  # not created yet: nothing was left there
            continue
        for entry in entries:
            name = entry.name
            if not (name.startswith(".") and name.endswith(".part")) or not entry.is_file(follow_symlinks=False):
                continue
            stem = name[1:-len(".part")]  # <final name>.<random><suffix>
            if any(_TEMP_RANDOM.fullmatch(stem[len(final) + 1:]) for final in _prefixes(stem, names)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _prefixes(stem: str, names: set[str]) -> list[str]:
    """The final names in ``names`` that ``stem`` could be a temporary of (it starts with ``name.``)."""
    return [stem[:i] for i, ch in enumerate(stem) if ch == "." and stem[:i] in names]


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
