"""Engine benchmark (not a test): ms per image and per step, eager vs CUDA graph, beside the
weight-streaming floor; and the engine's GPU checks (cuda == torch tokens, memory flat).

    python benchmarks/engine_bench.py --out DIR [--presets lasad-B,lasad-XL] [--batches 1,8,64,256]

Random weights (std 0.02, bf16), fp32 state, CFG by batch doubling (cfg 4.0, top-k 2000, as the
LlamaGen numbers in shared/docs/research/measured-baselines.md), 16×16 = 256 tokens per image.
Floor per step = (bf16 bytes of the streamed weights + fp32 state read and written) ÷ the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401  (the checkout importable as installed)

from lasad_engine import LasadConfig, LasadGen  # noqa: E402
from lasad_engine.engine import LasadEngine, SamplingParams  # noqa: E402
from lasad_tools.profiling import streamed_weight_bytes, sync  # noqa: E402

TARGETS_MS_PER_IMAGE = {"lasad-B": 25.0, "lasad-XL": 120.0}
BASELINE_COMPILED_MS = {"lasad-B": 178.4, "lasad-XL": 496.2}  # LlamaGen --compile, 1 image, same H200
PARAMS = SamplingParams(cfg_scale=4.0, top_k=2000)


def random_model(name: str, device, dtype) -> LasadGen:
    torch.manual_seed(0)
    with torch.device(device):
        model = LasadGen(LasadConfig.from_preset(name, token_dropout=0, resid_dropout=0, ffn_dropout=0))
    with torch.no_grad():
        model.output.weight.normal_(std=0.02)
        model.lower_bounds.normal_()
    return model.to(dtype).eval()


def streamed_bytes(model: LasadGen, rows: int) -> int:
    """Bytes one step must move at least: the streamed weights plus the fp32 state read and written."""
    return streamed_weight_bytes(model) + 2 * model.config.state_nbytes(rows)


def time_generation(engine, labels, grid, repeats, device) -> list[float]:
    out = []
    for r in range(repeats):
        gen = torch.Generator(device).manual_seed(r)
        sync(device)
        t = time.perf_counter()
        engine.generate(labels, grid=grid, params=PARAMS, generator=gen)
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def bench(results: dict, presets, batches, device, bw_TBps: float, quick: bool) -> None:
    rows = results.setdefault("engine_bench", [])
    for name in presets:
        model = random_model(name, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        cfg = model.config
        for batch in batches:
            labels = torch.arange(batch) % cfg.num_classes
            row = {"preset": name, "images": batch, "rows": 2 * batch, "tokens": cfg.seq_len}
            nbytes = streamed_bytes(model, 2 * batch)
            floor_ms = nbytes / (bw_TBps * 1e12) * 1e3
            row.update(floor_ms_per_step=floor_ms, bytes_per_step=nbytes)
            for mode, kw in (("graph", dict(backend="cuda")), ("eager_fused", dict(backend="cuda", use_cuda_graph=False)),
                             ("eager_torch", dict(backend="torch"))):
                if device.type != "cuda" and mode != "eager_torch":
                    continue
                if mode != "graph" and (batch > 8 or (mode == "eager_torch" and name not in ("lasad-B", "lasad-tiny"))):
                    continue  # eager is launch-bound: a few sizes show it
                engine = LasadEngine(model, device=device, max_batch=batch, **kw)
                grid = None if mode == "graph" else (2, cfg.grid_width)  # eager: 2 rows, per step
                steps = cfg.seq_len if grid is None else 2 * cfg.grid_width
                engine.generate(labels, grid=grid, params=PARAMS, generator=torch.Generator(device).manual_seed(0))
                times = time_generation(engine, labels, grid, 1 if quick else 3, device)
                med = statistics.median(times)
                row[f"{mode}_ms_per_step"] = med / steps
                if grid is None:
                    row[f"{mode}_ms_per_batch"] = med
                    row[f"{mode}_ms_per_image"] = med / batch
                    row[f"{mode}_raw_ms"] = times
                engine.close()
                del engine
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if "graph_ms_per_step" in row:
                row["graph_x_floor"] = row["graph_ms_per_step"] / floor_ms
                row["graph_fraction_of_bw"] = floor_ms / row["graph_ms_per_step"]
                if batch == 1 and name in TARGETS_MS_PER_IMAGE:
                    row["target_ms_per_image"] = TARGETS_MS_PER_IMAGE[name]
                    row["llamagen_compiled_ms_per_image"] = BASELINE_COMPILED_MS[name]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def checks(results: dict, device) -> None:
    """cuda == torch (tokens for a seed, teacher-forced logits); memory flat across steps, images
    and grids."""
    out = results.setdefault("engine_checks", {})
    # bf16: 49 GEMM outputs per step rounded to bf16 after sums in another order than cuBLAS's
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        model = random_model("lasad-B", device, dtype)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.config.vocab_size, (2, 256), generator=gen).to(device)
        labels = [3, 207]
        ref = LasadEngine(model, backend="torch", max_batch=2).teacher_forced_logits(tokens, labels, cfg_rows=True)
        cuda_engine = LasadEngine(model, backend="cuda", max_batch=2)
        got = cuda_engine.teacher_forced_logits(tokens, labels, cfg_rows=True)
        rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
        tag = str(dtype).split(".")[-1]
        out[f"teacher_forced_{tag}"] = {"cuda_vs_torch": rel(got, ref), "tolerance": tol,
                                         "pass": rel(got, ref) <= tol}
        same = {}
        for label, params in (("greedy", SamplingParams(temperature=0.0)), ("sampled", PARAMS)):
            a = LasadEngine(model, backend="torch", max_batch=2).generate(
                labels, params=params, generator=torch.Generator(device).manual_seed(7))
            b = cuda_engine.generate(labels, params=params, generator=torch.Generator(device).manual_seed(7))
            same[label] = {"identical": bool(torch.equal(a, b)), "fraction_equal": (a == b).float().mean().item()}
        out[f"same_tokens_{tag}"] = same
        cuda_engine.close()
    # memory: flat across steps and images, and across grids
    model = random_model("lasad-B", device, torch.bfloat16)
    engine = LasadEngine(model, backend="cuda", max_batch=1)
    mem = {}
    for grid in ((16, 16), (32, 32), (64, 64)):
        engine.generate([1], grid=grid, params=PARAMS, generator=torch.Generator(device).manual_seed(0))  # capture
        per_step = []
        for img in range(2):
            engine.generate([1], grid=grid, params=PARAMS, generator=torch.Generator(device).manual_seed(img),
                            callback=lambda p, t: per_step.append(torch.cuda.memory_allocated()) if p % 64 == 0 else None)
        mem[f"{grid[0]}x{grid[1]}"] = {"tokens": grid[0] * grid[1], "min_allocated": min(per_step),
                                       "max_allocated": max(per_step), "flat": min(per_step) == max(per_step),
                                       "buffers_bytes": engine.buffers.nbytes,
                                       "state_bytes": engine.state_nbytes}
    out["memory"] = mem
    engine.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--presets", default="lasad-B,lasad-L,lasad-XL,lasad-XXL")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bw", type=float, default=None, help="copy bandwidth TB/s (default: measure)")
    args = ap.parse_args()
    device = torch.device(args.device)
    results = {}
    bw = args.bw or 4.3
    bench(results, args.presets.split(","), [int(b) for b in args.batches.split(",")], device, bw, args.quick)
    if device.type == "cuda":
        checks(results, device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
