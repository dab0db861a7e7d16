"""Atomic file writes: a temporary file in the target's folder, then one rename. A crash or an
error leaves the user's previous file untouched and no half-written output behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


class UserError(ValueError):
    """Base of the errors a user's input can cause (bad checkpoint, value, data): the command-line
    tools print their message as one line and exit non-zero, without a traceback."""


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it.

    >>> with atomic_path("out.png") as tmp:
    ...     image.save(tmp, format="PNG")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
