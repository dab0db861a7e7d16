"""What a user asks of a generation, validated once where it enters: the sampling settings, the
token grid, the device. Inner layers (engine, backends, sampler) trust these typed values.
Nothing here imports torch at module load, so command-line `--help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass

from .io import UserError


class EngineError(UserError):
    """Bad input to the engine; the message is one line that names the value and the choices."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen (SPEC §5). Guidance (batch doubling) is on when cfg_scale != 1."""

    cfg_scale: float = 4.0
    cfg_interval: int = -1      # guidance only at positions p ≤ cfg_interval; -1: every step
    temperature: float = 1.0    # 0: greedy
    top_k: int = 0              # 0: off
    top_p: float = 1.0          # 1.0: off

    def __post_init__(self):
        if not self.temperature >= 0:
            raise EngineError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise EngineError(f"top_k={self.top_k} must be an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if not isinstance(self.cfg_interval, int) or self.cfg_interval < -1:
            raise EngineError(f"cfg_interval={self.cfg_interval} must be an integer >= -1 (-1 = always)")

    @property
    def cfg(self) -> bool:
        return self.cfg_scale != 1.0

    def graph_key(self) -> tuple:
        """What a captured step bakes in (Python scalars); the scale and interval are data."""
        return (self.cfg, self.temperature, self.top_k, self.top_p)


def resolve_device(device=None):
    """A torch device from a user's choice (None: cuda if available, else cpu); one-line errors."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise EngineError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device={device} was asked for, but CUDA is not available on this machine; use --device cpu")
    return device


def parse_grid(grid: str | tuple[int, int] | None, default: tuple[int, int]) -> tuple[int, int]:
    """"32x32" or (32, 32) or None (the trained grid) -> (h, w)."""
    if grid is None:
        return default
    if isinstance(grid, str):
        parts = grid.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise EngineError(f"grid={grid!r} is not of the form HxW, e.g. 16x16 or 32x32")
        grid = (int(parts[0]), int(parts[1]))
    h, w = grid
    if h < 1 or w < 1:
        raise EngineError(f"grid={h}x{w} must have positive sides")
    return int(h), int(w)
