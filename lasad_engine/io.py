"""Atomic file writes: a temporary file in the target's folder, then one rename. A crash or an
error leaves the user's previous file untouched and no half-written output behind.

Temporary files are named `.{name}.{8 random characters}.tmp` (`TEMP_PATTERN`) beside their
target; a run that was killed leaves them behind, and the next command that writes into that
folder removes the ones older than itself (`remove_stale_temps`). Several files that belong
together (an image and its record) are committed by `atomic_paths`: all or none.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import time
import unicodedata
from pathlib import Path

# mkstemp's names: prefix + 8 characters of [a-z0-9_] + suffix.
TEMP_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# A file name's temp adds ".", "." + 8 characters and ".tmp" to it: keep names this much under NAME_MAX.
TEMP_OVERHEAD = 14


class UserError(ValueError):
    """Base of the errors a user's input can cause (bad checkpoint, value, data): the command-line
    tools print their message as one line and exit non-zero, without a traceback."""


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


# What torch's zip writer says when a write fails (it does not pass on the errno): a full disk
# ends torch.save with "unexpected pos N vs M" or "file write failed".
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")
DISK_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def _write_failure(e: BaseException, path: Path) -> OSError | None:
    """The OSError for a write that failed inside a library that hides the cause (torch.save's
    RuntimeError): ENOSPC when the file system of `path` has less than 64 MiB left, else EIO;
    None for any other exception (it propagates as it is)."""
    if not isinstance(e, RuntimeError) or not any(s in str(e) for s in _TORCH_WRITE_FAILURES):
        return None
    import shutil
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 64 << 20:
        return OSError(errno.ENOSPC, f"No space left on device ({free >> 20} MiB free) writing", str(path))
    return OSError(errno.EIO, f"torch could not write the file ({one_line(e, 100)})", str(path))


def disk_hint(e: OSError) -> str:
    """What to change after a write failed with a full disk or quota ("" for other errors)."""
    if getattr(e, "errno", None) not in DISK_ERRNOS:
        return ""
    where = f" ({Path(e.filename).parent or '.'})" if getattr(e, "filename", None) else ""
    return (f"; free space on that file system{where} or write somewhere else; "
            "files from before this command are unchanged")


def _rename(src, dst) -> None:
    """os.replace; the one rename of a commit (tests replace it to inject a failure)."""
    os.replace(src, dst)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it.

    >>> with atomic_path("out.png") as tmp:
    ...     image.save(tmp, format="PNG")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give the file the usual mode
        _rename(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failure = _write_failure(e, path)
        if failure is not None:
            raise failure from None
        raise


@contextlib.contextmanager
def atomic_paths(paths):
    """Yield one temporary path per target; on success commit them all, else change nothing.

    The commit renames the temps onto their targets one by one, after keeping a hard link (or a
    copy) of each target that exists; if a rename fails, the targets already replaced get their
    previous content back (or are removed if they did not exist) before the error propagates.
    So an error or an interrupt (Ctrl-C, SIGTERM) leaves either every file from this run or
    every file as it was. (A SIGKILL in the middle of the renames cannot be caught: its leftovers
    are temps that `remove_stale_temps` removes.)

    >>> with atomic_paths(["grid.png", "grid.json"]) as (png, js):
    ...     write_png(png); write_json(js)
    """
    paths = [Path(p) for p in paths]
    temps: list[str] = []
    try:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            temps.append(_temp_beside(p))
        yield list(temps)
        mode = _default_mode()
        for t in temps:
            os.chmod(t, mode)
        _commit(paths, temps)
    except BaseException as e:
        for t in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
        failure = _write_failure(e, paths[0]) if paths else None
        if failure is not None:
            raise failure from None
        raise


def _commit(paths: list[Path], temps: list[str]) -> None:
    backups: list[str | None] = []
    try:
        for p in paths:
            backups.append(_keep_copy(p) if p.exists() else None)
        done = 0
        try:
            for p, t in zip(paths, temps):
                _rename(t, p)
                done += 1
        except BaseException:
            for p, b in zip(paths[:done], backups[:done]):
                if b is None:
                    os.unlink(p)
                else:
                    os.replace(b, p)
            raise
    finally:
        for b in backups:
            if b is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(b)


def _keep_copy(path: Path) -> str:
    """A temp beside `path` with its current content (a hard link where the file system allows)."""
    tmp = _temp_beside(path)
    os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        import shutil
        shutil.copy2(path, tmp)
    return tmp


def _process_start_time() -> float:
    """When this process started (seconds since the epoch): /proc on Linux, else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_START = _process_start_time()


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the temps of killed runs from `folder`: files named like ours (`TEMP_PATTERN`),
    owned by this user, last written before this process started; and output locks
    (`.NAME.png.lock`) that no running process holds. Returns their names."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    uid = os.getuid() if hasattr(os, "getuid") else None
    for e in entries:
        if LOCK_PATTERN.match(e.name):
            with contextlib.suppress(OSError):
                if e.is_file(follow_symlinks=False) and (uid is None or e.stat(follow_symlinks=False).st_uid == uid) \
                        and _remove_stale_lock(e):
                    removed.append(e.name)
            continue
        if not TEMP_PATTERN.match(e.name):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if not e.is_file(follow_symlinks=False) or (uid is not None and st.st_uid != uid):
                continue
            if st.st_mtime < PROCESS_START - 1:  # one second of slack for clock granularity
                os.unlink(e.path)
                removed.append(e.name)
        except OSError:
            continue
    return removed


