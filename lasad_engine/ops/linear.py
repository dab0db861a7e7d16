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
the activation dtype once more. SwiGLU and the residual follow as for float weights. The weights
stream as 1 byte an element (half the bytes of bf16) and are converted in registers, int8 by byte
permutes on a GPU (`_int8_to_f32`: the byte placed in the mantissa of 2^23, one subtraction;
exact, and no int -> float conversion instruction, which runs at a quarter rate on sm_90). Three
kernels, by row count:
- 1-4 rows: `gemv_kernel` (K in chunks, the weights read as int32 words of four features, one FMA
  per weight and row into per-row accumulators, the sums over K once at the end), or
  `fused_linear_kernel` where that measured faster (QUANT_TILE_POLICY: the smaller matrices);
- 5-ROWS_MAX rows: `fused_linear_kernel` with tensor cores, the weights converted to bf16;
- more rows: `quant_mm`, a K-looped tensor-core GEMM (the norm before it as for float weights, the
  residual in its epilogue), instead of a dequantised copy written out and read back.

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
INT8_ASM = True         # int8 weights converted by byte permutes (`_int8_to_f32`) on a GPU; False: Triton's
                        # own conversion (I2F), for benchmarks and the test that both agree bit for bit


@dataclass(frozen=True)
class LinearTiles:
    """How the Triton kernel cuts the GEMM. block_n: output columns per program (power of two);
    split_k: programs along K (1 = the whole K in one program; with a grouped norm it must divide
    norm_groups); mma: tl.dot on tensor cores with the rows padded to 16 (else per-row FMA);
    num_warps: warps per program; block_k: 0 for fused_linear_kernel (a program's whole slice of
    K loaded at once), else gemv_kernel's chunk of K (a power of two; a multiple of the norm
    group with a grouped norm)."""

    block_n: int
    split_k: int = 1
    mma: bool = False
    num_warps: int = 4
    block_k: int = 0  # > 0: `gemv_kernel`, K walked in chunks of block_k (at most FMA_ROWS_MAX rows)


QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)  # weight dtypes that come with a weight_scale


@dataclass(frozen=True)
class MmTiles:
    """How `quant_mm` (quantised weights, more than ROWS_MAX rows) cuts its GEMM: block_m rows ×
    block_n columns a program, K in steps of block_k pipelined over `stages` buffers.
    swap: the product taken as W · a^T (the weight tile, converted in registers, is the tensor
    cores' first operand, which Hopper's wgmma reads from registers; the activations come from
    shared memory), instead of a · W^T (the converted weights written back to shared memory
    first). split_k: programs along K, their partial sums added in a fixed order by the last to
    arrive (more programs than the output tiles alone give, for the narrow matrices)."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    stages: int = 4
    num_warps: int = 4
    group_m: int = 8
    swap: bool = False
    split_k: int = 1


def mm_tiles(rows: int, N: int, K: int) -> MmTiles:
    """The tiles `quant_mm` uses for an [N, K] weight (QUANT_MM_TILES, measured at 128 rows;
    else the default, 128 rows a program above 64 rows)."""
    t = QUANT_MM_TILES.get((N, K))
    return t if t is not None else MmTiles(block_m=128 if rows > 64 else 64)


# (N, K) -> MmTiles: quant_mm at 128 rows (64 images with CFG), measured on an H100 (2026-12-07,
# benchmarks/int8_gemv_sweep.py; benchmarks/results/2026-12-07-h100-int8-kernels.json)
QUANT_MM_TILES: dict = {
    (3840, 1280): MmTiles(128, 32, 128, 4, 4),  # lasad-XL qfv
    (1280, 1280): MmTiles(64, 32, 256, 3, 4),  # lasad-XL o
    (7168, 1280): MmTiles(128, 64, 128, 3, 4),  # lasad-XL w13
    (1280, 3584): MmTiles(64, 32, 256, 3, 4),  # lasad-XL w2
    (16384, 1280): MmTiles(128, 64, 64, 4, 4),  # lasad-XL head
    (4608, 1536): MmTiles(128, 64, 128, 3, 4),  # lasad-XXL qfv
    (1536, 1536): MmTiles(64, 32, 256, 3, 4),  # lasad-XXL o
    (8192, 1536): MmTiles(128, 64, 128, 3, 4),  # lasad-XXL w13
    (1536, 4096): MmTiles(64, 32, 256, 3, 4),  # lasad-XXL w2
    (16384, 1536): MmTiles(128, 64, 64, 4, 4),  # lasad-XXL head
    (2304, 768): MmTiles(128, 32, 128, 4, 4),  # lasad-B qfv
    (768, 768): MmTiles(64, 32, 256, 3, 4),  # lasad-B o
    (4096, 768): MmTiles(64, 64, 128, 4, 4),  # lasad-B w13
    (768, 2048): MmTiles(64, 32, 256, 3, 4),  # lasad-B w2
    (16384, 768): MmTiles(128, 64, 64, 4, 4),  # lasad-B head
}


def quantized_gemm(a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The one definition of a GEMM with weight-only quantised weights (module docstring):
    round_act(round_act(a · W_q^T) · s). a `[..., K]`, weight int8 / e4m3 `[N, K]`, weight_scale
    fp32 `[N]` -> `[..., N]` in a's dtype (fp64 references scale in fp64)."""
    y = F.linear(a, weight.to(a.dtype))
    acc = torch.promote_types(a.dtype, torch.float32)
    return (y.to(acc) * weight_scale.to(acc)).to(a.dtype)


