"""Selection for the sampler: the whole of `lasad_engine.sampling.sample` for one step in one
Triton launch, with the top-k and top-p thresholds found by selection instead of a sort.

`sample` in `lasad_engine/sampling.py` is the definition (CFG on raw logits, temperature,
top-k keeping ties, top-p as a probability threshold, exponential race over pre-drawn noise); this
file computes the same kept set and, for the same noise, the same token. See docs/sampler.md for
the design and the measurements.

Shapes:
    logits:  [R, V] float (R = 2B with CFG: rows [:B] conditional, [B:] unconditional)
    noise:   [B, V] fp32 Exp(1), or a block [S, B, V] read at step `pos % S`
    out:     int64, R elements ([R] or [R, 1]); both CFG halves receive the ids
    tokens:  int64 [B, N], column `pos` receives the ids (optional)
    pos:     int64 [1] device tensor (needed with a noise block or `tokens`)
    returns  int64 [B], a view of `out[:B]`

How a row is reduced (one program per row, or `split` programs per row that exchange partial
results through a global workspace; see `_exchange`):
1. guided = u + s·(c − u) (or c), x = guided / T, each rounded as torch rounds it on that device
   (fp-contraction off; CUDA torch multiplies by the fp32 reciprocal of a Python-scalar divisor).
2. top-k: the k-th largest x is found by radix selection on the order-preserving uint32 image of
   x (`_key`): each pass histograms LOG_NB bits of the candidates' keys (tl.histogram), keeps the
   bin that holds the k-th largest and stops as soon as that bin holds exactly the remaining count.
   Ties at the k-th value share a key, so they are all kept, as `x >= kth` keeps them in torch.
3. top-p: the smallest kept key t with mass(keys > t) < p · Z, by bisection over the key bits with
   masked sums (32 sums; top-p is off by default).
4. the exponential race argmax(exp(x − max) / max(noise, tiny)), ties to the lowest index. The
   common factor 1/Z of the softmax is left out: it cannot change the argmax, only its rounding.
"""

from __future__ import annotations

import os

import torch

from . import stream_key

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    triton = None

SAMPLE_BACKENDS = ("torch", "triton")
# Temperatures are floored here (LlamaGen's ``max(temperature, 1e-5)``). Only exactly 0 means
# greedy decoding.
MIN_TEMPERATURE = 1e-5
# The noise is clamped to this value from below. An Exp(1) draw of exactly 0 (some RNG backends
# can round to it) would otherwise make ``0 / 0 = NaN`` for a masked token, and argmax picks NaN.
# 1 / tiny is about 8.5e37, which is still finite in float32.
NOISE_FLOOR = torch.finfo(torch.float32).tiny
MAX_BLOCK = 16384     # elements of a row one program holds in registers
MAX_ROUNDS = 48       # exchanges per row in one launch: <= 7 top-k passes + Z + 32 top-p + final
_workspaces: dict = {}


def pick_backend(backend: str | None, logits: torch.Tensor) -> str:
    """`None`: triton for CUDA tensors when triton is importable and nothing traces the call."""
    if backend is None:
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        backend = "triton" if (logits.is_cuda and triton is not None and not tracing) else "torch"
    if backend not in SAMPLE_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(SAMPLE_BACKENDS)}")
    if backend == "triton" and triton is None:
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    if backend == "triton" and not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {logits.device}")
    return backend


