"""Engine benchmark (not a test): ms per image and per step, eager vs CUDA graph, beside the
weight-streaming floor; the engine's GPU checks (cuda == torch tokens, memory flat); and, with
--llamagen, LlamaGen's own generate() under torch.compile on the same GPU. This is the command
behind the README's speed table, for any CUDA machine:

    git clone https://github.com/FoundationVision/LlamaGen /path/to/LlamaGen   # only for the comparison
    python benchmarks/engine_bench.py --out DIR [--llamagen /path/to/LlamaGen]

Writes DIR/engine.json (every measurement, with the GPU, driver, versions, date and commit),
DIR/llamagen.json (with --llamagen) and DIR/summary.md, the README's table for this GPU, which it
also prints. A few minutes on an H100 / H200 (LlamaGen's torch.compile takes about a minute per
model the first time).

Random weights (std 0.02, bf16), fp32 state, CFG by batch doubling (cfg 4.0, top-k 2000, LlamaGen's
demo sampler), 16×16 = 256 tokens per image. Floor per step = (bf16 bytes of the streamed weights +
fp32 state read and written) ÷ the copy bandwidth measured in the same run (`--bw` to give one).
`--device cpu --presets lasad-tiny` runs the torch backend on a CPU (no table: a smoke run).
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

from lasad_engine import LASAD_PRESET_NAMES, LasadConfig, LasadGen  # noqa: E402
from lasad_engine.engine import LasadEngine, SamplingParams  # noqa: E402
from lasad_tools.profiling import copy_bandwidth, environment, streamed_weight_bytes, sync  # noqa: E402

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


LLAMAGEN_MODELS = {"lasad-B": "GPT-B", "lasad-L": "GPT-L", "lasad-XL": "GPT-XL", "lasad-XXL": "GPT-XXL"}


def run_llamagen(llamagen: Path, out: Path, presets, quick: bool) -> dict | None:
    """LlamaGen's benchmark (benchmarks/llamagen_bench.py) in a process of its own (its
    torch.compile state stays out of this one), for the presets' LlamaGen twins; its JSON."""
    import subprocess
    models = [LLAMAGEN_MODELS[p] for p in presets if p in LLAMAGEN_MODELS]
    if not models:
        return None
    cmd = [sys.executable, str(Path(__file__).with_name("llamagen_bench.py")), "--llamagen", str(llamagen),
           "--out", str(out), "--models", ",".join(models), "--repeats", "1" if quick else "3"]
    print("running", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("engine_bench.py: LlamaGen's benchmark failed (its error is above); "
                         "the lasad numbers are in " + str(out / "engine.json"))
    return json.loads((out / "llamagen.json").read_text())


def summary(results: dict, llamagen: dict | None) -> str:
    """The README's speed table for this run: one image per preset (ms, ms/token, LlamaGen, floor)
    and the largest batch's images/s, naming the GPU."""
    env = results["environment"]
    gpu = env.get("gpu") or env["device"]
    lg = {(r["model"], r["images"]): r for r in (llamagen or {}).get("rows", [])}
    lines = [f"Measured {env['date']} on {gpu} (driver {env.get('driver', '?')}, torch {env['torch']}, "
             f"commit {env['commit']}); copy bandwidth {results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s.", "",
             "| | lasad `cuda` | LlamaGen under `torch.compile` | floor | GPU |", "|---|---|---|---|---|"]
    rows = results["engine_bench"]
    for r in rows:
        if r["images"] != 1 or "graph_ms_per_image" not in r:
            continue
        twin = lg.get((LLAMAGEN_MODELS.get(r["preset"]), 1))
        theirs = f"{twin['ms_median']:.1f} ms (first call {twin['first_call_s']:.0f} s)" if twin else "(not run: --llamagen)"
        lines.append(f"| {r['preset']}, 1 image | **{r['graph_ms_per_image']:.1f} ms** "
                     f"({r['graph_ms_per_step']:.3f} ms/token) | {theirs} | "
                     f"{r['floor_ms_per_step'] * r['tokens']:.1f} ms | {gpu} |")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        big = max((r for r in rows if r["preset"] == preset and "graph_ms_per_batch" in r and r["images"] > 1),
                  key=lambda r: r["images"], default=None)
        if big is not None:
            lines.append(f"| {preset}, {big['images']} images | **{big['images'] / big['graph_ms_per_batch'] * 1e3:.0f} "
                         f"images/s** | | {big['graph_fraction_of_bw'] * 100:.0f} % of the bandwidth ceiling | {gpu} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                 epilog="The README's speed table: python benchmarks/engine_bench.py --out DIR "
                                        "--llamagen PATH_TO_LLAMAGEN_CHECKOUT")
    ap.add_argument("--out", type=Path, required=True, help="folder for engine.json, llamagen.json, summary.md")
    ap.add_argument("--presets", default="lasad-B,lasad-XL", help="comma-separated (lasad-B, lasad-L, lasad-XL, "
                                                                 "lasad-XXL; lasad-tiny for a smoke run)")
    ap.add_argument("--batches", default="1,8,64,256", help="images per batch, comma-separated")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    ap.add_argument("--bw", type=float, default=None, help="copy bandwidth in TB/s for the floor (default: measure)")
    ap.add_argument("--llamagen", type=Path, default=None,
                    help="a checkout of LlamaGen (git clone https://github.com/FoundationVision/LlamaGen): also time "
                         "its generate() under torch.compile for the presets' GPT twins")
    ap.add_argument("--no-checks", action="store_true", help="skip the cuda == torch and flat-memory checks")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("engine_bench.py: no CUDA GPU is visible to torch; the README's numbers are GPU numbers "
                         "(--device cpu --presets lasad-tiny runs the torch backend on a CPU)")
    presets = args.presets.split(",")
    unknown = [p for p in presets if p.lower() not in {n.lower() for n in LASAD_PRESET_NAMES}]
    if unknown:
        raise SystemExit(f"engine_bench.py: unknown preset {unknown[0]!r}; choose from {', '.join(LASAD_PRESET_NAMES)}")
    if args.llamagen is not None:
        if device.type != "cuda":
            raise SystemExit("engine_bench.py: --llamagen times LlamaGen on a CUDA GPU; drop it with --device cpu")
        from llamagen_bench import check_checkout
        check_checkout(args.llamagen)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(device, "python benchmarks/engine_bench.py")}
    results["copy_bandwidth_Bps"] = args.bw * 1e12 if args.bw else copy_bandwidth(device)
    bench(results, presets, [int(b) for b in args.batches.split(",")], device, results["copy_bandwidth_Bps"] / 1e12,
          args.quick)
    if device.type == "cuda" and not args.no_checks:
        checks(results, device)
    (args.out / "engine.json").write_text(json.dumps(results, indent=1))
    llamagen = run_llamagen(args.llamagen, args.out, presets, args.quick) if args.llamagen else None
    if device.type == "cuda":
        table = summary(results, llamagen)
        (args.out / "summary.md").write_text(table)
        print(table)
    print(f"wrote {args.out / 'engine.json'}" + (" and summary.md" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
