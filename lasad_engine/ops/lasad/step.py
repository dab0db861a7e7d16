"""The in-place single-token form of the LASAD op: the decode step of every engine backend.

`lasad_step_` updates the fp32 state in place and returns the readout. It dispatches to the Triton
kernel `lasad_step_kernel` for CUDA tensors (or when asked to, e.g. under TRITON_INTERPRET=1 on a
CPU) and to the torch reference `lasad_step_ref_` otherwise. The row-start mask arrives as data
(a one-element bool tensor computed by `mask.row_start_mask` from the device position and grid
width), so one compiled kernel serves every position and every resolution.

Shapes (one decode step, B rows, H heads):
    q, k, g:  [B, H, K]     query, key (input gate) and unmasked log-decay
    v:        [B, H, V]     value
    state:    [B, H, K, V]  fp32, updated in place; or, with `slots`, a pool [S, H, K, V] of which
                            row b reads and writes state[slots[b]] (the serving engine's state slots)
    start:    [B], [1] or [] bool, True where the row's position starts an image row (one flag for
                            every row when all rows stand at one position)
    slots:    [B] int64 or None (row b is state row b)
    returns o [B, H, V]     in v's dtype (or written into `out`)
"""

from __future__ import annotations

import torch


from .gates import fused_gates
from .mask import check_mode, row_start_log_decay

try:  # triton is optional: CPU installs run the torch reference
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None

STEP_BACKENDS = ("torch", "triton")


def lasad_step_functional(q, k, v, g, state, start, row_start, scale=None):
    """The step without side effects: returns (o `[B, H, V]` in v's dtype, new state). This is
    the definition; the in-place reference and the exported (ONNX) step are built on it.
    Computes in the state's dtype (fp32, or fp64 for a float64 reference)."""
    K = q.shape[-1]
    if scale is None:
        scale = K ** -0.5
    acc = state.dtype
    value = row_start_log_decay(row_start)
    g = g.to(acc)
    if value is not None:
        g = torch.where(start.reshape(-1, 1, 1), torch.full((), value, dtype=acc, device=g.device), g)
    new = state * g.exp()[..., None] + k.to(acc)[..., None] * v.to(acc)[..., None, :]
    o = ((q.to(acc) * scale)[..., None, :] @ new)[..., 0, :]     # [B, H, 1, K] @ [B, H, K, V]
    return o.to(v.dtype), new


def lasad_step_ref_(q, k, v, g, state, start, row_start, scale=None, out=None, slots=None):
    """Torch reference of the step: decay, rank-1 update, readout; `state` is updated in place
    (with `slots`: the pool rows `state[slots]`; the slots of one call are distinct)."""
    if slots is None:
        o, new = lasad_step_functional(q, k, v, g, state, start, row_start, scale)
        state.copy_(new)
    else:
        o, new = lasad_step_functional(q, k, v, g, state.index_select(0, slots), start, row_start, scale)
        state.index_copy_(0, slots, new)
    return o if out is None else out.copy_(o)