def default_split(rows: int, vocab: int, device: torch.device) -> int:
    """Programs per image row. Few rows leave most SMs idle and one SM needs several µs for the
    passes over 16,384 values, so a row is spread over up to 16 programs that meet at a spin
    barrier; 1 when the rows alone fill the GPU, and always 1 on the CPU (the interpreter runs
    programs one after another, so a barrier would never open)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while split < 16 and rows * split * 2 <= sms and triton.cdiv(vocab, split * 2) >= 512:
        split *= 2
    return max(split, triton.next_power_of_2(triton.cdiv(vocab, MAX_BLOCK)))


def _workspace(device: torch.device, rows: int, split: int, nb: int):
    """Partial results (int32) and one arrival counter per row, allocated once and reused. The
    counters return to 0 at the end of every launch, so launches on one stream share them (each
    stream has its own: two engines in one process)."""
    key = (device, stream_key(device), rows, split, nb)
    ws = _workspaces.get(key)
    if ws is None:
        hist = torch.empty(rows * MAX_ROUNDS * split * nb, dtype=torch.int32, device=device)
        scal = torch.empty(rows * MAX_ROUNDS * split * 2, dtype=torch.int32, device=device)
        ctr = torch.zeros(rows, dtype=torch.int32, device=device)
        ws = _workspaces[key] = (hist, scal, ctr)
    return ws


def _flat_ids(out, rows: int, device):
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=device)
    flat = out.view(-1)
    if flat.shape[0] != rows:
        raise ValueError(f"out has {flat.shape[0]} elements, expected {rows}")
    return flat


def sample_triton(logits, noise, *, cfg, cfg_scale, temperature, top_k, top_p, cfg_active=None,
                  out=None, pos=None, tokens=None, split=None, log_nb=6, num_warps=None):
    """`sample` (one setting for the whole batch) in one launch of the per-image kernel (see the
    module docstring for shapes); arguments as `sample`'s, plus `split` (programs per image,
    None: `default_split`), `log_nb` (bits per radix pass) and `num_warps`. Validation of the
    sampling settings is the caller's (`sample`)."""
    from ..sampling import SamplerTable
    R, V = logits.shape
    B = R // 2 if cfg else R
    device = logits.device
    if noise.dim() == 3:
        if pos is None:
            raise ValueError("a noise block [S, B, V] needs pos (int64 [1] device tensor)")
        noise = noise.index_select(0, torch.remainder(pos, noise.shape[0]))[0]
    if tuple(noise.shape) != (B, V):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected [..., {B}, {V}]")
    if tokens is not None and pos is None:
        raise ValueError("tokens needs pos (int64 [1] device tensor)")
    if tokens is not None and tokens.stride(-1) != 1:
        raise ValueError("tokens must have unit stride along its last dim")
    flat = _flat_ids(out, 2 * B if cfg else B, device)
    b = torch.arange(B, device=device)
    full = lambda v, dtype: torch.full((B,), v, dtype=dtype, device=device)  # noqa: E731
    if isinstance(cfg_scale, torch.Tensor):
        scale = cfg_scale.to(torch.float32).reshape(1).expand(B).contiguous()
    else:
        scale = full(float(cfg_scale), torch.float32)
    k = min(int(top_k), V)
    table = SamplerTable(
        cond_row=b, uncond_row=b + B if cfg else full(-1, torch.int64), cfg_scale=scale,
        cfg_interval=full(-1, torch.int64), temperature=full(float(temperature), torch.float32),
        top_k=full(k if 0 < k < V else 0, torch.int64), top_p=full(float(top_p), torch.float32),
        seed=full(0, torch.int64), tok_off=b * tokens.stride(0) if tokens is not None else b)
    rows_pos = pos.reshape(1).expand(R).contiguous() if pos is not None else torch.zeros(R, dtype=torch.int64,
                                                                                           device=device)
    active = cfg_active if (cfg and cfg_active is not None) else None
    sample_images_triton(logits, table, rows_pos, ids=flat, tokens=tokens, noise=noise, active=active,
                         split=split, log_nb=log_nb, num_warps=num_warps)
    return flat[:B]


