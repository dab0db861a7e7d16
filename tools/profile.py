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
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

from lasad_engine import LasadConfig, LasadGen, __version__
from lasad_engine.cli import OneLineCommand
from lasad_engine.engine import LasadEngine, SamplingParams, parse_grid
from lasad_engine.io import atomic_write_text


def percentiles(xs: list[float]) -> dict:
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(s), "n": len(s)}


def environment(device: torch.device, command: str = "lasad-profile") -> dict:
    """Date, versions, commit, command and (on CUDA) the GPU: the block every result file carries."""
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            return f"unavailable ({type(e).__name__})"
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "lasad": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "commit": os.environ.get("LASAD_COMMIT") or run(["git", "rev-parse", "--short", "HEAD"]),
           "command": " ".join([command] + sys.argv[1:]), "device": str(device)}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda,
                   driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    return env


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy (the ceiling)."""
    n = (2 << 30) if device.type == "cuda" else (256 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    times = []
    for _ in range(8):
        clock = StepClock(device, 1, nvtx=False)  # CUDA events on a GPU, the host clock elsewhere
        clock.mark(0)
        b.copy_(a)
        clock.mark(1)
        times.append(clock.ms()[0] / 1e3)
    return 2 * n / statistics.median(times[2:])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Per-step timestamps: CUDA events recorded after each step is enqueued, or host time."""

    def __init__(self, device, steps: int, nvtx: bool):
        self.device, self.nvtx = device, nvtx
        self.cuda = device.type == "cuda"
        n = steps + 1
        self.marks = [torch.cuda.Event(enable_timing=True) for _ in range(n)] if self.cuda else [0.0] * n

    def mark(self, i: int):
        if self.cuda:
            self.marks[i].record()
        else:
            self.marks[i] = time.perf_counter()
        if self.nvtx and self.cuda:
            if i > 0:
                torch.cuda.nvtx.range_pop()
            if i < len(self.marks) - 1:
                torch.cuda.nvtx.range_push(f"step {i}")

    def ms(self) -> list[float]:
        sync(self.device)
        if self.cuda:
            return [self.marks[i].elapsed_time(self.marks[i + 1]) for i in range(len(self.marks) - 1)]
        return [(self.marks[i + 1] - self.marks[i]) * 1e3 for i in range(len(self.marks) - 1)]


def streamed_weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith(("tok_embeddings", "cls_embedding")))


@dataclasses.dataclass
class Subject:
    """One engine under test: lasad, or the KV-cache baseline."""

    name: str
    model: torch.nn.Module
    make: callable           # (max_batch, grid) -> LasadEngine
    floor_bytes: callable    # (rows, position) -> bytes a step must move


def subjects(model: LasadGen, baseline: str | None, backend: str, device, use_graph: bool) -> list[Subject]:
    cfg = model.config
    w_bytes = streamed_weight_bytes(model)
    out = [Subject("lasad", model,
                   lambda mb, grid: LasadEngine(model, backend=backend, device=device, max_batch=mb,
                                                use_cuda_graph=use_graph),
                   lambda rows, pos: w_bytes + 2 * cfg.state_nbytes(rows))]
    if baseline == "kv":
        from lasad_tools.kv_baseline import KVCacheGPT
        torch.manual_seed(0)
        with torch.device(device):
            kv = KVCacheGPT(cfg)
        kv = kv.to(model.output.weight.dtype).eval()
        kv_w = streamed_weight_bytes(kv)
        el = kv.output.weight.element_size()

        def make_kv(mb, grid):
            kv.config = dataclasses.replace(cfg, grid_height=grid[0], grid_width=grid[1])  # cache sized per grid
            return LasadEngine(kv, backend=backend, device=device, max_batch=mb, use_cuda_graph=use_graph, fused=False)
        out.append(Subject("kv", kv, make_kv,
                           lambda rows, pos: kv_w + 2 * cfg.n_layer * rows * cfg.dim * (pos + 2) * el))
    return out


