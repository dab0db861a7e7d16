"""HGRN2's gates, written once: the forget gate in log space, its layer-wise lower bound, and the
input gate tied to it (docs/model.md, the mixer, steps 2–3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_lower_bounds(raw: torch.Tensor) -> torch.Tensor:
    """HGRN2's lower bounds from the learnable `[L, H·K]` tensor: softmax over layers, cumulative
    sum, minus the first row, so layer 0 has bound 0 and the bound grows with depth (< 1)."""
    p = raw.float().softmax(0)
    c = p.cumsum(0)
    return c - c[:1]


def log_decay(f: torch.Tensor, lower_bound: torch.Tensor | None) -> torch.Tensor:
    """g = log(lb + (1 - lb)·sigmoid(f)) ≤ 0; plain logsigmoid(f) without a bound (layer 0).

    Args:
        f: forget-gate pre-activation `[..., H·K]` (or `[..., H, K]` with `lower_bound` reshaped).
        lower_bound: this layer's bound broadcastable to `f`, or None.
    """
    if lower_bound is None:
        return F.logsigmoid(f)
    return torch.log(lower_bound + (1 - lower_bound) * torch.sigmoid(f))


def input_gate(g: torch.Tensor) -> torch.Tensor:
    """k = 1 - exp(g): HGRN2 ties the input gate to the forget gate. Always computed from the
    unmasked g (a row-start override must not change what a token writes)."""
    return -torch.expm1(g)


def gates(f: torch.Tensor, lower_bound: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, k) from the forget-gate pre-activation f: g = log_decay(f, lower_bound) and
    k = 1 - exp(g), written without cancellation as (1 - lb)·sigmoid(-f) (exactly equal: 1 - lb -
    (1 - lb)·sigmoid(f)). Standard ops only, so it exports to ONNX; the Triton kernel computes
    the same expression."""
    k = torch.sigmoid(-f)
    if lower_bound is not None:
        k = (1 - lower_bound) * k
    return log_decay(f, lower_bound), k


def fused_gates(qfv, lower_bound, H, K, V):
    """Split the fused projection W_q x | W_f x | W_i x `[B, 2HK + HV]` and apply the gates:
    q, k, g `[B, H, K]` (k, g fp32) and v `[B, H, V]` (the Triton step kernel computes the same with FUSED_GATES).
    Works on any leading dims: `[..., 2HK + HV]` -> `[..., H, K]` / `[..., H, V]`."""
    q, f, v = qfv.split([H * K, H * K, H * V], dim=-1)
    g, k = gates(f.to(torch.promote_types(f.dtype, torch.float32)), lower_bound)
    return (F.silu(q).unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V)),
            g.unflatten(-1, (H, K)))