def sample_images_triton(logits, table, pos, *, ids, tokens=None, noise=None, active=None, split=None,
                         log_nb=6, num_warps=None):
    """`sampling.sample_images` in one launch: grid (images, split). Arguments as there, plus
    `active` (a 0-d flag that switches guidance off for every image, `sample`'s cfg_active),
    `split`, `log_nb` and `num_warps` (see `sample_triton`)."""
    R, V = logits.shape
    B = table.images
    device = logits.device
    if noise is not None and tuple(noise.shape) != (B, V):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected [{B}, {V}]")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if noise is not None and noise.stride(-1) != 1:
        noise = noise.contiguous()
    if ids.numel() != R or not ids.is_contiguous():
        raise ValueError(f"ids must be a contiguous buffer of the {R} rows, got {tuple(ids.shape)}")

    split = default_split(B, V, device) if split is None else int(split)
    chunk = triton.cdiv(triton.cdiv(V, split), 32) * 32
    block = triton.next_power_of_2(chunk)
    if block > MAX_BLOCK:
        raise ValueError(f"V={V} over split={split} programs is {chunk} values per program; at most "
                         f"{MAX_BLOCK}: use a larger split")
    if split < 1 or split & (split - 1):
        raise ValueError(f"split={split} must be a power of two (1, 2, 4, ...)")
    if split > 1 and device.type != "cuda":
        raise ValueError(f"split={split} needs a CUDA device (programs meet at a spin barrier)")
    if split > 1 and B * split > torch.cuda.get_device_properties(device).multi_processor_count:
        # every program of an image must be resident at once, or the barrier never opens
        raise ValueError(f"split={split} with {B} images is more programs than SMs; use a smaller split")
    if num_warps is None:
        num_warps = max(4, min(16, block // 1024))
    if active is not None and active.dtype == torch.bool:
        active = active.view(torch.uint8)
    nb = 1 << int(log_nb)
    if split > 1:
        hist_ws, scal_ws, ctr = _workspace(device, B, split, nb)
    else:
        hist_ws = scal_ws = ctr = ids
    t = table
    _sample_kernel[(B, split)](
        logits, logits.stride(0), noise if noise is not None else logits, noise.stride(0) if noise is not None else 0,
        ids, tokens if tokens is not None else ids, pos, t.cond_row, t.uncond_row, t.cfg_scale, t.cfg_interval,
        t.temperature, t.top_k, t.top_p, t.seed, t.tok_off, active if active is not None else ids,
        hist_ws, scal_ws, ctr, V, MIN_TEMPERATURE, NOISE_FLOOR,
        CHUNK=chunk, BLOCK=block, SPLIT=split, HAS_ACTIVE=active is not None, SEEDED=noise is None,
        TOKENS=tokens is not None, LOG_NB=int(log_nb), NPASS=triton.cdiv(32 - int(log_nb), int(log_nb)) + 1,
        MAX_R=MAX_ROUNDS, PRECISE_LOG=device.type == "cuda", num_warps=num_warps, enable_fp_fusion=False)


if triton is not None:

    @triton.jit
    def _key(x):
        """Order-preserving uint32 image of fp32 x (-0.0 counts as +0.0; no NaN)."""
        bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
        return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)

    @triton.jit
    def _unkey(k):
        bits = tl.where((k >> 31) != 0, k ^ 0x80000000, ~k)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _barrier(ctr, target):
        # Every program of the row arrives, then waits until all have (the pattern of CUDA
        # cooperative groups' grid sync: block barrier, release arrive, acquire poll, barrier).
        tl.debug_barrier()
        tl.atomic_add(ctr, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(ctr, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(ctr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _exchange_hist(h, hist_ws, ctr, row, p, r, SPLIT: tl.constexpr, NB: tl.constexpr,
                       MAX_R: tl.constexpr):
        """Row total of each program's histogram h [NB] (exchange number r)."""
        if SPLIT == 1:
            return h
        else:
            base = (row * MAX_R + r).to(tl.int64) * SPLIT * NB
            bins = tl.arange(0, NB)
            tl.store(hist_ws + base + p * NB + bins, h)
            _barrier(ctr + row, (r + 1) * SPLIT)
            parts = tl.load(hist_ws + base + tl.arange(0, SPLIT)[:, None] * NB + bins[None, :],
                            cache_modifier=".cg")
            return tl.sum(parts, axis=0)

    @triton.jit
    def _exchange_pair(a, b, scal_ws, ctr, row, p, r, SPLIT: tl.constexpr, MAX_R: tl.constexpr):
        """Publish two int32 scalars, meet, return every program's pair ([SPLIT] each)."""
        base = (row * MAX_R + r).to(tl.int64) * SPLIT * 2
        tl.store(scal_ws + base + p * 2, a)
        tl.store(scal_ws + base + p * 2 + 1, b)
        _barrier(ctr + row, (r + 1) * SPLIT)
        parts = tl.arange(0, SPLIT)
        pa = tl.load(scal_ws + base + parts * 2, cache_modifier=".cg")
        pb = tl.load(scal_ws + base + parts * 2 + 1, cache_modifier=".cg")
        return pa, pb

    @triton.jit
    def _row_max_key(key, scal_ws, ctr, row, p, r, SPLIT: tl.constexpr, MAX_R: tl.constexpr):
        m = tl.max(key, axis=0)
        if SPLIT == 1:
            return m
        else:
            pa, pb = _exchange_pair(m.to(tl.int32, bitcast=True), 0, scal_ws, ctr, row, p, r,
                                    SPLIT, MAX_R)
            return tl.max(pa.to(tl.uint32, bitcast=True), axis=0)

    @triton.jit
    def _row_sum(v, scal_ws, ctr, row, p, r, SPLIT: tl.constexpr, MAX_R: tl.constexpr):
        s = tl.sum(v, axis=0)
        if SPLIT == 1:
            return s
        else:
            # Partial sums added in program order, so the result does not depend on timing.
            pa, pb = _exchange_pair(s.to(tl.int32, bitcast=True), 0, scal_ws, ctr, row, p, r,
                                    SPLIT, MAX_R)
            return tl.sum(pa.to(tl.float32, bitcast=True), axis=0)

    @triton.jit
    def _exp_noise(seed, pos, idx, PRECISE_LOG: tl.constexpr):
        """sampling.philox_noise for the lanes `idx` of one image: word idx % 4 of Philox4x32-10
        with key = the seed's halves and counter (idx // 4, pos, 0, 0); -log((bits >> 8 + 1)·2^-24)."""
        zero = tl.zeros_like(idx).to(tl.uint32)
        c1 = zero + (pos & 0xFFFFFFFF).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, (idx // 4).to(tl.uint32), c1, zero, zero)
        sub = idx % 4
        bits = tl.where(sub == 0, w0, tl.where(sub == 1, w1, tl.where(sub == 2, w2, w3)))
        u = ((bits >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
        if PRECISE_LOG:
            return -libdevice.log(u)  # logf, as torch.log computes it on CUDA
        else:
            return -tl.log(u)

    @triton.jit
    def _sample_kernel(logits, stride_l, noise, stride_n, ids, tokens, pos_ptr, cond_ptr, uncond_ptr,
                       scale_ptr, interval_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, tokoff_ptr, active_ptr,
                       hist_ws, scal_ws, ctr, V, min_t, noise_floor,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
                       HAS_ACTIVE: tl.constexpr, SEEDED: tl.constexpr, TOKENS: tl.constexpr,
                       LOG_NB: tl.constexpr, NPASS: tl.constexpr, MAX_R: tl.constexpr,
                       PRECISE_LOG: tl.constexpr):
        # Grid (B, SPLIT): program (b, p) holds values [p·CHUNK, (p+1)·CHUNK) of image b, whose
        # rows, position and settings come from the per-image tables (runtime values: one
        # compiled kernel serves every mix of settings).
        b = tl.program_id(0)
        p = tl.program_id(1)
        NB: tl.constexpr = 1 << LOG_NB
        crow = tl.load(cond_ptr + b)
        if crow >= 0:  # a padding entry (cond_row -1) writes nothing
            lane = tl.arange(0, BLOCK)
            idx = p * CHUNK + lane
            valid = (lane < CHUNK) & (idx < V)
            urow = tl.load(uncond_ptr + b)
            pos = tl.load(pos_ptr + crow)
            interval = tl.load(interval_ptr + b)
            c = tl.load(logits + crow * stride_l + idx, mask=valid, other=0.0).to(tl.float32)
            u = tl.load(logits + tl.maximum(urow, 0) * stride_l + idx, mask=valid, other=0.0).to(tl.float32)
            s = tl.load(scale_ptr + b).to(tl.float32)
            on = (urow >= 0) & ((interval < 0) | (pos <= interval))
            if HAS_ACTIVE:
                on = on & (tl.load(active_ptr) != 0)
            g = tl.where(on, u + s * (c - u), c)

            nan = tl.max(tl.where(valid & (g != g), 1, 0), axis=0)  # NaN logits: token -1
            r = tl.full((), 0, tl.int32)  # exchanges so far (each one a barrier when SPLIT > 1)
            t = tl.load(temp_ptr + b).to(tl.float32)
            if t == 0.0:
                best, arg = tl.max(tl.where(valid, g, float("-inf")), axis=0, return_indices=True,
                                   return_indices_tie_break_left=True)
            else:
                x = g / tl.maximum(t, min_t)
                key = tl.where(valid, _key(x), 0)
                top = _row_max_key(key, scal_ws, ctr, b, p, r, SPLIT, MAX_R)
                if SPLIT > 1:
                    r += 1
                m = _unkey(top)
                thr = tl.full((), 0, tl.uint32)
                k = tl.load(topk_ptr + b).to(tl.int32)
                if (k > 0) & (k < V):
                    # Radix select of the k-th largest key. Candidates: keys in [thr, thr + NB << sh);
                    # each pass keeps the bin holding the k_rem-th largest candidate.
                    k_rem = k
                    sh = tl.full((), 32 - LOG_NB, tl.uint32)
                    done = k_rem <= 0
                    bins_id = tl.arange(0, NB)
                    for _ in tl.static_range(NPASS):
                        if done == 0:
                            d = key - thr
                            cand = valid & (key >= thr) & ((d >> sh) < NB)
                            h = tl.histogram(tl.where(cand, d >> sh, 0).to(tl.int32), NB, mask=cand)
                            h = _exchange_hist(h, hist_ws, ctr, b, p, r, SPLIT, NB, MAX_R)
                            if SPLIT > 1:
                                r += 1
                            at_least = tl.cumsum(h, axis=0, reverse=True)  # candidates in bins >= b
                            bin_ = tl.sum((at_least >= k_rem).to(tl.int32), axis=0) - 1
                            k_rem -= tl.sum(tl.where(bins_id > bin_, h, 0), axis=0)
                            n_b = tl.sum(tl.where(bins_id == bin_, h, 0), axis=0)
                            thr = thr + (bin_.to(tl.uint32) << sh)
                            done = (n_b == k_rem) | (sh == 0)
                            sh = tl.where(sh > LOG_NB, sh - LOG_NB, 0).to(tl.uint32)
                kept = valid & (key >= thr)
                # x again from its key (exact; x itself is not kept alive through the passes)
                e = tl.where(kept, tl.exp(_unkey(key) - m), 0.0)
                top_p = tl.load(topp_ptr + b).to(tl.float32)
                if top_p < 1.0:
                    z = _row_sum(e, scal_ws, ctr, b, p, r, SPLIT, MAX_R)
                    if SPLIT > 1:
                        r += 1
                    # Smallest t with mass(keys > t) < p·Z (or t = the top key): a kept key, the
                    # smallest probability of the prefix (sampling.py's top-p threshold).
                    lo = thr
                    hi = top
                    goal = top_p * z
                    for _ in range(32):
                        if lo < hi:
                            mid = lo + (hi - lo) // 2
                            mass = _row_sum(tl.where(key > mid, e, 0.0), scal_ws, ctr, b, p, r, SPLIT, MAX_R)
                            if SPLIT > 1:
                                r += 1
                            if mass < goal:
                                hi = mid
                            else:
                                lo = mid + 1
                    kept = kept & (key >= lo)
                    e = tl.where(kept, e, 0.0)
                if SEEDED:
                    nz = _exp_noise(tl.load(seed_ptr + b), pos, idx, PRECISE_LOG)
                else:
                    nz = tl.load(noise + b.to(tl.int64) * stride_n + idx, mask=valid, other=1.0)
                score = tl.where(kept, e / tl.maximum(nz, noise_floor), 0.0)
                best, arg = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)

            arg = tl.where(nan > 0, -1, p * CHUNK + arg)
            if SPLIT == 1:
                winner = arg.to(tl.int64)
                write = True
            else:
                # Publish this program's best, arrive; the last program to arrive picks the winner
                # (ties to the lower program, i.e. the lower index) and resets the counter.
                base = (b * MAX_R + r).to(tl.int64) * SPLIT * 2
                tl.store(scal_ws + base + p * 2, best.to(tl.int32, bitcast=True))
                tl.store(scal_ws + base + p * 2 + 1, arg)
                tl.debug_barrier()
                seen = tl.atomic_add(ctr + b, 1, sem="acq_rel", scope="gpu")
                write = seen == (r + 1) * SPLIT - 1
                parts = tl.arange(0, SPLIT)
                pb = tl.load(scal_ws + base + parts * 2, cache_modifier=".cg").to(tl.float32, bitcast=True)
                pi = tl.load(scal_ws + base + parts * 2 + 1, cache_modifier=".cg")
                _, win = tl.max(pb, axis=0, return_indices=True, return_indices_tie_break_left=True)
                winner = tl.sum(tl.where(parts == win, pi, 0), axis=0).to(tl.int64)
                winner = tl.where(tl.min(pi, axis=0) < 0, -1, winner)
                if write:
                    tl.store(ctr + b, 0)
            if write:
                tl.store(ids + crow, winner)
                if urow >= 0:
                    tl.store(ids + urow, winner)
                if TOKENS:
                    tl.store(tokens + tl.load(tokoff_ptr + b) + pos, winner)