# An output's name is held while a run writes it: an advisory lock (flock) on `.NAME.lock` beside
# it. The kernel drops the lock when the process ends, however it ends, so a name is never held by
# a run that is gone; the file of a killed run is removed by the next command in that folder.
LOCK_SUFFIX = ".lock"
LOCK_PATTERN = re.compile(r"^\..+\.png\.lock$")


class OutputLock:
    """The hold on one output name (`hold_output`); `release()` (or leaving a `with`) gives it up."""

    def __init__(self, path: Path, lock: Path, fd: int, made: list[Path]):
        self.path, self.lock, self._fd, self._made = path, lock, fd, made

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if _same_file(self._fd, self.lock):
                    os.unlink(self.lock)  # still locked: a process that opened it meanwhile retries
        finally:
            os.close(self._fd)
            self._fd = None
        for folder in reversed(self._made):  # folders made for the lock, if nothing else came into them
            with contextlib.suppress(OSError):
                folder.rmdir()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def hold_output(path: str | os.PathLike) -> OutputLock | None:
    """Hold the name `path` for this process (O_CREAT + an exclusive, non-blocking flock on
    `.NAME.lock` beside it, made atomically by the kernel), or return None when another running
    process holds it. Two runs that choose a name at the same moment never both get it; a run
    that dies (even by SIGKILL) holds nothing. Folders on the way are made, and removed again on
    release if they stayed empty."""
    import fcntl

    path = Path(path)
    lock = path.with_name(f".{path.name}{LOCK_SUFFIX}")
    made, folder = [], path.parent
    while not folder.exists() and folder.parent != folder:
        made.append(folder)
        folder = folder.parent
    for f in reversed(made):
        with contextlib.suppress(FileExistsError):
            f.mkdir()
    made.reverse()
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _default_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            for f in reversed(made):
                with contextlib.suppress(OSError):
                    f.rmdir()
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock):  # else its holder removed it between our open and our lock: again
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return OutputLock(path, lock, fd, made)
        os.close(fd)


