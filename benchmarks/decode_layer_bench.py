"""Decode-layer benchmark (not a test): one decode step's chain of layers, replayed from a CUDA
graph, with today's kernels and with the fused decode-sized GEMMs of ops/linear.py (without and
with programmatic dependent launch, and tile variants), against the weight-streaming floor.

    python benchmarks/decode_layer_bench.py --out DIR [--presets lasad-B,lasad-XL] [--rows 2,16]

The chain is a real layer: add+RMSNorm, W_q|W_f|W_i, gates + LASAD step (fp32 state, in place),
output norm, W_o + residual, RMSNorm, W_1|W_3 + SwiGLU, W_2 + residual; then the final norm and
the 16,384-way head. Every layer has its own random bf16 weights (std 0.02), so nothing is
served from L2 across layers. Variants:
- `cublas`: today's `cuda` backend (lasad_engine/fused.py): cuBLAS GEMMs, Triton norm / SwiGLU /
  step kernels;
- `fused`: fused_linear (norm prologue, SwiGLU / residual epilogues) + the step kernel;
- `fused+pdl`: the same kernels launched with programmatic dependent launch;
- `pdl:...`: tile variants of fused+pdl (block_n halved / doubled, split K, tl.dot at few rows);
- a persistent-kernel skeleton (`--no-skeleton` skips it): one program per SM streams the same
  bytes through the same dependent phases with a grid barrier between them instead of a kernel
  boundary: the cost of the next design step, measured before it is built.
Reported per (preset, rows, variant): µs per step and per layer (the layers-only graph over
n_layer), the head's share, weight bytes / time against the copy bandwidth measured in this run
(bytes read + written by a large device-to-device copy), and the floor (bytes / copy bandwidth);
per-kernel µs and bandwidth of each op in a chain of n_layer launches of that op alone (`--ops`).
Every variant's logits and state are checked against the torch definition (fused_linear and the
step op with backend="torch") on the GPU; fused and fused+pdl must agree bit for bit. Exits
non-zero when a check fails. JSON: DIR/decode_layer_bench.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401  (the checkout importable as installed)

from lasad_engine import LasadConfig  # noqa: E402
from lasad_engine.io import atomic_write_text  # noqa: E402
from lasad_engine.ops import linear as L  # noqa: E402
from lasad_engine.ops.lasad import lasad_fused_step_, layer_lower_bounds  # noqa: E402
from lasad_engine.ops.linear import fused_linear  # noqa: E402
from lasad_engine.ops.norms import rms_norm, swiglu  # noqa: E402
from lasad_tools.profiling import copy_bandwidth, environment  # noqa: E402

OPS = ("qfv", "o", "w13", "w2", "head")
REL_TOL = 5e-2   # bf16 logits after 12-36 layers, any GEMM order vs cuBLAS's


def make_weights(cfg: LasadConfig, device, seed: int = 0) -> dict:
    """Distinct random bf16 weights per layer; fp32 lower bounds as the model derives them."""
    gen = torch.Generator(device).manual_seed(seed)
    d, H, K, V, F_ = cfg.dim, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.ffn_dim
    mat = lambda n, k: (0.02 * torch.randn(n, k, device=device, generator=gen)).bfloat16()
    norm = lambda n: (1 + 0.1 * torch.randn(n, device=device, generator=gen)).bfloat16()
    lbs = layer_lower_bounds(torch.randn(cfg.n_layer, H * K, device=device, generator=gen))
    layers = [dict(attn_norm=norm(d), qfv=mat(2 * H * K + H * V, d), g_norm=norm(H * V), o=mat(d, H * V),
                   ffn_norm=norm(d), w13=mat(2 * F_, d), w2=mat(d, F_),
                   lb=None if i == 0 else lbs[i].contiguous())
              for i in range(cfg.n_layer)]
    return dict(layers=layers, final_norm=norm(d), head=mat(cfg.vocab_size, d),
                groups=H if cfg.output_norm == "group" else 1, eps=cfg.norm_eps, mode=cfg.row_rule(cfg.grid_width)[0])


def layer_bytes(W: dict) -> int:
    p = W["layers"][0]
    return sum(t.numel() * t.element_size() for k, t in p.items() if k != "lb" and t is not None)


def step_torch(W, x, state, start, layers_only=False):
    """The definition: fused_linear and the step op with backend="torch"."""
    eps, kw = W["eps"], dict(backend="torch")
    for i, p in enumerate(W["layers"]):
        qfv = fused_linear(x, p["qfv"], norm_weight=p["attn_norm"], eps=eps, **kw)
        o = lasad_fused_step_(qfv, p["lb"], state[i], start, W["mode"], backend="torch")
        h = fused_linear(o.flatten(-2), p["o"], norm_weight=p["g_norm"], eps=eps, norm_groups=W["groups"],
                         residual=x, **kw)
        u = fused_linear(h, p["w13"], norm_weight=p["ffn_norm"], eps=eps, swiglu=True, **kw)
        x = fused_linear(u, p["w2"], residual=h, **kw)
    return x if layers_only else fused_linear(x, W["head"], norm_weight=W["final_norm"], eps=eps, **kw)


def step_cublas(W, x, state, start, layers_only=False):
    """Today's cuda backend (lasad_engine/fused.py FusedDecoder.run), kernel for kernel."""
    eps, k, layers = W["eps"], "triton", W["layers"]
    n = rms_norm(x, layers[0]["attn_norm"], eps, backend=k)
    for i, p in enumerate(layers):
        o = lasad_fused_step_(F.linear(n, p["qfv"]), p["lb"], state[i], start, W["mode"])
        o = rms_norm(o.flatten(-2), p["g_norm"], eps, W["groups"], backend=k)
        n, h = rms_norm(F.linear(o, p["o"]), p["ffn_norm"], eps, residual=x, backend=k)
        f = F.linear(swiglu(F.linear(n, p["w13"]), backend=k), p["w2"])
        nxt = layers[i + 1]["attn_norm"] if i + 1 < len(layers) else W["final_norm"]
        n, x = rms_norm(f, nxt, eps, residual=h, backend=k)
    return x if layers_only else F.linear(n, W["head"])