def latency(subject: Subject, grid, params, device, warmup: int, nvtx: bool, bw: float) -> dict:
    engine = subject.make(1, grid)
    N = grid[0] * grid[1]
    for i in range(warmup):
        engine.generate([1], grid=grid, params=params, generator=torch.Generator(device).manual_seed(i))
    clock = StepClock(device, N, nvtx)
    sync(device)
    t0 = time.perf_counter()
    clock.mark(0)
    engine.generate([1], grid=grid, params=params, generator=torch.Generator(device).manual_seed(0),
                    callback=lambda p, _: clock.mark(p + 1))
    sync(device)
    wall = (time.perf_counter() - t0) * 1e3
    steps = clock.ms()
    engine.close()
    floors = [subject.floor_bytes(2 if params.cfg else 1, p) / bw * 1e3 for p in range(N)]
    return {"grid": list(grid), "tokens": N, "step_ms": steps, "step_ms_percentiles": percentiles(steps),
            "time_to_first_token_ms": steps[0], "ms_per_image": wall, "floor_step_ms": floors}


def throughput(subject: Subject, grid, batches, params, device, iters: int, bw: float) -> list[dict]:
    rows = []
    N = grid[0] * grid[1]
    for b in batches:
        try:
            engine = subject.make(b, grid)
            labels = torch.arange(b) % subject.model.config.num_classes
            engine.generate(labels, grid=grid, params=params, generator=torch.Generator(device).manual_seed(0))
            times = []
            for i in range(iters):
                sync(device)
                t = time.perf_counter()
                engine.generate(labels, grid=grid, params=params, generator=torch.Generator(device).manual_seed(i))
                sync(device)
                times.append((time.perf_counter() - t) * 1e3)
            engine.close()
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch": b, "error": "out of memory"})
            break
        ms = statistics.median(times)
        r = 2 * b if params.cfg else b
        floor_ms = sum(subject.floor_bytes(r, p) for p in range(N)) / bw * 1e3
        rows.append({"batch": b, "raw_ms": times, "ms_per_batch": ms, "ms_per_step": ms / N,
                     "images_per_s": b / ms * 1e3, "ceiling_images_per_s": b / floor_ms * 1e3})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def memory(subject: Subject, grids, params, device) -> list[dict]:
    rows = []
    for grid in grids:
        if device.type != "cuda":
            engine = subject.make(1, grid)
            rows.append({"grid": list(grid), "tokens": grid[0] * grid[1], "state_bytes": engine.state_nbytes,
                         "buffers_bytes": engine.buffers.nbytes})
            engine.close()
            continue
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        engine = subject.make(1, grid)
        steady = []
        engine.generate([1], grid=grid, params=params, generator=torch.Generator(device).manual_seed(0))
        engine.generate([1], grid=grid, params=params, generator=torch.Generator(device).manual_seed(1),
                        callback=lambda p, _: steady.append(torch.cuda.memory_allocated(device)))
        rows.append({"grid": list(grid), "tokens": grid[0] * grid[1],
                     "peak_bytes": torch.cuda.max_memory_allocated(device) - base,
                     "steady_bytes": max(steady) - base, "steady_flat": min(steady) == max(steady),
                     "state_bytes": engine.state_nbytes, "buffers_bytes": engine.buffers.nbytes})
        engine.close()
        del engine
    return rows


def vq_stage(device, dtype, grid, batch: int, iters: int) -> dict:
    from lasad_engine.tokenizer import VQModel
    with torch.device(device):
        vq = VQModel("vq-16").eval()
    codes = torch.randint(0, vq.config.codebook_size, (batch, *grid), device=device)
    times = []
    with torch.no_grad():
        for i in range(iters + 1):
            sync(device)
            t = time.perf_counter()
            vq.decode_code(codes)
            sync(device)
            times.append((time.perf_counter() - t) * 1e3)
    return {"tokenizer": "vq-16 (random weights, LlamaGen's shape)", "batch": batch, "grid": list(grid),
            "raw_ms": times[1:], "ms_per_batch": statistics.median(times[1:])}


