"""Decode-sized linear layers with their neighbours fused in: RMSNorm of the input as a prologue,
SwiGLU and the residual add as epilogues, in one launch.

`fused_linear` is one definition (the torch composition below, the same ops the model's modules
run) with a Triton twin for few rows (R ≤ ROWS_MAX, the decode step). More rows go to the torch
path, i.e. cuBLAS: larger batches keep the GEMM that is fastest there.

The Triton kernel is built for streaming a small weight matrix at the bandwidth of the whole GPU:
- every program owns BLOCK_N output columns over a slice of K (the whole K, or 1/SPLIT_K of it)
  and loads its weight tile in one go, first thing, as wide loads;
- with programmatic dependent launch (Hopper, `pdl=True`) the program issues those loads, lets the
  next kernel launch (`gdc_launch_dependents`) and only then waits for the previous kernel
  (`gdc_wait`) before it reads x: the weight stream of kernel n+1 overlaps the tail of kernel n;
- each program recomputes the RMSNorm statistics of its rows (x is R × K: tiny);
- split-K partial sums go to a workspace; the last program of a column block to arrive (an int32
  counter, no float atomics) adds them in a fixed order, so results are bitwise reproducible.
Numerics follow the torch definition: fp32 accumulation; the GEMM result is rounded to the
activation dtype (as F.linear's output is) before SwiGLU and before the residual add.

Weight-only quantised weights (`weight` int8 or fp8 e4m3 with `weight_scale`, one fp32 scale per
output channel; lasad_engine/quant.py makes them) have one definition too (`quantized_gemm`):

    y = round_act( round_act( a · W_q^T ) · s )

the GEMM of the integer (fp8) values exactly as for float weights (W_q converted to the
activation dtype, which holds every int8 and e4m3 value exactly; fp32 accumulation; rounded to the
activation dtype as F.linear's output is), then times the channel's fp32 scale in fp32, rounded to
the activation dtype once more. SwiGLU and the residual follow as for float weights. The kernel
dequantises in registers (the weight tile streams as 1 byte an element: half the bytes of bf16)
and serves any row count, in blocks of at most ROWS_MAX rows (a third grid axis, the fastest, so
the blocks of one weight tile run together and read it from L2): with quantised weights there is
no GEMM-library path, which would have to write the dequantised matrix out first.

Shapes:
    x:           [..., K]            activations (R = x.numel() / K rows)
    weight:      [N, K]              nn.Linear layout; with swiglu, rows [:N/2] = W_1, [N/2:] = W_3;
                                     float, or int8 / float8_e4m3fn with weight_scale
    weight_scale: [N] fp32           per-output-channel scale of a quantised weight (None: float)
    norm_weight: [K]                 RMSNorm weight of the input (None: no norm); norm_groups
                                     equal slices of K, each normalised on its own
    residual:    [..., N_out]        added after the GEMM (and SwiGLU); N_out = N/2 with swiglu, else N
    returns      [..., N_out]        in x's dtype
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import stream_key
from .norms import _pick, rms_norm, silu_mul
from .norms import swiglu as swiglu_op

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    from .norms import rms_apply, silu_mul_f32
except ImportError:  # pragma: no cover
    triton = None

ROWS_MAX = 32           # the Triton path's row limit; more rows take cuBLAS
FMA_ROWS_MAX = 4        # up to here each row is a vector-times-tile on CUDA cores; above, tl.dot
TILE_ELEMS = 16384      # weight elements one program holds (32 KB of bf16: 32 registers a thread at
                        # 8 warps); with tl.dot the rows (padded to 16, held by every warp) a quarter
K_SLICE_MIN = 128       # split K only down to slices of this many features
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_COUNTERS: dict = {}    # per device: int32 split-K arrival counters (back at 0 after every launch)


@dataclass(frozen=True)
class LinearTiles:
    """How the Triton kernel cuts the GEMM. block_n: output columns per program (power of two);
    split_k: programs along K (1 = the whole K in one program; with a grouped norm it must divide
    norm_groups); mma: tl.dot on tensor cores with the rows padded to 16 (else per-row FMA);
    num_warps: warps per program."""

    block_n: int
    split_k: int = 1
    mma: bool = False
    num_warps: int = 4


QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)  # weight dtypes that come with a weight_scale


def quantized_gemm(a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The one definition of a GEMM with weight-only quantised weights (module docstring):
    round_act(round_act(a · W_q^T) · s). a `[..., K]`, weight int8 / e4m3 `[N, K]`, weight_scale
    fp32 `[N]` -> `[..., N]` in a's dtype (fp64 references scale in fp64)."""
    y = F.linear(a, weight.to(a.dtype))
    acc = torch.promote_types(a.dtype, torch.float32)
    return (y.to(acc) * weight_scale.to(acc)).to(a.dtype)


