"""The chunked (parallel) form of the LASAD op, for training and prefill.

On CUDA it runs flash-linear-attention's `chunk_gla` (imported lazily: fla needs triton at
import time). Elsewhere it runs a pure-torch chunked form: exact intra-chunk attention with
pairwise decay differences, and a recurrence over chunks.
"""

from __future__ import annotations

import torch

from .mask import apply_row_start, row_start_mask, sequence_positions

CHUNK_BACKENDS = ("torch", "fla")


def _fla_chunk_gla():
    try:
        from fla.ops.gla import chunk_gla
    except Exception as e:  # ImportError, or fla failing on a machine without triton/CUDA
        raise RuntimeError(
            f"flash-linear-attention is needed for chunk_lasad on CUDA ({type(e).__name__}: {e}); "
            "install it with: pip install -e '.[gpu]' in lasad's folder"
        ) from None
    return chunk_gla


def chunk_lasad(
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
    chunk_size: int = 16,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `naive_recurrent_lasad`, computed chunk by chunk.

    Args:
        q, k, g: `[B, T, H, K]`; g is the unmasked log-decay (≤ 0).
        v: `[B, T, H, V]`.
        width, row_start, scale, initial_state, output_final_state, start_pos: as the naive form.
        chunk_size: chunk length of the torch form. Default: 16.
        backend: "fla" (CUDA only) or "torch". Default: "fla" for CUDA tensors, else "torch".
    Returns:
        o `[B, T, H, V]` in v's dtype; final state `[B, H, K, V]` fp32 (fp64 for fp64 inputs) or None.

    "reset" uses the finite log-decay floor (mask.RESET_LOG_DECAY_FLOOR): differences of
    cumulative log-decays would be NaN with -inf.
    """
    if backend is None:
        backend = "fla" if q.is_cuda else "torch"
    if backend not in CHUNK_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(CHUNK_BACKENDS)}")
    T, K = q.shape[1], q.shape[-1]
    if scale is None:
        scale = K ** -0.5
    mask = row_start_mask(sequence_positions(T, start_pos, q.device), width)
    g = apply_row_start(g, mask, row_start, finite=True)
    if backend == "fla":
        if initial_state is not None:
            initial_state = initial_state.float()
        o, final = _fla_chunk_gla()(q, k, v, g, scale=scale, initial_state=initial_state,
                                     output_final_state=output_final_state)
        return o, final
    return _chunk_torch(q, k, v, g, scale, initial_state, output_final_state, chunk_size)


def _chunk_torch(q, k, v, g, scale, initial_state, output_final_state, C):
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    N = (T + C - 1) // C
    pad = N * C - T

    def split(x):  # [B, T, H, D] -> [B, H, N, C, D], zero-padded (g = 0, k = 0: no effect)
        x = torch.nn.functional.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v = split(q) * scale, split(k), split(v)
    # Cumulative log-decay from the chunk start, [B, H, N, C, K], summed and differenced in
    # float64: with reset floors the sums are large and fp32 differences would lose digits.
    b = split(g).double().cumsum(3)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = b[..., :, None, :] - b[..., None, :, :]             # [B, H, N, C(i), C(j), K]
    decay = torch.where(causal[..., None], diff, float("-inf")).exp().to(acc)
    A = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, decay)
    o = A @ v                                                  # intra-chunk part
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc).clone()
    b_last = b[:, :, :, -1]                                    # [B, H, N, K]
    qb = q * b.exp().to(acc)
    kb = k * (b_last[:, :, :, None] - b).exp().to(acc)
    b_last = b_last.to(acc)
    for n in range(N):
        o[:, :, n] += qb[:, :, n] @ S
        S = b_last[:, :, n, :, None].exp() * S + kb[:, :, n].transpose(-1, -2) @ v[:, :, n]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(out_dtype), (S if output_final_state else None)
