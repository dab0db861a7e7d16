"""The in-place single-token form of the LASAD op: the decode step of every engine backend.

`lasad_step_` updates the fp32 state in place and returns the readout. It dispatches to the Triton
kernel `lasad_step_kernel` for CUDA tensors (or when asked to, e.g. under TRITON_INTERPRET=1 on a
CPU) and to the torch reference `lasad_step_ref_` otherwise. The row-start mask arrives as data
(a one-element bool tensor computed by `mask.row_start_mask` from the device position and grid
width), so one compiled kernel serves every position and every resolution.

Shapes (one decode step, B rows, H heads):
    q, k, g:  [B, H, K]     query, key (input gate) and unmasked log-decay
    v:        [B, H, V]     value
    state:    [B, H, K, V]  fp32, updated in place
    start:    [1] or []     bool, True when this position starts an image row
    returns o [B, H, V]     in v's dtype (or written into `out`)
"""

from __future__ import annotations

import torch

from .mask import check_mode, row_start_log_decay

try:  # triton is optional: CPU installs run the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None

STEP_BACKENDS = ("torch", "triton")


def lasad_step_ref_(q, k, v, g, state, start, row_start, scale=None, out=None):
    """Torch reference of the step: decay, rank-1 update, readout; `state` is updated in place.
    Computes in the state's dtype (fp32, or fp64 for a float64 reference)."""
    K = q.shape[-1]
    if scale is None:
        scale = K ** -0.5
    acc = state.dtype
    value = row_start_log_decay(row_start)
    g = g.to(acc)
    if value is not None:
        g = torch.where(start.reshape(1, 1, 1), torch.full((), value, dtype=acc, device=g.device), g)
    state.mul_(g.exp()[..., None]).add_(k.to(acc)[..., None] * v.to(acc)[..., None, :])
    o = torch.einsum("bhk,bhkv->bhv", q.to(acc) * scale, state)
    if out is None:
        return o.to(v.dtype)
    return out.copy_(o)


if triton is not None:

    @triton.jit
    def lasad_step_kernel(
        q, k, v, g, s, o, start, override, scale,
        K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        HAS_OVERRIDE: tl.constexpr,
    ):
        # One program: one (row, head) pair and one BV-wide slice of the value dim, the whole key
        # dim (BK ≥ K). Slices are disjoint, so the in-place update needs no synchronisation.
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        if HAS_OVERRIDE:
            b_g = tl.where(tl.load(start) != 0, override, b_g)
        b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        p_s = s + i_bh * K * V + o_k[:, None] * V + o_v[None, :]
        m_s = m_k[:, None] & m_v[None, :]
        b_s = tl.load(p_s, mask=m_s, other=0.0)
        b_s = b_s * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        tl.store(p_s, b_s, mask=m_s)
        b_o = tl.sum(b_s * b_q[:, None], axis=0)
        tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def step_tiles(K: int, V: int, rows: int) -> tuple[int, int, int]:
    """Hand-chosen tiles (no autotune: an autotuner re-runs the kernel and would corrupt the
    in-place state). The whole key dim per program; the value dim is split into 16-wide slices
    when there are few (row, head) pairs, so that small batches still spread over the SMs.
    Returns (BK, BV, num_warps)."""
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 16 if rows < 1024 else 64)
    return BK, BV, 4 if BK * BV >= 2048 else 2


def lasad_step_(q, k, v, g, state, start, row_start="unit", scale=None, out=None, backend=None):
    """One decode step of the LASAD op; updates `state` in place and returns o `[B, H, V]`.

    Args: see the module docstring. `row_start`: "none" | "unit" | "reset".
        backend: "triton" or "torch". Default: "triton" for CUDA tensors, else "torch".
    """
    check_mode(row_start)
    if backend is None:
        backend = "triton" if (q.is_cuda and triton is not None) else "torch"
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(STEP_BACKENDS)}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor, got {state.dtype}")
    if backend == "torch":
        return lasad_step_ref_(q, k, v, g, state, start, row_start, scale, out)
    if triton is None:
        raise RuntimeError("the triton step backend needs triton: pip install 'lasad[gpu]'")
    B, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    if out is None:
        out = torch.empty(B, H, V, dtype=v.dtype, device=v.device)
    value = row_start_log_decay(row_start)
    BK, BV, num_warps = step_tiles(K, V, B * H)
    grid = (triton.cdiv(V, BV), B * H)
    lasad_step_kernel[grid](
        q, k, v, g, state, out, start, 0.0 if value is None else value, scale,
        K=K, V=V, BK=BK, BV=BV, HAS_OVERRIDE=value is not None, num_warps=num_warps,
    )
    return out
