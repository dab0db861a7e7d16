"""Which tiles (or the GEMM library) each decode GEMM should use on this GPU: a few tile policies
timed as the whole layer chain of a step and as one-op chains, in CUDA graphs with PDL, distinct
weights per layer (benchmarks/decode_layer_bench.py's set-up). Prints the best choice per op and
the chain with those choices; JSON under --out.

    python benchmarks/linear_tile_sweep.py --out DIR [--presets lasad-B,lasad-XL] [--rows 2,16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401

from decode_layer_bench import capture, default_tiles, make_weights, op_shapes, rel, step_torch, time_graph  # noqa: E402
from lasad_engine import LasadConfig  # noqa: E402
from lasad_engine.ops import linear as L  # noqa: E402
from lasad_engine.ops.lasad import lasad_fused_step_, row_start_mask  # noqa: E402
from lasad_engine.ops.linear import fused_linear  # noqa: E402
from lasad_tools.profiling import copy_bandwidth  # noqa: E402

OPS = ("qfv", "o", "w13", "w2", "head")


def policies(cfg, groups, rows, sms) -> dict:
    base = default_tiles(cfg, groups, rows, sms)
    shapes = op_shapes(cfg, groups)

    def split(op, t, s):
        n, k, g, nrm, sw = shapes[op]
        return t if (nrm and g > 1 and g % s) else replace(t, split_k=s)

    w4 = {op: replace(t, num_warps=4) for op, t in base.items()}
    return {"default": base, "library": {op: L.LIBRARY for op in OPS}, "warps4": w4,
            "warps2": {op: replace(t, num_warps=2) for op, t in base.items()},
            "warps4:bn*2": {op: replace(t, block_n=2 * t.block_n) for op, t in w4.items()},
            "warps4:split*2": {op: split(op, t, 2 * t.split_k) for op, t in w4.items()}}


def chain(W, tiles: dict, state, start):
    eps, kw = W["eps"], dict(backend="triton", pdl=True)

    def run(x):
        for i, p in enumerate(W["layers"]):
            qfv = fused_linear(x, p["qfv"], norm_weight=p["attn_norm"], eps=eps, tiles=tiles["qfv"], **kw)
            o = lasad_fused_step_(qfv, p["lb"], state[i], start, W["mode"], pdl=True)
            h = fused_linear(o.flatten(-2), p["o"], norm_weight=p["g_norm"], eps=eps, norm_groups=W["groups"],
                             residual=x, tiles=tiles["o"], **kw)
            u = fused_linear(h, p["w13"], norm_weight=p["ffn_norm"], eps=eps, swiglu=True, tiles=tiles["w13"], **kw)
            x = fused_linear(u, p["w2"], residual=h, tiles=tiles["w2"], **kw)
        return fused_linear(x, W["head"], norm_weight=W["final_norm"], eps=eps, tiles=tiles["head"], **kw)
    return run


def op_chain(op, W, tiles, bufs):
    eps, kw = W["eps"], dict(backend="triton", pdl=True, tiles=tiles)

    def run():
        for i, p in enumerate(W["layers"]):
            if op == "qfv":
                fused_linear(bufs["x"], p["qfv"], norm_weight=p["attn_norm"], eps=eps, **kw)
            elif op == "o":
                fused_linear(bufs["o"], p["o"], norm_weight=p["g_norm"], eps=eps, norm_groups=W["groups"],
                             residual=bufs["x"], **kw)
            elif op == "w13":
                fused_linear(bufs["x"], p["w13"], norm_weight=p["ffn_norm"], eps=eps, swiglu=True, **kw)
            elif op == "w2":
                fused_linear(bufs["u"], p["w2"], residual=bufs["x"], **kw)
            else:
                fused_linear(bufs["x"], W["heads"][i % 4], norm_weight=W["final_norm"], eps=eps, **kw)
    return run


def show(t):
    return t if isinstance(t, str) else f"bn{t.block_n}/s{t.split_k}/{'mma' if t.mma else 'fma'}/w{t.num_warps}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", default="lasad-B,lasad-XL")
    ap.add_argument("--rows", default="2,16")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds")
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = copy_bandwidth(dev)
    t0 = time.time()
    results, lines = {"copy_bandwidth_Bps": bw, "runs": []}, []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.presets.split(","):
        cfg = LasadConfig.from_preset(name)
        W = make_weights(cfg, dev)
        groups = W["groups"]
        W["heads"] = [W["head"]] + [W["head"].clone() for _ in range(3)]
        for rows in (int(r) for r in args.rows.split(",")):
            if time.time() - t0 > args.budget:
                lines.append(f"{name} rows={rows}: skipped (budget)")
                continue
            gen = torch.Generator(dev).manual_seed(rows)
            x0 = torch.randn(rows, cfg.dim, device=dev, generator=gen).bfloat16()
            state0 = 0.1 * torch.randn(cfg.n_layer, rows, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, device=dev,
                                       generator=gen)
            start = row_start_mask(torch.tensor([5], device=dev), torch.tensor([16], device=dev))
            ref = step_torch(W, x0, state0.clone(), start)
            bufs = {"x": x0, "o": torch.randn(rows, cfg.n_head * cfg.head_v_dim, device=dev).bfloat16(),
                    "u": torch.randn(rows, cfg.ffn_dim, device=dev).bfloat16()}
            per_op, full = {op: {} for op in OPS}, {}
            for pname, tiles in policies(cfg, groups, rows, sms).items():
                try:
                    state = state0.clone()
                    run = chain(W, tiles, state, start)
                    err = rel(run(x0), ref)
                    state.copy_(state0)
                    g = capture(run, x0)
                    full[pname] = {"us_per_step": time_graph(g, 10, 5), "rel_err": err}
                    del g
                    for op in OPS:
                        g = capture(op_chain(op, W, tiles[op], bufs))
                        per_op[op][pname] = time_graph(g, 10, 5) / cfg.n_layer
                        del g
                except Exception as e:  # a tile the kernel refuses: recorded, not fatal
                    full[pname] = {"error": f"{type(e).__name__}: {e}"[:200]}
            best = {op: min(per_op[op], key=per_op[op].get) for op in OPS if per_op[op]}
            pol = policies(cfg, groups, rows, sms)
            mix = {op: pol[best[op]][op] for op in best}
            state = state0.clone()
            run = chain(W, mix, state, start)
            err = rel(run(x0), ref)
            g = capture(run, x0)
            mixed = time_graph(g, 10, 5)
            del g
            row = {"preset": name, "rows": rows, "full": full, "per_op_us": per_op,
                   "best": {op: {"policy": best[op], "tiles": mix[op] if isinstance(mix[op], str) else asdict(mix[op]),
                                 "us": per_op[op][best[op]]} for op in best},
                   "best_mix_us_per_step": mixed, "best_mix_rel_err": err,
                   "shapes": {op: op_shapes(cfg, groups)[op][:2] for op in OPS}}
            results["runs"].append(row)
            (args.out / "tiles.json").write_text(json.dumps(results, indent=1))
            ok = {k: v["us_per_step"] for k, v in full.items() if "us_per_step" in v}
            lines.append(f"{name} rows={rows}: best mix {mixed:.1f} µs/step (err {err:.1e}); "
                         + ", ".join(f"{k} {v:.1f}" for k, v in sorted(ok.items(), key=lambda kv: kv[1])[:4]))
            for op in best:
                lines.append(f"    {op:5s} {show(mix[op]):22s} {per_op[op][best[op]]:6.2f} µs  (default "
                             f"{per_op[op].get('default', float('nan')):6.2f}, library {per_op[op].get('library', float('nan')):6.2f})")
        del W
        torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
