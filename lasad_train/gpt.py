"""`lasad-train gpt`: train LASADGen on token codes (LlamaGen's recipe), on one device or under
`torchrun` (DDP; FSDP for the large presets), resumable from its own checkpoints.

    lasad-train gpt CODES OUT --preset lasad-B --steps 1000 --batch-size 256
    lasad-train gpt CODES64 CODES96 OUT ...          # one model at two grid sizes (16x16, 24x24)
    torchrun --nproc_per_node 2 -m lasad_train.cli gpt CODES OUT --preset lasad-XL --fsdp ...

Defaults follow LlamaGen's `train_c2i.py`: AdamW (0.9, 0.95), weight decay 0.05 on tensors with
≥ 2 dims only, lr 1e-4 constant (optional linear warm-up, optional linear cool-down over the last
--cooldown steps to --min-lr: `lr_at`), grad-norm clip 1.0, bf16 autocast on CUDA, class dropout
0.1 (in the model), optional EMA. The batch of step s is drawn from a generator seeded with
(seed, s) and split across ranks, so a resumed run and a run on any number of processes see the
same global batches. With several code sets (one per grid size) the grid of step s is drawn from
(seed, s) too (weights: --mix, else each code grid alike), the whole batch comes from that grid's
set, about as many tokens as --batch-size sequences of the smallest grid (`bucket_batch_sizes`),
and the forward gets its width; the deploy meta lists the grids (`trained_grids`, read by
lasad-run's untrained-grid note).

OUT holds the resumable state (model, optimizer state keyed by parameter name, step, RNG, config,
every hyper-parameter, EMA weights: resume with --resume, with or without FSDP, on any number of
GPUs) as `last.pt` (--resume-format pt, the default: everything exact) or as `state/`
(--resume-format shards: safetensors shards of at most --shard-size bytes and an index, AdamW's
moments in bf16 unless --moments fp32; `state.py`), `model.safetensors` (the deploy checkpoint,
EMA weights when EMA is on, derived from the state) and `log.jsonl` (step, loss, lr, tokens/s,
elapsed seconds over all pieces of the run, the ETA at the recent rate, and on CUDA the rank's
peak memory). The folder rules (refusing to replace a run, resuming as the same run, the save
order) are `runs.py`'s. `--grad-accum N` splits each process's batch into N micro-batches;
`--no-save` writes the log only. On CUDA, Triton's cache (fla's compiled kernels and autotuning
results) is OUT/triton-cache unless --kernel-cache or $TRITON_CACHE_DIR says otherwise, so a
resumed run on the same machine does not compile again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lasad_engine import LasadConfig, LasadGen, save_checkpoint
from lasad_engine.io import atomic_path, clean_state_dict, one_line
from lasad_engine.model import LasadBlock
from lasad_engine.params import resolve_device

from .formats import DataError
from .runs import CHECKPOINT, RunFolder, check_rng_state, resolve_hyperparameters, rng_state, set_rng_state
from .state import DEFAULT_SHARD_BYTES, INDEX, MIN_SHARD_BYTES, MOMENT_CHOICES, MOMENT_KEYS, STATE_DIR, \
    load_state, remove_state, save_state

TRAIN_FORMAT, TRAIN_VERSION = "lasad-train", 1
DEPLOY = "model.safetensors"

# The hyper-parameters that define a run. On --resume they come from last.pt: an option left out
# takes the stored value, a different one is refused. (--grad-accum is restored too but may change:
# micro-batches give the same update.)
DEFAULTS = {
    "preset": "lasad-B",
    "overrides": {},        # LasadConfig fields (row_start, dropouts, ...)
    "batch_size": 256,      # global, over all ranks (at the smallest grid: see bucket_batch_sizes)
    "mix": None,            # per code set, the weight of its grid in the steps (None: each code grid alike)
    "lr": 1e-4,
    "warmup": 0,
    "cooldown": 0,          # the last N steps of --steps fall linearly to min_lr
    "min_lr": 0.0,
    "beta1": 0.9,
    "beta2": 0.95,
    "weight_decay": 0.05,
    "grad_clip": 1.0,
    "ema": 0.0,             # EMA decay (0 = off), e.g. 0.9999
    "seed": 0,
    "precision": "bf16",    # autocast dtype on CUDA ("fp32" = off)
}
# The fields of the model config that come from the code set rather than from --preset / --set.
DATA_FIELDS = ("vocab_size", "num_classes", "grid_height", "grid_width", "class_names")


@dataclass
class GPTTrainArgs:
    """One `lasad-train gpt` run. The hyper-parameters of DEFAULTS are None when not given: a new
    run then takes DEFAULTS, a resumed one the values stored in last.pt."""

    codes: str | list[str]  # one code set, or several of different grid sizes (bucketed steps)
    out: str
    preset: str | None = None
    overrides: dict | None = None
    steps: int = 1000
    batch_size: int | None = None
    mix: list[float] | None = None  # one weight per code set: how often a step draws from its grid
    lr: float | None = None
    warmup: int | None = None
    cooldown: int | None = None
    min_lr: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    grad_accum: int | None = None  # micro-batches per step on each process (same update, less memory); default 1
    ema: float | None = None
    seed: int | None = None
    precision: str | None = None
    fsdp: bool = False
    chunk_backend: str | None = None  # "fla" | "torch"; default fla on CUDA, torch on CPU
    save_every: int = 500
    log_every: int = 10
    device: str | None = None
    resume: bool = False
    overwrite: bool = False        # start again in an OUT that holds a run
    init: str | None = None        # a new run starts from these weights (a checkpoint), not random ones
    progress: bool = True
    time_limit: float | None = None  # seconds: stop after the step that crosses it, save, resume later
    save: bool = True              # False: write the log only (benchmark runs)
    memory_check: bool = True      # refuse a run the machine's memory cannot hold (memory.py)
    resume_format: str | None = None  # "pt" (last.pt) | "shards" (state/); default: the run's form, else pt
    moments: str | None = None     # shards: AdamW moments "bf16" | "fp32"; default: the run's, else bf16
    shard_size: int | None = None  # shards: bytes per file at most; default: the run's, else 16 MiB
    kernel_cache: str | None = None  # Triton's cache on CUDA; default $TRITON_CACHE_DIR, else OUT/triton-cache


class Dist:
    """Rank / world from torchrun's environment (or a single process)."""

    def __init__(self, device_type: str, fsdp: bool = False):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False  # whether close() destroys the group (not one the caller made)
        if dist.is_initialized():
            return
        backend = "nccl" if device_type == "cuda" else "gloo"
        if self.world > 1:
            dist.init_process_group(backend)
            self.owned = True
        elif fsdp:  # FSDP needs a process group even alone: one in memory when torchrun made none
            if "MASTER_ADDR" in os.environ:
                dist.init_process_group(backend)
            else:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.owned = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on tensors with ≥ 2 dims only (LlamaGen)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _param_names(optimizer, model: torch.nn.Module) -> list[list[str]]:
    """The parameter names of each optimizer group, in the optimizer's order (unwrapped model)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def optim_state_by_name(state: dict, names: list[list[str]]) -> dict:
    """A torch optimizer state dict (parameters numbered in group order) keyed by parameter name
    instead, the form FSDP's full optimizer state dict has: one checkpoint resumes with or without
    FSDP, on any number of GPUs."""
    order = [n for group in names for n in group]
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g, group in
                             zip(state["param_groups"], names)]}


def optim_state_by_index(state: dict, names: list[list[str]]) -> dict:
    """Inverse of `optim_state_by_name` for an optimizer whose groups hold `names` (in its order)."""
    saved = [set(g["params"]) for g in state["param_groups"]]
    if len(saved) != len(names):
        raise DataError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this model's {len(names)}")
    for k, (s, n) in enumerate(zip(saved, names)):
        if s != set(n):
            extra, missing = sorted(s - set(n)), sorted(set(n) - s)
            raise DataError(f"the checkpoint's optimizer group {k} names other parameters than this model's: "
                            f"{len(extra)} only in the checkpoint{' (' + extra[0] + ', ...)' if extra else ''}, "
                            f"{len(missing)} only in the model{' (' + missing[0] + ', ...)' if missing else ''}")
    index = {n: i for i, n in enumerate(n for group in names for n in group)}
    return {"state": {index[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in group]} for g, group in
                             zip(state["param_groups"], names)]}


BUCKET_STREAM = 0x6275636B  # the numpy seed-sequence key of the grid choice, apart from the batch draws


def bucket_batch_sizes(grids: list[tuple[int, int]], batch_size: int) -> list[int]:
    """The global batch of a step at each grid: `batch_size` sequences at the smallest grid, about
    as many tokens at the others (batch_size·T_min/T rounded to a multiple of q = gcd(batch_size,
    8), at least q), so a step costs about the same time and memory whatever its grid and one
    --batch-size, --grad-accum and memory check hold for all. Independent of the process count,
    as the batches are."""
    q = math.gcd(batch_size, 8)
    t_min = min(h * w for h, w in grids)
    return [max(q, (2 * batch_size * t_min + h * w * q) // (2 * h * w * q) * q) for h, w in grids]


def bucket_of_step(weights: list[float], seed: int, step: int) -> int:
    """The grid (index into `weights`) whose code set gives the whole global batch of `step`:
    k with probability weights[k] / sum, a pure function of (weights, seed, step) as
    `batch_indices` is, so a resumed run and every rank draw the same grid. One grid: 0."""
    if len(weights) == 1:
        return 0
    u = np.random.default_rng([BUCKET_STREAM, seed, step]).random()
    edges = np.cumsum(np.asarray(weights, dtype=np.float64))
    return min(int(np.searchsorted(edges / edges[-1], u, side="right")), len(weights) - 1)


def step_batch(sizes: list[int], batches: list[int], weights: list[float], seed: int,
               step: int) -> tuple[int, torch.Tensor]:
    """(grid k, the global batch's indices into code set k) of `step`, for code sets of `sizes`
    grids with global batches `batches` (`bucket_batch_sizes`). With one code set this is
    `batch_indices` alone, as before there were several."""
    k = bucket_of_step(weights, seed, step)
    return k, batch_indices(sizes[k], batches[k], seed, step)


def batch_indices(n_items: int, global_batch: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of `step`: a pure function of (seed, step), independent of the ranks."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n_items, (global_batch,), generator=g)


def lr_at(step: int, args: GPTTrainArgs) -> float:
    """The learning rate of step `step` (counted from 0): rising linearly over the first --warmup
    steps ((step + 1) / warmup of --lr), then --lr, and over the last --cooldown steps of --steps
    falling linearly towards --min-lr, which it would reach at step --steps (the first cool-down
    step takes --lr, the last min_lr + (lr - min_lr) / cooldown: no step is spent at the floor).
    Where warm-up and cool-down overlap, the lower of the two. Linear rather than cosine: a linear
    fall to the end is as good as cosine in the warm-up/stable/decay studies (Hägele et al. 2024)
    and a resumed or extended run can read it off the step alone."""
    lr = args.lr
    if args.warmup and step < args.warmup:
        lr = args.lr * (step + 1) / args.warmup
    if args.cooldown and step >= args.steps - args.cooldown:
        lr = min(lr, args.lr - (args.lr - args.min_lr) * (step - (args.steps - args.cooldown)) / args.cooldown)
    return lr


# Parameters the model stores fused (one matrix, rows stacked in this order) that checkpoints
# from before the fusion hold separately; the model converts its own state dict on load, the
# optimizer state is converted here.
FUSED_PARAMETERS = {
    "attention.qfv.weight": ("attention.q_proj.weight", "attention.f_proj.weight", "attention.i_proj.weight"),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}


def fuse_optimizer_state(state: dict, names) -> dict:
    """A name-keyed optimizer state (`optim_state_by_name`) from before the fusion, converted for
    a model whose parameters are `names`: for every fused parameter the model has and the state
    lacks, its parts' entries become one — tensors (AdamW's exp_avg, exp_avg_sq `[rows, d]`) are
    concatenated along dim 0 in FUSED_PARAMETERS order, scalars (`step`) must agree and are kept
    once — and the group lists the fused name where the first part was. A state that already
    matches is returned unchanged; a partial or inconsistent one is one DataError line."""
    wanted = set(names)
    listed = {n for g in state["param_groups"] for n in g["params"]}
    merges = {}
    for name in sorted(wanted - listed):
        for suffix, parts in FUSED_PARAMETERS.items():
            if name.endswith(suffix):
                old = [name[: -len(suffix)] + p for p in parts]
                if any(o in listed for o in old):
                    missing = [o for o in old if o not in listed]
                    if missing:
                        raise DataError(f"the checkpoint's optimizer has part of {name} but not {missing[0]}")
                    merges[name] = old
    if not merges:
        return state
    entries, groups = dict(state["state"]), [dict(g, params=list(g["params"])) for g in state["param_groups"]]
    for name, old in merges.items():
        group = next(g for g in groups if old[0] in g["params"])
        if not all(o in group["params"] for o in old):
            raise DataError(f"the checkpoint's optimizer puts the parts of {name} in different parameter groups")
        group["params"][group["params"].index(old[0])] = name
        for o in old[1:]:
            group["params"].remove(o)
        parts = [entries.pop(o, None) for o in old]
        if all(p is None for p in parts):
            continue
        if any(p is None for p in parts) or any(set(p) != set(parts[0]) for p in parts):
            raise DataError(f"the checkpoint's optimizer holds different state for the parts of {name}")
        merged = {}
        for key, first in parts[0].items():
            if isinstance(first, torch.Tensor) and first.dim() > 0:
                merged[key] = torch.cat([p[key] for p in parts], dim=0)
            elif all(torch.equal(torch.as_tensor(p[key]), torch.as_tensor(first)) for p in parts):
                merged[key] = first
            else:
                raise DataError(f"the checkpoint's optimizer has different {key!r} for the parts of {name}")
        entries[name] = merged
    return {"state": entries, "param_groups": groups}


def _model_config(preset: str, overrides: dict, manifest: dict) -> LasadConfig:
    h, w = manifest["grid"]
    try:
        return LasadConfig.from_preset(preset, vocab_size=int(manifest["vocab_size"]),
                                       num_classes=int(manifest["num_classes"]), grid_height=int(h),
                                       grid_width=int(w), class_names=manifest.get("class_names"), **overrides)
    except (TypeError, ValueError) as e:
        raise DataError(f"--preset {preset} with --set {overrides}: {one_line(e)}") from None


def resolve_args(args: GPTTrainArgs, checkpoint: dict | None, source: Path, found: str | None = None) -> GPTTrainArgs:
    """`args` with every hyper-parameter filled in: given > last.pt's (on resume) > DEFAULTS; a
    given one that differs from the run's is refused. Overrides are compared by the model they
    make (`check_same_model`). How the state is saved may change: --resume-format given > the form
    resumed from (`found`) > pt; --moments and --shard-size given > the run's > bf16, 16 MiB."""
    stored = checkpoint.get("args", {}) if checkpoint is not None else None
    given = {k: getattr(args, k) for k in DEFAULTS if k != "overrides"}
    values = resolve_hyperparameters(given, DEFAULTS, stored, source)
    if stored is None:
        values["overrides"] = dict(args.overrides or {})
    else:
        values["overrides"] = dict(stored.get("overrides") or {})
    accum = args.grad_accum if args.grad_accum is not None else (stored or {}).get("grad_accum", 1)
    if stored is not None and accum != stored.get("grad_accum", 1):
        print(f"lasad-train gpt: --grad-accum {accum} instead of the run's {stored.get('grad_accum', 1)}: "
              "the same update in other micro-batches", file=sys.stderr)
    if stored is not None and values["cooldown"] and args.steps != stored.get("steps", args.steps):
        print(f"lasad-train gpt: --steps {args.steps} instead of the run's {stored.get('steps')} moves its "
              f"cool-down (the last {values['cooldown']} steps)", file=sys.stderr)
    fmt = args.resume_format or found or "pt"
    if fmt == "pt" and (args.moments is not None or args.shard_size is not None):
        raise DataError(f"--{'moments' if args.moments is not None else 'shard-size'} applies to --resume-format "
                        "shards (last.pt keeps the whole state in its own precision, in one file)")
    kept = stored or {}
    moments = args.moments or (kept.get("moments") if kept.get("moments") in MOMENT_CHOICES else "bf16")
    shard = kept.get("shard_size")
    shard = args.shard_size or (shard if isinstance(shard, int) and shard >= MIN_SHARD_BYTES else DEFAULT_SHARD_BYTES)
    return dataclasses.replace(args, **values, grad_accum=accum, resume_format=fmt, moments=moments, shard_size=shard)


