"""One decode GEMM of a preset, launched a few times as the engine would (its tile policy), for a
profiler to read its hardware counters (issue 29: why an int8 GEMM at 1-2 images is not faster than
bf16 while it moves half the bytes). Not a benchmark by itself: run it under Nsight Compute, e.g.

    ncu --clock-control none --kernel-name regex:'fused_linear|gemv|quant_mm' --launch-skip 3 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats --section Occupancy \
        python benchmarks/int8_ncu_probe.py --preset lasad-XL --op o --fmt int8 --rows 2

(`benchmarks/device/gpu_call.sh int8-ncu` runs that for bf16 and int8 at lasad-XL's GEMMs.)
The output is checked against the torch definition of the same weights; exits non-zero if it differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401

from int8_gemv_sweep import OPS, make_op  # noqa: E402
from decode_layer_bench import rel  # noqa: E402
from lasad_engine import LasadConfig  # noqa: E402
from lasad_engine.ops.linear import MmTiles, fused_linear  # noqa: E402
from lasad_engine.ops import linear as L  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="lasad-XL")
    ap.add_argument("--op", choices=OPS, default="o")
    ap.add_argument("--fmt", choices=("bf16", "int8", "fp8"), default="int8")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--mm-tiles", help="quant_mm tiles for many rows, as MmTiles' fields: 128,64,128,3,4,8,1,1")
    a = ap.parse_args()
    dev = torch.device("cuda")
    cfg = LasadConfig.from_preset(a.preset)
    groups = cfg.n_head if cfg.output_norm == "group" else 1
    gen = torch.Generator(dev).manual_seed(0)
    mats, kw, (n_out, K, *_rest) = make_op(cfg, a.op, groups, dev, 1, gen)
    if a.fmt not in mats:
        raise SystemExit(f"--fmt {a.fmt} does not run on this GPU")
    w, s = mats[a.fmt][0]
    if a.mm_tiles:
        f = [int(v) for v in a.mm_tiles.split(",")]
        L.QUANT_MM_TILES[(w.shape[0], K)] = MmTiles(*f[:6], bool(f[6]) if len(f) > 6 else False,
                                                    f[7] if len(f) > 7 else 1)
    x = torch.randn(a.rows, K, device=dev, generator=gen).bfloat16()
    res = torch.randn(a.rows, n_out, device=dev, generator=gen).bfloat16() if a.op in ("o", "w2") else None
    ref = fused_linear(x, w, weight_scale=s, residual=res, backend="torch", **kw)
    for _ in range(a.reps):
        got = fused_linear(x, w, weight_scale=s, residual=res, backend="triton", pdl=True, **kw)
    torch.cuda.synchronize()
    err = rel(got, ref)
    print(f"{a.preset} {a.op} {a.fmt} rows={a.rows} [{w.shape[0]}, {K}] rel. error {err:.2e}")
    if not err < 2e-2:
        raise SystemExit(f"the kernel's output differs from the torch definition: {err:.2e}")


if __name__ == "__main__":
    main()
