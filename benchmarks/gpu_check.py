"""Everything lasad must show on a GPU, checked and timed in one run.

    python benchmarks/gpu_check.py --out DIR [--stages engine,pytest,chunk,step] [--quick]

Stages (in this order, each saved as soon as it ends):
- engine: benchmarks/engine_bench.py — ms per image / step for lasad-B/L/XL/XXL at batch 1, 8,
  64, 256, graph vs eager, beside the floor; cuda == torch tokens and logits; memory flat;
- pytest: the `gpu`-marked tests (in this process, so Triton/fla compile once);
- chunk: fla's chunk_gla vs the torch chunked form vs the float64 loop, every row_start mode
  (the finite floor for "reset"), forward and gradients, and the time of each;
- train: GPT training tokens/s (lasad-B, fla vs torch chunked form) and the tokenizer's PSNR
  after a short Emoji-5 run (set LASAD_EMOJI5_NPZ to a packed image set);
- step: the Triton step kernel vs its float64 reference at the B/L/XL/XXL head shapes and batches
  2, 64, 512, and its time per call (one call per layer, all layers' states distinct, replayed
  from a CUDA graph) against the bytes it must move.
The copy bandwidth is measured first: it is the ceiling every floor uses.
Writes DIR/gpu_check.json (raw numbers + environment) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repo import ROOT  # noqa: E402  (the checkout importable as installed)

from lasad_engine import LasadConfig  # noqa: E402
from lasad_tools.profiling import copy_bandwidth, environment  # noqa: E402
from lasad_engine.ops.lasad import (ROW_START_MODES, chunk_lasad, lasad_step_,  # noqa: E402
                                    naive_recurrent_lasad, row_start_mask)
from lasad_engine.ops.lasad.gates import input_gate  # noqa: E402
from lasad_engine.ops.lasad.step import lasad_step_ref_  # noqa: E402

PRESETS = ("lasad-B", "lasad-L", "lasad-XL", "lasad-XXL")


def rel(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm()).item()


def cuda_time_ms(fn, iters=50, warmup=5) -> float:
    """Median ms per call of `fn`, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def graph_time_ms(fn, iters=30) -> float:
    """Median ms of one replay of a CUDA graph of `fn` (no launch gaps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time_ms(graph.replay, iters=iters, warmup=3)


def step_kernel(results, batches, bw):
    rows = []
    for name in PRESETS:
        cfg = LasadConfig.from_preset(name)
        L, H, K, V = cfg.n_layer, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim
        for B in batches:
            gen = torch.Generator(device="cuda").manual_seed(B * 7 + H)
            q, k, v = (torch.randn(L, B, H, n, device="cuda", generator=gen) for n in (K, K, V))
            g = F.logsigmoid(torch.randn(L, B, H, K, device="cuda", generator=gen))
            state = torch.randn(L, B, H, K, V, device="cuda", generator=gen)
            err = {}
            for mode in ROW_START_MODES:
                for flag in (False, True):
                    start = torch.tensor([flag], device="cuda")
                    s_ref, s_tri = state[0].double().clone(), state[0].clone()
                    o_ref = lasad_step_ref_(q[0].double(), k[0].double(), v[0].double(), g[0].double(),
                                            s_ref, start, mode)
                    o = torch.full((B, H, V), float("nan"), device="cuda")
                    lasad_step_(q[0], k[0], v[0], g[0], s_tri, start, mode, out=o)
                    err[f"{mode}{'@row_start' if flag else ''}"] = max(rel(o, o_ref), rel(s_tri, s_ref))
            start = row_start_mask(torch.tensor([5], device="cuda"), torch.tensor([16], device="cuda"))
            out = torch.empty(L, B, H, V, device="cuda")
            state.mul_(0.01)  # keep the repeated in-place updates bounded while timing

            def all_layers(fn=lasad_step_):
                for i in range(L):
                    fn(q[i], k[i], v[i], g[i], state[i], start, "unit", out=out[i])
            t_graph = graph_time_ms(all_layers) / L
            t_eager = cuda_time_ms(all_layers, iters=10) / L
            t_ref = cuda_time_ms(lambda: all_layers(lasad_step_ref_), iters=5) / L
            nbytes = B * H * (2 * K * V * 4 + (3 * K + 2 * V) * 4)  # state r+w, q k g v in, o out
            floor_us = nbytes / (bw * 1e12) * 1e6
            rows.append({
                "preset": name, "batch": B, "heads": H, "layers": L, "max_rel_err": max(err.values()),
                "rel_err": err, "bytes_per_call": nbytes, "us_per_call_graph": t_graph * 1e3,
                "us_per_call_eager": t_eager * 1e3, "us_per_call_torch_ref": t_ref * 1e3,
                "floor_us": floor_us, "achieved_TBps": nbytes / (t_graph * 1e-3) / 1e12,
                "fraction_of_copy_bw": nbytes / (t_graph * 1e-3) / 1e12 / bw,
                "state_mib_all_layers": L * B * H * K * V * 4 / 2**20,
            })
            del q, k, v, g, state, out
    results["step_kernel"] = rows


def chunk_forms(results, quick):
    rows = []
    B, T, H, K, V = 2, 256, 4, 64, 64
    for mode in ROW_START_MODES:
        for width in (16, 7):
            gen = torch.Generator(device="cuda").manual_seed(width)
            q = torch.randn(B, T, H, K, device="cuda", generator=gen)
            f = torch.randn(B, T, H, K, device="cuda", generator=gen)
            v = torch.randn(B, T, H, V, device="cuda", generator=gen)
            S0 = torch.randn(B, H, K, V, device="cuda", generator=gen)
            ref_o, ref_S = naive_recurrent_lasad(q.double(), input_gate(F.logsigmoid(f.double())),
                                                 v.double(), F.logsigmoid(f.double()), width=width,
                                                 row_start=mode, initial_state=S0.double(),
                                                 output_final_state=True)
            row = {"mode": mode, "width": width}
            grads = {}
            for backend in ("torch", "fla"):
                for dtype in (torch.float32,):  # bf16 would autotune every fla kernel again
                    leaves = [x.clone().to(dtype).requires_grad_() for x in (q, f, v)]
                    qq, ff, vv = leaves
                    g = F.logsigmoid(ff.float())
                    o, S = chunk_lasad(qq, input_gate(g).to(dtype), vv, g, width=width, row_start=mode,
                                       initial_state=S0, output_final_state=True, backend=backend)
                    tag = f"{backend}_{str(dtype).split('.')[-1]}"
                    row[f"{tag}_o_err"] = rel(o, ref_o)
                    row[f"{tag}_state_err"] = rel(S, ref_S)
                    (o.float() * torch.linspace(-1, 1, V, device="cuda")).sum().backward()
                    grads[tag] = [x.grad.float() for x in leaves]
            row["grad_err_fla_vs_torch_fp32"] = max(rel(a, b) for a, b in zip(grads["fla_float32"], grads["torch_float32"]))
            rows.append(row)
    results["chunk_forms"] = rows

    # speed at the lasad-B training shape: forward + backward of one layer's op
    B, T, H = (8 if quick else 32), 256, 12
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = [torch.randn(B, T, H, 64, device="cuda", generator=gen).requires_grad_() for _ in range(3)]
    timing = {"shape": [B, T, H, 64, 64]}
    for backend in ("torch", "fla"):
        def fwd_bwd():
            g = F.logsigmoid(x[1].float())
            o, _ = chunk_lasad(x[0], input_gate(g), x[2], g, width=16, backend=backend)
            o.float().sum().backward()
        timing[f"{backend}_fwd_bwd_ms"] = cuda_time_ms(fwd_bwd, iters=10, warmup=2)
    results["chunk_speed"] = timing


def gpu_pytest(results, out_dir):
    import contextlib
    import io

    import pytest
    t = time.time()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")])
    text = buf.getvalue()
    (out_dir / "pytest_gpu.txt").write_text(text)
    results["pytest_gpu"] = {"returncode": int(code), "summary": (text.strip().splitlines() or [""])[-1],
                             "seconds": round(time.time() - t, 1)}


def train_stage(results, out_dir, quick):
    """GPT training tokens/s for lasad-B with fla's chunk_gla vs the torch chunked form (synthetic
    codes: speed does not depend on the data), and the tokenizer's held-out PSNR after a short run
    on Emoji-5 when the packed set is carried (LASAD_EMOJI5_NPZ, from formats.pack_image_set)."""
    import tempfile

    import numpy as np

    from lasad_train.formats import CODES_FORMAT, VERSION, save_npy, unpack_image_set, write_manifest
    from lasad_train.gpt import GPTTrainArgs, train_gpt
    work = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    n = 2048
    save_npy(work / "codes-00000.npy", rng.integers(0, 16384, (n, 16, 16)).astype(np.int32))
    save_npy(work / "labels-00000.npy", rng.integers(0, 1000, n).astype(np.int64))
    write_manifest(work, {"format": CODES_FORMAT, "version": VERSION, "grid": [16, 16], "vocab_size": 16384,
                          "num_classes": 1000, "class_names": None, "flip": False, "count": n,
                          "shards": [{"codes": "codes-00000.npy", "labels": "labels-00000.npy", "count": n}]})
    rows = {}
    steps = 20 if quick else 40
    for backend in ("fla", "torch"):
        out = work / f"gpt-{backend}"
        train_gpt(GPTTrainArgs(codes=str(work), out=str(out), preset="lasad-B", steps=steps, batch_size=64,
                               log_every=10, save_every=10**9, chunk_backend=backend, progress=False))
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        rows[backend] = {"tokens_per_s": [r["tokens_per_s"] for r in log], "loss": [r["loss"] for r in log],
                         "steady_tokens_per_s": statistics.median(r["tokens_per_s"] for r in log[1:])}
    results["train_gpt_lasad_B"] = {"batch": 64, "tokens_per_step": 64 * 256, **rows}
    npz = os.environ.get("LASAD_EMOJI5_NPZ")
    if npz and Path(npz).is_file():
        from lasad_train.tokenizer_train import train_tokenizer
        images = unpack_image_set(npz, work / "emoji5")
        steps = int(os.environ.get("LASAD_VQ_STEPS", "1500"))
        results["tokenizer_emoji5"] = train_tokenizer(images, work / "vq", preset="vq-f4-demo", steps=steps,
                                                      batch_size=64, progress=False, save_every=10**9)


def engine_stage(results, quick, bw):
    import engine_bench
    t = time.time()
    presets = ["lasad-B", "lasad-XL"] if quick else ["lasad-B", "lasad-L", "lasad-XL", "lasad-XXL"]
    engine_bench.bench(results, presets, [1, 8] if quick else [1, 8, 64, 256], torch.device("cuda"), bw, quick)
    results["engine_bench_seconds"] = round(time.time() - t, 1)
    engine_bench.checks(results, torch.device("cuda"))
    results["engine_seconds"] = round(time.time() - t, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--stages", default="engine,pytest,chunk,step")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible to torch")
    results = {"environment": environment(torch.device("cuda"), "python benchmarks/gpu_check.py")}
    bw = copy_bandwidth(torch.device("cuda")) / 1e12  # TB/s, bytes read + written
    results["copy_bandwidth_TBps"] = bw
    stages = {
        "engine": lambda: engine_stage(results, args.quick, bw),
        "pytest": lambda: gpu_pytest(results, args.out),
        "chunk": lambda: chunk_forms(results, args.quick),
        "step": lambda: step_kernel(results, (2, 64) if args.quick else (2, 64, 512), bw),
        "train": lambda: train_stage(results, args.out, args.quick),
    }
    for name in args.stages.split(","):
        t = time.time()
        try:
            stages[name]()
        except Exception as e:  # noqa: BLE001 - keep the other stages' numbers
            import traceback
            traceback.print_exc()
            results.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
        results.setdefault("stage_seconds", {})[name] = round(time.time() - t, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        print(f"stage {name} done in {time.time() - t:.0f} s", flush=True)

    print(f"\ncopy bandwidth {bw:.2f} TB/s; {results['environment']['gpu']}")
    print("step kernel: preset batch | max rel err | us/call graph (eager, torch ref) | floor us | TB/s")
    for r in results.get("step_kernel", []):
        print(f"  {r['preset']:9s} {r['batch']:4d} | {r['max_rel_err']:.1e} | {r['us_per_call_graph']:7.2f} "
              f"({r['us_per_call_eager']:6.2f}, {r['us_per_call_torch_ref']:7.2f}) | {r['floor_us']:7.2f} | "
              f"{r['achieved_TBps']:.2f}")
    print("chunk forms: mode width | o err torch / fla fp32 | state err fla | grad err fla vs torch")
    for r in results.get("chunk_forms", []):
        print(f"  {r['mode']:5s} {r['width']:2d} | {r['torch_float32_o_err']:.1e} / {r['fla_float32_o_err']:.1e} | "
              f"{r['fla_float32_state_err']:.1e} | {r['grad_err_fla_vs_torch_fp32']:.1e}")
    print("chunk speed:", results.get("chunk_speed"))
    print("engine: preset images | graph ms/image, ms/step | floor ms/step | x floor | eager fused, torch ms/step")
    for r in results.get("engine_bench", []):
        print(f"  {r['preset']:9s} {r['images']:4d} | {r.get('graph_ms_per_image', 0):8.2f} {r.get('graph_ms_per_step', 0):7.3f} | "
              f"{r['floor_ms_per_step']:7.3f} | {r.get('graph_x_floor', 0):5.1f} | {r.get('eager_fused_ms_per_step', 0):7.3f} "
              f"{r.get('eager_torch_ms_per_step', 0):7.3f}")
    print("engine checks:", json.dumps(results.get("engine_checks")))
    print("pytest -m gpu:", results.get("pytest_gpu"))
    print("errors:", results.get("errors", "none"))


if __name__ == "__main__":
    main()