def _gemm(a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None) -> torch.Tensor:
    return F.linear(a, weight) if weight_scale is None else quantized_gemm(a, weight, weight_scale)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, *, weight_scale: torch.Tensor | None = None,
                 norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-5, norm_groups: int = 1, residual: torch.Tensor | None = None,
                 swiglu: bool = False, out: torch.Tensor | None = None, backend: str | None = None,
                 pdl: bool | None = None, tiles: LinearTiles | None = None) -> torch.Tensor:
    """y = [residual +] [silu_mul ∘ halves] GEMM([rms_norm](x), weight), shapes as the module
    docstring; GEMM = F.linear for float weights, `quantized_gemm` for int8 / fp8 weights with
    their `weight_scale`.

    Args:
        backend: "torch" or "triton" (default: triton for CUDA tensors). The Triton path serves
            R ≤ ROWS_MAX rows (any R with quantised weights, in blocks of ROWS_MAX); more rows
            run the torch definition whatever the backend.
        weight_scale: fp32 `[N]`, the per-output-channel scales of an int8 / float8_e4m3fn
            `weight` (lasad_engine/quant.py); None for a float weight.
        pdl: launch with programmatic dependent launch (default: on CUDA devices of compute
            capability ≥ 9.0). The kernel reads only `weight`, `weight_scale` and `norm_weight`
            before it waits for the previous kernel, so these must not be written by the kernels
            just before.
        tiles: override the tile choice (`linear_tiles`), for benchmarks.
        out: where the result goes; it may be `residual` itself (the residual stream updated in
            place, as the decode step does: no copy of it on the GEMM-library path).
    Examples::
        >>> x, w = torch.randn(2, 8), torch.randn(6, 8)
        >>> torch.equal(fused_linear(x, w, backend="torch"), F.linear(x, w))
        True
    """
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {K}")
    quantized = weight.dtype in QUANT_DTYPES
    if quantized != (weight_scale is not None):
        raise ValueError(f"weight is {weight.dtype}: a weight_scale goes with int8 / float8_e4m3fn weights, "
                         "and only with them")
    if quantized and (weight_scale.shape != (N,) or weight_scale.dtype != torch.float32):
        raise ValueError(f"weight_scale must be fp32 [{N}] (one per output channel), got "
                         f"{weight_scale.dtype} {tuple(weight_scale.shape)}")
    if swiglu and N % 2:
        raise ValueError(f"swiglu needs an even number of weight rows (W_1 then W_3), got {N}")
    if norm_groups < 1 or K % norm_groups:
        raise ValueError(f"norm_groups={norm_groups} must divide the {K} input features")
    rows = x.numel() // K if K else 0
    explicit = tiles is not None  # quantised weights above ROWS_MAX rows: the kernel only when asked
    if tiles is None and _pick(backend, x) == "triton" and x.is_cuda:
        tiles = tile_policy(rows, N // 2 if swiglu else N, K, x.device, quantized=quantized)
    if (_pick(backend, x) == "triton" and 0 < rows and (rows <= ROWS_MAX or (quantized and explicit))
            and triton is not None and tiles != LIBRARY):
        return _fused_linear_triton(x, weight, weight_scale, norm_weight, eps, norm_groups, residual, swiglu,
                                    out, pdl, tiles)
    kernels = _pick(backend, x)
    a = rms_norm(x, norm_weight, eps, norm_groups, backend=kernels) if norm_weight is not None else x
    if kernels == "triton" and residual is not None and not swiglu and x.dim() == 2 and not quantized:
        # many rows on the GPU: cuBLAS adds the residual in its epilogue (the GEMM is not rounded
        # before the add, a difference within the activation dtype's rounding). Into the
        # residual's own buffer when `out` is it: then cuBLAS copies nothing first.
        if out is residual:
            return torch.addmm(residual, a, weight.t(), out=out)
        y = torch.addmm(residual, a, weight.t())
        return y if out is None else out.copy_(y)
    y = _gemm(a, weight, weight_scale)
    if swiglu:
        y = swiglu_op(y, backend=kernels) if kernels == "triton" else silu_mul(y[..., :N // 2], y[..., N // 2:])
    if residual is not None:
        y = residual + y
    return y if out is None else out.copy_(y)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _segments(K: int, groups: int, has_norm: bool, split_k: int) -> tuple[int, int]:
    """A program's slice of K as `nseg` segments of `seg` features: the norm groups it owns (a
    grouped norm, statistics local to the program) or one contiguous 1/split_k of K."""
    if has_norm and groups > 1:
        return K // groups, groups // split_k
    return -(-K // split_k), 1


@functools.lru_cache(maxsize=None)
def linear_tiles(rows: int, n_out: int, K: int, *, groups: int = 1, has_norm: bool = False,
                 swiglu: bool = False, sms: int = 132) -> LinearTiles:
    """Hand-chosen tiles (no autotune, as for the step kernel): enough programs to cover every SM
    (≥ `sms`), a weight tile of at most TILE_ELEMS elements each, and the whole K per program
    unless that leaves SMs idle or the tile too large; then the smallest split that fits."""
    mma = rows > FMA_ROWS_MAX
    br = max(16, _pow2(rows)) if mma else _pow2(rows)
    nacc = 2 if swiglu else 1
    bn_min = 16 if mma else 4
    splits = [s for s in range(1, 33) if (s == 1 or -(-K // s) >= K_SLICE_MIN)
              and (not (has_norm and groups > 1) or groups % s == 0)]
    best = None
    for s in splits:
        seg, nseg = _segments(K, groups, has_norm, s)
        kp = _pow2(seg) * _pow2(nseg)
        if mma and kp < 16:
            break
        if bn_min * nacc * kp > TILE_ELEMS or (mma and br * kp > TILE_ELEMS // 4):
            continue
        bn = bn_min
        while (bn < 64 and -(-n_out // (2 * bn)) * s >= sms and 2 * bn * nacc * kp <= TILE_ELEMS
               and 2 * bn <= _pow2(n_out)):
            bn *= 2
        elems = bn * nacc * kp
        warps = 8 if mma else max(2, min(4, elems // 4096))  # per-row FMA: 2-4 warps measured best (H200)
        best = LinearTiles(bn, s, mma, warps)
        if -(-n_out // bn) * s >= sms:
            break
    if best is None:  # nothing fits the register budget: the smallest tile of the finest split
        s = splits[-1]
        best = LinearTiles(bn_min, s, mma, 8)
    return best


# `tiles=LIBRARY`: this GEMM goes to the GEMM library (cuBLAS) with the norm and epilogue kernels
# around it, where that measured faster than the Triton kernel (TILE_POLICY).
LIBRARY = "library"
# Measured choices that override `linear_tiles` on a GPU: (rows bound, n_out, K) -> LinearTiles or
# LIBRARY, from benchmarks/linear_tile_sweep.py on the H200 (docs/performance.md).
def _t(bn, s, mma, w):
    return LinearTiles(bn, s, mma, w)


# benchmarks/results/2026-12-02-h200-tiles.json: one-op chains with PDL, distinct weights per layer,
# lasad-B and lasad-XL shapes (then lasad-L and lasad-XXL, below) at 2 rows (used up to
# FMA_ROWS_MAX) and 16 rows (up to ROWS_MAX).
# The 16,384-row head is faster through cuBLAS with the norm kernel before it at every size.
TILE_POLICY: dict = {
    # lasad-B, 1-4 rows: (n_out, K) -> tiles
    (4, 2304, 768): _t(16, 1, False, 2), (4, 768, 768): _t(4, 1, False, 2), (4, 2048, 768): _t(8, 1, False, 4),
    (4, 768, 2048): _t(4, 1, False, 4),
    # lasad-XL, 1-4 rows
    (4, 3840, 1280): _t(8, 1, False, 2), (4, 1280, 1280): _t(8, 1, False, 2), (4, 3584, 1280): _t(4, 1, False, 2),
    (4, 1280, 3584): _t(4, 1, False, 4),
    # lasad-B, 5-32 rows
    (32, 2304, 768): _t(32, 3, True, 2), (32, 768, 768): _t(32, 3, True, 4), (32, 2048, 768): _t(32, 3, True, 8),
    (32, 768, 2048): _t(32, 8, True, 2),
    # lasad-XL, 5-32 rows
    (32, 3840, 1280): "library", (32, 1280, 1280): _t(32, 5, True, 8), (32, 3584, 1280): "library",
    (32, 1280, 3584): _t(64, 14, True, 2),
    # 2026-12-02-h200-tiles-lxxl.json. lasad-L, 1-4 rows: the hand rule measured best (412 µs per
    # step's layer chain against 426 for the per-op bests); lasad-L, 5-32 rows (840 against 1211)
    (32, 3072, 1024): "library", (32, 1024, 1024): _t(32, 4, True, 4), (32, 2816, 1024): _t(32, 4, True, 2),
    (32, 1024, 2816): _t(64, 11, True, 2),
    # lasad-XXL, 1-4 rows (1287 against 1338)
    (4, 4608, 1536): _t(8, 1, False, 2), (4, 1536, 1536): _t(8, 1, False, 4), (4, 4096, 1536): _t(4, 1, False, 2),
    (4, 1536, 4096): _t(4, 1, False, 4),
    # lasad-XXL, 5-32 rows (2272 against 4261)
    (32, 4608, 1536): "library", (32, 1536, 1536): _t(64, 6, True, 2), (32, 4096, 1536): "library",
    (32, 1536, 4096): _t(64, 16, True, 2),
}


# Quantised (int8 / fp8) weights. Measured on an H100 (2026-12-07,
# benchmarks/results/2026-12-07-h100-int8.json, 2 rows): the hand rule's tiles beat bf16's measured
# ones (lasad-B 272 against 297 µs per step, lasad-XL 1,344 against 1,631), so bf16's tiles are
# followed only in the bands of QUANT_FOLLOWS_FLOAT_POLICY (5-32 rows, not measured with int8), the
# hand rule decides the rest, the head included. QUANT_TILE_POLICY takes measured int8 choices,
# (band, n_out, K) -> LinearTiles, first. Above ROWS_MAX rows the weights are dequantised to the
# activations' dtype and the GEMM goes to the library (the Triton kernel's blocks of ROWS_MAX rows
# each read every weight: lasad-XL at 128 rows took 13.9 ms per step against bf16's 2.8 there;
# the dequantised copy is not measured yet). Tiles passed explicitly still take the kernel.
QUANT_TILE_POLICY: dict = {}
QUANT_FOLLOWS_FLOAT_POLICY: set = {ROWS_MAX}


def tile_policy(rows: int, n_out: int, K: int, device, quantized: bool = False) -> "LinearTiles | str | None":
    """The measured choice for this GEMM (TILE_POLICY; the head, n_out ≥ 8192: the library), or
    None (then `linear_tiles` decides). Measured on an H200 (sm_90); elsewhere the hand rule.
    `quantized`: int8 / fp8 weights (QUANT_TILE_POLICY, then bf16's kernel tiles in the bands of
    QUANT_FOLLOWS_FLOAT_POLICY, never LIBRARY). Above ROWS_MAX rows: None, as for float weights
    (`fused_linear`'s row limit sends those GEMMs to the library)."""
    if torch.cuda.get_device_capability(device) != (9, 0):
        return None
    # the band these rows fall in, only: tiles measured at 16 rows are no choice for 2
    band = FMA_ROWS_MAX if rows <= FMA_ROWS_MAX else ROWS_MAX
    if quantized:
        if rows > ROWS_MAX:
            return None
        choice = QUANT_TILE_POLICY.get((band, n_out, K))
        if choice is None and band in QUANT_FOLLOWS_FLOAT_POLICY:
            choice = TILE_POLICY.get((band, n_out, K))
        return None if choice == LIBRARY else choice
    if n_out >= 8192:
        return LIBRARY
    if rows > ROWS_MAX:
        return None
    return TILE_POLICY.get((band, n_out, K))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Split-K arrival counters, one int32 per column block, allocated zeroed once per device; the
    last program of each block resets its counter, so they are zero between launches. Launches
    that use them run one after another in a stream (a launch waits for the previous kernel
    before it counts), so one array serves every call on a stream; each stream has its own (two
    engines in one process). A grown array keeps the old ones alive: captured CUDA graphs still
    point at them."""
    bufs = _COUNTERS.setdefault((device.type, device.index, stream_key(device)), [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return bufs[-1]


@functools.lru_cache(maxsize=None)
def _pdl_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


if triton is not None:

    @triton.jit
    def _load_normed(x, nw_t, rows, R, k, km, K: tl.constexpr, eps, BRX: tl.constexpr,
                     SEG: tl.constexpr, NSEG_P: tl.constexpr, SEG_P: tl.constexpr, NORM_N: tl.constexpr,
                     SPLIT_K: tl.constexpr, HAS_NORM: tl.constexpr, ROW_STATS: tl.constexpr):
        # x rows `rows` [BRX] at the program's K offsets k [KP] -> [BRX, KP] in x's dtype, normed
        # (norms.rms_norm) when HAS_NORM. Groups are the NSEG_P segments of SEG_P lanes; with
        # ROW_STATS (one group, K split over programs) the statistics come from the whole row.
        rm = rows < R
        xt = tl.load(x + rows[:, None] * K + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        if HAS_NORM:
            xf = xt.to(tl.float32)
            if ROW_STATS:
                ss = tl.zeros([BRX], dtype=tl.float32)
                j = tl.arange(0, SEG_P)
                for c in tl.static_range(SPLIT_K):
                    kc = c * SEG + j
                    m = rm[:, None] & ((j < SEG) & (kc < K))[None, :]
                    xc = tl.load(x + rows[:, None] * K + kc[None, :], mask=m, other=0.0).to(tl.float32)
                    ss += tl.sum(xc * xc, axis=1)
                y = rms_apply(xf, tl.rsqrt(ss / NORM_N + eps)[:, None], nw_t[None, :], xt.dtype)
            else:
                x3 = tl.reshape(xf, [BRX, NSEG_P, SEG_P])
                rstd = tl.rsqrt(tl.sum(x3 * x3, axis=2) / NORM_N + eps)
                y = rms_apply(x3, rstd[:, :, None], tl.reshape(nw_t, [1, NSEG_P, SEG_P]), xt.dtype)
                y = tl.reshape(y, [BRX, NSEG_P * SEG_P])
            xt = y.to(xt.dtype)
        return xt

    @triton.jit
    def _dot(a, w_t, DOT_F32: tl.constexpr):
        # a [BR, KP] @ w_t [BN, KP]^T -> [BR, BN] fp32 on tensor cores (fp32 inputs: exact FMA).
        # A quantised tile is converted to a's dtype first, which holds every int8 and e4m3
        # value exactly. DOT_F32 (Triton's CPU interpreter, whose dot multiplies bf16 bit
        # patterns as integers): fp32 copies with tf32 precision, which holds every bf16, fp16,
        # int8 and e4m3 value exactly.
        if DOT_F32:
            return tl.dot(a.to(tl.float32), tl.trans(w_t.to(tl.float32)), input_precision="tf32")
        elif a.dtype == tl.float32:
            return tl.dot(a, tl.trans(w_t.to(tl.float32)), input_precision="ieee")
        else:
            return tl.dot(a, tl.trans(w_t.to(a.dtype)))

    @triton.jit
    def _epilogue(acc, acc3, s_t, s3_t, res_t, out, off, om, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr,
                  HAS_SCALE: tl.constexpr):
        # acc [BR, BN] fp32 GEMM sums -> rounded to the activation dtype (F.linear's output); with
        # quantised weights times the channel scales s_t [BN] in fp32, rounded again
        # (quantized_gemm); then SwiGLU (acc3: the W_3 half) and the residual add, each rounded as
        # the torch ops round.
        dt = out.dtype.element_ty
        y = acc.to(dt)
        y3 = acc3.to(dt)
        if HAS_SCALE:
            y = (y.to(tl.float32) * s_t[None, :]).to(dt)
            y3 = (y3.to(tl.float32) * s3_t[None, :]).to(dt)
        if SWIGLU:
            y = silu_mul_f32(y, y3).to(dt)
        if HAS_RES:
            y = (res_t.to(tl.float32) + y.to(tl.float32)).to(dt)
        tl.store(out + off, y, mask=om)

    @triton.jit
    def fused_linear_kernel(
        x, w, ws, nw, res, out, part, cnt, R, N_OUT, eps,
        K: tl.constexpr, SEG: tl.constexpr, NSEG: tl.constexpr, SEG_P: tl.constexpr,
        NSEG_P: tl.constexpr, NORM_N: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_P: tl.constexpr,
        BR: tl.constexpr, BN: tl.constexpr, HAS_NORM: tl.constexpr, ROW_STATS: tl.constexpr,
        SWIGLU: tl.constexpr, NACC: tl.constexpr, HAS_RES: tl.constexpr, MMA: tl.constexpr,
        DOT_F32: tl.constexpr, USE_PDL: tl.constexpr, HAS_SCALE: tl.constexpr = False,
    ):
        # One program: output columns [i_n·BN, +BN) (and their W_3 partners with SWIGLU), input
        # features = the i_k-th slice of K, rows [i_r·BR, +BR) (one block of all R rows, padded
        # to BR, unless the weights are quantised). The row blocks of one weight tile are the
        # fastest grid axis: they run together and the tile comes from DRAM once.
        i_r, i_n, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_blocks = tl.num_programs(1)
        cols = i_n * BN + tl.arange(0, BN)
        kk = tl.arange(0, NSEG_P * SEG_P)
        if SEG == SEG_P or NSEG_P == 1:  # contiguous features: keeps the loads 16 bytes wide
            k = i_k * (NSEG * SEG) + kk
            km = (kk < NSEG * SEG) & (k < K)
        else:  # groups of a size that is not a power of two, each padded to SEG_P lanes
            g, j = kk // SEG_P, kk % SEG_P
            k = i_k * (NSEG * SEG) + g * SEG + j
            km = (g < NSEG) & (j < SEG) & (k < K)
        wm = (cols < N_OUT)[:, None] & km[None, :]
        # The weights (and the norm weight) do not depend on the previous kernel: load them first.
        w_t = tl.load(w + cols[:, None] * K + k[None, :], mask=wm, other=0.0)
        if SWIGLU:
            w3_t = tl.load(w + (cols + N_OUT)[:, None] * K + k[None, :], mask=wm, other=0.0)
        else:
            w3_t = w_t
        if HAS_SCALE:  # quantised weights: the channels' fp32 scales (epilogue)
            s_t = tl.load(ws + cols, mask=cols < N_OUT, other=0.0)
            if SWIGLU:
                s3_t = tl.load(ws + cols + N_OUT, mask=cols < N_OUT, other=0.0)
            else:
                s3_t = s_t
        else:
            s_t = cols
            s3_t = cols
        if HAS_NORM:
            nw_t = tl.load(nw + k, mask=km, other=0.0)
        else:
            nw_t = k
        if USE_PDL:
            gdc_launch_dependents()
            gdc_wait()
        rows = i_r * BR + tl.arange(0, BR)
        om = (rows < R)[:, None] & (cols < N_OUT)[None, :]
        off = rows[:, None] * N_OUT + cols[None, :]
        if HAS_RES:  # issued now, so that its latency hides behind the GEMM
            res_t = tl.load(res + off, mask=om, other=0.0)
        else:
            res_t = off
        a = _load_normed(x, nw_t, rows, R, k, km, K, eps, BR, SEG, NSEG_P, SEG_P, NORM_N, SPLIT_K,
                         HAS_NORM, ROW_STATS)
        if MMA:
            acc = _dot(a, w_t, DOT_F32)
            if SWIGLU:
                acc3 = _dot(a, w3_t, DOT_F32)
            else:
                acc3 = acc
        else:
            # Few rows: each row is a vector times the tile on CUDA cores, one row at a time.
            acc = tl.zeros([BR, BN], dtype=tl.float32)
            acc3 = tl.zeros([BR, BN], dtype=tl.float32)
            af = a.to(tl.float32)
            wf = w_t.to(tl.float32)
            w3f = w3_t.to(tl.float32)
            lr = tl.arange(0, BR)
            for r in tl.static_range(BR):
                a_r = tl.sum(tl.where(lr[:, None] == r, af, 0.0), axis=0)[None, :]
                acc = tl.where(lr[:, None] == r, tl.sum(wf * a_r, axis=1)[None, :], acc)
                if SWIGLU:
                    acc3 = tl.where(lr[:, None] == r, tl.sum(w3f * a_r, axis=1)[None, :], acc3)
        if SPLIT_K == 1:
            _epilogue(acc, acc3, s_t, s3_t, res_t, out, off, om, SWIGLU, HAS_RES, HAS_SCALE)
        else:
            # Partial sums [SPLIT_K, (1 or 2), BR, BN] per (row block, column block); the last
            # program to arrive adds them in split order (the same order whichever program it is).
            blk = i_r * n_blocks + i_n
            tile = tl.arange(0, BR)[:, None] * BN + tl.arange(0, BN)[None, :]
            base = part + (blk * SPLIT_K + i_k) * NACC * BR * BN
            tl.store(base + tile, acc)
            if SWIGLU:
                tl.store(base + BR * BN + tile, acc3)
            tl.debug_barrier()  # every thread's partials are written before the release below
            arrived = tl.atomic_add(cnt + blk, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                s = tl.arange(0, SPLIT_P)
                p = part + (blk * SPLIT_K + s[:, None, None]) * NACC * BR * BN + tile[None, :, :]
                sm = (s < SPLIT_K)[:, None, None]
                acc = tl.sum(tl.load(p, mask=sm, other=0.0, cache_modifier=".cg"), axis=0)
                if SWIGLU:
                    acc3 = tl.sum(tl.load(p + BR * BN, mask=sm, other=0.0, cache_modifier=".cg"), axis=0)
                else:
                    acc3 = acc
                _epilogue(acc, acc3, s_t, s3_t, res_t, out, off, om, SWIGLU, HAS_RES, HAS_SCALE)
                tl.atomic_xchg(cnt + blk, 0, sem="relaxed", scope="gpu")


def _fused_linear_triton(x, weight, weight_scale, norm_weight, eps, groups, residual, swiglu, out, pdl, tiles):
    N, K = weight.shape
    n_out = N // 2 if swiglu else N
    rows = x.numel() // K
    dtype = x.dtype
    quantized = weight_scale is not None
    for name, t in (("weight", None if quantized else weight), ("norm_weight", norm_weight),
                    ("residual", residual), ("out", out)):
        if t is not None and t.dtype != dtype:
            raise ValueError(f"{name} is {t.dtype} but x is {dtype}: the Triton path takes one dtype")
    if N * K >= 2**31:
        raise ValueError(f"weight {tuple(weight.shape)} has 2**31 or more elements (32-bit offsets)")
    if rows * max(K, n_out) >= 2**31:
        raise ValueError(f"{rows} rows of {max(K, n_out)} features: 2**31 or more elements (32-bit offsets)")
    has_norm = norm_weight is not None
    block_rows = min(rows, ROWS_MAX)  # quantised weights: blocks of up to ROWS_MAX rows
    if tiles is None:
        tiles = linear_tiles(block_rows, n_out, K, groups=groups, has_norm=has_norm, swiglu=swiglu,
                             sms=_sm_count(x.device))
    s = tiles.split_k
    if has_norm and groups > 1 and groups % s:
        raise ValueError(f"split_k={s} must divide norm_groups={groups}")
    seg, nseg = _segments(K, groups, has_norm, s)
    br = max(16, _pow2(block_rows)) if tiles.mma else _pow2(block_rows)
    if tiles.mma and (tiles.block_n < 16 or _pow2(seg) * _pow2(nseg) < 16):
        raise ValueError(f"mma tiles need block_n >= 16 and a K slice of >= 16 features, got {tiles}")
    shape = (*x.shape[:-1], n_out)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=x.device)
    elif tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} tensor, got {tuple(out.shape)}")
    if residual is not None and tuple(residual.shape) != shape:
        raise ValueError(f"residual must be {shape}, got {tuple(residual.shape)}")
    n_blocks = triton.cdiv(n_out, tiles.block_n)
    row_blocks = triton.cdiv(rows, br)
    nacc = 2 if swiglu else 1
    if s > 1:
        part = torch.empty(row_blocks * n_blocks * s * nacc * br * tiles.block_n, dtype=torch.float32,
                           device=x.device)
        cnt = _counters(x.device, row_blocks * n_blocks)
    else:
        part = cnt = out
    use_pdl = _pdl_supported(x.device) if pdl is None else bool(pdl and _pdl_supported(x.device))
    x = x.contiguous()
    extra = {"launch_pdl": True} if use_pdl else {}
    fused_linear_kernel[(row_blocks, n_blocks, s)](
        x, weight.contiguous(), weight_scale if quantized else x, norm_weight if has_norm else x,
        residual.contiguous() if residual is not None else x, out, part, cnt, rows, n_out, eps,
        K=K, SEG=seg, NSEG=nseg, SEG_P=_pow2(seg), NSEG_P=_pow2(nseg), NORM_N=K // groups,
        SPLIT_K=s, SPLIT_P=_pow2(s), BR=br, BN=tiles.block_n, HAS_NORM=has_norm,
        ROW_STATS=has_norm and groups == 1 and s > 1, SWIGLU=swiglu, NACC=nacc, HAS_RES=residual is not None,
        MMA=tiles.mma, DOT_F32=_INTERPRET, USE_PDL=use_pdl, HAS_SCALE=quantized, num_warps=tiles.num_warps,
        **extra)
    return out