def check_same_model(args: GPTTrainArgs, given_overrides: dict | None, manifest: dict, codes_count: int,
                     checkpoint: dict, source: Path) -> None:
    """On resume: the model that --preset/--set and the code sets make must be the run's (one line
    naming the first difference), and the code sets must hold as many grids (the batches are drawn
    by index), of the same sizes in the same order (the steps choose a grid by index)."""
    overrides = args.overrides if given_overrides is None else given_overrides
    built = _model_config(args.preset, overrides, manifest)
    _require_same_config(built, LasadConfig.from_dict(checkpoint["config"]), args, overrides, source,
                         "resuming would not continue the same run")
    count = checkpoint.get("codes_count")
    if count is not None and count != codes_count:
        raise DataError(f"{source} was trained on {count} code grids, {args.codes} holds {codes_count}: "
                        "resuming would not continue the same run")
    grids = (checkpoint.get("meta") or {}).get("trained_grids") or [[built.grid_height, built.grid_width]]
    if grids != manifest["trained_grids"]:
        raise DataError(f"{source} was trained on code sets of {_sizes(grids)} grids, {args.codes} hold "
                        f"{_sizes(manifest['trained_grids'])}: resuming would not continue the same run")


def _sizes(grids) -> str:
    return ", ".join(f"{h}x{w}" for h, w in grids)