def step_fused(pdl: bool, tiles: dict | None = None):
    """fused_linear chain; `tiles`: op -> LinearTiles (None: the default choice)."""
    tiles = tiles or {}

    def step(W, x, state, start, layers_only=False):
        eps, kw = W["eps"], dict(backend="triton", pdl=pdl)
        for i, p in enumerate(W["layers"]):
            qfv = fused_linear(x, p["qfv"], norm_weight=p["attn_norm"], eps=eps, tiles=tiles.get("qfv"), **kw)
            o = lasad_fused_step_(qfv, p["lb"], state[i], start, W["mode"], pdl=pdl)
            h = fused_linear(o.flatten(-2), p["o"], norm_weight=p["g_norm"], eps=eps, norm_groups=W["groups"],
                             residual=x, tiles=tiles.get("o"), **kw)
            u = fused_linear(h, p["w13"], norm_weight=p["ffn_norm"], eps=eps, swiglu=True, tiles=tiles.get("w13"),
                             **kw)
            x = fused_linear(u, p["w2"], residual=h, tiles=tiles.get("w2"), **kw)
        if layers_only:
            return x
        return fused_linear(x, W["head"], norm_weight=W["final_norm"], eps=eps, tiles=tiles.get("head"), **kw)
    return step


def op_shapes(cfg: LasadConfig, groups: int) -> dict:
    """op -> (n_out, K, norm groups, has_norm, swiglu), as the chain calls fused_linear."""
    d, H, K, V, F_ = cfg.dim, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.ffn_dim
    return {"qfv": (2 * H * K + H * V, d, 1, True, False), "o": (d, H * V, groups, True, False),
            "w13": (F_, d, 1, True, True), "w2": (d, F_, 1, False, False), "head": (cfg.vocab_size, d, 1, True, False)}


