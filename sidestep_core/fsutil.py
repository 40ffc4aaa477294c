"""File-system helpers: atomic writes, clean-up of interrupted writes, a per-folder run lock, and one-line
messages for operating-system errors.

Atomic writes go to a temporary file in the destination folder (named after the writing process, so a later run
can tell an abandoned one from a live one), are fsynced and renamed into place. Written files get the mode the
user's umask gives (``mkstemp`` alone would make every file 0600).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Optional

log = logging.getLogger("sidestep")

# Temporary names this project creates: files ``.NAME.tmp-PID-RANDOM`` (atomic writes), folders ``.NAME.tmp-PID``
# and ``.NAME.old-PID`` (atomic folder swaps, training/state.py), and ``.NAME.RANDOM.tmp`` from earlier versions.
_TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$|^\..+\.[A-Za-z0-9_]+\.tmp$")


def _temp_in(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0666 & ~umask
    return tmp


def _write(path: Path, data: bytes) -> None:
    """The one place bytes reach the disk (tests simulate a full disk here)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def naming(path: str | Path):
    """OS errors inside name ``path`` when they name no file: a failed ``write()`` on an open file (a full disk,
    a file-size limit) carries no name, and a message without one does not say where."""
    try:
        yield
    except OSError as exc:
        if exc.filename or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    dest = Path(dest)
    tmp = _temp_in(dest)
    try:
        with naming(dest):
            _write(tmp, data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_stream(dest: str | Path, fill: Callable[[BinaryIO], None]) -> None:
    """Like :func:`atomic_write_bytes` for files too large to hold in memory: ``fill`` writes into the open
    temporary file, piece by piece."""
    dest = Path(dest)
    tmp = _temp_in(dest)
    try:
        with naming(dest), open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(dest: str | Path, obj: Any) -> None:
    atomic_write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def atomic_save_file(tensors: Mapping[str, Any], dest: str | Path,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` made atomic; tensors are made contiguous first."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    atomic_write_bytes(dest, data)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C there; assume alive (nothing of others is removed)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove temporary files and folders of interrupted writes directly inside ``folder``: those of this
    project's naming whose writing process is gone (or, for old names without a pid, always). Call it where no
    other process can be writing (e.g. while holding the folder's :class:`RunLock`). Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_NAME.match(p.name)
        if not m:
            continue
        pid = int(m.group("pid")) if m.group("pid") else 0
        if pid == os.getpid() or (pid and pid_alive(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------------------
# run lock
# ----------------------------------------------------------------------------------------------------------

LOCK_NAME = ".sidestep.lock"


class FolderBusyError(ValueError):
    """Another process holds the folder's lock (message starts with the folder)."""


class RunLock:
    """An exclusive, non-blocking lock on a folder (``FOLDER/.sidestep.lock``), held while a run writes there.

    It is an OS file lock (``flock`` / ``msvcrt.locking``), released by the OS when the holder exits — also after
    ``kill -9`` — so a stale lock file never blocks. The file records the holder's pid for the message and is
    removed on release."""

    def __init__(self, folder: str | Path, what: str = "a training run"):
        self.folder = Path(folder)
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                _lock_fd(fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. some network file systems
                    log.warning("%s: this file system cannot lock files; make sure no other run uses this folder",
                                self.folder)
                    return self
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
                    raise
                raise FolderBusyError(
                    f"{self.folder}: {self.what} is already using this folder{_read_holder(path)}; wait for it to "
                    "finish or choose another output folder") from None
            if _same_file(fd, path):
                break
            os.close(fd)  # its holder released and removed it between our open and our lock: open anew
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.folder / LOCK_NAME)  # while still locked, so nobody locks a file about to vanish
            except OSError:
                pass  # Windows cannot remove an open file; the next run reuses it
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_fd(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


# ----------------------------------------------------------------------------------------------------------
# OS errors as one line
# ----------------------------------------------------------------------------------------------------------


def os_error_message(exc: OSError) -> str:
    """``PATH: what went wrong`` for an operating-system error on a file (e.g. ``/x: no space left on device``)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    reason = reason[:1].lower() + reason[1:]
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{where}: {reason}" if where else reason