if triton is not None:

    @triton.jit
    def _lasad_step_body(
        q, k, v, g, lb, s_in, s_out, o, start, override, scale, H, stride_qk, stride_v,
        K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        HAS_OVERRIDE: tl.constexpr, FUSED_GATES: tl.constexpr, HAS_LB: tl.constexpr,
        USE_PDL: tl.constexpr = False, slots=None, start_stride=1, HAS_SLOTS: tl.constexpr = False,
    ):
        # One program: one (row, head) pair and one BV-wide slice of the value dim, the whole key
        # dim (BK ≥ K). Slices are disjoint, so an in-place update (s_out == s_in) needs no
        # synchronisation. Rows of q/k/g (and v) are `stride_qk` (`stride_v`) elements apart.
        # Row b's state is row b of the state, or its slot `slots[b]` of a pool (HAS_SLOTS); its
        # row-start flag is start[b · start_stride] (stride 0: one flag for every row).
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        i_b, i_h = i_bh // H, i_bh % H
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        p_qk = i_b * stride_qk + i_h * K + o_k
        if HAS_SLOTS:
            i_s = tl.load(slots + i_b).to(tl.int64) * H + i_h
        else:
            i_s = i_bh
        off_s = i_s * K * V + o_k[:, None] * V + o_v[None, :]
        m_s = m_k[:, None] & m_v[None, :]
        b_s = tl.load(s_in + off_s, mask=m_s, other=0.0)
        if USE_PDL:
            # Programmatic dependent launch (Hopper): the state is not written by the kernels just
            # before this one (the projection GEMM), so it streams in while they finish; q, k, v
            # and the row-start flag are their outputs and are read after the wait.
            gdc_launch_dependents()
            gdc_wait()
        if FUSED_GATES:
            # q, k are the raw projections W_q x and W_f x: apply the gates here (gates.gates):
            # q = silu(W_q x) (rounded to the activation dtype, as the unfused model does),
            # g = log(lb + (1 - lb)·sigmoid(f)) or logsigmoid(f), k = (1 - lb)·sigmoid(-f).
            b_qr = tl.load(q + p_qk, mask=m_k, other=0.0)
            b_q = b_qr.to(tl.float32)
            b_q = (b_q / (1.0 + tl.exp(-b_q))).to(b_qr.dtype).to(tl.float32) * scale
            b_f = tl.load(k + p_qk, mask=m_k, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-b_f))
            b_k = 1.0 / (1.0 + tl.exp(b_f))
            if HAS_LB:
                b_lb = tl.load(lb + i_h * K + o_k, mask=m_k, other=0.0)
                b_g = tl.log(b_lb + (1.0 - b_lb) * sig)
                b_k = (1.0 - b_lb) * b_k
            else:
                b_g = tl.minimum(b_f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(b_f)))
        else:
            b_q = tl.load(q + p_qk, mask=m_k, other=0.0).to(tl.float32) * scale
            b_k = tl.load(k + p_qk, mask=m_k, other=0.0).to(tl.float32)
            b_g = tl.load(g + p_qk, mask=m_k, other=0.0).to(tl.float32)
        if HAS_OVERRIDE:
            b_g = tl.where(tl.load(start + i_b * start_stride) != 0, override, b_g)
        b_v = tl.load(v + i_b * stride_v + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_s = b_s * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        tl.store(s_out + off_s, b_s, mask=m_s)
        b_o = tl.sum(b_s * b_q[:, None], axis=0)
        tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)

    @triton.jit
    def lasad_step_kernel(
        q, k, v, g, lb, s, o, start, slots, start_stride, override, scale, H, stride_qk, stride_v,
        K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        HAS_OVERRIDE: tl.constexpr, FUSED_GATES: tl.constexpr, HAS_LB: tl.constexpr,
        USE_PDL: tl.constexpr, HAS_SLOTS: tl.constexpr,
    ):
        """The engine's launch: state updated in place (rows, or their slots of a pool)."""
        _lasad_step_body(q, k, v, g, lb, s, s, o, start, override, scale, H, stride_qk, stride_v,
                         K, V, BK, BV, HAS_OVERRIDE, FUSED_GATES, HAS_LB, USE_PDL, slots, start_stride,
                         HAS_SLOTS)

    @triton.jit
    def lasad_step_plugin_kernel(
        qfv, lb, past, start, H, S, o, present,
        K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        HAS_OVERRIDE: tl.constexpr, OVERRIDE: tl.constexpr, SCALE: tl.constexpr, HAS_LB: tl.constexpr,
    ):
        """The TensorRT plugin's launch (ahead-of-time): the LasadStep node's I/O in contract order
        (inputs, int32 scalars, outputs), float settings as constants. `present` may alias `past`;
        `start` holds one flag per row (lasad_plugins.contract)."""
        _lasad_step_body(qfv, qfv + H * K, qfv + 2 * H * K, qfv, lb, past, present, o, start, OVERRIDE,
                         SCALE, H, S, S, K, V, BK, BV, HAS_OVERRIDE, True, HAS_LB)


def step_tiles(K: int, V: int, rows: int) -> tuple[int, int, int]:
    """Hand-chosen tiles (no autotune: an autotuner re-runs the kernel and would corrupt the
    in-place state). The whole key dim per program; the value dim is split into 16-wide slices
    when there are few (row, head) pairs, so that small batches still spread over the SMs.
    Returns (BK, BV, num_warps)."""
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 16 if rows < 1024 else 64)
    return BK, BV, 4 if BK * BV >= 2048 else 2