def default_tiles(cfg, groups, rows, sms) -> dict:
    return {op: L.linear_tiles(rows, n, k, groups=g, has_norm=nrm, swiglu=sw, sms=sms)
            for op, (n, k, g, nrm, sw) in op_shapes(cfg, groups).items()}


def tile_variants(cfg, groups, rows, sms) -> dict:
    """A few hand-made alternatives to the default tiles (each valid for its op)."""
    base = default_tiles(cfg, groups, rows, sms)
    shapes = op_shapes(cfg, groups)

    def split(op, t, s):
        n, k, g, nrm, sw = shapes[op]
        if nrm and g > 1 and g % s:
            return t
        return replace(t, split_k=s)

    out = {
        "pdl:bn/2": {op: replace(t, block_n=max(16 if t.mma else 1, t.block_n // 2)) for op, t in base.items()},
        "pdl:bn*2": {op: replace(t, block_n=t.block_n * 2, num_warps=min(8, 2 * t.num_warps))
                     for op, t in base.items()},
        "pdl:split2": {op: split(op, t, 2 * t.split_k) if op != "head" else t for op, t in base.items()},
        "pdl:warps4": {op: replace(t, num_warps=4) for op, t in base.items()},
    }
    if rows <= L.FMA_ROWS_MAX:  # the tensor-core tiles of 16 rows, used at few rows
        out["pdl:mma"] = {op: L.linear_tiles(16, n, k, groups=g, has_norm=nrm, swiglu=sw, sms=sms)
                          for op, (n, k, g, nrm, sw) in shapes.items()}
    return out


@triton.jit
def persistent_skeleton_kernel(w, offs, lens, sync, act, bar, err, n_phases, NP, max_spin,
                               TILE: tl.constexpr, ACT: tl.constexpr, R: tl.constexpr, BARRIER: tl.constexpr):
    # Phase p: every program streams its `lens[p]` elements of the weights at offs[p], reduces them
    # against the activations the previous phase wrote (ping-pong buffers, R rows) and writes its
    # outputs. A phase with sync[p] != 0 first waits until every program has arrived after the
    # previous synced phase (an int32 counter, spin bounded by max_spin: a timeout sets `err`
    # rather than hanging); its weight loads are issued before the wait.
    pid = tl.program_id(0)
    j = tl.arange(0, TILE)
    a = tl.arange(0, ACT)
    arrived = 0
    for p in range(n_phases):
        ln = tl.load(lens + p)
        start = tl.load(offs + p) + pid * ln
        wt = tl.load(w + start + j, mask=j < ln, other=0.0)
        if BARRIER:
            if tl.load(sync + p) != 0:
                target = arrived * NP
                cnt = tl.atomic_add(bar, 0, sem="acquire", scope="gpu")
                spins = 0
                while (cnt < target) & (spins < max_spin):
                    cnt = tl.atomic_add(bar, 0, sem="acquire", scope="gpu")
                    spins += 1
                if cnt < target:
                    tl.atomic_xchg(err, 1)
                tl.debug_barrier()
        src = act + (p % 2) * R * ACT
        dst = act + ((p + 1) % 2) * R * ACT
        w2 = tl.reshape(wt, [TILE // ACT, ACT]).to(tl.float32)
        o = (pid * (TILE // ACT) + tl.arange(0, TILE // ACT)) % ACT
        for r in tl.static_range(R):
            x = tl.load(src + r * ACT + a, cache_modifier=".cg").to(tl.float32)
            tl.store(dst + r * ACT + o, tl.sum(w2 * x[None, :], axis=1).to(dst.dtype.element_ty))
        if BARRIER:
            if tl.load(sync + p + 1, mask=p + 1 < n_phases, other=1) != 0:
                tl.debug_barrier()
                old = tl.atomic_add(bar, 1, sem="acq_rel", scope="gpu")
                arrived += 1
                if old == tl.load(sync + n_phases) * NP - 1:  # the launch's last arrival: reset
                    tl.atomic_xchg(bar, 0, sem="relaxed", scope="gpu")


SKELETON_TILE, SKELETON_WARPS = 32768, 16   # 64 KB of bf16 per program: the whole register file


def skeleton_phases(cfg: LasadConfig, rows: int, np_: int) -> list[tuple[int, bool]]:
    """(bf16 elements per program, barrier before) for one decode step of the persistent design:
    per layer W_q|W_f|W_i, the LASAD step (its fp32 state, read and written, as bytes), W_o,
    W_1|W_3, W_2, then the head; a matrix larger than a tile runs as several phases, one barrier."""
    d, H, K, V, F_ = cfg.dim, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.ffn_dim
    state_elems = 2 * cfg.state_nbytes(rows) // cfg.n_layer // 2
    mats = [(2 * H * K + H * V) * d, state_elems, d * H * V, 2 * F_ * d, d * F_] * cfg.n_layer + [cfg.vocab_size * d]
    out = []
    for n in mats:
        per = -(-n // np_)
        for i in range(0, per, SKELETON_TILE):
            out.append((min(SKELETON_TILE, per - i), i == 0))
    return out


def bench_skeleton(name: str, cfg: LasadConfig, rows: int, bw: float, sms: int, results: dict,
                   failures: list) -> None:
    """Item-5 probe: what a persistent kernel (one program per SM, a grid barrier between
    dependent GEMMs, the next weights in flight across the barrier) would cost per step, measured
    on a skeleton that moves the same bytes with the same number of barriers and a GEMV's work."""
    dev = torch.device("cuda")
    phases = skeleton_phases(cfg, rows, sms)
    lens = torch.tensor([n for n, _ in phases], dtype=torch.int64)
    offs = torch.zeros_like(lens)
    offs[1:] = torch.cumsum(lens * sms, 0)[:-1]
    total = int((lens * sms).sum())
    n_sync = sum(1 for _, b in phases[1:] if b) + 1
    sync = torch.tensor([int(b) for _, b in phases] + [n_sync], dtype=torch.int32)
    w = torch.empty(total + SKELETON_TILE, dtype=torch.bfloat16, device=dev).normal_(std=0.02)
    act = torch.randn(2 * rows * 1024, device=dev).bfloat16()
    bar, err = torch.zeros(1, dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)
    lens, offs, sync = lens.to(dev), offs.to(dev), sync.to(dev)
    row = {"preset": name, "rows": rows, "programs": sms, "phases": len(phases), "barriers": n_sync - 1,
           "bytes": 2 * total}
    for barrier in (True, False):
        launch = lambda: persistent_skeleton_kernel[(sms,)](
            w, offs, lens, sync, act, bar, err, len(phases), sms, 200000, TILE=SKELETON_TILE, ACT=1024, R=rows,
            BARRIER=barrier, num_warps=SKELETON_WARPS)
        launch()
        torch.cuda.synchronize()
        if barrier and (int(err.item()) or int(bar.item())):
            failures.append(f"{name} rows={rows} skeleton: a barrier timed out (programs not co-resident?)")
            row["barrier_timeout"] = True
            break
        g = capture(launch)
        t = time_graph(g, 10, 5)
        row["us_per_step_barrier" if barrier else "us_per_step_no_barrier"] = t
    if "us_per_step_no_barrier" in row:
        row["TBps_barrier"] = row["bytes"] / row["us_per_step_barrier"] / 1e6
        row["fraction_of_copy_bw_barrier"] = row["TBps_barrier"] / (bw / 1e12)
        row["us_per_barrier"] = (row["us_per_step_barrier"] - row["us_per_step_no_barrier"]) / max(1, n_sync - 1)
        row["floor_us"] = row["bytes"] / bw * 1e6
    results["skeleton"].append(row)
    print(json.dumps(row), flush=True)


def capture(fn, *args) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(*args)  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph


def time_graph(graph: torch.cuda.CUDAGraph, reps: int = 50, trials: int = 7) -> float:
    """Median over trials of the mean µs per replay (replays back to back, as a decode loop)."""
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def op_chain(op: str, W: dict, bufs: dict, state, start, variant: str):
    """n_layer launches of one op alone (each on its own layer's weights): µs per kernel."""
    pdl = variant == "fused+pdl"
    eps, layers = W["eps"], W["layers"]

    def run():
        for i, p in enumerate(layers):
            if variant == "cublas":
                if op == "step":
                    lasad_fused_step_(bufs["qfv"], p["lb"], state[i], start, W["mode"])
                elif op == "head":
                    F.linear(bufs["x"], W["heads"][i % len(W["heads"])])
                else:
                    F.linear(bufs[{"qfv": "x", "o": "o", "w13": "x", "w2": "u"}[op]], p[op])
                continue
            kw = dict(backend="triton", pdl=pdl, eps=eps)
            if op == "qfv":
                fused_linear(bufs["x"], p["qfv"], norm_weight=p["attn_norm"], **kw)
            elif op == "step":
                lasad_fused_step_(bufs["qfv"], p["lb"], state[i], start, W["mode"], pdl=pdl)
            elif op == "o":
                fused_linear(bufs["o"], p["o"], norm_weight=p["g_norm"], norm_groups=W["groups"],
                             residual=bufs["x"], **kw)
            elif op == "w13":
                fused_linear(bufs["x"], p["w13"], norm_weight=p["ffn_norm"], swiglu=True, **kw)
            elif op == "w2":
                fused_linear(bufs["u"], p["w2"], residual=bufs["x"], **kw)
            else:
                fused_linear(bufs["x"], W["heads"][i % len(W["heads"])], norm_weight=W["final_norm"], **kw)
    return run


def bench_preset(name: str, rows_list, args, bw: float, sms: int, results: dict, failures: list) -> None:
    cfg = LasadConfig.from_preset(name)
    dev = torch.device("cuda")
    W = make_weights(cfg, dev)
    groups = W["groups"]
    lbytes, hbytes = layer_bytes(W), W["head"].numel() * 2 + W["final_norm"].numel() * 2
    H, K, V = cfg.n_head, cfg.head_k_dim, cfg.head_v_dim
    for rows in rows_list:
        gen = torch.Generator(dev).manual_seed(rows)
        x0 = torch.randn(rows, cfg.dim, device=dev, generator=gen).bfloat16()
        state0 = 0.1 * torch.randn(cfg.n_layer, rows, H, K, V, device=dev, generator=gen)
        start = torch.zeros(1, dtype=torch.bool, device=dev)
        s_ref = state0.clone()
        ref = step_torch(W, x0, s_ref, start).float()
        variants = {"cublas": step_cublas, "fused": step_fused(False), "fused+pdl": step_fused(True)}
        chosen = default_tiles(cfg, groups, rows, sms)
        tiles_of = {"fused": chosen, "fused+pdl": chosen}
        if args.tile_variants and (name, rows) in {(p, r) for p in args.tile_presets for r in args.tile_rows}:
            for vname, t in tile_variants(cfg, groups, rows, sms).items():
                variants[vname] = step_fused(True, t)
                tiles_of[vname] = t
        state_bytes = 2 * cfg.state_nbytes(rows) // cfg.n_layer   # one layer's state read + written
        outs = {}
        for vname, fn in variants.items():
            t0 = time.perf_counter()
            s = state0.clone()
            logits = fn(W, x0, s, start).float()     # eager: compiles, and the check below
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            outs[vname] = (logits, s)
            row = {"preset": name, "rows": rows, "variant": vname, "output_norm": cfg.output_norm,
                   "compile_and_first_run_s": compile_s,
                   "rel_err_logits": rel(logits, ref), "rel_err_state": rel(s, s_ref),
                   "tiles": {op: asdict(t) for op, t in tiles_of[vname].items()} if vname in tiles_of else None}
            x_buf, s_buf = x0.clone(), state0.clone()
            g_layers = capture(fn, W, x_buf, s_buf, start, True)
            g_step = capture(fn, W, x_buf, s_buf, start, False)
            t_layers = time_graph(g_layers, args.reps, args.trials)
            t_step = time_graph(g_step, args.reps, args.trials)
            del g_layers, g_step
            L_ = cfg.n_layer
            row.update(
                us_per_step=t_step, us_layers=t_layers, us_per_layer=t_layers / L_, us_head=t_step - t_layers,
                layer_weight_bytes=lbytes, head_weight_bytes=hbytes, state_bytes_per_layer=state_bytes,
                layer_TBps=lbytes / (t_layers / L_) / 1e6, step_TBps=(L_ * lbytes + hbytes) / t_step / 1e6,
                layer_fraction_of_copy_bw=lbytes / (t_layers / L_) / 1e6 / (bw / 1e12),
                floor_us_per_layer=(lbytes + state_bytes) / bw * 1e6,
                floor_us_per_step=(L_ * (lbytes + state_bytes) + hbytes) / bw * 1e6)
            row["x_floor_step"] = row["us_per_step"] / row["floor_us_per_step"]
            ok = row["rel_err_logits"] <= REL_TOL and row["rel_err_state"] <= REL_TOL
            row["check"] = "ok" if ok else "FAIL"
            if not ok:
                failures.append(f"{name} rows={rows} {vname}: logits {row['rel_err_logits']:.2e}, "
                                f"state {row['rel_err_state']:.2e} > {REL_TOL}")
            results["chain"].append(row)
            print(json.dumps(row), flush=True)
        if "fused" in outs and "fused+pdl" in outs:
            same = torch.equal(outs["fused"][0], outs["fused+pdl"][0]) and torch.equal(outs["fused"][1],
                                                                                     outs["fused+pdl"][1])
            results["pdl_bitwise_equal"].append({"preset": name, "rows": rows, "equal": same})
            if not same:
                failures.append(f"{name} rows={rows}: fused and fused+pdl differ")
        if args.ops:
            bench_ops(name, cfg, W, rows, x0, state0, start, bw, results)
        if args.skeleton:
            bench_skeleton(name, cfg, rows, bw, sms, results, failures)
        del outs
        torch.cuda.empty_cache()


def bench_ops(name, cfg, W, rows, x0, state0, start, bw, results) -> None:
    dev = x0.device
    p = W["layers"][0]
    W = dict(W, heads=[W["head"]] + [W["head"].clone() for _ in range(3)])   # 4 heads: not from L2
    bufs = {"x": x0, "qfv": F.linear(x0, p["qfv"]), "o": torch.randn(rows, cfg.n_head * cfg.head_v_dim, device=dev).bfloat16(),
            "u": torch.randn(rows, cfg.ffn_dim, device=dev).bfloat16()}
    nbytes = {op: p[op].numel() * 2 for op in ("qfv", "o", "w13", "w2")}
    nbytes["head"] = W["head"].numel() * 2
    nbytes["step"] = 2 * cfg.state_nbytes(rows) // cfg.n_layer
    for variant in ("cublas", "fused", "fused+pdl"):
        for op in ("qfv", "step", "o", "w13", "w2", "head"):
            s = state0.clone()
            run = op_chain(op, W, bufs, s, start, variant)
            g = capture(run)
            t = time_graph(g, 10, 5) / cfg.n_layer
            del g
            row = {"preset": name, "rows": rows, "variant": variant, "op": op, "us_per_kernel": t,
                   "bytes": nbytes[op], "TBps": nbytes[op] / t / 1e6, "fraction_of_copy_bw": nbytes[op] / t / 1e6 / (bw / 1e12)}
            results["ops"].append(row)
    del W


def table(results: dict, bw: float) -> str:
    lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s (read + written)",
             f"{'preset':9} {'rows':>4} {'variant':12} {'us/step':>8} {'us/layer':>8} {'head us':>8} "
             f"{'layer TB/s':>10} {'%copy':>6} {'floor/step':>10} {'x floor':>7} {'rel err':>8} check"]
    for r in results["chain"]:
        lines.append(f"{r['preset']:9} {r['rows']:>4} {r['variant']:12} {r['us_per_step']:8.1f} "
                     f"{r['us_per_layer']:8.2f} {r['us_head']:8.1f} {r['layer_TBps']:10.2f} "
                     f"{100 * r['layer_fraction_of_copy_bw']:5.0f}% {r['floor_us_per_step']:10.1f} "
                     f"{r['x_floor_step']:7.2f} {r['rel_err_logits']:8.1e} {r['check']}")
    if results["ops"]:
        lines.append("")
        lines.append(f"{'preset':9} {'rows':>4} {'op':5} " + " ".join(f"{v + ' us':>13} {'TB/s':>5}"
                                                               for v in ("cublas", "fused", "fused+pdl")))
        keys = sorted({(r["preset"], r["rows"], r["op"]) for r in results["ops"]}, key=lambda k: (k[0], k[1]))
        by = {(r["preset"], r["rows"], r["op"], r["variant"]): r for r in results["ops"]}
        for k in keys:
            cells = []
            for v in ("cublas", "fused", "fused+pdl"):
                r = by.get((*k, v))
                cells.append(f"{r['us_per_kernel']:13.2f} {r['TBps']:5.2f}" if r else f"{'-':>13} {'-':>5}")
            lines.append(f"{k[0]:9} {k[1]:>4} {k[2]:5} " + " ".join(cells))
    if results["skeleton"]:
        lines.append("")
        lines.append(f"{'persistent skeleton':20} {'rows':>4} {'barriers':>8} {'us/step':>8} {'no-barrier':>10} "
                     f"{'us/barrier':>10} {'%copy':>6} {'floor us':>8}")
        for r in results["skeleton"]:
            if "us_per_barrier" not in r:
                lines.append(f"{r['preset']:20} {r['rows']:>4} {r['barriers']:>8}  barrier timed out")
                continue
            lines.append(f"{r['preset']:20} {r['rows']:>4} {r['barriers']:>8} {r['us_per_step_barrier']:8.1f} "
                         f"{r['us_per_step_no_barrier']:10.1f} {r['us_per_barrier']:10.2f} "
                         f"{100 * r['fraction_of_copy_bw_barrier']:5.0f}% {r['floor_us']:8.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for decode_layer_bench.json")
    ap.add_argument("--presets", default="lasad-B,lasad-XL")
    ap.add_argument("--rows", default="2,16")
    ap.add_argument("--reps", type=int, default=20, help="graph replays per timing")
    ap.add_argument("--trials", type=int, default=5, help="timings per graph (median)")
    ap.add_argument("--no-tile-variants", dest="tile_variants", action="store_false")
    ap.add_argument("--tile-presets", default="lasad-B", help="presets that get the tile variants")
    ap.add_argument("--tile-rows", default="2", help="row counts that get the tile variants")
    ap.add_argument("--no-ops", dest="ops", action="store_false", help="skip the per-op kernel chains")
    ap.add_argument("--no-skeleton", dest="skeleton", action="store_false",
                    help="skip the persistent-kernel skeleton (the grid-barrier probe)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("decode_layer_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    args.tile_presets = args.tile_presets.split(",")
    args.tile_rows = [int(r) for r in args.tile_rows.split(",")]
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    bw = copy_bandwidth(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    results = {"environment": environment(dev, "benchmarks/decode_layer_bench.py"), "copy_bandwidth_Bps": bw,
               "sm_count": sms, "chain": [], "ops": [], "pdl_bitwise_equal": [], "skeleton": []}
    failures: list[str] = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in args.presets.split(","):
        bench_preset(name, [int(r) for r in args.rows.split(",")], args, bw, sms, results, failures)
    results["failures"] = failures
    results["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "decode_layer_bench.json", json.dumps(results, indent=1))
    print(f"wall {results['wall_s']:.0f} s, JSON: {args.out / 'decode_layer_bench.json'}")
    print(table(results, bw))
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
