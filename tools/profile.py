"""`lasad-profile`: latency percentiles, throughput and memory of the decode engine, side by side
with a KV-cache transformer of the same shape (`--baseline kv`), as one JSON with raw samples.

    lasad-profile --preset lasad-B --baseline kv --out profile.json
    lasad-profile --checkpoint ckpt.pt --backend torch --device cpu --batches 1 --grids 16x16

Measured per engine (lasad, and the baseline when asked), all in one process on one device:
- per-step latency over one generation at batch 1 (CUDA events between steps; host clock on a
  CPU): raw samples, p50 / p90 / p99, time to first token, ms per image;
- images/s and ms per step against batch (`--batches`), at the trained grid;
- peak and steady memory against grid (`--grids`), at batch 1;
- the VQ decoder's time per batch (`--vq`), the second stage of a picture;
and, for each, the floor: bytes a step must move (weights + state, or weights + the KV cache read
so far) over the copy bandwidth measured here. `--trace` writes a torch.profiler trace of one
generation; `--nvtx` puts NVTX ranges around stages and steps (for nsys).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import click

from lasad_engine.cli import FiniteFloat, OneLineCommand
from lasad_engine.params import MAX_CFG_SCALE, MAX_TOP_K

NAME = "lasad-profile"


@click.command(NAME, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="lasad-B", show_default=True,
              type=click.Choice(["lasad-B", "lasad-L", "lasad-XL", "lasad-XXL", "lasad-S", "lasad-tiny"],
                                case_sensitive=False), help="Shape to profile with random weights.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Profile this checkpoint instead of a preset: 'default' (the bundled model), a model folder or a file.")
@click.option("--baseline", type=click.Choice(["kv"]), default=None,
              help="Also run LlamaGen's KV-cache transformer of the same shape, same batches and grids.")
@click.option("--backend", type=click.Choice(["torch", "cuda"]), default=None,
              help="Decode backend (default: cuda on a GPU, else torch).")
@click.option("--device", default=None, help="Default: cuda if available, else cpu.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Weights (default bf16 on CUDA, fp32 on CPU); the LASAD state is always fp32.")
@click.option("--batches", default="1,8,64,256,512", show_default=True, help="Images per batch, for throughput.")
@click.option("--grids", default="16x16,32x32,64x64", show_default=True, help="Grids for memory vs resolution.")
@click.option("--latency-grid", default=None, help="Grid of the per-step latency run (default: the largest of --grids).")
@click.option("--iters", default=3, show_default=True, type=click.IntRange(1, 10000), help="Timed repeats.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0, 10000), help="Untimed runs first.")
@click.option("--cfg-scale", default=4.0, show_default=True, type=FiniteFloat(-MAX_CFG_SCALE, MAX_CFG_SCALE))
@click.option("--top-k", default=2000, show_default=True, type=click.IntRange(0, MAX_TOP_K))
@click.option("--no-cuda-graph", is_flag=True, help="Launch every kernel (graph off).")
@click.option("--vq/--no-vq", default=True, show_default=True, help="Time the VQ-16 decoder stage too.")
@click.option("--trace", type=click.Path(path_type=Path), default=None, help="torch.profiler trace (Chrome JSON) of one generation.")
@click.option("--nvtx", is_flag=True, help="NVTX ranges per stage and per step (for nsys).")
@click.option("--max-minutes", default=60, show_default=True, type=click.IntRange(0, 10**6),
              help="Refuse, before it starts, a profile estimated to run longer (timed steps here x the steps it "
                   "runs, a lower bound); 0 = no limit.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("profile.json"), show_default=True)
def main(preset, checkpoint, baseline, backend, device, precision, batches, grids, latency_grid, iters, warmup,
         cfg_scale, top_k, no_cuda_graph, vq, trace, nvtx, max_minutes, out):
    """Latency, throughput and memory of lasad's decode, beside a KV-cache baseline."""
    import torch

    from lasad_engine import LasadConfig, LasadGen
    from lasad_engine.engine import LasadEngine
    from lasad_engine.io import atomic_write_text
    from lasad_engine.params import SamplingParams, parse_grid

    from .profiling import (copy_bandwidth, environment, latency, memory, parse_list, planned_steps, probe_step_seconds,
                            subjects, throughput, vq_stage)
    from lasad_engine.checkpoint import load_checkpoint
    from lasad_engine.pipeline import PRECISIONS
    from lasad_engine.params import resolve_device

    from lasad_engine.io import check_writable, remove_stale_temps
    from lasad_engine.params import MAX_BATCH
    batch_list = parse_list(batches)
    if not batch_list or not all(1 <= b <= MAX_BATCH for b in batch_list):
        raise click.BadParameter(f"{batches!r}: give batches in 1..{MAX_BATCH}, comma-separated", param_hint="--batches")
    grid_list = [parse_grid(g, (16, 16)) for g in grids.split(",")]
    for path, what in ((out, "--out"), (trace, "--trace")):
        if path is not None:
            check_writable(path, what)
            remove_stale_temps(path.parent)
    device = resolve_device(device)
    backend = backend or ("cuda" if device.type == "cuda" else "torch")
    dtype = PRECISIONS[precision or ("bf16" if device.type == "cuda" else "fp32")]
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, device=device, dtype=dtype)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = LasadGen(LasadConfig.from_preset(preset))
        with torch.no_grad():
            model.output.weight.normal_(std=0.02)
        model = model.to(dtype).eval()
    lat_grid = parse_grid(latency_grid, max(grid_list, key=lambda g: g[0] * g[1]))
    params = SamplingParams(cfg_scale=cfg_scale, top_k=top_k)
    bw = copy_bandwidth(device)
    cfg = model.config
    result = {"environment": environment(device), "config": cfg.to_dict(), "precision": str(dtype).split(".")[-1],
              "backend": backend, "cuda_graph": not no_cuda_graph,
              "sampling": dataclasses.asdict(params), "copy_bandwidth_Bps": bw, "subjects": {}}
    train_grid = (cfg.grid_height, cfg.grid_width)
    rng = torch.cuda.nvtx.range if (nvtx and device.type == "cuda") else (lambda name: contextlib.nullcontext())
    under_test = subjects(model, baseline, backend, device, not no_cuda_graph)
    _check_feasible(under_test, cfg, params, device, lat_grid, grid_list, train_grid, batch_list, warmup, iters,
                    max_minutes, planned_steps, probe_step_seconds)
    for s in under_test:
        click.echo(f"profiling {s.name} ...", err=True)
        r = {}
        with rng(f"{s.name} latency"):
            r["latency"] = latency(s, lat_grid, params, device, warmup, nvtx, bw)
        with rng(f"{s.name} throughput"):
            r["throughput"] = throughput(s, train_grid, batch_list, params, device, iters, bw)
        with rng(f"{s.name} memory"):
            r["memory"] = memory(s, grid_list, params, device)
        result["subjects"][s.name] = r
        atomic_write_text(out, json.dumps(result, allow_nan=False) + "\n")  # keep what is measured so far
    if vq:
        with rng("vq decode"):
            result["vq_decode"] = vq_stage(device, dtype, train_grid, 1, iters)
    if trace is not None:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        engine = LasadEngine(model, backend=backend, device=device, max_batch=1, use_cuda_graph=not no_cuda_graph)
        engine.generate([1], params=params, generator=torch.Generator(device).manual_seed(0))
        with profile(activities=acts) as prof:
            engine.generate([1], params=params, generator=torch.Generator(device).manual_seed(1))
        prof.export_chrome_trace(str(trace))
        result["trace"] = str(trace)
    atomic_write_text(out, json.dumps(result, allow_nan=False) + "\n")
    for name, r in result["subjects"].items():
        lat = r["latency"]
        click.echo(f"{name}: step p50 {lat['step_ms_percentiles']['p50']:.3f} ms, p99 {lat['step_ms_percentiles']['p99']:.3f} ms "
                   f"at {lat['grid'][0]}x{lat['grid'][1]}; ttft {lat['time_to_first_token_ms']:.2f} ms; "
                   + ", ".join(f"b{t['batch']}: {t.get('images_per_s', 0):.1f} img/s" for t in r["throughput"]))
    click.echo(f"wrote {out}")