def _gemm(a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
          kernels: str = "torch") -> torch.Tensor:
    if weight_scale is None:
        return F.linear(a, weight)
    if kernels == "triton" and triton is not None and a.numel():
        return quant_mm(a, weight, weight_scale)
    return quantized_gemm(a, weight, weight_scale)


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
    if (quantized and kernels == "triton" and triton is not None and residual is not None and not swiglu
            and x.numel()):
        return quant_mm(a, weight, weight_scale, residual=residual, out=out)
    y = _gemm(a, weight, weight_scale, kernels)
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


def gemv_fits(K: int, groups: int = 1, has_norm: bool = False) -> bool:
    """Whether gemv_kernel takes this GEMM: K in words of four, and a grouped norm's groups a
    power of two of at least 4 features (a chunk holds whole groups)."""
    g = K // groups if has_norm and groups > 1 else 4
    return K % 4 == 0 and g >= 4 and g & (g - 1) == 0 and g <= 512


@functools.lru_cache(maxsize=None)
def gemv_tiles(rows: int, n_out: int, K: int, *, groups: int = 1, has_norm: bool = False, swiglu: bool = False,
               sms: int = 132) -> LinearTiles:
    """Hand-chosen tiles for `gemv_kernel` (1-byte weights, at most FMA_ROWS_MAX rows): chunks
    of 512 or 256 features (the larger that divides K; a whole number of norm groups), 16
    columns a program (8 from 4 rows), warps so that each thread holds 4 columns of a chunk (the
    activations it normalises serve 4 columns), and K split until there are two programs for
    every SM."""
    g = K // groups if has_norm and groups > 1 else 1
    bk = 512 if K % 512 == 0 else 256
    bk = max(bk, _pow2(g))
    bn = 8 if rows > 2 else 16
    warps = max(1, min(8, bn * bk // 2048))
    s = 1
    while -(-n_out // bn) * s < 2 * sms and -(-K // (s + 1)) >= bk:
        s += 1
    return LinearTiles(bn, s, False, warps, bk)


# `tiles=LIBRARY`: this GEMM goes to the GEMM library (cuBLAS) with the norm and epilogue kernels
# around it, where that measured faster than the Triton kernel (TILE_POLICY).
LIBRARY = "library"
# Measured choices that override `linear_tiles` on a GPU: (rows bound, n_out, K) -> LinearTiles or
# LIBRARY, from benchmarks/linear_tile_sweep.py on the H200 (docs/performance.md).
def _t(bn, s, mma, w, bk=0):
    return LinearTiles(bn, s, mma, w, bk)


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


# Quantised (int8 / fp8) weights, 1-4 rows: gemv_kernel (K in chunks, `gemv_tiles`) by default;
# the measured choices of benchmarks/int8_gemv_sweep.py on an H100 (2026-12-07,
# benchmarks/results/2026-12-07-h100-int8-kernels.json: every GEMM of the step alone, 2 rows, a
# chain over distinct weights with PDL) override it, block_k 0 meaning fused_linear_kernel (the
# whole slice of K loaded at once: faster for the smaller matrices, whose time is latency).
# 5-32 rows follow bf16's measured tiles (QUANT_FOLLOWS_FLOAT_POLICY); above ROWS_MAX rows the
# GEMM is quant_mm with QUANT_MM_TILES.
QUANT_TILE_POLICY: dict = {
    (FMA_ROWS_MAX, 3840, 1280): _t(16, 1, False, 4, 512),  # lasad-XL qfv
    (FMA_ROWS_MAX, 1280, 1280): _t(8, 1, False, 4),  # lasad-XL o
    (FMA_ROWS_MAX, 3584, 1280): _t(16, 5, False, 2, 256),  # lasad-XL w13
    (FMA_ROWS_MAX, 1280, 3584): _t(4, 1, False, 4),  # lasad-XL w2
    (FMA_ROWS_MAX, 4608, 1536): _t(16, 6, False, 2, 256),  # lasad-XXL qfv
    (FMA_ROWS_MAX, 1536, 1536): _t(8, 1, False, 4),  # lasad-XXL o
    (FMA_ROWS_MAX, 4096, 1536): _t(16, 1, False, 4, 512),  # lasad-XXL w13
    (FMA_ROWS_MAX, 1536, 4096): _t(4, 1, False, 4),  # lasad-XXL w2
    (FMA_ROWS_MAX, 16384, 1536): _t(16, 1, False, 2, 256),  # lasad-XXL head
    (FMA_ROWS_MAX, 2304, 768): _t(16, 1, False, 4, 512),  # lasad-B qfv
    (FMA_ROWS_MAX, 768, 768): _t(4, 1, False, 2),  # lasad-B o
    (FMA_ROWS_MAX, 768, 2048): _t(4, 1, False, 2),  # lasad-B w2
}
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

    # four int8 in one 32-bit register ($4) -> four exact fp32 ($0-$3), by byte permutes
    _I8X4_F32: tl.constexpr = tl.constexpr("""{
            .reg .b32 t;
            xor.b32 t, $4, 0x80808080;
            prmt.b32 $0, t, 0x4B000000, 0x7650;
            prmt.b32 $1, t, 0x4B000000, 0x7651;
            prmt.b32 $2, t, 0x4B000000, 0x7652;
            prmt.b32 $3, t, 0x4B000000, 0x7653;
            sub.f32 $0, $0, 0f4B000080;
            sub.f32 $1, $1, 0f4B000080;
            sub.f32 $2, $2, 0f4B000080;
            sub.f32 $3, $3, 0f4B000080;
            }""")

    @triton.jit
    def _int8_to_f32(w):
        # int8 -> fp32, exact, four values a 32-bit register with byte permutes (no I2F, a
        # quarter-rate conversion on sm_90): u = v + 128 (xor of the sign bits) placed in the
        # mantissa of 2^23 gives the float 2^23 + u, minus 2^23 + 128 gives v.
        return tl.inline_asm_elementwise(_I8X4_F32, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)

    @triton.jit
    def _int8_to_bf16(w):
        # int8 -> bf16, exact: as _int8_to_f32, then each float's upper half (|v| <= 128 fits a
        # bf16 exactly, so dropping the lower half rounds nothing), two a register.
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, f<4>;
            xor.b32 t, $2, 0x80808080;
            prmt.b32 f0, t, 0x4B000000, 0x7650;
            prmt.b32 f1, t, 0x4B000000, 0x7651;
            prmt.b32 f2, t, 0x4B000000, 0x7652;
            prmt.b32 f3, t, 0x4B000000, 0x7653;
            sub.f32 f0, f0, 0f4B000080;
            sub.f32 f1, f1, 0f4B000080;
            sub.f32 f2, f2, 0f4B000080;
            sub.f32 f3, f3, 0f4B000080;
            prmt.b32 $0, f0, f1, 0x7632;
            prmt.b32 $1, f2, f3, 0x7632;
            }""", "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)

    @triton.jit
    def _w_f32(w_t, W_ASM: tl.constexpr):
        # a weight tile in fp32 (exact for bf16, fp16, int8, e4m3); W_ASM: int8 by byte permutes
        if W_ASM:
            return _int8_to_f32(w_t)
        else:
            return w_t.to(tl.float32)

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
    def _dot(a, w_t, DOT_F32: tl.constexpr, W_ASM: tl.constexpr = False):
        # a [BR, KP] @ w_t [BN, KP]^T -> [BR, BN] fp32 on tensor cores (fp32 inputs: exact FMA).
        # A quantised tile is converted to a's dtype first, which holds every int8 and e4m3
        # value exactly. DOT_F32 (Triton's CPU interpreter, whose dot multiplies bf16 bit
        # patterns as integers): fp32 copies with tf32 precision, which holds every bf16, fp16,
        # int8 and e4m3 value exactly.
        if DOT_F32:
            return tl.dot(a.to(tl.float32), tl.trans(w_t.to(tl.float32)), input_precision="tf32")
        elif a.dtype == tl.float32:
            return tl.dot(a, tl.trans(_w_f32(w_t, W_ASM)), input_precision="ieee")
        elif W_ASM and a.dtype == tl.bfloat16:
            return tl.dot(a, tl.trans(_int8_to_bf16(w_t)))
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
        W_ASM: tl.constexpr = False,
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
        if HAS_SCALE and not MMA:
            # 1-byte weights: offsets that the compiler sees as runs of 8 (the same offsets), so the
            # tile is loaded 8 features a thread, the layout of the activations' 16-byte loads. As
            # 16-byte runs (16 features a thread), the fp32 tile went through shared memory once
            # converted, in dozens of barrier-separated pieces after the wait (SASS, sm_90).
            kw = (k // 8) * 8 + k % 8
        else:
            kw = k
        w_t = tl.load(w + cols[:, None] * K + kw[None, :], mask=wm, other=0.0)
        if SWIGLU:
            w3_t = tl.load(w + (cols + N_OUT)[:, None] * K + kw[None, :], mask=wm, other=0.0)
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
            acc = _dot(a, w_t, DOT_F32, W_ASM)
            if SWIGLU:
                acc3 = _dot(a, w3_t, DOT_F32, W_ASM)
            else:
                acc3 = acc
        else:
            # Few rows: each row is a vector times the tile on CUDA cores, one row at a time.
            acc = tl.zeros([BR, BN], dtype=tl.float32)
            acc3 = tl.zeros([BR, BN], dtype=tl.float32)
            af = a.to(tl.float32)
            wf = _w_f32(w_t, W_ASM)
            if SWIGLU:
                w3f = _w_f32(w3_t, W_ASM)
            else:
                w3f = wf
            lr = tl.arange(0, BR)
            for r in tl.static_range(BR):
                a_r = tl.sum(tl.where(lr[:, None] == r, af, 0.0), axis=0)[None, :]
                acc = tl.where(lr[:, None] == r, tl.sum(wf * a_r, axis=1)[None, :], acc)
                if SWIGLU:
                    acc3 = tl.where(lr[:, None] == r, tl.sum(w3f * a_r, axis=1)[None, :], acc3)
        _finish(acc, acc3, s_t, s3_t, res_t, out, off, om, part, cnt, i_r * n_blocks + i_n, i_k,
                SPLIT_K, SPLIT_P, BR, BN, NACC, SWIGLU, HAS_RES, HAS_SCALE)

    @triton.jit
    def _finish(acc, acc3, s_t, s3_t, res_t, out, off, om, part, cnt, blk, i_k, SPLIT_K: tl.constexpr,
                SPLIT_P: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, NACC: tl.constexpr,
                SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr):
        # The GEMM sums of one (row block, column block) `blk` over the i_k-th slice of K -> the
        # epilogue, directly (one slice) or by the last of the SPLIT_K programs to arrive.
        if SPLIT_K == 1:
            _epilogue(acc, acc3, s_t, s3_t, res_t, out, off, om, SWIGLU, HAS_RES, HAS_SCALE)
        else:
            # Partial sums [SPLIT_K, (1 or 2), BR, BN] per (row block, column block); the last
            # program to arrive adds them in split order (the same order whichever program it is).
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

    @triton.jit
    def _bytes_f32(w4, W_ASM: tl.constexpr, FP8: tl.constexpr):
        # int32 words of four 1-byte weights -> four fp32 tensors, byte b of each word (the
        # feature 4j + b), exactly: int8 by byte permutes (W_ASM) or shifts, e4m3 by bitcasts
        if W_ASM:
            return tl.inline_asm_elementwise(_I8X4_F32, "=r,=r,=r,=r,r", [w4],
                                             dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True,
                                             pack=1)
        elif FP8:
            f0 = (w4 & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            f1 = ((w4 >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            f2 = ((w4 >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            f3 = ((w4 >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            return f0, f1, f2, f3
        else:
            return ((w4 << 24) >> 24).to(tl.float32), ((w4 << 16) >> 24).to(tl.float32), \
                ((w4 << 8) >> 24).to(tl.float32), (w4 >> 24).to(tl.float32)

    @triton.jit
    def _row_quads(x, nw, row: tl.constexpr, R, k4, km, rstd, eps, K: tl.constexpr, G: tl.constexpr,
                   BK4: tl.constexpr, HAS_NORM: tl.constexpr, GROUPED: tl.constexpr):
        # row `row` of x at the features 4·j + b (k4 = the chunk's 4·j, b = 0..3) -> four fp32
        # tensors [BK4], normalised (norms.rms_norm: the rstd given, or per group of G features
        # inside the chunk) and rounded to the activation dtype
        m = km & (k4 * 0 + row < R)
        p = x + row * K + k4
        x0 = tl.load(p, mask=m, other=0.0)
        x1 = tl.load(p + 1, mask=m, other=0.0)
        x2 = tl.load(p + 2, mask=m, other=0.0)
        x3 = tl.load(p + 3, mask=m, other=0.0)
        dt = x0.dtype
        f0, f1, f2, f3 = x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32)
        if HAS_NORM:
            if GROUPED:
                GQ: tl.constexpr = G // 4
                q = tl.reshape(f0 * f0 + f1 * f1 + f2 * f2 + f3 * f3, [BK4 // GQ, GQ])
                r = tl.reshape(tl.broadcast_to(tl.rsqrt(tl.sum(q, axis=1) / G + eps)[:, None], [BK4 // GQ, GQ]),
                               [BK4])
            else:
                r = rstd
            f0 = rms_apply(f0, r, tl.load(nw + k4, mask=km, other=0.0), dt).to(dt).to(tl.float32)
            f1 = rms_apply(f1, r, tl.load(nw + k4 + 1, mask=km, other=0.0), dt).to(dt).to(tl.float32)
            f2 = rms_apply(f2, r, tl.load(nw + k4 + 2, mask=km, other=0.0), dt).to(dt).to(tl.float32)
            f3 = rms_apply(f3, r, tl.load(nw + k4 + 3, mask=km, other=0.0), dt).to(dt).to(tl.float32)
        return f0, f1, f2, f3

    @triton.jit
    def _quad_fma(acc, w0, w1, w2, w3, xq):
        x0, x1, x2, x3 = xq
        acc += w0 * x0[None, :]
        acc += w1 * x1[None, :]
        acc += w2 * x2[None, :]
        acc += w3 * x3[None, :]
        return acc

    @triton.jit
    def _pick_row(v, lr, r: tl.constexpr):
        return tl.sum(tl.where(lr == r, v, 0.0), axis=0)

    @triton.jit
    def gemv_kernel(
        x, w4, ws, nw, res, out, part, cnt, R, N_OUT, eps,
        K: tl.constexpr, KS: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, SPLIT_K: tl.constexpr,
        SPLIT_P: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, HAS_NORM: tl.constexpr,
        SWIGLU: tl.constexpr, NACC: tl.constexpr, HAS_RES: tl.constexpr, USE_PDL: tl.constexpr,
        W_ASM: tl.constexpr, FP8: tl.constexpr, KP: tl.constexpr,
    ):
        # Few rows (BR <= 4), 1-byte weights (int8 / e4m3, read as int32 words of four: w4 is
        # [N, K/4]), K in chunks: one program owns BN output columns (and their W_3 partners)
        # over KS features (the i_k-th slice of K), walked in chunks of BK with the next chunk's
        # weights loaded while this one computes. Each row keeps a [BN, BK/4] fp32 accumulator
        # (one FMA per weight and row, the word's four features in turn); the sums over K happen
        # once, after the loop. Numerics as fused_linear_kernel's (fp32 sums, the same roundings).
        i_n, i_k = tl.program_id(0), tl.program_id(1)
        cols = i_n * BN + tl.arange(0, BN)
        cm = cols < N_OUT
        BK4: tl.constexpr = BK // 4
        K4: tl.constexpr = K // 4
        jj = tl.arange(0, BK4)
        NCH: tl.constexpr = (KS + BK - 1) // BK
        GROUPED: tl.constexpr = HAS_NORM and G < K
        j = i_k * (KS // 4) + jj
        km = (jj < KS // 4) & (j < K4)
        # the first chunk of weights does not depend on the previous kernel: loaded before the wait
        w_t = tl.load(w4 + cols[:, None] * K4 + j[None, :], mask=cm[:, None] & km[None, :], other=0)
        if SWIGLU:
            w3_t = tl.load(w4 + (cols + N_OUT)[:, None] * K4 + j[None, :], mask=cm[:, None] & km[None, :], other=0)
            s3_t = tl.load(ws + cols + N_OUT, mask=cm, other=0.0)
        else:
            w3_t = w_t
        s_t = tl.load(ws + cols, mask=cm, other=0.0)
        if not SWIGLU:
            s3_t = s_t
        if USE_PDL:
            gdc_launch_dependents()
            gdc_wait()
        lr = tl.arange(0, BR)
        om = (lr < R)[:, None] & cm[None, :]
        off = lr[:, None] * N_OUT + cols[None, :]
        if HAS_RES:
            res_t = tl.load(res + off, mask=om, other=0.0)
        else:
            res_t = off
        rstd = tl.zeros([BR], dtype=tl.float32)
        if HAS_NORM and not GROUPED:  # one group: statistics of the whole row (one load), whatever the slice
            kk = tl.arange(0, KP)
            xc = tl.load(x + lr[:, None] * K + kk[None, :], mask=(lr < R)[:, None] & (kk < K)[None, :],
                         other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / G + eps)
        r0 = _pick_row(rstd, lr, 0)
        r1 = _pick_row(rstd, lr, 1)
        r2 = _pick_row(rstd, lr, 2)
        r3 = _pick_row(rstd, lr, 3)
        a0 = tl.zeros([BN, BK4], dtype=tl.float32)
        a1 = tl.zeros([BN, BK4], dtype=tl.float32)
        a2 = tl.zeros([BN, BK4], dtype=tl.float32)
        a3 = tl.zeros([BN, BK4], dtype=tl.float32)
        b0 = tl.zeros([BN, BK4], dtype=tl.float32)
        b1 = tl.zeros([BN, BK4], dtype=tl.float32)
        b2 = tl.zeros([BN, BK4], dtype=tl.float32)
        b3 = tl.zeros([BN, BK4], dtype=tl.float32)
        for c in range(NCH):
            jn = j + BK4
            kmn = (jj + (c + 1) * BK4 < KS // 4) & (jn < K4)
            wn = tl.load(w4 + cols[:, None] * K4 + jn[None, :], mask=cm[:, None] & kmn[None, :], other=0)
            if SWIGLU:
                w3n = tl.load(w4 + (cols + N_OUT)[:, None] * K4 + jn[None, :], mask=cm[:, None] & kmn[None, :],
                              other=0)
            else:
                w3n = wn
            p0, p1, p2, p3 = _bytes_f32(w_t, W_ASM, FP8)
            if SWIGLU:
                q0, q1, q2, q3 = _bytes_f32(w3_t, W_ASM, FP8)
            else:
                q0, q1, q2, q3 = p0, p1, p2, p3
            k4 = 4 * j
            xq = _row_quads(x, nw, 0, R, k4, km, r0, eps, K, G, BK4, HAS_NORM, GROUPED)
            a0 = _quad_fma(a0, p0, p1, p2, p3, xq)
            if SWIGLU:
                b0 = _quad_fma(b0, q0, q1, q2, q3, xq)
            if BR > 1:
                xq = _row_quads(x, nw, 1, R, k4, km, r1, eps, K, G, BK4, HAS_NORM, GROUPED)
                a1 = _quad_fma(a1, p0, p1, p2, p3, xq)
                if SWIGLU:
                    b1 = _quad_fma(b1, q0, q1, q2, q3, xq)
            if BR > 2:
                xq = _row_quads(x, nw, 2, R, k4, km, r2, eps, K, G, BK4, HAS_NORM, GROUPED)
                a2 = _quad_fma(a2, p0, p1, p2, p3, xq)
                if SWIGLU:
                    b2 = _quad_fma(b2, q0, q1, q2, q3, xq)
                xq = _row_quads(x, nw, 3, R, k4, km, r3, eps, K, G, BK4, HAS_NORM, GROUPED)
                a3 = _quad_fma(a3, p0, p1, p2, p3, xq)
                if SWIGLU:
                    b3 = _quad_fma(b3, q0, q1, q2, q3, xq)
            w_t = wn
            w3_t = w3n
            j = jn
            km = kmn
        acc = tl.where(lr[:, None] == 0, tl.sum(a0, axis=1)[None, :], 0.0)
        acc3 = tl.where(lr[:, None] == 0, tl.sum(b0, axis=1)[None, :], 0.0)
        if BR > 1:
            acc = tl.where(lr[:, None] == 1, tl.sum(a1, axis=1)[None, :], acc)
            acc3 = tl.where(lr[:, None] == 1, tl.sum(b1, axis=1)[None, :], acc3)
        if BR > 2:
            acc = tl.where(lr[:, None] == 2, tl.sum(a2, axis=1)[None, :], acc)
            acc = tl.where(lr[:, None] == 3, tl.sum(a3, axis=1)[None, :], acc)
            acc3 = tl.where(lr[:, None] == 2, tl.sum(b2, axis=1)[None, :], acc3)
            acc3 = tl.where(lr[:, None] == 3, tl.sum(b3, axis=1)[None, :], acc3)
        if not SWIGLU:
            acc3 = acc
        _finish(acc, acc3, s_t, s3_t, res_t, out, off, om, part, cnt, i_n, i_k, SPLIT_K, SPLIT_P, BR, BN, NACC,
                SWIGLU, HAS_RES, True)

if triton is not None:

    @triton.jit
    def _dot_t(w_t, a, DOT_F32: tl.constexpr, W_ASM: tl.constexpr):
        # w_t [BN, BK] @ a [BM, BK]^T -> [BN, BM] fp32: _dot with the operands swapped, the
        # converted weights the tensor cores' register operand (numerics as _dot's)
        if DOT_F32:
            return tl.dot(w_t.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision="tf32")
        elif a.dtype == tl.float32:
            return tl.dot(_w_f32(w_t, W_ASM), tl.trans(a), input_precision="ieee")
        elif W_ASM and a.dtype == tl.bfloat16:
            return tl.dot(_int8_to_bf16(w_t), tl.trans(a))
        else:
            return tl.dot(w_t.to(a.dtype), tl.trans(a))

    @triton.jit
    def quant_mm_kernel(a, w, ws, res, c, part, cnt, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr,
                        DOT_F32: tl.constexpr, W_ASM: tl.constexpr, HAS_RES: tl.constexpr,
                        SWAP: tl.constexpr, KS: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_P: tl.constexpr):
        # quantized_gemm for many rows: c [M, N] = round(round(a [M, K] · W_q^T) · s), W_q [N, K]
        # int8 / e4m3 converted in registers (tensor cores, fp32 accumulation), the i_k-th slice
        # of KS features in steps of BK pipelined over STAGES buffers; programs in groups of
        # GROUP_M row blocks so that a weight tile is read from DRAM once and from L2 by the
        # group's other row blocks. SWAP: the tile as (W_q · a^T)^T (MmTiles). SPLIT_K > 1: the
        # slices' partial sums added by the last program to arrive, in slice order (_finish).
        pid, i_k = tl.program_id(0), tl.program_id(1)
        num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pm = first_m + (pid % group) % size_m
        pn = (pid % group) // size_m
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        if SWAP:
            acc_t = tl.zeros([BN, BM], dtype=tl.float32)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
        if SPLIT_K == 1:  # K known to the compiler: the loop's trip count too
            k_lo = 0
        else:
            k_lo = i_k * KS
        for k0 in tl.range(k_lo, k_lo + KS, BK, num_stages=STAGES):
            km = ((k0 + rk) < K) & ((k0 + rk) < k_lo + KS)
            a_t = tl.load(a + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm < M)[:, None] & km[None, :], other=0.0)
            w_t = tl.load(w + rn[:, None] * K + (k0 + rk)[None, :], mask=(rn < N)[:, None] & km[None, :], other=0.0)
            if SWAP:
                acc_t += _dot_t(w_t, a_t, DOT_F32, W_ASM)
            else:
                acc += _dot(a_t, w_t, DOT_F32, W_ASM)
        if SWAP:
            acc = tl.trans(acc_t)
        s_t = tl.load(ws + rn, mask=rn < N, other=0.0)
        off = rm[:, None] * N + rn[None, :]
        om = (rm < M)[:, None] & (rn < N)[None, :]
        if HAS_RES:  # residual + y, rounded as the torch add rounds
            res_t = tl.load(res + off, mask=om, other=0.0)
        else:
            res_t = off
        _finish(acc, acc, s_t, s_t, res_t, c, off, om, part, cnt, pid, i_k, SPLIT_K, SPLIT_P, BM, BN, 1, False,
                HAS_RES, True)


def quant_mm(a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             tiles: MmTiles | None = None, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """`quantized_gemm` as one Triton GEMM (any row count; the engine sends it more than ROWS_MAX
    rows): the int8 / e4m3 weights stream once as 1 byte an element, converted in registers,
    instead of a dequantised copy written out and read back. a `[..., K]` -> `[..., N]`;
    `residual` (same shape as the result) added in the epilogue; `out` may be `residual`."""
    N, K = weight.shape
    if a.shape[-1] != K:
        raise ValueError(f"a has {a.shape[-1]} features but weight {tuple(weight.shape)} expects {K}")
    if N * K >= 2**31 or a.numel() >= 2**31 or a.numel() // K * N >= 2**31:
        raise ValueError("quant_mm: 2**31 or more elements in one operand (32-bit offsets)")
    x = a.reshape(-1, K).contiguous()
    M = x.shape[0]
    t = tiles or mm_tiles(M, N, K)
    shape = (*a.shape[:-1], N)
    for name, v in (("residual", residual), ("out", out)):
        if v is not None and (tuple(v.shape) != shape or v.dtype != a.dtype or not v.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {a.dtype} {shape} tensor, got {v.dtype} {tuple(v.shape)}")
    if t.split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {t}")
    c = out if out is not None else torch.empty(shape, dtype=a.dtype, device=a.device)
    ks = -(-(-(-K // t.split_k)) // t.block_k) * t.block_k  # a program's slice of K: whole steps
    s = -(-K // ks)
    blocks = triton.cdiv(M, t.block_m) * triton.cdiv(N, t.block_n)
    stages = t.stages if a.element_size() <= 2 else min(t.stages, 2)  # tiles measured in bf16: fp32's fit too
    part, cnt = _split_workspace(c, blocks, s, t.block_m * t.block_n)
    quant_mm_kernel[(blocks, s)](x, weight.contiguous(), weight_scale, residual if residual is not None else c, c,
                                 part, cnt, M, N, K=K, BM=t.block_m, BN=t.block_n, BK=t.block_k, GROUP_M=t.group_m,
                                 STAGES=stages, DOT_F32=_INTERPRET, W_ASM=_int8_asm(weight),
                                 HAS_RES=residual is not None, SWAP=t.swap, KS=ks, SPLIT_K=s, SPLIT_P=_pow2(s),
                                 num_warps=t.num_warps, num_stages=stages)
    return c


def _int8_asm(weight: torch.Tensor) -> bool:
    """Whether the kernels convert this weight with the inline-PTX byte permutes: int8 weights on a
    CUDA GPU (Triton's CPU interpreter runs no PTX, so there the conversion is Triton's own)."""
    return INT8_ASM and weight.dtype == torch.int8 and weight.is_cuda and not _INTERPRET


def _split_workspace(out: torch.Tensor, blocks: int, split_k: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial sums, arrival counters) of a launch whose `blocks` output tiles of `tile` fp32
    values are each summed over `split_k` slices of K (`_finish`); without a split, `out` stands in
    for both (the kernels never touch them then)."""
    if split_k == 1:
        return out, out
    return (torch.empty(blocks * split_k * tile, dtype=torch.float32, device=out.device),
            _counters(out.device, blocks))


def _launch_buffers(x, n_out, out, residual, pdl, row_blocks, n_blocks, split_k, nacc, br, bn):
    """What every decode GEMM launch sets up alike: `out` (checked, or made), the residual's shape
    checked, the split-K workspace and its counters (one per output tile), and whether to launch
    with programmatic dependent launch. Returns (out, part, cnt, use_pdl, launch kwargs)."""
    shape = (*x.shape[:-1], n_out)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} tensor, got {tuple(out.shape)}")
    if residual is not None and tuple(residual.shape) != shape:
        raise ValueError(f"residual must be {shape}, got {tuple(residual.shape)}")
    part, cnt = _split_workspace(out, row_blocks * n_blocks, split_k, nacc * br * bn)
    use_pdl = _pdl_supported(x.device) if pdl is None else bool(pdl and _pdl_supported(x.device))
    return out, part, cnt, use_pdl, ({"launch_pdl": True} if use_pdl else {})


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
    if tiles is None and quantized and rows <= FMA_ROWS_MAX and gemv_fits(K, groups, has_norm):
        tiles = gemv_tiles(rows, n_out, K, groups=groups, has_norm=has_norm, swiglu=swiglu, sms=_sm_count(x.device))
    elif tiles is None:
        tiles = linear_tiles(block_rows, n_out, K, groups=groups, has_norm=has_norm, swiglu=swiglu,
                             sms=_sm_count(x.device))
    if tiles.block_k:
        return _gemv_triton(x, weight, weight_scale, norm_weight, eps, groups, residual, swiglu, out, pdl, tiles)
    s = tiles.split_k
    if has_norm and groups > 1 and groups % s:
        raise ValueError(f"split_k={s} must divide norm_groups={groups}")
    seg, nseg = _segments(K, groups, has_norm, s)
    br = max(16, _pow2(block_rows)) if tiles.mma else _pow2(block_rows)
    if tiles.mma and (tiles.block_n < 16 or _pow2(seg) * _pow2(nseg) < 16):
        raise ValueError(f"mma tiles need block_n >= 16 and a K slice of >= 16 features, got {tiles}")
    n_blocks = triton.cdiv(n_out, tiles.block_n)
    row_blocks = triton.cdiv(rows, br)
    nacc = 2 if swiglu else 1
    out, part, cnt, use_pdl, extra = _launch_buffers(x, n_out, out, residual, pdl, row_blocks, n_blocks, s, nacc, br,
                                                     tiles.block_n)
    x = x.contiguous()
    fused_linear_kernel[(row_blocks, n_blocks, s)](
        x, weight.contiguous(), weight_scale if quantized else x, norm_weight if has_norm else x,
        residual.contiguous() if residual is not None else x, out, part, cnt, rows, n_out, eps,
        K=K, SEG=seg, NSEG=nseg, SEG_P=_pow2(seg), NSEG_P=_pow2(nseg), NORM_N=K // groups,
        SPLIT_K=s, SPLIT_P=_pow2(s), BR=br, BN=tiles.block_n, HAS_NORM=has_norm,
        ROW_STATS=has_norm and groups == 1 and s > 1, SWIGLU=swiglu, NACC=nacc, HAS_RES=residual is not None,
        MMA=tiles.mma, DOT_F32=_INTERPRET, USE_PDL=use_pdl, HAS_SCALE=quantized,
        W_ASM=_int8_asm(weight), num_warps=tiles.num_warps,
        **extra)
    return out


def _gemv_triton(x, weight, weight_scale, norm_weight, eps, groups, residual, swiglu, out, pdl, tiles):
    """gemv_kernel's launch (tiles.block_k > 0); arguments checked by _fused_linear_triton."""
    N, K = weight.shape
    n_out = N // 2 if swiglu else N
    rows = x.numel() // K
    bk, has_norm = tiles.block_k, norm_weight is not None
    g = K // groups if has_norm else K
    if (rows > FMA_ROWS_MAX or tiles.mma or bk & (bk - 1) or bk < 16 or weight.dtype not in QUANT_DTYPES
            or K % 4):
        raise ValueError(f"block_k tiles (gemv_kernel) take int8 / e4m3 weights with K a multiple of 4, at most "
                         f"{FMA_ROWS_MAX} rows, no mma and a power-of-two block_k >= 16; got {weight.dtype} "
                         f"[{N}, {K}], {rows} rows and {tiles}")
    if has_norm and groups > 1 and (bk % g or not gemv_fits(K, groups, has_norm)):
        raise ValueError(f"block_k={bk} must be a multiple of the norm group ({g} features, a power of two >= 4)")
    ks = -(-(-(-K // tiles.split_k)) // bk) * bk  # a program's slice: whole chunks
    s = -(-K // ks)
    n_blocks = triton.cdiv(n_out, tiles.block_n)
    br, nacc = _pow2(rows), 2 if swiglu else 1
    out, part, cnt, use_pdl, extra = _launch_buffers(x, n_out, out, residual, pdl, 1, n_blocks, s, nacc, br,
                                                     tiles.block_n)
    x = x.contiguous()
    gemv_kernel[(n_blocks, s)](
        x, weight.contiguous().view(torch.int32), weight_scale, norm_weight if has_norm else x,
        residual.contiguous() if residual is not None else x, out, part, cnt, rows, n_out, eps,
        K=K, KS=ks, BK=bk, G=g, SPLIT_K=s, SPLIT_P=_pow2(s), BR=br, BN=tiles.block_n, HAS_NORM=has_norm,
        SWIGLU=swiglu, NACC=nacc, HAS_RES=residual is not None, USE_PDL=use_pdl,
        W_ASM=_int8_asm(weight), FP8=weight.dtype == torch.float8_e4m3fn, KP=_pow2(K), num_warps=tiles.num_warps,
        num_stages=1,
        **extra)
    return out
