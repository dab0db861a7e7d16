"""Where one decode step goes, kernel by kernel (issue 15's anatomy; rerun it on any GPU).

    python benchmarks/step_anatomy.py --out DIR [--presets lasad-B,lasad-XL] [--images 1]

For each preset (random bf16 weights, fp32 state, CFG 4, top-k 2000, one image = 2 rows):
- the graph step: a whole generation of 256 tokens replayed from the captured CUDA graph, timed
  with CUDA events, per step;
- the anatomy: torch.profiler over eager steps of the same backend (the kernels the graph holds),
  grouped into families (GEMMs, fused linear layers, the LASAD step, norms, the sampler, the
  embedding, everything else), with launches per step, µs per step, and for the families that
  stream weights the achieved bandwidth against the copy bandwidth measured in the same run;
- the floor: bytes a step must move (weights + state read and written) over that bandwidth.
Writes DIR/anatomy.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401  (the checkout importable as installed)

from lasad_engine.engine import LasadEngine  # noqa: E402
from lasad_engine.params import SamplingParams  # noqa: E402
from lasad_tools.profiling import copy_bandwidth, environment, streamed_weight_bytes  # noqa: E402

from engine_bench import random_model  # noqa: E402

PARAMS = SamplingParams(cfg_scale=4.0, top_k=2000)
# kernel-name substrings -> family (first match wins; names as the profiler reports them)
FAMILIES = [
    ("fused linear", ("fused_linear", "linear_kernel", "skinny")),
    ("LASAD step", ("lasad_step",)),
    ("sampler", ("_sample_kernel", "sample")),
    ("embedding", ("embed_step",)),
    ("GEMM (cuBLAS)", ("gemm", "cutlass", "xmma", "sm90_", "cublas", "splitk")),
    ("RMSNorm", ("rms_norm", "layernorm", "layer_norm")),  # onnxruntime: (Skip)SimplifiedLayerNorm kernels
    ("SwiGLU", ("swiglu", "quickgelu", "silu")),
    ("top-k / sort", ("topk", "sort", "radix", "gatherTopK", "bitonic")),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return fam
    return "element-wise / copy"


def graph_step_us(engine, n_tokens: int, device) -> float:
    times = []
    for seed in range(3):
        gen = torch.Generator(device).manual_seed(seed)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        engine.generate([1], params=PARAMS, generator=gen)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n_tokens)
    return statistics.median(times)


def anatomy(model, device, steps: int = 16, backend: str = "cuda", weight_bytes: int | None = None,
            **engine_kw) -> dict:
    """Kernels of `steps` eager steps of `backend` (the same kernels its graph replays), by family;
    with "per_gemm": µs and achieved bandwidth of each weight-streaming op (qfv, o, w13, w2 of every
    layer, then the head), matched by launch order where a step launches exactly one kernel per op;
    `weight_bytes`: bytes per weight where the backend's weights differ from the model's (an export)."""
    from torch.profiler import ProfilerActivity, profile
    engine = LasadEngine(model, backend=backend, device=device, max_batch=1, use_cuda_graph=False, **engine_kw)
    grid = (1, steps)
    engine.generate([1], grid=grid, params=PARAMS, generator=torch.Generator(device).manual_seed(0))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate([1], grid=grid, params=PARAMS, generator=torch.Generator(device).manual_seed(1))
        torch.cuda.synchronize()
    engine.close()
    fam = defaultdict(lambda: {"launches": 0, "us": 0.0, "kernels": defaultdict(int)})
    gemms = []
    for ev in sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start):
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        name = family(ev.name)
        f = fam[name]
        f["launches"] += 1
        f["us"] += us
        f["kernels"][ev.name[:80]] += 1
        if name in ("fused linear", "GEMM (cuBLAS)"):
            gemms.append(us)
    out = {}
    for name, f in fam.items():
        out[name] = {"launches_per_step": f["launches"] / steps, "us_per_step": f["us"] / steps,
                     "kernels": dict(sorted(f["kernels"].items(), key=lambda kv: -kv[1])[:6])}
    out["per_gemm"] = per_gemm(model, gemms, steps, weight_bytes)
    return out


def gemm_ops(model, weight_bytes: int | None = None) -> list[tuple[str, int]]:
    """(op, weight bytes) in launch order for one step: each layer's qfv, o, w13, w2, then the head."""
    ops = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        for op, w in (("qfv", a.qfv.weight), ("o", a.o_proj.weight), ("w13", f.w13.weight), ("w2", f.w2.weight)):
            ops.append((op, w.numel() * (weight_bytes or w.element_size())))
    w = model.output.weight
    return ops + [("head", w.numel() * (weight_bytes or w.element_size()))]