def _check_feasible(under_test, cfg, params, device, lat_grid, grid_list, train_grid, batch_list, warmup, iters,
                    max_minutes, planned_steps, probe_step_seconds) -> None:
    """Refuse, in one line and before any measurement, a profile that cannot fit in memory (the
    KV baseline's cache at the largest grid and batch) or that would run longer than
    `max_minutes`: a step timed here at batch 1 times the steps the profile runs (a lower bound:
    larger batches and a KV cache that grows only take longer)."""
    from lasad_engine.params import EngineError, check_memory
    rows = 2 if params.cfg else 1
    if any(s.name == "kv" for s in under_test):
        el = 2 if device.type == "cuda" else 4
        tokens = max(max(g[0] * g[1] for g in [lat_grid, *grid_list]) * rows,
                     train_grid[0] * train_grid[1] * rows * max(batch_list))
        check_memory(2 * cfg.n_layer * cfg.dim * tokens * el, device, "the KV baseline's cache",
                     "use smaller --grids / --latency-grid / --batches")
    if not max_minutes:
        return
    steps = planned_steps(lat_grid, grid_list, train_grid, batch_list, warmup, iters, device)
    seconds = sum(probe_step_seconds(s, params, device) * steps for s in under_test)
    if seconds > 60 * max_minutes:
        raise EngineError(f"this profile would run for at least {seconds / 3600:.1f} hours here ({steps} decode "
                          f"steps per engine, timed at batch 1 on {device}); use smaller --grids / --latency-grid / "
                          f"--batches / --iters, or raise --max-minutes ({max_minutes})")


if __name__ == "__main__":
    main()
