"""`lasad-train gpt`: train LASADGen on token codes (LlamaGen's recipe), on one device or under
`torchrun` (DDP; FSDP for the large presets), resumable from its own checkpoints.

    lasad-train gpt CODES OUT --preset lasad-B --steps 1000 --batch-size 256
    torchrun --nproc_per_node 2 -m lasad_train.cli gpt CODES OUT --preset lasad-XL --fsdp ...

Defaults follow LlamaGen's `train_c2i.py`: AdamW (0.9, 0.95), weight decay 0.05 on tensors with
≥ 2 dims only, lr 1e-4 constant (optional linear warm-up), grad-norm clip 1.0, bf16 autocast on
CUDA, class dropout 0.1 (in the model), optional EMA. The batch of step s is drawn from a
generator seeded with (seed, s) and split across ranks, so a resumed run and a run on any number
of processes see the same global batches. OUT holds `last.pt` (model, optimizer state keyed by
parameter name, step, RNG, config: resume with --resume, with or without FSDP, on any number of
GPUs), `model.safetensors` (the deploy checkpoint, EMA weights when EMA is on) and `log.jsonl`
(step, loss, lr, tokens/s, and on CUDA the rank's peak memory). `--grad-accum N` splits each
process's batch into N micro-batches; `--no-save` writes the log only.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lasad_engine import LasadConfig, LasadGen, save_checkpoint
from lasad_engine.cli import OneLineCommand
from lasad_engine.params import resolve_device
from lasad_engine.config import LASAD_PRESET_NAMES
from lasad_engine.io import atomic_path
from lasad_engine.model import LasadBlock

from .formats import DataError, read_training_checkpoint, rng_state, set_rng_state

TRAIN_FORMAT = "lasad-train"


@dataclass
class GPTTrainArgs:
    codes: str
    out: str
    preset: str = "lasad-B"
    overrides: dict = field(default_factory=dict)  # LasadConfig fields (row_start, dropouts, ...)
    steps: int = 1000
    batch_size: int = 256          # global, over all ranks
    lr: float = 1e-4
    warmup: int = 0
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    grad_accum: int = 1            # micro-batches per step on each process (same update, less memory)
    ema: float = 0.0               # EMA decay (0 = off), e.g. 0.9999
    seed: int = 0
    precision: str = "bf16"        # autocast dtype on CUDA ("fp32" = off)
    fsdp: bool = False
    chunk_backend: str | None = None  # "fla" | "torch"; default fla on CUDA, torch on CPU
    save_every: int = 500
    log_every: int = 10
    device: str | None = None
    resume: bool = False
    progress: bool = True
    time_limit: float | None = None  # seconds: stop after the step that crosses it, save, resume later
    save: bool = True              # False: write the log only (benchmark runs)


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


def batch_indices(n_items: int, global_batch: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of `step`: a pure function of (seed, step), independent of the ranks."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n_items, (global_batch,), generator=g)


def lr_at(step: int, args: GPTTrainArgs) -> float:
    if args.warmup and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr


def _model_config(args: GPTTrainArgs, manifest: dict) -> LasadConfig:
    h, w = manifest["grid"]
    return LasadConfig.from_preset(args.preset, vocab_size=int(manifest["vocab_size"]),
                                   num_classes=int(manifest["num_classes"]), grid_height=int(h), grid_width=int(w),
                                   class_names=manifest.get("class_names"), **args.overrides)


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


def save_training(out: Path, wrapped, inner: LasadGen, optimizer, step: int, args: GPTTrainArgs, world: Dist,
                  ema: LasadGen | None, manifest: dict) -> None:
    with _full_state(wrapped, args):
        model_state = wrapped.state_dict()
        if args.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            optim_state = FSDP.optim_state_dict(wrapped, optimizer)
        else:
            optim_state = optim_state_by_name(optimizer.state_dict(), _param_names(optimizer, inner))
    if not world.main:
        return
    from lasad_engine.io import clean_state_dict
    model_state = clean_state_dict(model_state)
    obj = {"format": TRAIN_FORMAT, "format_version": 1, "step": step, "config": inner.config.to_dict(),
           "model": model_state, "optimizer": optim_state, "rng": rng_state(), "args": asdict(args),
           "world_size": world.world}
    if ema is not None:
        obj["ema"] = ema.state_dict()
    with atomic_path(out / "last.pt") as tmp:
        torch.save(obj, tmp)
    with torch.device("meta"):  # no initialisation: it would consume the training RNG
        deploy = LasadGen(inner.config)
    deploy.load_state_dict(ema.state_dict() if ema is not None else model_state, assign=True)
    save_checkpoint(out / "model.safetensors", deploy, meta={
        "step": step, "tokenizer": manifest.get("tokenizer"), "codes": str(args.codes), "ema": ema is not None})


def train_gpt(args: GPTTrainArgs) -> dict:
    """Train (or resume) and return a summary dict; see the module docstring."""
    device = resolve_device(args.device)
    if args.fsdp and device.type != "cuda":
        raise DataError(f"--fsdp needs CUDA devices (torch's FSDP has no CPU path), got device={device}; "
                        "drop --fsdp to train with DDP")
    if args.fsdp and args.ema:
        raise DataError("--ema is not supported together with --fsdp")
    world = Dist(device.type, fsdp=args.fsdp)
    try:
        return _train(args, world, device)
    finally:  # also on errors: an in-process caller keeps no stale process group
        world.close()


def _train(args: GPTTrainArgs, world: Dist, device: torch.device) -> dict:
    """train_gpt inside its process group."""
    from .codes import load_codes

    if device.type == "cuda" and world.world > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if args.batch_size % world.world:
        raise DataError(f"--batch-size {args.batch_size} is not divisible by the {world.world} processes")
    if args.grad_accum < 1 or (args.batch_size // world.world) % args.grad_accum:
        raise DataError(f"--grad-accum {args.grad_accum}: the batch per process ({args.batch_size // world.world}) "
                        "must be a multiple of it")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    codes, labels, manifest = load_codes(args.codes)
    codes = torch.as_tensor(np.asarray(codes), dtype=torch.int64).flatten(1)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    start, resumed = 0, None
    if args.resume and (out / "last.pt").is_file():
        resumed = read_training_checkpoint(out / "last.pt", TRAIN_FORMAT, 1, "format_version")
        config = LasadConfig.from_dict(resumed["config"])
        start = int(resumed["step"])
    else:
        config = _model_config(args, manifest)
    torch.manual_seed(args.seed)
    model = LasadGen(config).to(device)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    ema = None
    if args.ema:
        ema = LasadGen(config).to(device).eval().requires_grad_(False)
        ema.load_state_dict(resumed["ema"] if resumed is not None and "ema" in resumed else model.state_dict())
    # the groups before wrapping: FSDP (use_orig_params) turns every parameter into a flat view of
    # its shard, which would hide the matrices from the weight-decay rule; the objects stay the same
    groups = param_groups(model, args.weight_decay)
    wrapped = _wrap(model, args, world, device)
    optimizer = torch.optim.AdamW(groups, lr=args.lr,
                                  betas=(args.beta1, args.beta2), fused=device.type == "cuda")
    if resumed is not None:
        if args.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            with _full_state(wrapped, args):
                state = FSDP.optim_state_dict_to_load(wrapped, optimizer, resumed["optimizer"])
            optimizer.load_state_dict(state)
        else:
            optimizer.load_state_dict(optim_state_by_index(resumed["optimizer"], _param_names(optimizer, model)))
        set_rng_state(resumed["rng"])
    local = args.batch_size // world.world
    use_amp = device.type == "cuda" and args.precision == "bf16" and not args.fsdp
    log_path = out / "log.jsonl"
    bar = None
    if args.progress and world.main:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, unit="step", desc="gpt")
    wrapped.train()
    tokens_per_step = args.batch_size * codes.shape[1]
    t_last, step_last, last_loss = time.perf_counter(), start, float("nan")
    t_start, done = time.perf_counter(), start
    for step in range(start, args.steps):
        idx = batch_indices(len(codes), args.batch_size, args.seed, step)[world.rank * local:(world.rank + 1) * local]
        x, y = codes[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        micro = local // args.grad_accum
        for k in range(args.grad_accum):  # gradients summed over micro-batches, synced after the last
            last = k == args.grad_accum - 1
            sync = contextlib.nullcontext() if last or world.world == 1 else wrapped.no_sync()
            xs, ys = x[k * micro:(k + 1) * micro], y[k * micro:(k + 1) * micro]
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = wrapped(xs, ys, chunk_backend=args.chunk_backend)
                part = F.cross_entropy(logits.float().flatten(0, 1), xs.flatten()) / args.grad_accum
                part.backward()
            loss += part.detach()
        if args.grad_clip:
            (wrapped.clip_grad_norm_ if args.fsdp else
             (lambda c: torch.nn.utils.clip_grad_norm_(wrapped.parameters(), c)))(args.grad_clip)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm.detach(), 1 - args.ema)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            last_loss = world.mean(loss.detach()).item()
            now = time.perf_counter()
            rate = tokens_per_step * (done - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            if world.main:
                with open(log_path, "a") as f:
                    row = {"step": done, "loss": last_loss, "lr": lr_at(step, args), "tokens_per_s": rate,
                           "world_size": world.world}
                    if device.type == "cuda":  # this rank's peak so far (FSDP vs DDP memory)
                        row["max_memory_allocated_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
                    f.write(json.dumps(row) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{rate:,.0f}")
        if bar is not None:
            bar.update(1)
        out_of_time = args.time_limit is not None and time.perf_counter() - t_start > args.time_limit
        if world.world > 1:  # every rank stops at the same step
            flag = torch.tensor([float(out_of_time)], device=device)
            out_of_time = bool(world.mean(flag).item() > 0)
        if args.save and (done % args.save_every == 0 or done == args.steps or out_of_time):
            save_training(out, wrapped, model, optimizer, done, args, world, ema, manifest)
            world.barrier()
        if out_of_time and done < args.steps:
            break
    if bar is not None:
        bar.close()
    return {"steps": done, "complete": done == args.steps, "final_loss": last_loss, "world_size": world.world,
            "out": str(out), "parameters": model.num_parameters() if not args.fsdp else None}


@click.command("gpt", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("codes", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", default="lasad-B", show_default=True, type=click.Choice(LASAD_PRESET_NAMES, case_sensitive=False))
@click.option("--row-start", type=click.Choice(["none", "unit", "reset"]), default=None, help="Default: the preset's (unit).")
@click.option("--no-decay", is_flag=True, help="Ablation: linear attention without decay (log-decay 0 everywhere).")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Override any LasadConfig field (JSON value).")
@click.option("--steps", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Global batch.")
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--warmup", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--weight-decay", default=0.05, show_default=True, type=click.FloatRange(min=0))
@click.option("--grad-clip", default=1.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1),
              help="Micro-batches per step on each process: the same update in less memory.")
@click.option("--ema", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="EMA decay (0 = off).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--fsdp", is_flag=True, help="Fully sharded data parallel (under torchrun; alone, on one GPU), bf16 mixed precision on CUDA.")
@click.option("--chunk-backend", type=click.Choice(["fla", "torch"]), default=None,
              help="LASAD training kernel (default: fla on CUDA, torch on CPU).")
@click.option("--save-every", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default=None)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--no-progress", is_flag=True)
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop (and save) after the step that crosses this many seconds; --resume continues.")
@click.option("--no-save", is_flag=True, help="Write the log only, no checkpoints (speed and memory runs).")
def gpt_cmd(codes, out, preset, row_start, no_decay, sets, steps, batch_size, lr, warmup, weight_decay, grad_clip,
            grad_accum,
            ema, seed, precision, fsdp, chunk_backend, save_every, log_every, device, resume, no_progress,
            time_limit, no_save):
    """Train LASADGen on a code set (from lasad-train codes)."""
    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"--set {item!r} is not FIELD=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if row_start:
        overrides["row_start"] = row_start
    if no_decay:
        overrides["decay"] = False
    try:
        LasadConfig.from_preset(preset, **overrides)
    except (TypeError, ValueError) as e:
        raise click.UsageError(" ".join(str(e).split())) from None
    args = GPTTrainArgs(codes=str(codes), out=str(out), preset=preset, overrides=overrides, steps=steps,
                        batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip, grad_accum=grad_accum,
                        ema=ema, seed=seed, precision=precision, fsdp=fsdp, chunk_backend=chunk_backend,
                        save_every=save_every,
                        log_every=log_every, device=device, resume=resume, progress=not no_progress,
                        time_limit=time_limit, save=not no_save)
    summary = train_gpt(args)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(summary))