def parse_list(text: str, kind=int) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list") from None


NAME = "lasad-profile"


@click.command(NAME, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="lasad-B", show_default=True,
              type=click.Choice(["lasad-B", "lasad-L", "lasad-XL", "lasad-XXL", "lasad-S", "lasad-tiny"],
                                case_sensitive=False), help="Shape to profile with random weights.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Profile this checkpoint instead of a preset.")
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
@click.option("--iters", default=3, show_default=True, type=click.IntRange(min=1), help="Timed repeats.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--cfg-scale", default=4.0, show_default=True, type=float)
@click.option("--top-k", default=2000, show_default=True, type=click.IntRange(min=0))
@click.option("--no-cuda-graph", is_flag=True, help="Launch every kernel (graph off).")
@click.option("--vq/--no-vq", default=True, show_default=True, help="Time the VQ-16 decoder stage too.")
@click.option("--trace", type=click.Path(path_type=Path), default=None, help="torch.profiler trace (Chrome JSON) of one generation.")
@click.option("--nvtx", is_flag=True, help="NVTX ranges per stage and per step (for nsys).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("profile.json"), show_default=True)
def main(preset, checkpoint, baseline, backend, device, precision, batches, grids, latency_grid, iters, warmup,
         cfg_scale, top_k, no_cuda_graph, vq, trace, nvtx, out):
    """Latency, throughput and memory of lasad's decode, beside a KV-cache baseline."""
    from lasad_engine.checkpoint import load_checkpoint
    from lasad_engine.pipeline import PRECISIONS
    from lasad_engine.params import resolve_device

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
    batch_list = parse_list(batches)
    grid_list = [parse_grid(g, (16, 16)) for g in grids.split(",")]
    lat_grid = parse_grid(latency_grid, max(grid_list, key=lambda g: g[0] * g[1]))
    params = SamplingParams(cfg_scale=cfg_scale, top_k=top_k)
    bw = copy_bandwidth(device)
    cfg = model.config
    result = {"environment": environment(device), "config": cfg.to_dict(), "precision": str(dtype).split(".")[-1],
              "backend": backend, "cuda_graph": not no_cuda_graph,
              "sampling": dataclasses.asdict(params), "copy_bandwidth_Bps": bw, "subjects": {}}
    train_grid = (cfg.grid_height, cfg.grid_width)
    rng = torch.cuda.nvtx.range if (nvtx and device.type == "cuda") else (lambda name: contextlib.nullcontext())
    for s in subjects(model, baseline, backend, device, not no_cuda_graph):
        click.echo(f"profiling {s.name} ...", err=True)
        r = {}
        with rng(f"{s.name} latency"):
            r["latency"] = latency(s, lat_grid, params, device, warmup, nvtx, bw)
        with rng(f"{s.name} throughput"):
            r["throughput"] = throughput(s, train_grid, batch_list, params, device, iters, bw)
        with rng(f"{s.name} memory"):
            r["memory"] = memory(s, grid_list, params, device)
        result["subjects"][s.name] = r
        atomic_write_text(out, json.dumps(result) + "\n")  # keep what is measured so far
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
    atomic_write_text(out, json.dumps(result) + "\n")
    for name, r in result["subjects"].items():
        lat = r["latency"]
        click.echo(f"{name}: step p50 {lat['step_ms_percentiles']['p50']:.3f} ms, p99 {lat['step_ms_percentiles']['p99']:.3f} ms "
                   f"at {lat['grid'][0]}x{lat['grid'][1]}; ttft {lat['time_to_first_token_ms']:.2f} ms; "
                   + ", ".join(f"b{t['batch']}: {t.get('images_per_s', 0):.1f} img/s" for t in r["throughput"]))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