def _require_same_config(built: LasadConfig, stored: LasadConfig, args: GPTTrainArgs, overrides: dict | None,
                         source, consequence: str) -> None:
    """One line naming the first field where the model the options make differs from `stored`."""
    built, stored = built.to_dict(), stored.to_dict()
    diff = [k for k in built if built[k] != stored.get(k)]
    if diff:
        k, more = diff[0], f" (and {len(diff) - 1} more field(s))" if len(diff) > 1 else ""
        cause = (f"the code set {args.codes} gives" if k in DATA_FIELDS else
                 f"--preset {args.preset} with --set/--row-start/--no-decay {overrides} gives")
        raise DataError(f"{source} was trained with {k}={one_line(repr(stored.get(k)), 80)}, {cause} "
                        f"{k}={one_line(repr(built[k]), 80)}{more}: {consequence}")


def init_weights(args: GPTTrainArgs, config: LasadConfig) -> dict:
    """The state dict of --init (any checkpoint form `read_checkpoint` takes), fp32, after checking
    that it holds the model the options and the code set make."""
    from lasad_engine.checkpoint import read_checkpoint, resolve_checkpoint
    source = resolve_checkpoint(args.init)
    stored, state, _ = read_checkpoint(source)
    _require_same_config(config, stored, args, args.overrides, source, "pass the --preset/--set it was trained with")
    return {k: v.float() for k, v in state.items()}


