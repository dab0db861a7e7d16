"""RMSNorm (with an optional fused residual add) and SwiGLU's gate: the torch definitions that the
model uses everywhere, and Triton kernels that compute the same in one launch for the decode step.

Numerics follow LlamaGen: the norm is computed in fp32 (at least), cast back to the input dtype,
then multiplied by the weight; SiLU is rounded to the input dtype before the product.

Shapes:
    x, residual: [..., N]    weight: [N]    groups: N is split into `groups` equal slices, each
    normalised on its own (1 = the usual full-width norm; H = LASAD's per-head output norm)
    ab:          [..., 2F]   first half the SwiGLU gate (w1 x), second half the value (w3 x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

KERNEL_BACKENDS = ("torch", "triton")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _pick(backend: str | None, x: torch.Tensor) -> str:
    if backend is None:
        backend = "triton" if (x.is_cuda and triton is not None) else "torch"
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(KERNEL_BACKENDS)}")
    return backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, groups: int = 1,
             residual: torch.Tensor | None = None, backend: str | None = None):
    """RMSNorm of `x` (or of h = x + residual). Returns the normed tensor, or (normed, h) when a
    residual is given. Output dtype: x's; the weight multiplies after the cast (LlamaGen)."""
    if _pick(backend, x) == "triton":
        return _rms_norm_triton(x, weight, eps, groups, residual)
    h = x if residual is None else x + residual
    # written as x / sqrt(mean(x²) + eps) with no reshape inside it for a full-width norm: the
    # pattern onnxruntime's SimplifiedLayerNormFusion turns into one kernel in an exported step
    hf = h.to(_acc(h.dtype))
    if groups > 1:
        hf = hf.unflatten(-1, (groups, -1))
    hf = hf / torch.sqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if groups > 1:
        hf = hf.flatten(-2)
    out = hf.type_as(h) * weight
    return out if residual is None else (out, h)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(a) · b."""
    return F.silu(a) * b


def swiglu(ab: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu_mul of the two halves of `ab` [..., 2F] -> [..., F] (one launch on the GPU)."""
    if _pick(backend, ab) == "triton":
        return _swiglu_triton(ab)
    a, b = ab.chunk(2, dim=-1)
    return silu_mul(a, b)


if triton is not None:

    @triton.jit
    def rms_apply(hf, rstd, w, dtype: tl.constexpr):
        """rms_norm's last two roundings on loaded fp32 values: (h · rstd) cast to the activation
        dtype, times the weight. Returns fp32 (the caller casts to the output dtype)."""
        return (hf * rstd).to(dtype).to(tl.float32) * w.to(tl.float32)

    @triton.jit
    def silu_mul_f32(a, b):
        """silu_mul on loaded values: silu(a) rounded to a's dtype, times b. Returns fp32."""
        af = a.to(tl.float32)
        return (af / (1.0 + tl.exp(-af))).to(a.dtype).to(tl.float32) * b.to(tl.float32)

    @triton.jit
    def rms_norm_kernel(x, r, w, out, h_out, eps, N_G: tl.constexpr, GROUPS: tl.constexpr,
                        BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        # One program: one row, one group of N_G = N / GROUPS elements.
        i_row, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        m = offs < N_G
        base = i_row * N_G * GROUPS + i_g * N_G
        h = tl.load(x + base + offs, mask=m, other=0.0)
        if HAS_RESIDUAL:
            h = (h.to(tl.float32) + tl.load(r + base + offs, mask=m, other=0.0).to(tl.float32)).to(h.dtype)
            tl.store(h_out + base + offs, h, mask=m)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / N_G + eps)
        y = rms_apply(hf, rstd, tl.load(w + i_g * N_G + offs, mask=m, other=0.0), h.dtype)
        tl.store(out + base + offs, y.to(out.dtype.element_ty), mask=m)

    @triton.jit
    def swiglu_kernel(ab, out, F_: tl.constexpr, BLOCK: tl.constexpr):
        i_row, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1)
        offs = i_b * BLOCK + tl.arange(0, BLOCK)
        m = offs < F_
        a = tl.load(ab + i_row * 2 * F_ + offs, mask=m, other=0.0)
        b = tl.load(ab + i_row * 2 * F_ + F_ + offs, mask=m, other=0.0)
        tl.store(out + i_row * F_ + offs, silu_mul_f32(a, b).to(out.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _rms_norm_triton(x, weight, eps, groups, residual):
    N = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else out
    n_g = N // groups
    rms_norm_kernel[(_rows(x), groups)](
        x, residual.contiguous() if residual is not None else x, weight, out, h, eps,
        N_G=n_g, GROUPS=groups, BLOCK=triton.next_power_of_2(n_g), HAS_RESIDUAL=residual is not None,
        num_warps=4 if n_g >= 1024 else 2)
    return out if residual is None else (out, h)


def _swiglu_triton(ab):
    F_ = ab.shape[-1] // 2
    ab = ab.contiguous()
    out = torch.empty(*ab.shape[:-1], F_, dtype=ab.dtype, device=ab.device)
    BLOCK = 1024
    swiglu_kernel[(_rows(ab), triton.cdiv(F_, BLOCK))](ab, out, F_=F_, BLOCK=BLOCK, num_warps=4)
    return out
