"""What a user asks of a generation, validated once where it enters: the sampling settings, the
token grid, the class labels, the device. Inner layers (engine, backends, sampler) trust these
typed values. Nothing here imports torch at module load, so command-line `--help` stays fast."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

from .io import UserError

# Sane bounds, checked before anything is allocated. A side of 1024 tokens is a 16k-pixel image
# with a 16x VQ; a request of 1M images would take days at the fastest rates measured here.
MAX_GRID_SIDE = 1024
MAX_TOKENS = MAX_GRID_SIDE * MAX_GRID_SIDE
MAX_IMAGES = 1 << 20
MAX_BATCH = 1 << 16         # images decoded together (buffers are sized for this)
MAX_SEED = (1 << 63) - 1    # torch generators take 64-bit seeds; 0 .. 2**63-1 is portable
MAX_CFG_SCALE = 100.0       # |cfg_scale|; LlamaGen uses 1.5-10
MAX_TEMPERATURE = 100.0     # logits / 100 is already nearly uniform
MAX_TOP_K = 1 << 20         # the largest vocabulary a config may have; top_k >= vocab is off


# `weights=` (pipeline, lasad-run, lasad-export): the decode matrices' storage. "float": in the
# precision of the rest; "int8" / "fp8": weight-only quantised, one fp32 scale per output channel
# (lasad_engine/quant.py). Here, not in quant.py, so that `--help` imports no torch.
WEIGHT_CHOICES = ("float", "int8", "fp8")


class EngineError(UserError):
    """Bad input to the engine; the message is one line that names the value and the choices."""


class OutOfRange(EngineError):
    """A value the user gave that is outside its range or not one of its choices (a class id or
    name, a grid, a device, a sampling setting): a usage error, exit code 2 from the command-line
    tools, as click gives for an option's own range."""

    exit_code = 2


