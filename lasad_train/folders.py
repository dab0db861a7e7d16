"""Folders the `lasad-train` stages own: one writer at a time, whole-folder replacement that never
leaves the target missing, and the temporaries that killed runs leave behind.

- `FolderLock(path)`: an exclusive `flock` on `path` (held by a training run on `OUT/.lock`), so a
  second process in the same folder stops with one line and the holder may treat every temporary
  of ours in that folder as stale.
- `staging_folder(out)` + `replace_folder(staging, out)`: an image or code set is written into
  `.OUT.<pid>.<hex>.tmp` beside OUT and swapped into place. On Linux the swap is one
  `renameat2(RENAME_EXCHANGE)` (OUT is never missing); elsewhere the old set is renamed to
  `.OUT.<pid>.<hex>.old` first and the next run restores it if a kill came between the renames.
- `clean_stale_siblings(out)`: the next run's recovery; `clean_stale_files(folder, names)`: the
  `.NAME.*.tmp` files `lasad_engine.io.atomic_path` leaves when its process is killed.

Only names of these patterns are ever removed; a user's files are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
from pathlib import Path

from .formats import DataError

try:
    import fcntl
except ImportError:  # Windows: no locking (the stale-file cleanup is then only by process id)
    fcntl = None


def _fault(point: str) -> None:
    """Fault-injection hook, a no-op: tests replace it to kill the process at `point`
    ("exchanged", "backed-up", "replaced") and check what the next run finds."""


class FolderLock:
    """An exclusive, non-blocking lock on the file `path` (created if missing, never removed), held
    until `release()` or process exit; the file holds the holder's process id."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self._fd = Path(path), None
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = self.path.read_text().strip() or "?"
            raise DataError(f"{what} is in use by another lasad-train process (pid {holder}); "
                            "wait for it or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def holds(self, path: str | os.PathLike) -> bool:
        """Whether `path` is the very file this lock holds (not one made after it was removed)."""
        try:
            return self._fd is not None and os.path.samestat(os.fstat(self._fd), os.stat(path))
        except OSError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def clean_stale_files(folder: str | os.PathLike, names) -> list[Path]:
    """Remove `.NAME.<random>.tmp` files (the temporaries of `atomic_path`) for each NAME in
    `names` from `folder`; call it only while holding the folder's lock. Returns what was removed."""
    folder, removed = Path(folder), []
    for name in names:
        pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}\.tmp")
        for p in folder.glob(".*.tmp"):
            if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                removed.append(p)
    return removed


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def _siblings(out: Path, kind: str) -> list[tuple[Path, int | None]]:
    """Our `.OUT.<pid>.<hex>.KIND` folders beside `out` (and, for "tmp", the `.OUT.<8 chars>.tmp`
    of earlier versions, pid None), oldest first."""
    new = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[0-9a-f]{{8}}\.{kind}")
    old = re.compile(rf"\.{re.escape(out.name)}\.[A-Za-z0-9_]{{8}}\.tmp") if kind == "tmp" else None
    found = []
    if not out.parent.is_dir():
        return found
    for p in out.parent.iterdir():
        m = new.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append((p, int(m.group(1))))
        elif old is not None and old.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            found.append((p, None))
    return sorted(found, key=lambda t: t[0].stat().st_mtime)


def _alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():
        return pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale_siblings(out: str | os.PathLike, marker: str = "manifest.json") -> None:
    """The next run's recovery beside `out`: restore the set a killed swap left as a backup when
    `out` is missing (a backup holding `marker`, the file written last), then remove the staging
    and backup folders of processes that are gone."""
    out = Path(out)
    backups = [p for p, pid in _siblings(out, "old") if not _alive(pid)]
    if not out.exists() and backups and (backups[-1] / marker).is_file():
        os.rename(backups.pop(), out)
    for p, pid in _siblings(out, "tmp") + [(b, None) for b in backups]:
        if not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def staging_folder(out: str | os.PathLike) -> Path:
    """A new empty folder beside `out` (same file system, so the swap is a rename), with the
    permissions a plain `mkdir` would give."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    return tmp


def _renameat2():
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system or file system cannot, so the caller falls back to two renames."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(staging: Path, out: Path) -> None:
    """Put the complete folder `staging` at `out`, replacing an earlier one. A kill at any point
    leaves `out` whole (old or new) or, on the two-rename fallback only, its backup beside it for
    `clean_stale_siblings` to restore."""
    if not out.exists():
        os.rename(staging, out)
        return
    if exchange(staging, out):  # staging now holds the old set
        _fault("exchanged")
        shutil.rmtree(staging, ignore_errors=True)
        return
    backup = _sibling(out, "old")
    os.rename(out, backup)
    try:
        _fault("backed-up")
        os.rename(staging, out)
    except BaseException:
        os.rename(backup, out)
        raise
    _fault("replaced")
    shutil.rmtree(backup, ignore_errors=True)
