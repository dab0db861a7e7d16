"""A linear layer with its neighbours: the input's RMSNorm, SwiGLU on the output, the residual
add. One op per GEMM of the decode step (docs/design.md), so a backend can run each as one kernel.

`fused_linear` with `backend="torch"` is the definition: the same modules the parallel forward
uses (`norms.rms_norm`, `F.linear`, `norms.swiglu`, `+`), in the same dtypes. A Triton twin for
decode-sized inputs is chosen by `backend="triton"`.

Shapes:
    x:        [R, K]      (any leading dims on the torch path)
    weight:   [N, K]      nn.Linear layout
    residual: [R, N] (or [R, N/2] with swiglu)
    returns   [R, N] or [R, N/2] with swiglu, in x's dtype (the weight's dtype for the GEMM input)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .norms import KERNEL_BACKENDS, rms_norm, swiglu as swiglu_op


def fused_linear(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-5, norm_groups: int = 1, residual: torch.Tensor | None = None,
                 swiglu: bool = False, backend: str | None = None) -> torch.Tensor:
    """y = W · rms_norm(x) (or W · x), then SwiGLU of y's two halves if `swiglu`, then
    `residual + y` if a residual is given."""
    if backend not in (None, *KERNEL_BACKENDS):
        raise ValueError(f"backend={backend!r} is not one of {', '.join(KERNEL_BACKENDS)}")
    a = x if norm_weight is None else rms_norm(x, norm_weight, eps, norm_groups, backend=backend)
    y = F.linear(a.to(weight.dtype), weight)
    if swiglu:
        y = swiglu_op(y, backend=backend)
    return y if residual is None else residual + y