def _wrap(model: LasadGen, args: GPTTrainArgs, world: Dist, device: torch.device):
    if args.fsdp:
        from functools import partial

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
        mp = None
        if device.type == "cuda" and args.precision == "bf16":
            mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        return FSDP(model, auto_wrap_policy=partial(transformer_auto_wrap_policy, transformer_layer_cls={LasadBlock}),
                    sharding_strategy=ShardingStrategy.FULL_SHARD, mixed_precision=mp,
                    device_id=device if device.type == "cuda" else None, use_orig_params=True)
    if world.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


@contextlib.contextmanager
def _full_state(wrapped, args: GPTTrainArgs):
    """Full (unsharded) model / optimizer state dicts, on rank 0, for FSDP; plain ones otherwise."""
    if args.fsdp:
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            yield
    else:
        yield


@dataclass
class _Parts:
    """What one training process holds: the model, its wrapper (DDP / FSDP / the model itself),
    the EMA copy, the optimizer, and the model's parameter names (taken before wrapping)."""

    model: LasadGen
    wrapped: torch.nn.Module
    ema: LasadGen | None
    optimizer: torch.optim.Optimizer
    names: list[str]


def _build(args: GPTTrainArgs, config: LasadConfig, device: torch.device, world: Dist,
           checkpoint: dict | None, init: dict | None = None) -> _Parts:
    """Model, EMA, optimizer, initialised from the seed (or the --init weights) or restored from
    last.pt (RNG included)."""
    torch.manual_seed(args.seed)
    model = LasadGen(config).to(device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    elif init is not None:
        model.load_state_dict(init)
    ema = None
    if args.ema:
        ema = LasadGen(config).to(device).eval().requires_grad_(False)
        ema.load_state_dict(checkpoint["ema"] if checkpoint is not None and "ema" in checkpoint else model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    # the groups before wrapping: FSDP (use_orig_params) turns every parameter into a flat view of
    # its shard, which would hide the matrices from the weight-decay rule; the objects stay the same
    groups = param_groups(model, args.weight_decay)
    wrapped = _wrap(model, args, world, device)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")
    parts = _Parts(model, wrapped, ema, optimizer, names)
    if checkpoint is not None:
        saved = fuse_optimizer_state(checkpoint["optimizer"], names)
        if args.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            with _full_state(wrapped, args):
                saved = FSDP.optim_state_dict_to_load(wrapped, optimizer, saved)
        else:
            saved = optim_state_by_index(saved, _param_names(optimizer, model))
        optimizer.load_state_dict(saved)
        set_rng_state(checkpoint["rng"])
    return parts


def deploy_meta(step: int, args: GPTTrainArgs, manifest: dict) -> dict:
    meta = {"step": step, "tokenizer": manifest.get("tokenizer"), "ema": bool(args.ema),
            "codes": str(args.codes) if isinstance(args.codes, (str, Path)) else [str(c) for c in args.codes]}
    if manifest.get("trained_grids"):  # each grid the steps drew from, the config's first (lasad-run --grid)
        meta["trained_grids"] = manifest["trained_grids"]
    if args.init is not None:
        meta["init"] = str(args.init)  # steps count from these weights
    return meta


def write_deploy(path: Path, checkpoint: dict) -> None:
    """model.safetensors from the content of a last.pt: its EMA weights when the run keeps them."""
    with torch.device("meta"):  # no initialisation: it would consume the training RNG
        deploy = LasadGen(LasadConfig.from_dict(checkpoint["config"]))
    deploy.load_state_dict(checkpoint["ema"] if "ema" in checkpoint else checkpoint["model"], assign=True)
    meta = checkpoint.get("meta") or {"step": int(checkpoint["step"]), "ema": "ema" in checkpoint}
    save_checkpoint(path, deploy, meta=meta)


def deploy_step(path: Path) -> int | None:
    """The step a deploy file records (None: missing or unreadable)."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}")).get("step")
    except Exception:  # noqa: BLE001 - any unreadable file is rewritten
        return None


def save_training(out: Path, parts: _Parts, step: int, args: GPTTrainArgs, world: Dist, manifest: dict,
                  codes_count: int, elapsed: float = 0.0) -> None:
    """The resumable state (last.pt, or state/ with --resume-format shards), the commit point, then
    model.safetensors derived from it (rank 0 writes). A kill between the two leaves a deploy file
    of an earlier step, which the next --resume rewrites. Once one form is written the other goes,
    so OUT holds one state (a kill in between leaves both, and --resume reads the later)."""
    with _full_state(parts.wrapped, args):
        model_state = parts.wrapped.state_dict()
        if args.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            optim_state = FSDP.optim_state_dict(parts.wrapped, parts.optimizer)
        else:
            optim_state = optim_state_by_name(parts.optimizer.state_dict(), _param_names(parts.optimizer, parts.model))
    if not world.main:
        return
    obj = {"format": TRAIN_FORMAT, "format_version": TRAIN_VERSION, "step": step,
           "config": parts.model.config.to_dict(), "model": clean_state_dict(model_state),
           "optimizer": optim_state, "rng": rng_state(), "args": asdict(args), "world_size": world.world,
           "codes_count": codes_count, "meta": deploy_meta(step, args, manifest), "elapsed_s": float(elapsed)}
    if parts.ema is not None:
        obj["ema"] = parts.ema.state_dict()
    if args.resume_format == "shards":
        save_state(out / STATE_DIR, obj, shard_bytes=args.shard_size, moments=args.moments)
        (out / CHECKPOINT).unlink(missing_ok=True)
    else:
        with atomic_path(out / CHECKPOINT) as tmp:
            torch.save(obj, tmp)
        remove_state(out / STATE_DIR)
    write_deploy(out / DEPLOY, obj)


def read_state_checked(folder: Path) -> dict:
    """The checkpoint a state/ folder holds (`state.load_state`), with every field the trainer reads
    checked: the envelope, step, config, the model's and the EMA's tensors against the model the
    config makes, the optimizer's moments against their parameters, the RNG state. Anything else
    is one DataError line naming the index."""
    obj = load_state(folder)
    source = folder / INDEX

    def bad(what):
        return DataError(f"{source}: {what}; resume from a state this version of lasad-train wrote, "
                         "or start again with --overwrite")
    version = obj.get("format_version")
    if obj.get("format") != TRAIN_FORMAT or not isinstance(version, int) or not 1 <= version <= TRAIN_VERSION:
        raise bad(f"not a {TRAIN_FORMAT} state of format version 1 to {TRAIN_VERSION}")
    step = obj.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"step {step!r} is not a count of steps")
    for key in ("args", "config"):
        if not isinstance(obj.get(key), dict):
            raise bad(f"'{key}' is not an object")
    if not isinstance(obj.get("codes_count", 0), int) or not isinstance(obj.get("elapsed_s", 0.0), (int, float)):
        raise bad("'codes_count' or 'elapsed_s' is not a number")
    try:
        config = LasadConfig.from_dict(obj["config"])
        with torch.device("meta"):  # shapes only: no memory, no RNG
            expected = {k: tuple(v.shape) for k, v in LasadGen(config).state_dict().items()}
    except (TypeError, ValueError, KeyError) as e:
        raise bad(f"its config does not make a model ({one_line(e, 100)})") from None
    for key in ("model", "ema") if "ema" in obj else ("model",):
        state = obj[key]
        if not isinstance(state, dict) or set(state) != set(expected):
            found = set(state) if isinstance(state, dict) else set()
            raise bad(f"'{key}' does not hold the tensors of its config's model ({len(expected - found)} missing, "
                      f"{len(found - set(expected))} unexpected)")
        for name, shape in expected.items():
            t = state[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise bad(f"{key}/{name} is {got}, its config's model has {list(shape)}")
    optim = obj.get("optimizer")
    if not (isinstance(optim, dict) and isinstance(optim.get("state"), dict)
            and isinstance(optim.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optim["param_groups"])):
        raise bad("'optimizer' is not {state, param_groups: [{params, ...}]}")
    for name, entry in optim["state"].items():
        if name not in expected or not isinstance(entry, dict):
            raise bad(f"optimizer state for {name!r}, which its config's model has no parameter of")
        for key in MOMENT_KEYS:
            t = entry.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected[name]:
                got = list(t.shape) if isinstance(t, torch.Tensor) else "missing"
                raise bad(f"optimizer/state/{name}/{key} is {got}, the parameter {list(expected[name])}")
        if not isinstance(entry.get("step"), (torch.Tensor, int, float)):
            raise bad(f"optimizer/state/{name}/step is missing")
    check_rng_state(obj.get("rng"), source)
    return obj


def _repair_deploy(out: Path, checkpoint: dict, source: Path) -> None:
    """A deploy file of another step than the state's (a run stopped between its two saves) is
    derived again from the state (`source`: last.pt or state/index.json)."""
    path, step = out / DEPLOY, int(checkpoint["step"])
    found = deploy_step(path)
    if found != step:
        write_deploy(path, checkpoint)
        print(f"lasad-train gpt: {path} was {'from step ' + str(found) if found is not None else 'missing'}; "
              f"written again from {source.relative_to(out)} (step {step})", file=sys.stderr)


def _train_step(parts: _Parts, args: GPTTrainArgs, step: int, x: torch.Tensor, y: torch.Tensor, world: Dist,
                device: torch.device, width: int | None = None) -> torch.Tensor:
    """One optimizer step on this process's part of the batch, x int64 `[b, T]` of grids `width`
    tokens wide (the row-start rule; None: the config's), y int64 `[b]`: gradients summed over
    --grad-accum micro-batches (synced after the last), clipped, AdamW, EMA. Returns the batch's
    mean loss (a detached scalar)."""
    for group in parts.optimizer.param_groups:
        group["lr"] = lr_at(step, args)
    parts.optimizer.zero_grad(set_to_none=True)
    use_amp = device.type == "cuda" and args.precision == "bf16" and not args.fsdp
    loss = torch.zeros((), device=device)
    micro = len(x) // args.grad_accum
    for k in range(args.grad_accum):
        last = k == args.grad_accum - 1
        sync = contextlib.nullcontext() if last or world.world == 1 else parts.wrapped.no_sync()
        xs, ys = x[k * micro:(k + 1) * micro], y[k * micro:(k + 1) * micro]
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = parts.wrapped(xs, ys, width=width, backend=args.chunk_backend)
            part = F.cross_entropy(logits.float().flatten(0, 1), xs.flatten()) / args.grad_accum
            part.backward()
        loss += part.detach()
    if args.grad_clip:
        if args.fsdp:
            parts.wrapped.clip_grad_norm_(args.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(parts.wrapped.parameters(), args.grad_clip)
    parts.optimizer.step()
    if parts.ema is not None:
        with torch.no_grad():
            for pe, pm in zip(parts.ema.parameters(), parts.model.parameters()):
                pe.lerp_(pm.detach(), 1 - args.ema)
    return loss


def _clock(seconds: float) -> str:
    """1:02:03 / 2:03 for a progress line."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Progress:
    """The main rank's log.jsonl rows and progress: a tqdm bar, or with --no-progress one plain
    stderr line per logged step. `elapsed()` counts the run's training seconds over all its
    pieces (`elapsed` is what the checkpoint resumed from recorded)."""

    def __init__(self, args: GPTTrainArgs, world: Dist, device: torch.device, start: int, tokens_per_step: int,
                 path: Path, elapsed: float = 0.0):
        self.args, self.world, self.device, self.path = args, world, device, path
        self.tokens_per_step, self.t_last, self.step_last = tokens_per_step, time.perf_counter(), start
        self.t_start, self.elapsed_before = self.t_last, elapsed
        self.bar = None
        if args.progress and world.main:
            from tqdm import tqdm
            self.bar = tqdm(total=args.steps, initial=start, unit="step", desc="gpt", file=sys.stderr)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def log(self, done: int, step: int, loss: torch.Tensor) -> float:
        """Append the row of step `done` (all ranks take part in the mean); returns the loss. The
        ETA is the steps left to --steps at the rate since the previous row."""
        value = self.world.mean(loss).item()
        now = time.perf_counter()
        seconds = max(now - self.t_last, 1e-9)
        rate = self.tokens_per_step * (done - self.step_last) / seconds
        eta = (self.args.steps - done) * seconds / max(done - self.step_last, 1)
        self.t_last, self.step_last = now, done
        if self.world.main:
            lr, elapsed = lr_at(step, self.args), self.elapsed()
            row = {"step": done, "loss": value, "lr": lr, "tokens_per_s": rate, "world_size": self.world.world,
                   "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 1)}
            if self.device.type == "cuda":  # this rank's peak so far (FSDP vs DDP memory)
                row["max_memory_allocated_MiB"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.3g}", tok_s=f"{rate:,.0f}")
            else:
                print(f"step {done}/{self.args.steps}: loss {value:.4f}, lr {lr:.3g}, {rate:,.0f} tokens/s, "
                      f"elapsed {_clock(elapsed)}, eta {_clock(eta)}", file=sys.stderr, flush=True)
        return value

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _out_of_time(args: GPTTrainArgs, t_start: float, world: Dist, device: torch.device) -> bool:
    out = args.time_limit is not None and time.perf_counter() - t_start > args.time_limit
    if world.world > 1:  # every rank stops at the same step
        out = bool(world.mean(torch.tensor([float(out)], device=device)).item() > 0)
    return out


@dataclass
class _Bucket:
    """The code grids of one size: codes int64 `[n, h·w]`, labels int64 `[n]`, the global batch a
    step at this grid takes (`bucket_batch_sizes`) and the grid's weight in the choice of a step's
    grid (`bucket_of_step`)."""

    grid: tuple[int, int]
    codes: torch.Tensor
    labels: torch.Tensor
    batch: int
    weight: float


def _buckets(args: GPTTrainArgs, sets: list, world: Dist) -> list[_Bucket]:
    """The code sets of `load_code_sets` as buckets, checked against --mix, the processes and
    --grad-accum. Default weights: each set's token count, so that every code grid, whatever its
    size, is drawn about equally often (as if the sets were one)."""
    grids = [tuple(int(s) for s in m["grid"]) for _, _, m in sets]
    if args.mix is not None and len(args.mix) != len(sets):
        raise DataError(f"--mix {','.join(f'{w:g}' for w in args.mix)}: {len(args.mix)} weight(s) for "
                        f"{len(sets)} code set(s); give one weight per code set, in their order")
    weights = args.mix or [float(len(c) * h * w) for (c, _, _), (h, w) in zip(sets, grids)]
    batches = bucket_batch_sizes(grids, args.batch_size)
    unit = world.world * args.grad_accum
    for (h, w), b in zip(grids, batches):
        if b % unit:
            raise DataError(f"--batch-size {args.batch_size} gives {b} sequences per step at {h}x{w} (about as many "
                            f"tokens as at the smallest grid), not a multiple of the {world.world} process(es) x "
                            f"--grad-accum {args.grad_accum}: code sets of several grid sizes need a --batch-size "
                            "that is a multiple of 8 and processes x --grad-accum dividing 8")
    return [_Bucket(g, torch.as_tensor(np.asarray(c), dtype=torch.int64).flatten(1),
                    torch.as_tensor(np.asarray(l), dtype=torch.int64), b, float(wt))
            for (c, l, _), g, b, wt in zip(sets, grids, batches, weights)]


def _loop(args: GPTTrainArgs, parts: _Parts, buckets: list[_Bucket], start: int,
          world: Dist, device: torch.device, out: Path, manifest: dict, elapsed: float = 0.0) -> tuple[int, float]:
    """Steps start .. args.steps (or until --time-limit): returns (last step done, last logged loss).
    Each step's whole global batch comes from one grid's code set (`step_batch`) and the forward
    gets that grid's width."""
    sizes, batches, weights = ([len(b.codes) for b in buckets], [b.batch for b in buckets],
                               [b.weight for b in buckets])
    tokens = sum(b.weight * b.batch * b.codes.shape[1] for b in buckets) / sum(weights)  # per step, expected
    progress = _Progress(args, world, device, start, round(tokens), out / "log.jsonl", elapsed)
    t_start, done, last_loss = time.perf_counter(), start, float("nan")
    try:
        for step in range(start, args.steps):
            k, idx = step_batch(sizes, batches, weights, args.seed, step)
            b, local = buckets[k], batches[k] // world.world
            idx = idx[world.rank * local:(world.rank + 1) * local]
            x, y = b.codes[idx].to(device, non_blocking=True), b.labels[idx].to(device, non_blocking=True)
            try:
                loss = _train_step(parts, args, step, x, y, world, device, width=b.grid[1])
            except torch.cuda.OutOfMemoryError:
                raise DataError(f"out of GPU memory at step {step + 1} with micro-batches of "
                                f"{local // args.grad_accum} sequences ({args.preset}): pass a larger --grad-accum "
                                "(the same update in smaller micro-batches), a smaller --batch-size or --preset") from None
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                last_loss = progress.log(done, step, loss)
            progress.tick()
            out_of_time = _out_of_time(args, t_start, world, device)
            if args.save and (done % args.save_every == 0 or done == args.steps or out_of_time):
                save_training(out, parts, done, args, world, manifest, sum(sizes), progress.elapsed())
                world.barrier()
            if out_of_time and done < args.steps:
                break
    finally:
        progress.close()
    return done, last_loss


def _check_options(args: GPTTrainArgs, world: Dist) -> None:
    if args.fsdp and args.ema:
        raise DataError("--ema is not supported together with --fsdp")
    if args.batch_size % world.world:
        raise DataError(f"--batch-size {args.batch_size} is not divisible by the {world.world} processes")
    if args.grad_accum < 1 or (args.batch_size // world.world) % args.grad_accum:
        raise DataError(f"--grad-accum {args.grad_accum}: the batch per process ({args.batch_size // world.world}) "
                        "must be a multiple of it")
    if args.cooldown > args.steps:
        raise DataError(f"--cooldown {args.cooldown} is longer than --steps {args.steps}: the cool-down is the last "
                        "steps of the run (0 to --steps)")
    if args.min_lr > args.lr:
        raise DataError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the cool-down falls from --lr to --min-lr")


def kernel_cache(args: GPTTrainArgs, out: Path, environ=os.environ) -> Path:
    """Where Triton keeps its compiled kernels and autotuning results: --kernel-cache, else
    $TRITON_CACHE_DIR, else OUT/triton-cache (beside the state, so a resumed run on the same
    machine finds its kernels, and the folder can travel with the run)."""
    if args.kernel_cache is not None:
        return Path(args.kernel_cache).absolute()
    if environ.get("TRITON_CACHE_DIR"):
        return Path(environ["TRITON_CACHE_DIR"])
    return (out / "triton-cache").absolute()


def use_kernel_cache(path: Path, environ=os.environ) -> None:
    """Point Triton at `path` (read when a kernel is compiled or tuned, so before the first
    training step is early enough) and keep autotuning results there too: Triton's
    TRITON_CACHE_AUTOTUNING and fla's FLA_CACHE_RESULTS (on by default in fla-core 0.6; both are
    read when fla is imported, so a value already set is left as it is)."""
    environ["TRITON_CACHE_DIR"] = str(path)
    environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    environ.setdefault("FLA_CACHE_RESULTS", "1")


def train_gpt(args: GPTTrainArgs) -> dict:
    """Train (or resume) and return a summary dict; see the module docstring."""
    device = resolve_device(args.device)
    if args.fsdp and device.type != "cuda":
        raise DataError(f"--fsdp needs CUDA devices (torch's FSDP has no CPU path), got device={device}; "
                        "drop --fsdp to train with DDP")
    world = Dist(device.type, fsdp=args.fsdp)
    try:
        return _train(args, world, device)
    finally:  # also on errors: an in-process caller keeps no stale process group
        world.close()


def _train(args: GPTTrainArgs, world: Dist, device: torch.device) -> dict:
    """train_gpt inside its process group: data, run folder, hyper-parameters, memory, model, loop."""
    from .codes import load_code_sets
    from .memory import check_training_memory

    if device.type == "cuda" and world.world > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    sets = load_code_sets([args.codes] if isinstance(args.codes, (str, Path)) else args.codes)
    # the first code set's grid is the model's (its default grid); every set's is a trained one
    manifest = {**sets[0][2], "trained_grids": [[int(s) for s in m["grid"]] for _, _, m in sets]}
    with RunFolder(args.out, fmt=TRAIN_FORMAT, max_version=TRAIN_VERSION, deploy=DEPLOY, resume=args.resume,
                   overwrite=args.overwrite, main=world.main, state=(STATE_DIR, read_state_checked)) as run:
        checkpoint, run.checkpoint = run.checkpoint, None
        given_overrides = args.overrides
        args = resolve_args(args, checkpoint, run.ckpt_path, run.format)
        _check_options(args, world)
        buckets = _buckets(args, sets, world)
        del sets
        config = _model_config(args.preset, args.overrides, manifest)
        start, init = 0, None
        if args.init is not None and checkpoint is not None:
            raise DataError("--init starts a new run from given weights, --resume continues OUT's run: pass one")
        if args.init is not None:
            init = init_weights(args, config)
        if checkpoint is not None:
            check_same_model(args, given_overrides, manifest, sum(len(b.codes) for b in buckets), checkpoint,
                             run.ckpt_path)
            start = int(checkpoint["step"])
            if start > args.steps:
                raise DataError(f"{run.ckpt_path} is at step {start}, past --steps {args.steps}")
        if args.memory_check:  # at the grid whose steps hold the most tokens (all hold about as many)
            heavy = max(buckets, key=lambda b: b.batch * b.codes.shape[1])
            check_training_memory(dataclasses.replace(config, grid_height=heavy.grid[0], grid_width=heavy.grid[1]),
                                  preset=args.preset, batch_size=heavy.batch, grad_accum=args.grad_accum,
                                  world=world.world, device=device, ema=bool(args.ema), fsdp=args.fsdp)
        if device.type == "cuda":
            use_kernel_cache(kernel_cache(args, run.out))
        parts = _build(args, config, device, world, checkpoint, init)
        del init
        run.start(start)
        if checkpoint is not None and args.save and world.main:
            _repair_deploy(run.out, checkpoint, run.ckpt_path)
        elapsed = checkpoint.get("elapsed_s", 0.0) if checkpoint is not None else 0.0
        elapsed = float(elapsed) if isinstance(elapsed, (int, float)) and math.isfinite(elapsed) and elapsed >= 0 \
            else 0.0  # an older or damaged record counts from this piece
        del checkpoint
        done, last_loss = _loop(args, parts, buckets, start, world, device, run.out, manifest, elapsed)
    return {"steps": done, "complete": done == args.steps, "final_loss": last_loss, "world_size": world.world,
            "out": str(run.out), "resumed_from": start if args.resume else None,
            "parameters": parts.model.num_parameters() if not args.fsdp else None}
