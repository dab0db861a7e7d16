"""The spatial-aware decay: which positions start an image row, and what their log-decay becomes.

This file is the only definition of the row-start rule. The naive, chunked and step forms of the
op (and the Triton step kernel, which receives the mask as data) all take it from here.

Sequence position p: p = 0 is the class token, image token t = p - 1 sits at p ≥ 1. A position
starts a row when p ≥ 1 and t mod w == 0, w being the grid width in tokens (an input, not a
constant: 16 at 256², 32 at 512²). The class position is never masked.
"""

from __future__ import annotations

import torch

ROW_START_MODES = ("none", "unit", "reset")

# The log-decay that replaces g at a row start. "reset" is -inf (decay 0: the state is cleared);
# chunked kernels work with differences of cumulative log-decays, where -inf - -inf is NaN, so
# they pass `finite=True` and get RESET_LOG_DECAY_FLOOR instead. exp(-30) ≈ 9e-14 is far below
# fp32 resolution (1.2e-7) relative to the state, so the result equals a true reset; a floor of
# larger magnitude (-60, -88) would only add cancellation error to the cumulative sums.
RESET_LOG_DECAY_FLOOR = -30.0


def check_mode(mode: str) -> str:
    if mode not in ROW_START_MODES:
        raise ValueError(f"row_start={mode!r} is not one of {', '.join(ROW_START_MODES)}")
    return mode


def row_start_mask(pos: torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """True where sequence position `pos` starts an image row.

    Args:
        pos: int tensor of sequence positions, any shape (a device tensor in decode).
        width: grid width w in tokens, a Python int or an int tensor broadcastable to `pos`.
    Returns:
        bool tensor shaped like `pos`.
    """
    t = pos - 1
    return (pos >= 1) & (torch.remainder(t, width) == 0)


def row_start_log_decay(mode: str, finite: bool = False) -> float | None:
    """The log-decay written at row starts in `mode`, or None when nothing is overridden."""
    check_mode(mode)
    if mode == "none":
        return None
    if mode == "unit":
        return 0.0
    return RESET_LOG_DECAY_FLOOR if finite else float("-inf")


def apply_row_start(g: torch.Tensor, mask: torch.Tensor, mode: str, finite: bool = False) -> torch.Tensor:
    """Override the log-decay `g` at row starts.

    Args:
        g: log-decay `[B, T, H, K]` (or `[B, H, K]` for a single step), ≤ 0.
        mask: bool row-start mask, `[T]` (or a single element for a step).
        mode: "none" | "unit" | "reset".
        finite: use the finite floor for "reset" (chunked forms).
    Returns:
        g' with the same shape and dtype as `g` (a new tensor; `g` is untouched).
    """
    value = row_start_log_decay(mode, finite)
    if value is None:
        return g
    if g.dim() == 4:  # [B, T, H, K]: mask over T
        mask = mask.reshape(1, -1, 1, 1)
    else:  # one step: a single flag
        mask = mask.reshape(*([1] * g.dim()))
    return torch.where(mask, torch.full((), value, dtype=g.dtype, device=g.device), g)


def sequence_positions(T: int, start: int = 0, device=None) -> torch.Tensor:
    """Positions start … start+T-1 as an int64 tensor `[T]`."""
    return torch.arange(start, start + T, device=device, dtype=torch.int64)
