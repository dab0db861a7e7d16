"""Which kernel, conversion and tiles each quantised decode GEMM should use on this GPU (issue 29):
every GEMM of a preset's step timed alone as a chain over its layers (distinct weights per layer,
CUDA graph, PDL, decode_layer_bench's set-up), bf16 beside int8 and fp8, and the best choice per
GEMM written as a policy that benchmarks/int8_bench.py --quant-policy can load.

    python benchmarks/int8_gemv_sweep.py --out DIR [--presets lasad-XL,lasad-XXL,lasad-B] [--rows 2,128]

Variants at the decode's few rows (≤ ops.linear.FMA_ROWS_MAX, 1 and 2 images with CFG):
- `bf16`: the engine's bf16 path (its measured tiles, the library for the head);
- `fp8`, `int8_i2f`, `int8`: ops.linear.gemv_kernel with the tiles the engine picks (gemv_tiles),
  int8 converted by shifts and Triton's int -> float conversion (I2F) or by byte permutes;
- `int8_whole_k`: fused_linear_kernel (a program's whole slice of K loaded at once, what int8
  weights took until 2026-12-07) with its hand rule's tiles, then with other tiles (`fma`);
- `int8 bnB/sS/bkK/wW`: gemv_kernel with other tiles (block_n, split_k, block_k, warps).
Above ROWS_MAX rows (64 images with CFG): `bf16` (cuBLAS), `int8_dequant` (the weights
dequantised to bf16 each call, then cuBLAS: what the engine did before quant_mm), `int8_mm` and
`fp8_mm` (ops.linear.quant_mm with its default tiles) and `int8_mm <tiles>`.
Each variant's output is checked against the torch definition of its own weights (rel. error).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401

from decode_layer_bench import capture, op_shapes, rel, time_graph  # noqa: E402
from lasad_engine import LasadConfig, quant  # noqa: E402
from lasad_engine.ops import linear as L  # noqa: E402
from lasad_engine.ops.linear import LinearTiles, MmTiles, fused_linear  # noqa: E402
from lasad_tools.profiling import copy_bandwidth  # noqa: E402

OPS = ("qfv", "o", "w13", "w2", "head")
GEMV_GRID = dict(block_n=(8, 16, 32), block_k=(256, 512))
# quant_mm at many rows: the tiles that won on 2026-12-07 (H100), three wide in N (fewer
# programs re-reading the activations, as cuBLAS's tiles are), and the product swapped (MmTiles.swap:
# the converted weights as wgmma's register operand). Each tile is also run with K split so that
# the programs cover every SM (`fill_split`).
MM_GRID = [MmTiles(64, 64, 128, 4, 4), MmTiles(128, 64, 128, 3, 4), MmTiles(128, 64, 64, 4, 4),
           MmTiles(128, 32, 128, 4, 4), MmTiles(64, 32, 256, 3, 4),
           MmTiles(64, 128, 64, 4, 4), MmTiles(128, 128, 64, 3, 8), MmTiles(128, 256, 64, 3, 8),
           MmTiles(128, 64, 128, 3, 4, swap=True), MmTiles(128, 64, 64, 4, 4, swap=True),
           MmTiles(64, 64, 128, 4, 4, swap=True), MmTiles(128, 128, 64, 3, 8, swap=True),
           MmTiles(128, 128, 128, 3, 8, swap=True), MmTiles(64, 128, 128, 3, 8, swap=True)]


def fill_split(t: MmTiles, M: int, N: int, K: int, sms: int) -> int:
    """The smallest split of K that gives at least one program per SM (slices of at least two
    K steps), 1 if the output tiles alone do."""
    blocks = -(-M // t.block_m) * -(-N // t.block_n)
    s = 1
    while blocks * s < sms and -(-K // (s + 1)) >= 2 * t.block_k:
        s += 1
    return s


def make_op(cfg, op, groups, device, n_mats, gen):
    """n_mats distinct bf16 weights of one op, their int8 and fp8 forms, and its inputs."""
    n_out, K, g, has_norm, swiglu = op_shapes(cfg, groups)[op]
    N = 2 * n_out if swiglu else n_out
    w = [0.02 * torch.randn(N, K, device=device, generator=gen) for _ in range(n_mats)]
    mats = {"bf16": [(m.bfloat16(), None) for m in w],
            "int8": [quant.quantize_weight(m, "int8") for m in w]}
    if torch.cuda.get_device_capability(device) >= quant.FP8_CAPABILITY:
        mats["fp8"] = [quant.quantize_weight(m, "fp8") for m in w]
    del w
    kw = dict(eps=1e-5, swiglu=swiglu, norm_groups=g)
    if has_norm:
        kw["norm_weight"] = (1 + 0.1 * torch.randn(K, device=device, generator=gen)).bfloat16()
    return mats, kw, (n_out, K, g, has_norm, swiglu)


def time_chain(mats, x, kw, residual, tiles, backend="triton") -> tuple[float, float]:
    """µs per GEMM over the chain of distinct weights, and the rel. error of the first against
    the torch definition of the same weights."""
    out = torch.empty(*x.shape[:-1], kw_out(mats, kw), dtype=x.dtype, device=x.device)

    def run():
        for w, s in mats:
            fused_linear(x, w, weight_scale=s, residual=residual, out=out, backend=backend, tiles=tiles, pdl=True,
                         **kw)
    w, s = mats[0]
    ref = fused_linear(x, w, weight_scale=s, residual=residual, backend="torch", **kw)
    got = fused_linear(x, w, weight_scale=s, residual=residual, backend=backend, tiles=tiles, pdl=True, **kw)
    err = rel(got, ref)
    g = capture(run)
    us = time_graph(g, 10, 5) / len(mats)
    del g
    return us, err


def kw_out(mats, kw):
    n = mats[0][0].shape[0]
    return n // 2 if kw["swiglu"] else n


def whole_k_grid(shape, rule):
    """fused_linear_kernel tiles beside its hand rule's: narrower and wider column blocks, 2 or 4
    warps (bf16's measured tiles at these rows use 2-4), K unsplit or in slices of 256 features
    (no padding to a power of two)."""
    n_out, K, g, has_norm, swiglu = shape
    exact = K // 256 if K % 256 == 0 else 1
    for bn, s, w in itertools.product((4, 8, 16), sorted({1, exact}), (2, 4)):
        if (has_norm and g > 1 and g % s) or (bn, s, w) == (rule.block_n, rule.split_k, rule.num_warps):
            continue
        yield LinearTiles(bn, s, False, w)


def gemv_grid(shape, rows, sms):
    """gemv_kernel tiles around the hand rule: block_n × block_k, warps so that a thread holds 4
    columns, K unsplit or split to fill the SMs twice."""
    n_out, K, g, has_norm, swiglu = shape
    seen = set()
    for bn, bk in itertools.product(GEMV_GRID["block_n"], GEMV_GRID["block_k"]):
        if bk > max(256, L._pow2(K)) or (has_norm and g > 1 and bk % (K // g)):
            continue
        fill = 1
        while -(-n_out // bn) * fill < 2 * sms and -(-K // (fill + 1)) >= bk:
            fill += 1
        w0 = max(1, min(8, bn * bk // 2048))
        for s, w in itertools.product(sorted({1, fill}), (w0,)):
            if -(-K // s) < bk // 2:
                continue
            t = LinearTiles(bn, s, False, w, bk)
            if t not in seen:
                seen.add(t)
                yield t
    # one chunk a program (every weight requested before the wait), K split in pieces of bk
    for bn, bk in ((4, 256), (8, 256), (4, 512), (8, 512), (16, 256)):
        if has_norm and g > 1 and bk % (K // g):
            continue
        s = -(-K // bk)
        if s > 1 or bk >= K:
            t = LinearTiles(bn, s, False, max(1, bn * bk // 2048), bk)
            if t not in seen:
                seen.add(t)
                yield t


def show(t):
    if isinstance(t, MmTiles):
        return (f"mm{t.block_m}x{t.block_n}x{t.block_k}/st{t.stages}/w{t.num_warps}" + ("/swap" if t.swap else "")
                + (f"/s{t.split_k}" if t.split_k > 1 else ""))
    kind = f"bk{t.block_k}" if getattr(t, "block_k", 0) else ("mma" if t.mma else "fma")
    return t if isinstance(t, str) else f"bn{t.block_n}/s{t.split_k}/{kind}/w{t.num_warps}"


def sweep_op(cfg, op, groups, rows, device, gen, deadline, sms=132) -> dict:
    n_mats = 4 if op == "head" else cfg.n_layer
    mats, kw, shape = make_op(cfg, op, groups, device, n_mats, gen)
    n_out, K = shape[0], shape[1]
    x = torch.randn(rows, K, device=device, generator=gen).bfloat16()
    residual = torch.randn(rows, n_out, device=device, generator=gen).bfloat16() if op in ("o", "w2") else None
    res = {"n_out": n_out, "K": K, "rows": rows, "weights_bytes_bf16": mats["bf16"][0][0].numel() * 2,
           "variants": {}}

    def add(name, fmt, tiles, backend="triton", asm=True):
        if time.time() > deadline:
            return
        L.INT8_ASM = asm
        try:
            us, err = time_chain(mats[fmt], x, kw, residual, tiles, backend)
            res["variants"][name] = {"us": us, "rel_err": err, "tiles": show(tiles) if tiles is not None else None,
                                     "fmt": fmt, "tiles_raw": asdict(tiles) if hasattr(tiles, "block_n") else tiles}
        except Exception as e:  # a tile the kernel refuses, an out-of-registers compile: recorded
            res["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            L.INT8_ASM = True

    add("bf16", "bf16", None)
    for fmt in ("fp8", "int8"):
        if fmt in mats:
            add(fmt, fmt, None)
    add("int8_i2f", "int8", None, asm=False)
    if rows <= L.FMA_ROWS_MAX:
        old = L.linear_tiles(rows, n_out, K, groups=shape[2], has_norm=shape[3], swiglu=shape[4], sms=sms)
        add("int8_whole_k", "int8", old)  # fused_linear_kernel, the whole slice of K at once (until 2026-12-07)
        for t in whole_k_grid(shape, old):
            add(f"int8 {show(t)}", "int8", t)
        for t in gemv_grid(shape, rows, sms):
            add(f"int8 {show(t)}", "int8", t)
    elif rows > L.ROWS_MAX:
        add("int8_dequant", "int8", None, backend="torch")
        if "fp8" in mats:
            add("fp8_mm", "fp8", None)
        n_w = mats["int8"][0][0].shape[0]
        grid = []
        for t in MM_GRID:
            s = fill_split(t, rows, n_w, K, sms)
            grid += [t] + ([replace(t, split_k=s)] if s > 1 else [])
        for t in grid:
            if time.time() > deadline:
                break
            L.QUANT_MM_TILES = {(n_w, K): t}
            try:
                add(f"int8 {show(t)}", "int8", None)
                res["variants"][f"int8 {show(t)}"]["tiles_raw"] = asdict(t)
            finally:
                L.QUANT_MM_TILES = {}
    ok = {k: v for k, v in res["variants"].items() if "us" in v and v["rel_err"] < 2e-2}
    q = {k: v for k, v in ok.items() if v["fmt"] == "int8" and k != "int8_dequant"}
    if q:
        best = min(q, key=lambda k: q[k]["us"])
        res["best_int8"] = {"variant": best, **q[best]}
        if "bf16" in ok:
            res["best_int8"]["speedup_vs_bf16"] = ok["bf16"]["us"] / q[best]["us"]
    del mats
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", default="lasad-XL,lasad-XXL,lasad-B")
    ap.add_argument("--rows", default="2,128")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds")
    a = ap.parse_args()
    dev = torch.device("cuda")
    deadline = time.time() + a.budget
    a.out.mkdir(parents=True, exist_ok=True)
    rec = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(dev),
           "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
           "copy_bandwidth_Bps": copy_bandwidth(dev), "runs": [],
           "policy": {"quant_tile_policy": [], "quant_mm_tiles": []}}
    path = a.out / "int8_gemv_sweep.json"
    gen = torch.Generator(dev).manual_seed(0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for rows in (int(r) for r in a.rows.split(",")):  # every preset at the first row count first
        for preset in a.presets.split(","):
            cfg = LasadConfig.from_preset(preset)
            groups = cfg.n_head if cfg.output_norm == "group" else 1
            for op in OPS:
                if time.time() > deadline:
                    print(f"{preset} rows={rows} {op}: skipped (budget)", flush=True)
                    continue
                r = sweep_op(cfg, op, groups, rows, dev, gen, deadline, sms)
                r.update(preset=preset, op=op)
                rec["runs"].append(r)
                v = r["variants"]
                b = r.get("best_int8", {})
                print(f"{preset} rows={rows} {op:4s} bf16 {v.get('bf16', {}).get('us', float('nan')):7.2f}  "
                      f"fp8 {v.get('fp8', {}).get('us', float('nan')):7.2f}  "
                      f"int8_i2f {v.get('int8_i2f', {}).get('us', float('nan')):7.2f}  "
                      f"int8 {v.get('int8', {}).get('us', float('nan')):7.2f}  best int8 {b.get('variant')} "
                      f"{b.get('us', float('nan')):7.2f} (x{b.get('speedup_vs_bf16', float('nan')):.2f})", flush=True)
                raw = b.get("tiles_raw")
                if isinstance(raw, dict) and "block_m" not in raw and rows <= L.FMA_ROWS_MAX:
                    rec["policy"]["quant_tile_policy"].append(
                        {"band": L.FMA_ROWS_MAX, "n_out": r["n_out"], "K": r["K"], "tiles": raw})
                elif isinstance(raw, dict) and "block_m" in raw:
                    n_w = 2 * r["n_out"] if op == "w13" else r["n_out"]
                    rec["policy"]["quant_mm_tiles"].append({"N": n_w, "K": r["K"], "tiles": raw, "preset": preset,
                                                            "op": op})
                path.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
