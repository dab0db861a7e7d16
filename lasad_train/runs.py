"""A training run's folder and its resume: one definition for `lasad-train tokenizer` and
`lasad-train gpt`.

OUT holds `last.pt` (the resumable state, the commit point: written first), a deploy file derived
from it (`vq.safetensors` / `model.safetensors`, written second) and `log.jsonl`; `lasad-train gpt`
may keep the resumable state as `state/` instead (`state.py`: bounded safetensors shards and an
index; the trainer removes the other form once one is written). Both trainers:
- refuse an OUT that holds a run unless `--resume` (continue it) or `--overwrite` (start again);
  `--resume` refuses a missing or foreign `last.pt` (or `state/`; where both are, a kill came
  between writing one and removing the other, and the later step is read);
- restore the run's hyper-parameters from `last.pt` (`resolve_hyperparameters`): an option left out
  takes the stored value; a given one that differs is refused, since the run would change;
- drop log lines written after the step they resume from;
- hold `OUT/.lock` while they run, so a second process there stops with one line and the
  temporaries a killed run left (`.last.pt.*.tmp` ...) can be removed.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from lasad_engine.checkpoint import read_envelope
from lasad_engine.io import atomic_write_text

from .folders import FolderLock, clean_stale_files, clean_stale_siblings
from .formats import DataError
from .state import INDEX, remove_state, state_step

LOCK_NAME, CHECKPOINT, LOG = ".lock", "last.pt", "log.jsonl"


def read_training_checkpoint(path: str | Path, fmt: str, max_version: int) -> dict:
    """A resumable checkpoint: `lasad_engine.checkpoint.read_envelope` (weights_only, memory-mapped,
    `format` == fmt, `format_version` or the legacy `version` up to max_version)."""
    return read_envelope(path, fmt, max_version, what="training checkpoint")


class RunFolder:
    """OUT of one trainer while it runs (a context manager that holds OUT's lock on the main rank).

    Args:
        out: the run folder (created if missing).
        fmt, max_version: what `last.pt` must be.
        deploy: the deploy file's name beside last.pt.
        resume: continue the run in OUT (its last.pt must exist).
        overwrite: start again in a folder that holds a run (its files go at `start()`).
        main: whether this process writes (rank 0); the others only read.
        state: (folder name, reader) of the sharded form of the resumable state (`state.py`),
            for a trainer that writes it; the reader returns the checkpoint dict, checked.
    After construction `checkpoint` is the resumed state's content or None (the trainer may drop
    the reference once it has restored from it), `resumed` says which, `ckpt_path` is the file
    it came from (last.pt or state/index.json) and `format` its form ("pt" or "shards").
    """

    def __init__(self, out: str | Path, *, fmt: str, max_version: int, deploy: str, resume: bool,
                 overwrite: bool = False, main: bool = True, state: tuple | None = None):
        self.out, self.deploy, self.main = Path(out), deploy, main
        self.ckpt_path, self.log_path = self.out / CHECKPOINT, self.out / LOG
        self.state_dir, self._read_state = (self.out / state[0], state[1]) if state else (None, None)
        self.checkpoint, self.resumed, self._lock, self.format = None, bool(resume), None, None
        if resume and overwrite:
            raise DataError("--resume continues the run in OUT and --overwrite starts it again: pass one")
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"{self.out}: exists and is not a folder")
        self._created = main and not self.out.exists()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = FolderLock(self.out / LOCK_NAME, str(self.out))
            clean_stale_files(self.out, (CHECKPOINT, deploy, LOG))
            if self.state_dir is not None:
                clean_stale_siblings(self.state_dir, marker=INDEX)
        try:
            self._check(fmt, max_version, resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _check(self, fmt, max_version, resume, overwrite):
        sharded = self.state_dir is not None and self.state_dir.is_dir()
        held = [n for n in (CHECKPOINT, self.deploy) if (self.out / n).exists()] + \
            ([self.state_dir.name + "/"] if sharded else [])
        if resume:
            if not self.ckpt_path.is_file() and not sharded:
                also = f" ({self.out} holds {self.deploy} only, which cannot be resumed)" if held else ""
                none = f", no {self.state_dir.name}/ folder" if self.state_dir is not None else ""
                raise DataError(f"{self.ckpt_path}: nothing to resume (no such file{none}){also}; "
                                "leave out --resume to start a new run")
            if self.ckpt_path.is_file():
                self.checkpoint, self.format = read_training_checkpoint(self.ckpt_path, fmt, max_version), "pt"
                step, other = self.checkpoint.get("step"), state_step(self.state_dir) if sharded else None
                if not sharded or (isinstance(step, int) and (other is None or other <= step)):
                    return
            self.checkpoint, self.format = self._read_state(self.state_dir), "shards"
            self.ckpt_path = self.state_dir / INDEX
        elif held and not overwrite:
            raise DataError(f"{self.out} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                            "--overwrite to start again, or choose another OUT")

    def start(self, step: int) -> None:
        """Called once every check has passed, just before training: a new run (step 0) removes
        the files of the one it replaces; a resumed run drops log lines past `step`."""
        if not self.main:
            return
        if not self.resumed:
            for name in (CHECKPOINT, self.deploy, LOG):
                (self.out / name).unlink(missing_ok=True)
            if self.state_dir is not None:
                remove_state(self.state_dir)
        else:
            truncate_log(self.log_path, step)

    def close(self) -> None:
        """Release the lock; a folder this run created and left empty (a refused start) goes too."""
        if self._lock is None:
            return
        lock_path = self.out / LOCK_NAME
        with contextlib.suppress(OSError):
            if self._created and [p.name for p in self.out.iterdir()] == [LOCK_NAME] and self._lock.holds(lock_path):
                lock_path.unlink()
                self.out.rmdir()
        self._lock.release()
        self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resolve_hyperparameters(given: dict, defaults: dict, stored: dict | None, source: Path) -> dict:
    """The hyper-parameters of a run. `given`: what the user passed (None = left out). A new run
    (`stored` None) takes the given values over `defaults`; a resumed run takes `stored` (keys an
    older checkpoint lacks: the default) and refuses a given value that differs, in one line."""
    if stored is None:
        return {k: defaults[k] if v is None else v for k, v in given.items()}
    out = {}
    for key, value in given.items():
        kept = stored.get(key, defaults[key])
        if value is not None and value != kept:
            flag = "--" + key.replace("_", "-")
            raise DataError(f"{source} was trained with {key}={kept!r}; resuming with {flag} {value!r} would not "
                            f"continue the same run (leave out {flag} to keep the run's value)")
        out[key] = kept
    return out


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    atomic_write_text(path, "".join(s + "\n" for s in keep))


def rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states as tensors and plain values (weights_only-safe),
    saved in every resumable training checkpoint."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_rng_state(state, source) -> None:
    """One DataError line naming `source` unless `state` has the form `rng_state` returns."""
    def bad(what):
        return DataError(f"{source}: damaged RNG state ({what}); resume from an undamaged copy of the run")
    if not isinstance(state, dict):
        raise bad("not an object")
    t = state.get("torch")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise bad("'torch' is not a uint8 vector")
    n, p = state.get("numpy"), state.get("python")
    if not (isinstance(n, dict) and isinstance(n.get("name"), str) and isinstance(n.get("keys"), torch.Tensor)
            and n["keys"].shape == (624,) and isinstance(n.get("pos"), int) and isinstance(n.get("has_gauss"), int)
            and isinstance(n.get("cached_gaussian"), (int, float))):
        raise bad("'numpy' is not {name, keys [624], pos, has_gauss, cached_gaussian}")
    if not (isinstance(p, dict) and isinstance(p.get("version"), int) and isinstance(p.get("state"), list)
            and len(p["state"]) == 625 and all(isinstance(w, int) for w in p["state"])
            and (p.get("gauss_next") is None or isinstance(p.get("gauss_next"), float))):
        raise bad("'python' is not {version, state [625 ints], gauss_next}")
    cuda = state.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda):
        raise bad("'cuda' is not a list of uint8 tensors")


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
