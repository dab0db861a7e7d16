"""The decode step of the model body as one persistent Triton kernel: a task interpreter for few
rows (1-2 images with CFG), without a kernel boundary between the GEMVs (docs/performance.md,
"Issue 27: the persistent step").

Why: at 2 rows every decode GEMV of lasad-B costs its bytes plus 2.4-5.9 µs of fixed cost (launch,
ramp-up, tail, the wait on its input), and the 70 kernels of a step cost more than the whole
bandwidth floor. Here a step is a fixed list of tasks run by a grid of resident programs:

- tasks, in topological order (`build_schedule`): per layer the W_q|W_f|W_i tiles (RMSNorm
  prologue, recomputed per tile from the tiny x; layer 0 gathers its rows from the embedding
  tables), the LASAD step per (head, value slice) with the gates fused (the fp32 state updated in
  place; the per-head output norm applied here when `output_norm == "group"`), the W_o tiles
  (full-width norm prologue, residual epilogue), the W_1|W_3 tiles (norm prologue, SwiGLU
  epilogue), the W_2 tiles (residual epilogue); then the final norm and the head, written as fp32
  logits. The sampler stays its own launch (ops/select.py): it needs every logit of a row.
- dependencies through int64 counters in global memory, one per (layer, stage) and one per
  (layer, head) for the W_q|W_f|W_i tiles: a task loads its weight tile (or its state slice) first,
  then waits (acquire loads) until the counter of what it reads reaches its target, computes,
  stores, and adds 1 to its own counter (release). No grid-wide barrier anywhere.
- tasks are handed out by a ticket counter (an atomic add per task), so the programs take them in
  list order. Dependencies point only to earlier tasks, hence the earliest unfinished task is
  always held by a running program whose inputs are done: no deadlock whatever the number of
  programs the GPU keeps resident (one, or the interpreter running them one after another). A
  program takes its next ticket while its weight loads are in flight.
- nothing is reset between steps: each launch adds exactly `n_tasks + programs` to the ticket
  counter and a known count to every other counter, so launch k (k = ticket // that sum) waits for
  (k + 1) × target. No memset, no host sync, one launch per step inside a CUDA graph.
- a wait that spins `max_spin` polls gives up and sets the error flag (`PersistentStep.error()`)
  instead of hanging the GPU.
- optionally (`tagged=True`) every activation carries its launch number in the same 8-byte word,
  so readers check their inputs themselves and the counters need no release fence.

Numerics are the per-op Triton path's (ops/linear.py, the FMA path for few rows; the LASAD step
kernel with fused gates): fp32 accumulation; each GEMM output rounded to the activation dtype
before SwiGLU / the residual add; RMSNorm in fp32, cast, times the weight. Every reduction has a
fixed order (no float atomics, no split-K), so the same inputs give the same bits run to run.

Shapes (R rows ≤ rows_max, L layers, S state slots, H heads, K = head_k_dim, V = head_v_dim):
    ids     int64 [R]   class ids at position 0, token ids after
    pos     int64 [R]   each row's sequence position
    width   int64 [R]   each row's grid width (row-start rule, ops/lasad/mask.py)
    ssm     fp32  [L, S, H, K, V]  state pool, updated in place; row r uses ssm[:, slots[r]]
    slots   int64 [R]   distinct slots
    logits  fp32  [R, vocab]  output
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .lasad.mask import check_mode, row_start_log_decay

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    from .norms import rms_apply, silu_mul_f32
except ImportError:  # pragma: no cover
    triton = None

ROWS_MAX = 4            # rows one step serves (1-2 images with CFG); larger batches keep the GEMM path
TILE_ELEMS = 16384      # weight elements one GEMV task holds (ops/linear.py's register budget)
MAX_SPIN = 1 << 22      # polls before a wait gives up (seconds of GPU time): an error, not a hang
LAUNCHES = ("step", "layer", "layer-pdl")
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Task types (column 0 of the task table).
QFV, LASAD, O_PROJ, W13, W2, HEAD = range(6)
TASK_NAMES = ("qfv", "lasad", "o", "w13", "w2", "head")
NF = 8                  # int32 fields per task: type, layer, index, dep counter, dep count, own counter, 0, 0


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Schedule:
    """The task list of one decode step and how it is launched.

    tasks: int32 [n, NF] rows (type, layer, index, dep counter, dep count per launch, own counter);
        index is the first output column of a GEMV tile, head · n_vslices + slice for a LASAD task.
    n_counters: int64 counters the tasks use (after the tickets).
    ranges: [lo, hi) of the tasks each launch runs (one range: the whole step in one launch).
    block_n: output columns per GEMV tile, by task type name; block_v: value slice of a LASAD task.
    """

    tasks: torch.Tensor
    n_counters: int
    ranges: tuple
    block_n: dict
    block_v: int
    head_deps: bool

    @property
    def n_tasks(self) -> int:
        return self.tasks.shape[0]

    def counts(self) -> dict:
        """Tasks per type name."""
        types = self.tasks[:, 0].tolist()
        return {name: types.count(i) for i, name in enumerate(TASK_NAMES)}

    def subset(self, types=None, waits: bool = True) -> "Schedule":
        """For measurements only: the tasks of the given type names (all: None), in one launch;
        `waits=False` drops every dependency (the results are then wrong: what remains is the
        streaming and the per-task cost, without the latency of the waits)."""
        keep = [TASK_NAMES.index(t) for t in (types or TASK_NAMES)]
        tasks = self.tasks[torch.isin(self.tasks[:, 0], torch.tensor(keep, dtype=self.tasks.dtype))].clone()
        if not waits:
            tasks[:, 4] = 0
        elif types is not None:
            raise ValueError("a subset of the task types needs waits=False: its dependencies are not in it")
        return Schedule(tasks, self.n_counters, ((0, tasks.shape[0]),), self.block_n, self.block_v, self.head_deps)


def _block_n(n_out: int, kp: int, nacc: int, tile: int, min_tiles: int) -> int:
    """Output columns per tile: the largest power of two within the register budget, halved while
    the op would have fewer than `min_tiles` tiles (so that every op spreads over the GPU)."""
    bn = 1
    while 2 * bn * nacc * kp <= tile and 2 * bn <= _pow2(n_out):
        bn *= 2
    while bn > 1 and -(-n_out // bn) < min_tiles:
        bn //= 2
    return bn


def build_schedule(cfg, *, tile: int = TILE_ELEMS, min_tiles: int = 64, block_v: int | None = None,
                   head_deps: bool = True, launch: str = "step") -> Schedule:
    """The task list of one step for `cfg` (a LasadConfig), in topological order.

    Args:
        tile: weight elements per GEMV task (at most; padded to powers of two).
        min_tiles: split an op into at least this many tiles where the budget allows.
        block_v: value-dim slice of a LASAD task (power of two; the whole head with a group norm).
        head_deps: the LASAD task of head h waits only for the W_q|W_f|W_i tiles of head h (the
            tiles are then ordered head by head); else for all of them.
        launch: "step" (one launch), "layer" / "layer-pdl" (one launch per layer, the head with
            the last layer; see PersistentStep).
    """
    if launch not in LAUNCHES:
        raise ValueError(f"launch={launch!r} is not one of {', '.join(LAUNCHES)}")
    L, d, H, K, V, F_ = cfg.n_layer, cfg.dim, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.ffn_dim
    HK, HV = H * K, H * V
    nq = 2 * HK + HV
    group = cfg.output_norm == "group"
    bv = block_v or (_pow2(V) if group else min(_pow2(V), 32))
    if bv & (bv - 1) or bv < 1:
        raise ValueError(f"block_v={bv} must be a power of two")
    if group and bv < V:
        raise ValueError(f"block_v={bv}: the per-head output norm needs the whole head ({V}) in one task")
    nvs = -(-V // bv)
    bn = {"qfv": _block_n(nq, _pow2(d), 1, tile, min_tiles), "o": _block_n(d, _pow2(HV), 1, tile, min_tiles),
          "w13": _block_n(F_, _pow2(d), 2, tile, min_tiles), "w2": _block_n(d, _pow2(F_), 1, tile, min_tiles),
          "head": _block_n(cfg.vocab_size, _pow2(d), 1, tile, min_tiles)}
    if head_deps:
        # a tile must not straddle two heads: its columns then belong to one head's q, f or v
        while bn["qfv"] > 1 and (K % bn["qfv"] or V % bn["qfv"]):
            bn["qfv"] //= 2
    # counters: per layer [qfv (all, or one per head)..., lasad, o, w13, w2], then the head's
    per_layer = (H if head_deps else 1) + 4
    c_head = L * per_layer

    def c(layer, stage, h=0):  # stage: 0 qfv, 1 lasad, 2 o, 3 w13, 4 w2
        base = layer * per_layer
        return base + (h if head_deps else 0) if stage == 0 else base + per_layer - 5 + stage

    rows, ranges = [], []
    n_tiles = {op: -(-n // bn[op]) for op, n in (("qfv", nq), ("o", d), ("w13", F_), ("w2", d),
                                                  ("head", cfg.vocab_size))}
    for layer in range(L):
        lo = len(rows)
        dep = (c(layer - 1, 4), n_tiles["w2"]) if layer else (0, 0)
        if head_deps:
            b = bn["qfv"]
            per_head = []
            for h in range(H):
                cols = [n for seg, width in ((h * K, K), (HK + h * K, K), (2 * HK + h * V, V))
                        for n in range(seg, seg + width, b)]
                per_head.append(len(cols))
                rows += [(QFV, layer, n, *dep, c(layer, 0, h)) for n in cols]
        else:
            rows += [(QFV, layer, n, *dep, c(layer, 0)) for n in range(0, nq, bn["qfv"])]
        for h in range(H):
            qdep = (c(layer, 0, h), per_head[h]) if head_deps else (c(layer, 0), n_tiles["qfv"])
            rows += [(LASAD, layer, h * nvs + j, *qdep, c(layer, 1)) for j in range(nvs)]
        rows += [(O_PROJ, layer, n, c(layer, 1), H * nvs, c(layer, 2)) for n in range(0, d, bn["o"])]
        rows += [(W13, layer, n, c(layer, 2), n_tiles["o"], c(layer, 3)) for n in range(0, F_, bn["w13"])]
        rows += [(W2, layer, n, c(layer, 3), n_tiles["w13"], c(layer, 4)) for n in range(0, d, bn["w2"])]
        ranges.append([lo, len(rows)])
    rows += [(HEAD, L - 1, n, c(L - 1, 4), n_tiles["w2"], c_head) for n in range(0, cfg.vocab_size, bn["head"])]
    ranges[-1][1] = len(rows)
    if launch == "step":
        ranges = [[0, len(rows)]]
    tasks = torch.tensor([list(r) + [0] * (NF - len(r)) for r in rows], dtype=torch.int32)
    return Schedule(tasks, c_head + 1, tuple(tuple(r) for r in ranges), bn, bv, head_deps)


class PersistentStep:
    """One decode step of a `LasadGen` for up to `rows_max` rows in one launch (or one per layer).

    Built once from the model (bf16 / fp16 / fp32 weights on CUDA, or on the CPU under
    TRITON_INTERPRET=1); owns the task table, the activation buffers, the counters and the fp32
    lower bounds, and reads the model's weights by address: rebuild it if the parameters are
    replaced (`model.to(...)`, `load_state_dict(..., assign=True)`); in-place updates are seen
    (the lower bounds are recomputed when their parameter changes, outside a graph capture).
    `step` allocates nothing and never syncs with the host, so it can be captured in a CUDA graph.
    One instance runs one step at a time (one stream): its buffers are shared between calls.

    Args:
        model: the LasadGen (eval mode).
        rows_max: rows a step may have (≤ ROWS_MAX).
        tile, min_tiles, block_v, head_deps: the schedule (`build_schedule`).
        programs: resident programs per launch (default: SMs × per_sm; 1 under the interpreter).
        per_sm: programs per SM when `programs` is None.
        num_warps: warps per program.
        launch: "step": one launch per step; "layer": one launch per layer (the head with the last);
            "layer-pdl": the same, each launch after the first with programmatic dependent launch,
            so that a layer's programs load their weights while the previous layer runs.
        max_spin: polls before a wait gives up and sets the error flag.
        schedule: a task list of this config's (`build_schedule`, `Schedule.subset`) instead of the
            one the arguments above describe.
        tagged: every activation is stored as one 8-byte word with the launch's number in its high
            half (written by a relaxed atomic exchange, read by volatile loads and checked), so the
            counters need no release fence: they only tell a task when to start polling its inputs
            (NCCL's "LL" protocol). Costs 4x (bf16) the activation bytes, which are tiny.
        slack: tagged only: start polling the inputs when all but `slack` of their producers have
            counted (0: when all have).

    Examples::
        >>> from lasad_engine import LasadConfig, LasadGen                      # doctest: +SKIP
        >>> model = LasadGen(LasadConfig.from_preset("lasad-B")).cuda().bfloat16().eval()
        >>> ps = PersistentStep(model)
        >>> ssm = torch.zeros(12, 2, 12, 64, 64, device="cuda")
        >>> logits = torch.empty(2, 16384, device="cuda")
        >>> ids = torch.tensor([207, 1000], device="cuda")
        >>> zeros = torch.zeros(2, dtype=torch.long, device="cuda")
        >>> ps.step(ids, zeros, zeros + 16, ssm, torch.arange(2, device="cuda"), logits)
    """

    def __init__(self, model, *, rows_max: int = 2, tile: int = TILE_ELEMS, min_tiles: int = 64,
                 block_v: int | None = None, head_deps: bool = True, programs: int | None = None,
                 per_sm: int = 2, num_warps: int = 4, launch: str = "step", max_spin: int = MAX_SPIN,
                 schedule: Schedule | None = None, tagged: bool = False, slack: int = 0):
        if triton is None:
            raise RuntimeError("the persistent step needs triton: pip install -e '.[gpu]' in lasad's folder")
        cfg = self.config = model.config
        if not 1 <= rows_max <= ROWS_MAX:
            raise ValueError(f"rows_max={rows_max} must be in 1..{ROWS_MAX}")
        w = model.output.weight
        self.device, self.dtype = w.device, w.dtype
        if self.device.type != "cuda" and not _INTERPRET:
            raise ValueError(f"the persistent step runs on CUDA (or under TRITON_INTERPRET=1), not {self.device}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"weights must be fp32, bf16 or fp16, got {self.dtype}")
        self.mode = check_mode(cfg.row_rule(cfg.grid_width)[0])
        self.unit_width = not cfg.decay
        self.schedule = schedule or build_schedule(cfg, tile=tile, min_tiles=min_tiles, block_v=block_v,
                                                   head_deps=head_deps, launch=launch)
        self.launch, self.rows_max, self.num_warps, self.max_spin = launch, rows_max, num_warps, int(max_spin)
        if slack and not tagged:
            raise ValueError("slack needs tagged=True: without tags the counters are the only synchronisation")
        self.tagged, self.slack = bool(tagged), int(slack)
        # programmatic dependent launch: Hopper and later only (elsewhere "layer-pdl" runs as "layer")
        self._pdl = launch == "layer-pdl" and self.device.type == "cuda" \
            and torch.cuda.get_device_capability(self.device)[0] >= 9
        if programs is None:
            programs = 1 if self.device.type != "cuda" else \
                torch.cuda.get_device_properties(self.device).multi_processor_count * per_sm
        self.programs = int(programs)

        # Weights by address: one base pointer and element offsets (16-byte aligned where possible).
        # Table rows: per layer [qfv, o_proj, w13, w2, attention norm, output norm, ffn norm, -];
        # row L: [class table, token table, final norm, head, -, -, -, -] (the kernel's columns).
        layers = model.layers
        mats = []
        for blk in layers:
            a, f = blk.attention, blk.feed_forward
            mats.append([a.qfv.weight, a.o_proj.weight, f.w13.weight, f.w2.weight, blk.attention_norm.weight,
                         a.g_norm.weight, blk.ffn_norm.weight, None])
        mats.append([model.cls_embedding.embedding_table.weight, model.tok_embeddings.weight, model.norm.weight,
                     model.output.weight] + [None] * 4)
        self._weights = [t for row in mats for t in row if t is not None]   # kept alive, read by address
        for t in self._weights:
            if t.dtype != self.dtype or t.device != self.device or not t.is_contiguous():
                raise ValueError("every weight must be contiguous, on one device, in one dtype "
                                 f"({self.dtype}); got {t.dtype} {tuple(t.shape)} on {t.device}")
        esize = w.element_size()
        base = self._weights[0]
        offs = [[0 if t is None else (t.data_ptr() - base.data_ptr()) // esize for t in row] for row in mats]
        if any((t.data_ptr() - base.data_ptr()) % esize for t in self._weights):
            raise ValueError("weights are not aligned to their element size")
        self._base = base
        self.woffs = torch.tensor(offs, dtype=torch.int64, device=self.device)
        align = 0
        for row in offs:
            for o in row:
                align = math.gcd(align, o)
        self.walign = 16 // esize if align % (16 // esize) == 0 else 1
        eps = {m.eps for blk in layers for m in (blk.attention_norm, blk.ffn_norm)}
        if len(eps) != 1:
            raise ValueError("the attention and ffn norms of every layer must share one eps")
        self.eps_a = eps.pop()
        self.eps_g = layers[0].attention.g_norm.eps
        self.eps_f = model.norm.eps
        self._model = model
        L, H, K, V = cfg.n_layer, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim
        self.lbs = torch.zeros(L, H * K, dtype=torch.float32, device=self.device)
        self._lb_key = None
        self.refresh_lower_bounds()

        R, dev = rows_max, self.device
        dt = torch.int64 if self.tagged else self.dtype
        nq = 2 * H * K + H * V
        self.qfv_buf = torch.zeros(L, R, nq, dtype=dt, device=dev)
        self.o_buf = torch.zeros(L, R, H * V, dtype=dt, device=dev)
        self.h_buf = torch.zeros(L, R, cfg.dim, dtype=dt, device=dev)
        self.u_buf = torch.zeros(L, R, cfg.ffn_dim, dtype=dt, device=dev)
        self.x_buf = torch.zeros(L, R, cfg.dim, dtype=dt, device=dev)
        n_launch = len(self.schedule.ranges)
        self.n_tickets = n_launch
        self.counters = torch.zeros(n_launch + self.schedule.n_counters, dtype=torch.int64, device=dev)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)
        self.tasks = self.schedule.tasks.to(dev)

    # -- host side ---------------------------------------------------------------------------
    def refresh_lower_bounds(self) -> None:
        """Recompute the fp32 HGRN2 bounds if the model's parameter changed since the last call."""
        model = self._model
        if not model.config.use_lower_bound:
            return
        raw = model.lower_bounds
        key = (raw.data_ptr(), raw._version)
        if key == self._lb_key:
            return
        with torch.no_grad():   # a copy of the values, never a node of the caller's autograd graph
            for i, lb in enumerate(model._lower_bounds()):
                if lb is not None:
                    self.lbs[i].copy_(lb.reshape(-1))
        self._lb_key = key

    def reset(self) -> None:
        """Zero the counters and the error flag (only needed after an error; never during a step);
        tagged, the activations too (their tags restart with the counters)."""
        self.counters.zero_()
        self.err.zero_()
        if self.tagged:
            for b in (self.qfv_buf, self.o_buf, self.h_buf, self.u_buf, self.x_buf):
                b.zero_()

    def activations(self) -> dict:
        """The activation buffers of the last step, [L, rows_max, width] in the model's dtype (tagged
        words decoded): qfv, o (the LASAD readout; normed with a per-head norm), h (after W_o), u
        (after SwiGLU), x (each layer's output). For tests and debugging."""
        out = {}
        for name, b in (("qfv", self.qfv_buf), ("o", self.o_buf), ("h", self.h_buf), ("u", self.u_buf),
                        ("x", self.x_buf)):
            if self.tagged:
                if self.dtype == torch.float32:
                    b = (b & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
                else:
                    b = (b & 0xFFFF).to(torch.int16).view(self.dtype)
            out[name] = b
        return out

    def kernel_info(self) -> dict:
        """Registers, spills and shared memory of the last launched kernel (benchmarks)."""
        k = getattr(self, "_compiled", None)
        sch = self.schedule
        info = {"programs": self.programs, "num_warps": self.num_warps, "tasks": sch.counts(),
                "block_n": sch.block_n, "block_v": sch.block_v, "launches": len(sch.ranges)}
        for name in ("n_regs", "n_spills"):
            info[name] = getattr(k, name, None)
        info["shared"] = getattr(getattr(k, "metadata", None), "shared", None)
        return info

    def error(self) -> bool:
        """True if a wait gave up since the last reset (a host sync: for tests and benchmarks)."""
        return bool(self.err.item())

    def step(self, ids: torch.Tensor, pos: torch.Tensor, width: torch.Tensor, ssm: torch.Tensor,
             slots: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """One decode step for R rows (module docstring for the shapes); returns `logits`."""
        cfg = self.config
        R = ids.shape[0]
        if not 1 <= R <= self.rows_max:
            raise ValueError(f"{R} rows: this PersistentStep serves 1..{self.rows_max}")
        for name, t in (("ids", ids), ("pos", pos), ("width", width), ("slots", slots)):
            if t.dtype != torch.int64 or tuple(t.shape) != (R,) or t.device != self.device or t.stride(0) != 1:
                raise ValueError(f"{name} must be a contiguous int64 [{R}] tensor on {self.device}, got {t.dtype} "
                                 f"{tuple(t.shape)} (strides {t.stride()}) on {t.device}")
        want = (cfg.n_layer, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim)
        if ssm.dtype != torch.float32 or ssm.dim() != 5 or (ssm.shape[0], *ssm.shape[2:]) != want \
                or not ssm.is_contiguous():
            raise ValueError(f"ssm must be a contiguous fp32 pool [{want[0]}, S, {', '.join(map(str, want[1:]))}], "
                             f"got {ssm.dtype} {tuple(ssm.shape)}")
        if logits.dtype != torch.float32 or tuple(logits.shape) != (R, cfg.vocab_size) or not logits.is_contiguous():
            raise ValueError(f"logits must be a contiguous fp32 [{R}, {cfg.vocab_size}] tensor")
        if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
            self.refresh_lower_bounds()
        self._launch(ids, pos, width, ssm, slots, logits, R)
        return logits

    def _launch(self, ids, pos, width, ssm, slots, logits, R):
        cfg, sch = self.config, self.schedule
        L, d, H, K, V, F_ = cfg.n_layer, cfg.dim, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.ffn_dim
        value = row_start_log_decay(self.mode)
        pdl_ok = self._pdl
        for i, (lo, hi) in enumerate(sch.ranges):
            pdl = pdl_ok and i > 0
            extra = {"launch_pdl": True} if pdl else {}
            self._compiled = persistent_step_kernel[(self.programs,)](
                self.tasks, self.woffs, self._base, self.lbs, ids, pos, width, ssm, slots, logits,
                self.qfv_buf, self.o_buf, self.h_buf, self.u_buf, self.x_buf, self.counters, self.err,
                R, ssm.shape[1], L, i, self.n_tickets, lo, hi - lo, hi - lo + self.programs,
                self.eps_a, self.eps_g, self.eps_f, K ** -0.5, 0.0 if value is None else value, self.max_spin,
                self.slack,
                D=d, DP=_pow2(d), H=H, KH=K, VH=V, BKH=_pow2(K), BVH=sch.block_v, NVS=-(-V // sch.block_v),
                FF=F_, FP=_pow2(F_), HVP=_pow2(H * V), VOCAB=cfg.vocab_size, NCLS=cfg.num_classes + 1,
                BR=_pow2(R), RB=self.rows_max, BN_Q=sch.block_n["qfv"], BN_O=sch.block_n["o"],
                BN_13=sch.block_n["w13"], BN_2=sch.block_n["w2"], BN_HEAD=sch.block_n["head"],
                HAS_OVERRIDE=value is not None, GROUP_NORM=cfg.output_norm == "group",
                HAS_LB=cfg.use_lower_bound, UNIT_WIDTH=self.unit_width, WALIGN=self.walign,
                XALIGN=math.gcd(self.walign, d), TAGGED=self.tagged,
                INTERPRET=_INTERPRET, PDL=pdl, PDL_TRIGGER=pdl_ok, num_warps=self.num_warps, **extra)


if triton is not None:

    @triton.jit
    def _grab(ticket):
        """The next ticket (relaxed: it publishes nothing)."""
        return tl.atomic_add(ticket, 1, sem="relaxed", scope="gpu").to(tl.int64)

    @triton.jit
    def _poll(ptr, INTERPRET: tl.constexpr):
        if INTERPRET:
            return tl.load(ptr, volatile=True)
        else:
            # every thread reads the counter with acquire semantics: its own later loads see what
            # the producers stored before their release
            return tl.inline_asm_elementwise("ld.acquire.gpu.global.b64 $0, [$1];", "=l,l", [ptr],
                                             dtype=tl.int64, is_pure=False, pack=1)

    @triton.jit
    def _wait(cnt, dep, target, max_spin, err, INTERPRET: tl.constexpr):
        """Spin until counter `dep` reaches `target` (or give up after max_spin polls: error flag;
        once it is set no wait spins, so a broken launch ends in about one timeout)."""
        c = _poll(cnt + dep, INTERPRET)
        limit = tl.where(tl.load(err, volatile=True) != 0, 0, max_spin)
        spins = 0
        while (c < target) & (spins < limit):
            c = _poll(cnt + dep, INTERPRET)
            spins += 1
        if c < target:
            # a plain store: threads may leave the loop at different polls, so nothing here may
            # need the whole block (a scalar atomic would bring block barriers)
            tl.store(err, 1)

    @triton.jit
    def _release(cnt, out, TAGGED: tl.constexpr):
        # every thread's stores are issued (block barrier), then one release add makes them visible
        # with the count (the cooperative-groups grid-sync pattern, without the grid). Tagged: the
        # values carry their own launch number, the count is only a hint (relaxed: no fence).
        tl.debug_barrier()
        if TAGGED:
            tl.atomic_add(cnt + out, 1, sem="relaxed", scope="gpu")
        else:
            tl.atomic_add(cnt + out, 1, sem="release", scope="gpu")

    @triton.jit
    def _pack(y, tag, DT: tl.constexpr):
        """A tagged word: the value's bits in the low half, the launch tag in the high half."""
        if DT == tl.float32:
            bits = y.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        else:
            bits = y.to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
        return bits | (tag << 32)

    @triton.jit
    def _unpack(wd, DT: tl.constexpr):
        if DT == tl.float32:
            return wd.to(tl.int32).to(tl.float32, bitcast=True)
        else:
            return wd.to(tl.int16).to(DT, bitcast=True)

    @triton.jit
    def _put(ptrs, y, mask, tag, DT: tl.constexpr, TAGGED: tl.constexpr):
        """Store activations; tagged: each as one 8-byte word, written atomically (relaxed)."""
        if TAGGED:
            tl.atomic_xchg(ptrs, _pack(y, tag, DT), mask=mask, sem="relaxed", scope="gpu")
        else:
            tl.store(ptrs, y, mask=mask)

    @triton.jit
    def _fetch(ptrs, mask, tag, check, max_spin, err, DT: tl.constexpr, TAGGED: tl.constexpr):
        """Load activations (masked lanes 0). Tagged: poll the words until every one carries this
        launch's tag (when `check`), then unpack them. The loop condition is a block-wide sum, the
        same in every thread (its barriers are reached by all)."""
        if TAGGED:
            wd = tl.load(ptrs, mask=mask, other=0, volatile=True)
            if check:
                bad = tl.sum((((wd >> 32) != tag) & mask).to(tl.int32))
                spins = 0
                while (bad > 0) & (spins < max_spin):
                    wd = tl.load(ptrs, mask=mask, other=0, volatile=True)
                    bad = tl.sum((((wd >> 32) != tag) & mask).to(tl.int32))
                    spins += 1
                if bad > 0:
                    tl.store(err, 1)
            return _unpack(wd, DT)
        else:
            return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")

    @triton.jit
    def _next(ticket, tasks, task_lo, k, M, n_tasks):
        """Take the next ticket and read its task row (issued now, used next iteration):
        (task, type, layer, index, dep counter, dep count, own counter)."""
        task = _grab(ticket) - k * M
        d = tasks + (task_lo + tl.where(task < n_tasks, task, 0)) * 8   # past the end: any valid row
        return (task, tl.load(d), tl.load(d + 1).to(tl.int64), tl.load(d + 2), tl.load(d + 3), tl.load(d + 4),
                tl.load(d + 5))

    @triton.jit
    def _gemv(n0, w, w3_off, nw, x_emb, x_buf, x_is_emb, r_emb, r_buf, r_is_emb, out, out_stride, eps, R, tag,
              check, ticket, tasks, task_lo, k, M, n_tasks, cnt, dep, target, max_spin, err,
              N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
              HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, OUT_F32: tl.constexpr,
              DT: tl.constexpr, TAGGED: tl.constexpr, INTERPRET: tl.constexpr):
        """One GEMV tile: output columns [n0, n0 + BN) of every row, the whole K (ops/linear.py's
        FMA path: same prologue, epilogue and roundings). Each row's input (residual) starts at
        x_emb (r_emb), [BR] pointers into the embedding tables, when x_is_emb (r_is_emb), else at
        x_buf (r_buf), into an activation buffer. Loads the weights, takes the next ticket, waits
        for its input, computes, stores. Returns the next task (`_next`)."""
        cols = n0 + tl.arange(0, BN)
        kk = tl.arange(0, KP)
        km = kk < K
        cm = cols < N
        # the tile is loaded as [1, BN, KP]: the product with the rows and the sum over K below then
        # run in the layout of the load (as [BN, KP] Triton moves the whole tile to another layout)
        wp = w + cols[None, :, None] * K + kk[None, None, :]
        wm = cm[None, :, None] & km[None, None, :]
        w_t = tl.load(wp, mask=wm, other=0.0)
        if SWIGLU:
            w3_t = tl.load(wp + w3_off, mask=wm, other=0.0)
        else:
            w3_t = w_t
        if HAS_NORM:
            nw_t = tl.load(nw + kk, mask=km, other=0.0)
        else:
            nw_t = kk
        nxt = _next(ticket, tasks, task_lo, k, M, n_tasks)
        _wait(cnt, dep, target, max_spin, err, INTERPRET)
        rows = tl.arange(0, BR)
        rm = rows < R
        om = rm[:, None] & cm[None, :]
        if HAS_RES:  # first: its latency hides behind the GEMV
            if r_is_emb:
                res_t = tl.load(r_emb[:, None] + cols[None, :], mask=om, other=0.0)
            else:
                res_t = _fetch(r_buf[:, None] + cols[None, :], om, tag, check, max_spin, err, DT, TAGGED)
        else:
            res_t = om
        xm = rm[:, None, None] & km[None, None, :]
        if x_is_emb:
            xt = tl.load(x_emb[:, None, None] + kk[None, None, :], mask=xm, other=0.0)      # [BR, 1, KP]
        else:
            xt = _fetch(x_buf[:, None, None] + kk[None, None, :], xm, tag, check, max_spin, err, DT, TAGGED)
        if HAS_NORM:
            xf = xt.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(xf * xf, axis=2) / K + eps)
            xt = rms_apply(xf, rstd[:, :, None], nw_t[None, None, :], DT).to(DT)
        af = xt.to(tl.float32)
        acc = tl.sum(w_t.to(tl.float32) * af, axis=2)                                  # [BR, BN]
        if SWIGLU:
            acc3 = tl.sum(w3_t.to(tl.float32) * af, axis=2)
        else:
            acc3 = acc
        y = acc.to(DT)
        if SWIGLU:
            y = silu_mul_f32(y, acc3.to(DT)).to(DT)
        if HAS_RES:
            y = (res_t.to(tl.float32) + y.to(tl.float32)).to(DT)
        off = rows[:, None] * out_stride + cols[None, :]
        if OUT_F32:
            tl.store(out + off, y.to(tl.float32), mask=om)
        else:
            _put(out + off, y, om, tag, DT, TAGGED)
        return nxt

    @triton.jit
    def _lasad(layer, idx, qfv, o, ssm, slot, start, lbs, gw, R, S, eps_g, scale, override, tag, check,
               ticket, tasks, task_lo, k, M, n_tasks, cnt, dep, target, max_spin, err,
               H: tl.constexpr, KH: tl.constexpr, VH: tl.constexpr, BKH: tl.constexpr, BVH: tl.constexpr,
               NVS: tl.constexpr, NQ: tl.constexpr, BR: tl.constexpr, HAS_OVERRIDE: tl.constexpr,
               GROUP_NORM: tl.constexpr, HAS_LB: tl.constexpr, DT: tl.constexpr, TAGGED: tl.constexpr,
               INTERPRET: tl.constexpr):
        """The LASAD step of head idx // NVS, value slice idx % NVS, every row (ops/lasad/step.py's
        kernel with fused gates, the same expressions); slot, start: each row's state slot and
        row-start flag [BR]. The state slices load before the wait. Returns the next task."""
        h = idx // NVS
        j = idx % NVS
        rows = tl.arange(0, BR)
        rm = rows < R
        kk = tl.arange(0, BKH)
        km = kk < KH
        vv = j * BVH + tl.arange(0, BVH)
        vm = vv < VH
        s_off = ((layer * S + slot) * H + h) * (KH * VH)                                 # [BR] int64
        sp = ssm + s_off[:, None, None] + kk[None, :, None] * VH + vv[None, None, :]
        smask = rm[:, None, None] & km[None, :, None] & vm[None, None, :]
        b_s = tl.load(sp, mask=smask, other=0.0)
        has_lb = HAS_LB & (layer > 0)
        b_lb = tl.load(lbs + layer * (H * KH) + h * KH + kk, mask=km & has_lb, other=0.0)
        if GROUP_NORM:
            b_gw = tl.load(gw + h * VH + vv, mask=vm, other=0.0)
        nxt = _next(ticket, tasks, task_lo, k, M, n_tasks)
        _wait(cnt, dep, target, max_spin, err, INTERPRET)
        base = qfv + rows[:, None] * NQ
        qm = rm[:, None] & km[None, :]
        b_qr = _fetch(base + h * KH + kk[None, :], qm, tag, check, max_spin, err, DT, TAGGED)
        b_q = b_qr.to(tl.float32)
        b_q = (b_q / (1.0 + tl.exp(-b_q))).to(DT).to(tl.float32) * scale
        b_f = _fetch(base + H * KH + h * KH + kk[None, :], qm, tag, check, max_spin, err, DT, TAGGED).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-b_f))
        b_k = 1.0 / (1.0 + tl.exp(b_f))
        lb2 = b_lb[None, :]
        g_lb = tl.log(lb2 + (1.0 - lb2) * sig)
        g_plain = tl.minimum(b_f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(b_f)))
        b_g = tl.where(has_lb, g_lb, g_plain)
        b_k = tl.where(has_lb, (1.0 - lb2) * b_k, b_k)
        if HAS_OVERRIDE:
            b_g = tl.where(start[:, None], override, b_g)
        b_v = _fetch(base + 2 * H * KH + h * VH + vv[None, :], rm[:, None] & vm[None, :], tag, check, max_spin, err,
                     DT, TAGGED).to(tl.float32)
        # one explicit fused multiply-add: left to the compiler, a*b + c*d contracts either way,
        # and the tagged form's compile took the other one (its state differed in the last bits)
        b_s = tl.fma(b_s, tl.exp(b_g)[:, :, None], b_k[:, :, None] * b_v[:, None, :])
        tl.store(sp, b_s, mask=smask)
        b_o = tl.sum(b_s * b_q[:, :, None], axis=1)                                      # [BR, BVH]
        om = rm[:, None] & vm[None, :]
        if GROUP_NORM:
            # the per-head RMSNorm of W_o's input (norms.rms_norm with groups = heads), whole head here
            of = tl.where(om, b_o.to(DT).to(tl.float32), 0.0)
            rstd = tl.rsqrt(tl.sum(of * of, axis=1) / VH + eps_g)
            b_o = rms_apply(of, rstd[:, None], b_gw[None, :], DT)
        _put(o + rows[:, None] * (H * VH) + h * VH + vv[None, :], b_o.to(DT), om, tag, DT, TAGGED)
        return nxt

    # The integers that differ between launches of one step (ranges of the per-layer forms) or between
    # calls (rows, slots) are not specialised on (divisibility, == 1): one compile serves them all.
    @triton.jit(do_not_specialize=["R", "S", "n_layer", "ticket_at", "cnt_at", "task_lo", "n_tasks", "M",
                                   "max_spin", "slack"])
    def persistent_step_kernel(
        tasks, woffs, wbase, lbs, ids, pos, width, ssm, slots, logits,
        qfv_buf, o_buf, h_buf, u_buf, x_buf, counters, err,
        R, S, n_layer, ticket_at, cnt_at, task_lo, n_tasks, M, eps_a, eps_g, eps_f, scale, override, max_spin,
        slack,
        D: tl.constexpr, DP: tl.constexpr, H: tl.constexpr, KH: tl.constexpr, VH: tl.constexpr,
        BKH: tl.constexpr, BVH: tl.constexpr, NVS: tl.constexpr, FF: tl.constexpr, FP: tl.constexpr,
        HVP: tl.constexpr, VOCAB: tl.constexpr, NCLS: tl.constexpr, BR: tl.constexpr, RB: tl.constexpr,
        BN_Q: tl.constexpr, BN_O: tl.constexpr, BN_13: tl.constexpr, BN_2: tl.constexpr, BN_HEAD: tl.constexpr,
        HAS_OVERRIDE: tl.constexpr, GROUP_NORM: tl.constexpr, HAS_LB: tl.constexpr, UNIT_WIDTH: tl.constexpr,
        WALIGN: tl.constexpr, XALIGN: tl.constexpr, TAGGED: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr, PDL_TRIGGER: tl.constexpr,
    ):
        # Tasks [task_lo, task_lo + n_tasks) of the table, taken by ticket. Launch number k of this
        # range is ticket // M (M = n_tasks + programs: each program takes one ticket past the end).
        if PDL_TRIGGER:
            gdc_launch_dependents()   # the next launch's programs may start and load their weights
        NQ: tl.constexpr = 2 * H * KH + H * VH
        HV: tl.constexpr = H * VH
        ticket = counters + ticket_at                 # this launch's ticket counter
        cnt = counters + cnt_at                       # the dependency counters
        g_row = woffs + n_layer * 8   # the globals: class table, token table, final norm, head
        cls_off = tl.multiple_of(tl.load(g_row + 0), WALIGN)
        tok_off = tl.multiple_of(tl.load(g_row + 1), WALIGN)
        fn_w = wbase + tl.multiple_of(tl.load(g_row + 2), WALIGN)
        head_w = wbase + tl.multiple_of(tl.load(g_row + 3), WALIGN)
        # The step's inputs do not change during the step: read once per program. Layer 0 reads
        # the class row at position 0 and the token row after (clamped as ops/embed.py clamps).
        rows = tl.arange(0, BR)
        rm = rows < R
        p = tl.load(pos + rows, mask=rm, other=0)
        i = tl.load(ids + rows, mask=rm, other=0)
        e_off = tl.where(p == 0, cls_off + tl.minimum(tl.maximum(i, 0), NCLS - 1) * D,
                         tok_off + tl.minimum(tl.maximum(i, 0), VOCAB - 1) * D)
        emb_rows = wbase + tl.multiple_of(e_off, XALIGN)
        slot = tl.load(slots + rows, mask=rm, other=0)
        if UNIT_WIDTH:
            start = p >= 1
        else:
            wd = tl.load(width + rows, mask=rm, other=1)
            start = (p >= 1) & ((p - 1) % wd == 0)      # ops/lasad/mask.py's row-start rule
        t0 = _grab(ticket)
        k = t0 // M
        task = t0 - k * M
        d = tasks + (task_lo + tl.where(task < n_tasks, task, 0)) * 8
        tt, layer, idx, dep, dn, out = (tl.load(d), tl.load(d + 1).to(tl.int64), tl.load(d + 2), tl.load(d + 3),
                                        tl.load(d + 4), tl.load(d + 5))
        DT: tl.constexpr = wbase.dtype.element_ty        # the activations' dtype (the weights')
        tag = (k + 1) % 2147483648                         # tagged activations: this launch's number
        while task < n_tasks:
            # tagged: the count is a hint, the tags decide; start polling the data `slack` early
            target = (k + 1) * dn - slack
            check = dn > 0                                 # a measurement without waits reads anything
            w_row = woffs + layer * 8
            lrow = layer * RB                              # this layer's first row in the buffers
            buf_rows = (lrow + rows).to(tl.int64)
            # x_l, the layer's input (and W_o's residual): the embedding rows at layer 0
            first = layer == 0
            x_prev = x_buf + tl.multiple_of((buf_rows - RB) * D, XALIGN)
            if tt == 0:    # W_q|W_f|W_i, norm prologue
                nxt = _gemv(idx, wbase + tl.multiple_of(tl.load(w_row + 0), WALIGN), 0,
                            wbase + tl.multiple_of(tl.load(w_row + 4), WALIGN), emb_rows, x_prev, first,
                            emb_rows, x_prev, first, qfv_buf + lrow * NQ, NQ, eps_a, R, tag, check,
                            ticket, tasks, task_lo, k, M, n_tasks, cnt, dep, target, max_spin, err,
                            NQ, D, DP, BN_Q, BR, True, False, False, False, DT, TAGGED, INTERPRET)
            elif tt == 1:  # the LASAD step of one head (slice), gates fused, state in place
                nxt = _lasad(layer, idx, qfv_buf + lrow * NQ, o_buf + lrow * HV, ssm, slot, start, lbs,
                             wbase + tl.multiple_of(tl.load(w_row + 5), WALIGN), R, S, eps_g, scale, override,
                             tag, check, ticket, tasks, task_lo, k, M, n_tasks, cnt, dep, target, max_spin, err,
                             H, KH, VH, BKH, BVH, NVS, NQ, BR, HAS_OVERRIDE, GROUP_NORM, HAS_LB, DT, TAGGED,
                             INTERPRET)
            elif tt == 2:  # W_o: full-width output norm prologue (group norm: done by the step), + x_l
                nxt = _gemv(idx, wbase + tl.multiple_of(tl.load(w_row + 1), WALIGN), 0,
                            wbase + tl.multiple_of(tl.load(w_row + 5), WALIGN), emb_rows, o_buf + buf_rows * HV,
                            False, emb_rows, x_prev, first, h_buf + lrow * D, D, eps_g, R, tag, check,
                            ticket, tasks, task_lo, k, M, n_tasks, cnt, dep, target, max_spin, err,
                            D, HV, HVP, BN_O, BR, not GROUP_NORM, False, True, False, DT, TAGGED, INTERPRET)
            elif tt == 3:  # W_1|W_3: norm prologue, SwiGLU epilogue
                nxt = _gemv(idx, wbase + tl.multiple_of(tl.load(w_row + 2), WALIGN), FF * D,
                            wbase + tl.multiple_of(tl.load(w_row + 6), WALIGN), emb_rows, h_buf + buf_rows * D,
                            False, emb_rows, x_prev, False, u_buf + lrow * FF, FF, eps_a, R, tag, check,
                            ticket, tasks, task_lo, k, M, n_tasks, cnt, dep, target, max_spin, err,
                            FF, D, DP, BN_13, BR, True, True, False, False, DT, TAGGED, INTERPRET)
            elif tt == 4:  # W_2: + h
                nxt = _gemv(idx, wbase + tl.multiple_of(tl.load(w_row + 3), WALIGN), 0, fn_w,
                            emb_rows, u_buf + buf_rows * FF, False, emb_rows, h_buf + buf_rows * D, False,
                            x_buf + lrow * D, D, eps_a, R, tag, check,
                            ticket, tasks, task_lo, k, M, n_tasks, cnt, dep, target, max_spin, err,
                            D, FF, FP, BN_2, BR, False, False, True, False, DT, TAGGED, INTERPRET)
            else:          # the head: final norm prologue, fp32 logits (rounded as the GEMM output)
                nxt = _gemv(idx, head_w, 0, fn_w, emb_rows, x_buf + buf_rows * D, False, emb_rows, x_prev, False,
                            logits, VOCAB, eps_f, R, tag, check,
                            ticket, tasks, task_lo, k, M, n_tasks, cnt, dep, target, max_spin, err,
                            VOCAB, D, DP, BN_HEAD, BR, True, False, False, True, DT, TAGGED, INTERPRET)
            _release(cnt, out, TAGGED)
            task, tt, layer, idx, dep, dn, out = nxt
        if PDL:
            gdc_wait()   # exit only after the previous launch has: launches complete in order