def output_holder(path: str | os.PathLike) -> str:
    """" (pid N)" of the process holding `path` (`hold_output`), or "" if it cannot be read."""
    path = Path(path)
    try:
        text = path.with_name(f".{path.name}{LOCK_SUFFIX}").read_text()[:20].strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _remove_stale_lock(entry) -> bool:
    """Remove a `.NAME.png.lock` that no running process holds (left by a killed run)."""
    import fcntl
    try:
        fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, Path(entry.path)):
            os.unlink(entry.path)
            return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, a file that cannot be written: its name too long for the file
    system (with room for its temp's name), a parent that is a file, or a folder this process
    cannot create files in (tried with a temp file, which root's permission checks need)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a folder; give a file name")
    folder = path.parent
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {str(path)!r}: {str(existing)!r} is not a folder")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    for part in path.parts[:-1]:
        if len(os.fsencode(part)) > name_max:
            raise UserError(f"{what} {str(path)!r}: the folder name {part[:40]!r}... is longer than this file "
                            f"system allows ({name_max} bytes)")
    n = len(os.fsencode(path.name))
    if n > name_max - TEMP_OVERHEAD:
        raise UserError(f"{what} {str(path)!r}: its name has {n} bytes; this file system allows {name_max}, "
                        f"and lasad needs {TEMP_OVERHEAD} of them for its temp file: choose a shorter name")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lasad-probe.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} {str(path)!r}: cannot write in {str(existing)!r} ({e.strerror or e})") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DDP / FSDP wrappers


def clean_state_dict(state_dict) -> dict:
    """Strip wrapper prefixes (`_orig_mod.` of torch.compile, `module.` of DDP) from every key.
    The one place that handles them: every checkpoint reader and writer goes through it."""
    out = {}
    for key, value in state_dict.items():
        key = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def safe_text(text, limit: int = 200) -> str:
    """Text from a file (a checkpoint's note, a class name) made safe to print: control and
    format characters (escape sequences, bidi overrides) shown as escapes, one line, at most
    `limit` characters."""
    out = []
    for ch in str(text):
        if ch in "\t\n\r":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    s = " ".join("".join(out).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def torch_load_reason(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one short clause. torch's refusal is
    several paragraphs that begin with how to turn the safety off; lasad never does, so it says
    only what the file holds."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
    if found:
        return (f"it holds pickled Python objects ({found.group(1)[:80]}), which files saved by lasad never do; "
                "lasad loads only tensors and plain values, so it ran nothing from it")
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        operand = re.search(r"(Unsupported operand \S+|Unsupported class \S+)", text)
        return f"damaged, or not a torch file ({operand.group(1)[:80] if operand else 'unreadable pickle'})"
    return one_line(f"{type(exc).__name__}: {text}")


def loads_strict(text: str):
    """json.loads that refuses NaN and infinities (Python's json reads them; they are not JSON)
    and JSON nested too deeply for Python's parser (a RecursionError otherwise): ValueError."""
    import json

    def refuse(name):
        raise ValueError(f"{name} is not a JSON value")
    try:
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise ValueError("its JSON is nested too deeply to be lasad's") from None


MAX_JSON_BYTES = 64 << 20  # a config with 2**20 class names of up to 1024 characters is far less in practice


def special_file(path: str | os.PathLike) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder ("a character
    device", "a FIFO", "a link to nothing", ...), following links; None otherwise."""
    import stat
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a link to nothing" if path.is_symlink() else None
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    for test, what in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return None


def read_small_file(path: str | os.PathLike, *, inside: str | os.PathLike | None = None,
                    limit: int = MAX_JSON_BYTES) -> str:
    """The text of a small file a lasad file set names (a model folder's config.json): refused
    with one UserError line when it is not a regular file (a device such as /dev/zero or
    /dev/urandom, a FIFO: reading those would never end), when it lies outside the folder
    `inside` (a link that leads out of it), or when it is larger than `limit` bytes."""
    import stat
    path = Path(path)
    kind = special_file(path)
    if kind is not None:
        raise UserError(f"{path}: is {kind}, not a file")
    if inside is not None and not path.resolve().is_relative_to(Path(inside).resolve()):
        raise UserError(f"{path}: a link to {safe_text(str(path.resolve()), 120)}, outside {inside}; lasad reads "
                        "only files inside the folder")
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # changed since the check above
                raise UserError(f"{path}: is not a regular file")
            if st.st_size > limit:
                raise UserError(f"{path}: {st.st_size} bytes; at most {limit} are read")
            data = f.read(limit + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def nonfinite_tensor(state) -> str | None:
    """The name of the first floating tensor of a state dict with a NaN or an infinity, or None
    (one pass of isfinite over the weights)."""
    for name, t in state.items():
        if not (hasattr(t, "is_floating_point") and t.is_floating_point()):
            continue
        if t.element_size() == 1:  # fp8 (e4m3: NaN, no infinity) has no isfinite kernel
            t = t.float()
        if not bool(t.isfinite().all()):
            return name
    return None


def one_line(e, limit: int = 200) -> str:
    """An exception (or text) as one line of at most `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_diff(missing, unexpected, show: int = 5) -> str:
    """"2 missing: a, b; 1 unexpected: c" for a strict-load error."""
    parts = []
    for name, keys in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            parts.append(f"{len(keys)} {name}: {', '.join(keys[:show])}{more}")
    return "; ".join(parts)
