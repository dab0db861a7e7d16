"""Measurement helpers of `lasad-profile` (and of the benchmarks): percentiles, environment,
copy bandwidth, per-step clocks, latency / throughput / memory runs of an engine."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

from lasad_engine import LasadGen, __version__
from lasad_engine.engine import LasadEngine


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
        kv = kv.to(model.norm.weight.dtype).eval()  # the activations' dtype (the head may be int8)
        kv_w = streamed_weight_bytes(kv)
        el = kv.output.weight.element_size()

        def make_kv(mb, grid):
            kv.config = dataclasses.replace(cfg, grid_height=grid[0], grid_width=grid[1])  # cache sized per grid
            return LasadEngine(kv, backend=backend, device=device, max_batch=mb, use_cuda_graph=use_graph)
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


PROBE_TOKENS = 8  # tokens of the short generation that times a step before a profile starts


def probe_step_seconds(subject: Subject, params, device) -> float:
    """Seconds one decode step of `subject` takes at batch 1 here: a generation of one row of
    PROBE_TOKENS tokens, timed after an untimed one (which pays for graph capture)."""
    grid = (1, PROBE_TOKENS)
    engine = subject.make(1, grid)
    engine.generate([1], grid=grid, params=params, generator=torch.Generator(device).manual_seed(0))
    sync(device)
    t = time.perf_counter()
    engine.generate([1], grid=grid, params=params, generator=torch.Generator(device).manual_seed(1))
    sync(device)
    engine.close()
    return (time.perf_counter() - t) / PROBE_TOKENS


def planned_steps(latency_grid, memory_grids, train_grid, batches, warmup: int, iters: int, device) -> int:
    """Decode steps one subject of a profile runs: the latency run (warmup + 1 generations at
    `latency_grid`), the throughput runs (iters + 1 generations per batch at the trained grid) and,
    on CUDA, the memory runs (2 generations per grid; on a CPU they only allocate)."""
    tokens = lambda g: g[0] * g[1]  # noqa: E731
    steps = (warmup + 1) * tokens(latency_grid) + len(batches) * (iters + 1) * tokens(train_grid)
    if device.type == "cuda":
        steps += 2 * sum(tokens(g) for g in memory_grids)
    return steps


def parse_list(text: str, kind=int) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list") from None


