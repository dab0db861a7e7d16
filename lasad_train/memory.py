"""Memory a `lasad-train gpt` run needs, estimated before anything is allocated, and the memory
the machine has.

Activations are not guessed from a formula: the training forward runs on the meta device (shapes
only, no memory, ~0.1 s for lasad-B) under `torch.autograd.graph.saved_tensors_hooks`, which sees
every tensor autograd keeps for the backward pass — on a real CPU run the same hook counts the
same bytes. Two probes (1 and 2 sequences) give the part that grows with the micro-batch.

The peak of a step is the weights, gradients and AdamW moments, plus the saved activations and
what the backward pass allocates while it consumes them: gradients of the size of the saved
tensors, the largest two of which are the logits' (`[B, T, vocab]` fp32, the gradient of the
log-softmax and of the head's output). Measured on this project's 2-core CPU (peak RSS of two
AdamW steps, `torch` chunked form, 9 shapes from lasad-tiny to lasad-B, vocab 4096 and 16384):
the model `fixed + ACTIVATION_FACTOR × saved + 2 × largest + SLACK` holds every measured peak,
at 54–89 % of the estimate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .formats import DataError

ACTIVATION_FACTOR = 1.2
SLACK = 256 << 20
GiB = float(1 << 30)


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of one training process: `fixed` (weights, gradients, AdamW moments, the EMA copy),
    saved activations `base + per_sequence · micro_batch`, of which the largest tensor holds
    `largest · micro_batch`."""

    fixed: int
    base: int
    per_sequence: int
    largest: int

    def activations(self, micro_batch: int) -> int:
        """Saved activations and the backward pass's gradients of them, at their peak."""
        return int(ACTIVATION_FACTOR * (self.base + self.per_sequence * micro_batch) + 2 * self.largest * micro_batch)

    def total(self, micro_batch: int) -> int:
        return self.fixed + self.activations(micro_batch) + SLACK

    def largest_micro_batch(self, available: int) -> int:
        room = available - self.fixed - SLACK - ACTIVATION_FACTOR * self.base
        per = ACTIVATION_FACTOR * self.per_sequence + 2 * self.largest
        return max(0, math.floor(room / max(per, 1)))


def _saved_bytes(model, batch: int) -> tuple[int, int]:
    """Bytes autograd saves for one training forward + cross-entropy of `batch` sequences (meta),
    in all and in the largest tensor."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    params = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params:
            seen[id(base)] = base.numel() * base.element_size()
        return t

    tokens = torch.zeros(batch, cfg.grid_height * cfg.grid_width, dtype=torch.int64, device="meta")
    labels = torch.zeros(batch, dtype=torch.int64, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens, labels, backend="torch")
        F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    return sum(seen.values()), max(seen.values(), default=0)


def estimate(config, *, ema: bool = False, ddp: bool = False) -> TrainingMemory:
    """The memory of training `config` (a LasadConfig) in fp32 with AdamW on one process:
    4 bytes per parameter each for the weights and gradients, 8 for AdamW's two moments, 4 more
    for an EMA copy and for DDP's gradient buckets."""
    import torch

    from lasad_engine import LasadGen

    with torch.device("meta"):
        model = LasadGen(config).train()
    n = sum(p.numel() for p in model.parameters())
    (one, largest), (two, _) = _saved_bytes(model, 1), _saved_bytes(model, 2)
    return TrainingMemory(fixed=n * (16 + 4 * bool(ema) + 4 * bool(ddp)), base=max(0, 2 * one - two),
                          per_sequence=two - one, largest=largest)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_bytes(device=None) -> int | None:
    """Memory this process can still use: free CUDA memory on a CUDA `device`; on the CPU,
    Linux's MemAvailable, lowered to the control group's limit minus its usage (cgroup v2 or v1)
    where one is set. None where it cannot be read."""
    if device is not None and device.type == "cuda":
        import torch
        return torch.cuda.mem_get_info(device)[0]
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 1 << 60:
            avail = lim - use if avail is None else min(avail, lim - use)
    return avail


def advice(mem: TrainingMemory, available: int, local_batch: int, world: int) -> str:
    """What to change so that a run fits: --grad-accum (the same update), else the batch, else
    the preset."""
    fit = mem.largest_micro_batch(available)
    if fit >= 1:
        accum = next(k for k in range(1, local_batch + 1) if local_batch % k == 0 and local_batch // k <= fit)
        return (f"pass --grad-accum {accum} (the same update in micro-batches of {local_batch // accum}), "
                f"or a --batch-size of at most {fit * world}")
    return (f"choose a smaller --preset (the weights, gradients and optimizer state alone need "
            f"{mem.fixed / GiB:.1f} GiB)")


def check_training_memory(config, *, preset: str, batch_size: int, grad_accum: int, world: int,
                          device, ema: bool, fsdp: bool) -> None:
    """Refuse, in one line with advice, a run that cannot fit, before it allocates anything.

    CPU: the whole estimate against the available RAM (all processes of a torchrun on this host
    share it). CUDA: the weights, gradients and optimizer state against the free memory; the
    activations there depend on the kernels (flash-linear-attention keeps far less than the torch
    form this probe runs), so a step that runs out of GPU memory is caught instead (`gpt.py`)."""
    available = available_bytes(device)
    if available is None:
        return
    local_batch = batch_size // world
    micro = local_batch // grad_accum
    mem = estimate(config, ema=ema, ddp=world > 1 and not fsdp)
    if device.type == "cuda":
        fixed = mem.fixed // (world if fsdp else 1)
        if fixed + SLACK > available:
            raise DataError(f"{preset} needs about {fixed / GiB:.1f} GiB of GPU memory for its weights, gradients and "
                            f"AdamW state, but {available / GiB:.1f} GiB are free on {device}: choose a smaller "
                            f"--preset{'' if fsdp else ' or shard it over several GPUs with --fsdp'}")
        return
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    per_process = available // max(sharing, 1)
    need = mem.total(micro)
    if need > per_process:
        where = f"per process ({sharing} on this machine)" if sharing > 1 else "on this machine"
        raise DataError(
            f"training {preset} at --batch-size {batch_size} needs about {need / GiB:.1f} GiB of memory "
            f"(weights, gradients and AdamW state {mem.fixed / GiB:.1f} GiB, activations of micro-batches of "
            f"{micro}: {mem.activations(micro) / GiB:.1f} GiB), but {per_process / GiB:.1f} GiB are available "
            f"{where}: {advice(mem, per_process, local_batch, world)}; --no-memory-check skips this estimate")
