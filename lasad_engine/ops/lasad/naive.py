"""The reference form of the LASAD op: a loop over positions (docs/model.md, the mixer, steps 5–7), float64-capable."""

from __future__ import annotations

import torch

from .mask import apply_row_start, row_start_mask, sequence_positions


def naive_recurrent_lasad(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    width: int,
    row_start: str = "unit",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    start_pos: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_p = diag(exp(g'_p))·S_{p-1} + k_p v_pᵀ;  o_p = (scale·q_p)ᵀ S_p, one position at a time.

    Args:
        q, k, g: `[B, T, H, K]`; g is the unmasked log-decay (≤ 0).
        v: `[B, T, H, V]`.
        width: grid width w in tokens (row starts are where (p - 1) mod w == 0, p ≥ 1).
        row_start: "none" | "unit" | "reset".  Default: "unit".
        scale: query scale. Default: K ** -0.5.
        initial_state: `[B, H, K, V]` state before the first position. Default: zeros.
        start_pos: sequence position p of the first element of T.  Default: 0.
    Returns:
        o `[B, T, H, V]` in v's dtype, and the final state `[B, H, K, V]` (fp32, or fp64 for fp64
        inputs) when `output_final_state`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    out_dtype = v.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = row_start_mask(sequence_positions(T, start_pos, q.device), width)
    g = apply_row_start(g.to(acc), mask, row_start)
    q, k, v = (x.to(acc) for x in (q, k, v))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc).clone()
    o = q.new_empty(B, T, H, V)
    for t in range(T):
        S = S * g[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
    return o.to(out_dtype), (S if output_final_state else None)