def per_gemm(model, times_us: list[float], steps: int, weight_bytes: int | None = None) -> dict:
    """Mean µs and bandwidth per op kind, or why launch order cannot name them."""
    ops = gemm_ops(model, weight_bytes)
    if len(times_us) != steps * len(ops):
        return {"note": f"{len(times_us) / steps:.1f} GEMM kernels per step for {len(ops)} ops: not one per op, "
                        "so launch order does not name them"}
    nbytes = dict(ops)  # every layer has the same shapes
    times = defaultdict(list)  # op -> its kernels' µs, every layer of every step
    for j, us in enumerate(times_us):
        times[ops[j % len(ops)][0]].append(us)
    mean = {op: statistics.fmean(t) for op, t in times.items()}
    return {op: {"us": us, "weight_bytes": nbytes[op], "bandwidth_Bps": nbytes[op] / (us * 1e-6)}
            for op, us in mean.items()}


def kernels_per_step(fams: dict) -> float:
    return sum(f["launches_per_step"] for k, f in fams.items() if k != "per_gemm")


def family_lines(fams: dict) -> list[str]:
    """The anatomy as text: families by time, then the per-op GEMM table."""
    lines = []
    for name, f in sorted(((k, f) for k, f in fams.items() if k != "per_gemm"), key=lambda kv: -kv[1]["us_per_step"]):
        lines.append(f"    {name:22s} {f['launches_per_step']:6.1f} launches {f['us_per_step']:8.1f} µs (eager)")
    for op, g in fams["per_gemm"].items():
        lines.append(f"    {op:8s} {g}" if op == "note" else
                     f"    {op:8s} {g['us']:6.2f} µs/kernel  {g['weight_bytes'] / 1e6:6.2f} MB  "
                     f"{g['bandwidth_Bps'] / 1e12:5.2f} TB/s")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", default="lasad-B,lasad-XL")
    args = ap.parse_args()
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    result = {"environment": environment(device, "step_anatomy"), "copy_bandwidth_Bps": bw, "presets": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in args.presets.split(","):
        model = random_model(name, device, torch.bfloat16)
        cfg = model.config
        w_bytes = streamed_weight_bytes(model)
        floor_us = (w_bytes + 2 * cfg.state_nbytes(2)) / bw * 1e6
        engine = LasadEngine(model, backend="cuda", device=device, max_batch=1)
        engine.generate([1], params=PARAMS, generator=torch.Generator(device).manual_seed(0))  # capture
        step_us = graph_step_us(engine, cfg.seq_len, device)
        engine.close()
        fams = anatomy(model, device)
        linear_us = sum(f["us_per_step"] for k, f in fams.items() if k in ("fused linear", "GEMM (cuBLAS)"))
        r = {"graph_step_us": step_us, "ms_per_image": step_us * cfg.seq_len / 1e3, "floor_step_us": floor_us,
             "x_floor": step_us / floor_us, "weight_bytes": w_bytes,
             "linear_bandwidth_Bps": w_bytes / (linear_us * 1e-6) if linear_us else None,
             "kernels_per_step": kernels_per_step(fams), "families": fams}
        result["presets"][name] = r
        (args.out / "anatomy.json").write_text(json.dumps(result, indent=1))
        lines.append(f"{name}: graph step {step_us:.1f} µs ({r['ms_per_image']:.1f} ms/image), floor {floor_us:.1f} µs "
                     f"(x{r['x_floor']:.1f}), {r['kernels_per_step']:.0f} kernels/step, linear layers at "
                     f"{(r['linear_bandwidth_Bps'] or 0) / 1e12:.2f} TB/s of {bw / 1e12:.2f}")
        lines += family_lines(fams)
        del model
        torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