def _number(name: str, value, kind=float):
    """`value` as a finite Python number of `kind` (bools and NaN/inf refused)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer() if ok and isinstance(value, float) else ok and isinstance(value, int)
    if not ok or not math.isfinite(value):
        raise EngineError(f"{name}={value!r} must be a finite {'integer' if kind is int else 'number'}")
    return kind(value)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen (docs/model.md, "Generation"). Guidance (batch doubling) is on when
    cfg_scale != 1. Defaults are LlamaGen's demo sampler (cfg 4.0, top-k 2000)."""

    cfg_scale: float = 4.0
    cfg_interval: int = -1      # guidance only at positions p ≤ cfg_interval; -1: every step
    temperature: float = 1.0    # 0: greedy
    top_k: int = 2000           # 0: off
    top_p: float = 1.0          # 1.0: off

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "cfg_scale", _number("cfg_scale", self.cfg_scale))
        set_(self, "temperature", _number("temperature", self.temperature))
        set_(self, "top_p", _number("top_p", self.top_p))
        set_(self, "top_k", _number("top_k", self.top_k, int))
        set_(self, "cfg_interval", _number("cfg_interval", self.cfg_interval, int))
        if not abs(self.cfg_scale) <= MAX_CFG_SCALE:
            raise OutOfRange(f"cfg_scale={self.cfg_scale} must be in -{MAX_CFG_SCALE:g}..{MAX_CFG_SCALE:g} (1 = off)")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise OutOfRange(f"temperature={self.temperature} must be in 0..{MAX_TEMPERATURE:g} (0 = greedy)")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise OutOfRange(f"top_k={self.top_k} must be an integer in 0..{MAX_TOP_K} (0 = off)")
        if not 0 < self.top_p <= 1:
            raise OutOfRange(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if not -1 <= self.cfg_interval <= MAX_TOKENS:
            raise OutOfRange(f"cfg_interval={self.cfg_interval} must be an integer in -1..{MAX_TOKENS} (-1 = always)")

    @property
    def cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @classmethod
    def resolve(cls, given: dict, recommended=None, source: str = "the checkpoint") -> "SamplingParams":
        """The settings of one call: each field `given` (None = left out), else the model's
        `recommended` one (a checkpoint's meta["sampling"], as Hugging Face models carry a
        generation config), else the class default. A recommendation that is not a dict of known
        fields with valid values is one EngineError line naming `source`."""
        fields = tuple(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise EngineError(f"unknown sampling setting {unknown[0]!r}; use {', '.join(fields)}")
        if recommended is not None and (not isinstance(recommended, dict) or set(recommended) - set(fields)):
            raise EngineError(f"{source}: damaged metadata (sampling must map {', '.join(fields)} to values)")
        chosen = {k: v for k, v in given.items() if v is not None}
        used = {k: v for k, v in (recommended or {}).items() if k not in chosen}  # the recommendation in use
        try:
            return cls(**used, **chosen)  # validated once, the recommendation with what was given
        except EngineError:
            if used:
                try:
                    cls(**used)
                except EngineError as e:  # the checkpoint's values are at fault, not the caller's
                    raise EngineError(f"{source}: damaged metadata (sampling: {e})") from None
            raise

    def graph_key(self) -> tuple:
        """What a captured step bakes in (Python scalars); the scale and interval are data."""
        return (self.cfg, self.temperature, self.top_k, self.top_p)


class Grid(NamedTuple):
    """A validated token grid: h rows of w tokens."""

    h: int
    w: int

    @property
    def tokens(self) -> int:
        return self.h * self.w


def parse_grid(grid, default) -> Grid:
    """"32x32", (32, 32), a Grid, or None (the trained grid, `default`) -> Grid."""
    if isinstance(grid, Grid):
        return grid
    if grid is None:
        grid = default
    if isinstance(grid, str):
        parts = grid.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise OutOfRange(f"grid={grid!r} is not of the form HxW, e.g. 16x16 or 32x32")
        grid = (int(parts[0]), int(parts[1]))
    try:
        h, w = (_number("grid side", v, int) for v in grid)
    except (TypeError, ValueError):
        raise OutOfRange(f"grid={grid!r} is not (h, w) or 'HxW'") from None
    if not (1 <= h <= MAX_GRID_SIDE and 1 <= w <= MAX_GRID_SIDE):
        raise OutOfRange(f"grid={h}x{w}: each side must be in 1..{MAX_GRID_SIDE} tokens")
    return Grid(h, w)


@dataclass(frozen=True)
class ClassLabels:
    """Validated class ids: int64 `[n]` (CPU) in 0..num_classes-1 (or ..num_classes, the null
    class, where allowed). Made once at the edge by `ClassLabels.of`; the engine trusts it."""

    ids: "torch.Tensor"  # noqa: F821
    num_classes: int

    @classmethod
    def of(cls, labels, num_classes: int, allow_null: bool = False) -> "ClassLabels":
        """Ids (an int, a list, a tensor) -> ClassLabels, every value checked; one-line errors."""
        import torch

        if isinstance(labels, ClassLabels) and labels.num_classes == num_classes:
            return labels
        if isinstance(labels, int) or (hasattr(labels, "ndim") and labels.ndim == 0):
            labels = [labels]
        try:
            values = labels.reshape(-1).tolist() if hasattr(labels, "reshape") else list(labels)
        except TypeError:
            raise EngineError(f"class labels {labels!r} are not a list of ids") from None
        if not values:
            raise EngineError("no class labels given")
        if len(values) > MAX_IMAGES:
            raise EngineError(f"{len(values)} class labels: at most {MAX_IMAGES} per request")
        top = num_classes if allow_null else num_classes - 1
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise EngineError(f"class {v!r} is not an integer id (0..{num_classes - 1})")
            if not 0 <= v <= top:
                null = f" ({num_classes} = null class)" if allow_null else ""
                raise OutOfRange(f"class {v} is out of range: this model has classes 0..{num_classes - 1}{null}")
        return cls(torch.tensor(values, dtype=torch.int64), num_classes)

    def __len__(self) -> int:
        return self.ids.numel()

    def __getitem__(self, index: slice) -> "ClassLabels":
        return ClassLabels(self.ids[index], self.num_classes)  # a slice of valid ids is valid

    def tolist(self) -> list[int]:
        return self.ids.tolist()


def available_bytes(device) -> int | None:
    """Free memory of a torch device (CUDA: the driver's count; CPU: available physical pages),
    or None where it cannot be read."""
    if device.type == "cuda":
        import torch
        free, _ = torch.cuda.mem_get_info(device)
        return free
    import os
    try:
        with open("/proc/meminfo") as f:  # MemAvailable counts reclaimable page cache
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: int, device, what: str, hint: str = "use a smaller --max-batch or grid") -> None:
    """Refuse, in one line, an allocation the device cannot hold (before it is tried). Under
    1 MiB nothing is asked of the device (a server checks every request: the driver's count of
    free memory costs tens of µs, and no allocation that small is what runs a device out)."""
    if nbytes < 1 << 20:
        return
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise EngineError(f"{what} needs {nbytes / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free; {hint}")


class OutOfMemory(EngineError):
    """An allocation failed inside torch (the CPU allocator, or CUDA's) although the estimates
    before it passed (another process took the memory, or a step needs more than estimated): one
    line naming the stage, what was asked for, and what to change. Exit code 1."""


def is_out_of_memory(e: BaseException) -> bool:
    """True for torch's out-of-memory errors (torch.OutOfMemoryError on CUDA; a RuntimeError from
    the CPU allocator) and Python's MemoryError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()
                                           or "Cannot allocate memory" in text)


def out_of_memory_line(e: BaseException, what: str, hint: str) -> str:
    """"out of memory while WHAT (torch asked for N GiB); HINT": the one line for `e`."""
    import re
    text = str(e)
    asked = re.search(r"tried to allocate (\d+) bytes", text, re.IGNORECASE)
    if asked:
        size = f"{int(asked.group(1)) / 2**30:.1f} GiB"
    else:
        found = re.search(r"tried to allocate ([\d.]+ [KMGT]?i?B)", text, re.IGNORECASE)
        size = found.group(1) if found else None
    device = "CUDA" if "CUDA" in text or type(e).__name__ == "OutOfMemoryError" else "the CPU"
    asked_for = f" (torch asked {device} for {size} more)" if size else f" ({device})"
    return f"out of memory while {what}{asked_for}; {hint}"


@contextlib.contextmanager
def memory_stage(what: str, hint: str):
    """Turn an out-of-memory error raised inside into OutOfMemory, one line naming `what` was
    being done and `hint` (what to change); other errors pass through."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        _release_cuda_cache()
        raise OutOfMemory(out_of_memory_line(e, what, hint)) from None


def _release_cuda_cache() -> None:
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def with_index(device):
    """`device` with its CUDA index filled in (cuda -> cuda:N of the current device): a thread of its own
    starts on device 0 whatever the caller's current device, and torch.cuda.set_device refuses a bare "cuda"."""
    import torch

    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_device(device=None):
    """A torch device from a user's choice (None: cuda if available, else cpu), a CUDA one with its
    index; one-line errors."""
    import torch

    if isinstance(device, torch.device):
        device_in = device
    else:
        device_in = None
    if device is None:
        return with_index(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = device_in or torch.device(device)
    except (RuntimeError, TypeError):
        raise OutOfRange(f"device={device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device={device} was asked for, but CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OutOfRange(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise OutOfRange(f"device={device}: lasad runs on cpu or cuda (e.g. cpu, cuda, cuda:1)")
    elif device.index not in (None, 0):
        raise OutOfRange(f"device={device}: there is one cpu device (cpu or cpu:0)")
    return with_index(device)