def lasad_step_(q, k, v, g, state, start, row_start="unit", scale=None, out=None, backend=None, slots=None):
    """One decode step of the LASAD op; updates `state` in place and returns o `[B, H, V]`.

    Args: see the module docstring. `row_start`: "none" | "unit" | "reset".
        backend: "triton" or "torch". Default: "triton" for CUDA tensors, else "torch".
        slots: int64 `[B]`, row b's state is `state[slots[b]]` (distinct slots), or None.
    """
    check_mode(row_start)
    if backend is None:
        backend = "triton" if (q.is_cuda and triton is not None) else "torch"
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(STEP_BACKENDS)}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor, got {state.dtype}")
    if backend == "torch":
        return lasad_step_ref_(q, k, v, g, state, start, row_start, scale, out, slots)
    if triton is None:
        raise RuntimeError("the triton step backend needs triton: pip install -e '.[gpu]' in lasad's folder")
    B, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    if out is None:
        out = torch.empty(B, H, V, dtype=v.dtype, device=v.device)
    _launch(q, k, v, g, None, state, out, start, row_start, scale, B, H, K, V, H * K, H * V, False, slots=slots)
    return out


def _launch(q, k, v, g, lb, state, out, start, row_start, scale, B, H, K, V, stride_qk, stride_v, fused,
            pdl=False, slots=None):
    if scale is None:
        scale = K ** -0.5
    value = row_start_log_decay(row_start)
    BK, BV, num_warps = step_tiles(K, V, B * H)
    grid = (triton.cdiv(V, BV), B * H)
    # Programmatic dependent launch only where the hardware has it (Hopper and later).
    pdl = bool(pdl) and state.is_cuda and torch.cuda.get_device_capability(state.device)[0] >= 9
    start_stride = 0 if start.numel() == 1 else 1
    if start_stride and start.numel() != B:
        raise ValueError(f"start has {start.numel()} flags for {B} rows (one, or one per row)")
    lasad_step_kernel[grid](
        q, k, v, q if g is None else g, q if lb is None else lb, state, out, start,
        start if slots is None else slots, start_stride, 0.0 if value is None else value, scale, H,
        stride_qk, stride_v, K=K, V=V, BK=BK, BV=BV, HAS_OVERRIDE=value is not None, FUSED_GATES=fused,
        HAS_LB=lb is not None, USE_PDL=pdl, HAS_SLOTS=slots is not None, num_warps=num_warps,
        **({"launch_pdl": True} if pdl else {}),
    )


def lasad_fused_step_(qfv, lower_bound, state, start, row_start="unit", scale=None, out=None,
                      backend=None, pdl=False, slots=None):
    """The decode step fed straight from one fused projection: gates (gates.py) + step.

    Args:
        qfv: `[B, H·K + H·K + H·V]`, the concatenated raw projections W_q x | W_f x | W_i x.
        lower_bound: this layer's HGRN2 bound `[H·K]` fp32, or None (layer 0 / no bound).
        state, start, row_start, scale, out, backend, slots: as `lasad_step_`.
        pdl: launch the Triton kernel with programmatic dependent launch (CUDA, compute
            capability ≥ 9.0; ignored elsewhere): it reads the state before it waits for the
            previous kernel, so the state must not be written by the kernels just before it.
    Returns:
        o `[B, H, V]` in qfv's dtype.
    """
    check_mode(row_start)
    B, _ = qfv.shape
    H, K, V = state.shape[1], state.shape[2], state.shape[3]
    if backend is None:
        backend = "triton" if (qfv.is_cuda and triton is not None) else "torch"
    if backend == "torch":
        q, k, v, g = fused_gates(qfv, lower_bound, H, K, V)
        return lasad_step_(q, k, v, g, state, start, row_start, scale, out, backend="torch", slots=slots)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor, got {state.dtype}")
    qfv = qfv.contiguous()
    if out is None:
        out = torch.empty(B, H, V, dtype=qfv.dtype, device=qfv.device)
    S = qfv.shape[1]
    _launch(qfv, qfv[:, H * K:], qfv[:, 2 * H * K:], None, lower_bound, state, out, start, row_start,
            scale, B, H, K, V, S, S, True, pdl, slots)
    return out
