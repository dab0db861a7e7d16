"""The input of one decode step: the class row at position 0, the token row after, and whether
the position starts an image row (docs/model.md, "Sequence" and the mixer's step 5).

`embed_step(..., backend="torch")` is the definition (two lookups and a device-side select, so
the position never needs a host sync); the Triton twin does the same in one launch.

Shapes:
    ids: int64 [R]    pos: int64 [R] (each row's own position) or [1] (one for every row)
    width: int64 [R] or [1] (the grid width of each row, or of all), or a Python int
    cls_table: [C + 1, d] (the last row the null class)    tok_table: [V, d]
    returns x [R, d] in the tables' dtype, start bool [R] (or [1] when pos is [1]): the row-start flags
"""

from __future__ import annotations

import torch

from .lasad.mask import row_start_mask
from .norms import _pick

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def embed_step(ids: torch.Tensor, pos: torch.Tensor, width, cls_table: torch.Tensor, tok_table: torch.Tensor,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if _pick(backend, ids) == "triton":
        return _embed_triton(ids, pos, width, cls_table, tok_table)
    cls = cls_table[ids.clamp(0, cls_table.shape[0] - 1)]
    tok = tok_table[ids.clamp(0, tok_table.shape[0] - 1)]
    return torch.where(pos.reshape(-1, 1) == 0, cls, tok), row_start_mask(pos, width)


if triton is not None:

    @triton.jit
    def embed_step_kernel(ids, pos, width, cls, tok, x, start, C, V, pos_stride, width_stride, start_stride,
                          D: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
        # One program per row: the class row (p = 0) or the token row, clamped like the torch
        # definition, and the row's row-start flag (stride 0: one position, width or flag for
        # every row; a single flag is written by program 0).
        i = tl.program_id(0).to(tl.int64)
        p = tl.load(pos + i * pos_stride)
        w = tl.load(width + i * width_stride) if WIDTH == 0 else WIDTH
        idx = tl.load(ids + i)
        first = p == 0
        row_c = tl.minimum(tl.maximum(idx, 0), C - 1)
        row_t = tl.minimum(tl.maximum(idx, 0), V - 1)
        offs = tl.arange(0, BLOCK)
        m = offs < D
        a = tl.load(cls + row_c * D + offs, mask=m, other=0.0)  # both rows exist (clamped): read
        b = tl.load(tok + row_t * D + offs, mask=m, other=0.0)  # both, keep one
        tl.store(x + i * D + offs, tl.where(first, a, b), mask=m)
        if start_stride != 0 or i == 0:
            tl.store(start + i * start_stride, (p >= 1) & ((p - 1) % w == 0))


def _embed_triton(ids, pos, width, cls_table, tok_table):
    R, D = ids.shape[0], cls_table.shape[1]
    ids = ids.contiguous()  # the kernel reads ids[i] at i (a column of a token matrix is strided)
    x = torch.empty(R, D, dtype=cls_table.dtype, device=ids.device)
    const = 0 if isinstance(width, torch.Tensor) else int(width)
    pos_stride, width_stride = int(pos.numel() != 1), int(const == 0 and width.numel() != 1)
    for name, t, stride in (("pos", pos, pos_stride), ("width", width, width_stride)):
        if stride and t.numel() != R:
            raise ValueError(f"{name} has {t.numel()} values for {R} rows (one, or one per row)")
    per_row = pos_stride or width_stride
    start = torch.empty(R if per_row else 1, dtype=torch.bool, device=ids.device)
    embed_step_kernel[(R,)](ids, pos, width if const == 0 else pos, cls_table, tok_table, x, start,
                            cls_table.shape[0], tok_table.shape[0], pos_stride, width_stride, int(per_row), D=D,
                            BLOCK=triton.next_power_of_2(D), WIDTH=const, num_warps=4 if D >= 1024 else 2)
    return x, start
