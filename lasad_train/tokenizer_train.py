"""`lasad-train tokenizer IMAGES OUT_DIR`: train the VQ image tokenizer (LlamaGen's recipe, minus LPIPS).

Losses, as LlamaGen ``tokenizer/tokenizer_image/vq_loss.py`` without the perceptual term (its VGG
backbone cannot be downloaded here):

    loss = rec_weight * MSE(x, x_rec) + l1_weight * L1(x, x_rec)
           + codebook_weight * (vq_loss + commit_loss + entropy_loss)
           [+ disc_weight * hinge_gen(D(x_rec))   with --gan, from step --disc-start on]

and, with ``--gan``, a PatchGAN discriminator (LlamaGen's ``NLayerDiscriminator``: BatchNorm,
LeakyReLU 0.2, N(0, 0.02) init) trained on ``disc_weight * hinge_d(D(x), D(x_rec))``.
Optimiser: Adam, lr 1e-4, betas (0.9, 0.95), gradient clipping at norm 1 (LlamaGen's
``vq_train.py`` defaults); bf16 autocast on CUDA only.

Data: the image set's train split (``formats.load_images(IMAGES, split=0)``), uint8 -> [-1, 1],
random horizontal flip. The batch of step ``s`` is a pure function of ``(seed, s)``: sample
positions ``s*B .. s*B+B-1`` of an endless sequence of epochs, each epoch a permutation drawn from
a generator seeded with ``(seed, epoch)``, flips drawn from a generator seeded with ``(seed, s)``.
So ``--resume`` needs no sampler state and continues exactly as an uninterrupted run would.

Files in OUT_DIR (the folder and resume rules are ``runs.py``'s):
    last.pt         resumable checkpoint (``torch.load(..., weights_only=True)`` reads it):
                    {"format": "lasad-vq-train", "format_version": 1, "step", "model", "optimizer",
                     ["discriminator", "optimizer_disc"], "rng": {torch, [cuda], numpy, python},
                     "config": VQConfig dict, "train": hyper-parameters}
    vq.safetensors  the deploy tokenizer (``lasad_engine.tokenizer.load_tokenizer`` reads it)
    log.jsonl       one JSON object per logged step
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lasad_engine.io import atomic_path, one_line
from lasad_engine.params import resolve_device
from lasad_engine.tokenizer import VQ_PRESETS, VQConfig, VQModel, load_tokenizer, save_tokenizer

from .formats import DataError, load_images, spread
from .runs import RunFolder, resolve_hyperparameters, rng_state, set_rng_state

CKPT_FORMAT, CKPT_VERSION = "lasad-vq-train", 1
DEPLOY = "vq.safetensors"
DEFAULT_PRESET = "vq-f4-demo"

# Hyper-parameters that define a run. On --resume they come from last.pt; passing a different
# value is an error (the resumed run would no longer be the same run).
DEFAULTS = {
    "preset": DEFAULT_PRESET,
    "batch_size": 64,
    "lr": 1e-4,
    "beta1": 0.9,           # LlamaGen vq_train.py --beta1
    "beta2": 0.95,          # LlamaGen vq_train.py --beta2
    "max_grad_norm": 1.0,   # LlamaGen vq_train.py --max-grad-norm (0 = off)
    "rec_weight": 1.0,      # LlamaGen --reconstruction-weight (L2)
    "l1_weight": 0.0,
    "codebook_weight": 1.0,  # LlamaGen --codebook-weight
    "gan": False,
    "disc_start": 20000,    # LlamaGen --disc-start
    "disc_weight": 0.5,     # LlamaGen --disc-weight
    "seed": 0,
    "limit": None,          # train on this many images, spread over the train split (None: all)
    "init": None,           # the tokenizer file whose weights started the run (--init; None: seeded)
}


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def psnr_db(pred: torch.Tensor, target: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """Mean over the batch of the per-image PSNR in dB, ``10 log10(max_val^2 / MSE)``.

    ``pred`` and ``target`` are ``[B, ...]`` images on the same scale (``[0, 1]`` by default);
    computed in float64; an exact match counts as 100 dB rather than infinity.
    """
    a, b = pred.detach().double(), target.detach().double()
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(dim=1)
    return (10 * torch.log10(max_val ** 2 / mse.clamp_min(1e-10))).mean()


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (unclamped decoder output) -> [0, 1]."""
    return (x.float().clamp(-1, 1) + 1) / 2


# --------------------------------------------------------------------------------------------
# Discriminator (LlamaGen / taming-transformers PatchGAN)
# --------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN ``NLayerDiscriminator`` as in LlamaGen (``ndf`` 64, BatchNorm, 4x4 convolutions).
    ``n_layers`` is the number of stride-2 convolutions (3 in LlamaGen)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def disc_layers_for(size: int, wanted: int = 3) -> int:
    """Stride-2 layers the PatchGAN can have on ``size``-pixel images (its two final 4x4 stride-1
    convolutions each take one pixel off, so ``size / 2^n`` must be at least 3)."""
    n = wanted
    while n > 1 and size // 2 ** n < 3:
        n -= 1
    return n


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


# --------------------------------------------------------------------------------------------
# Deterministic data order
# --------------------------------------------------------------------------------------------


def _mix(seed: int, k: int, salt: int) -> int:
    """A generator seed from (seed, k, salt); distinct for distinct inputs in practical ranges."""
    return (int(seed) * 1_000_003 * 4 + int(k) * 4 + salt) % (2 ** 63)


class StepSampler:
    """Indices and flips of step ``s`` as a pure function of ``(seed, s)``: epochs are
    permutations of the ``n`` images; step ``s`` takes positions ``[s*B, (s+1)*B)``."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 1))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = step * self.batch_size + torch.arange(self.batch_size)
        epochs, offsets = pos // self.n, pos % self.n
        idx = torch.empty(self.batch_size, dtype=torch.int64)
        for e in epochs.unique().tolist():
            sel = epochs == e
            idx[sel] = self._perm(e)[offsets[sel]]
        g = torch.Generator().manual_seed(_mix(self.seed, step, 2))
        flips = torch.rand(self.batch_size, generator=g) < 0.5
        return idx, flips


def to_model_input(images_u8: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], mirrored where ``flips``."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if flips is not None:
        x = torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return x.contiguous()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: VQModel, images_u8, batch_size: int, device: torch.device, progress: bool = False) -> dict:
    """Encode + decode (the deploy path) every image of uint8 `[N, H, W, 3]`: mean per-image PSNR
    in dB and the fraction of the codebook the images use; a tqdm bar on stderr with `progress`."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    total, n = 0.0, len(images_u8)
    used = torch.zeros(model.config.codebook_size, dtype=torch.bool, device=device)
    bar = tqdm(total=n, disable=not progress, file=sys.stderr, unit="img", desc="held-out", dynamic_ncols=True)
    try:
        for i in range(0, n, batch_size):
            batch = torch.from_numpy(np.array(images_u8[i:i + batch_size])).to(device)
            x = to_model_input(batch)
            with _autocast(device):
                codes = model.encode(x)
                recon = model.decode_code(codes)
            used[codes.reshape(-1)] = True
            total += psnr_db(_to_unit(recon), _to_unit(x)).item() * len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return {"psnr": total / n if n else None, "codebook_usage": used.float().mean().item() if n else None,
            "images": n}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """The images of a run: train uint8 `[N, H, W, 3]` (on the GPU when it fits), held-out uint8
    `[M, H, W, 3]` (memory-mapped), and what identifies the training images (`key`)."""

    train: torch.Tensor
    held: np.ndarray
    manifest: dict
    key: dict


@dataclass
class _Nets:
    model: VQModel
    opt: torch.optim.Optimizer
    disc: PatchDiscriminator | None = None
    disc_opt: torch.optim.Optimizer | None = None


@dataclass
class _Schedule:
    steps: int
    save_every: int
    log_every: int
    progress: bool
    time_limit: float | None
    t_start: float


def _hyperparameters(given: dict, ckpt: dict | None, ckpt_path: Path, steps: int) -> dict:
    """The run's hyper-parameters (`runs.resolve_hyperparameters`), checked for a new run."""
    hp = resolve_hyperparameters(given, DEFAULTS, dict(ckpt["train"]) if ckpt is not None else None, ckpt_path)
    if ckpt is not None:
        if int(ckpt["step"]) > steps:
            raise DataError(f"{ckpt_path} is at step {ckpt['step']}, past --steps {steps}")
        return hp
    if hp["preset"] not in VQ_PRESETS:
        raise DataError(f"unknown preset {hp['preset']!r}; known: {', '.join(sorted(VQ_PRESETS))}")
    if int(hp["batch_size"]) < 1:
        raise DataError(f"batch_size must be >= 1 (got {hp['batch_size']})")
    if not hp["lr"] > 0:
        raise DataError(f"lr must be > 0 (got {hp['lr']})")
    return hp


@dataclass
class _Init:
    preset: str
    state: dict


def _init_tokenizer(path, preset: str | None, ckpt: dict | None) -> _Init | None:
    """The weights of --init and the preset whose config they have (one line if it is none, or not
    the --preset given, or the run resumes)."""
    if path is None:
        return None
    if ckpt is not None:
        raise DataError("--init starts a new run from a tokenizer's weights, --resume continues OUT_DIR's run: "
                        "pass one")
    try:
        model = load_tokenizer(path)
    except FileNotFoundError:
        raise DataError(f"--init {path}: no such file") from None
    except (ValueError, OSError, RuntimeError) as e:
        raise DataError(f"--init {path}: not a tokenizer ({one_line(e)})") from None
    names = [n for n, c in VQ_PRESETS.items() if c == model.config]
    if not names:
        raise DataError(f"--init {path}: its config is none of the presets ({', '.join(sorted(VQ_PRESETS))}); "
                        "the trainer builds presets only")
    if preset is not None and preset not in names:
        raise DataError(f"--init {path} is a {names[0]} tokenizer, not --preset {preset}: leave --preset out "
                        "or pass that one")
    return _Init(preset if preset is not None else names[0], model.state_dict())  # loading casts and copies


def _load_data(images_dir: Path, hp: dict, config: VQConfig, ckpt: dict | None, ckpt_path: Path,
               dev: torch.device) -> _Data:
    """The train split (`--limit`: spread over it), the held-out split, checked against the
    tokenizer's downsample factor and, on resume, against the images the run trained on."""
    train_u8, _, _, manifest = load_images(images_dir, None, split=0)
    held_u8 = load_images(images_dir, None, split=1)[0]
    if len(train_u8) == 0:
        raise DataError(f"{images_dir}: the image set has no training images (split 0)")
    f = config.downsample_factor
    H, W = train_u8.shape[1:3]
    if H % f or W % f:
        raise DataError(f"{images_dir}: images are {H}x{W}, not a multiple of the tokenizer's "
                        f"downsample factor {f} (preset {hp['preset']})")
    train_u8 = train_u8[spread(len(train_u8), hp["limit"])]  # a copy (memmaps are read-only)
    key = {"train_images": int(len(train_u8)), "image_size": [int(H), int(W)]}
    if ckpt is not None:
        stored = {k: ckpt["train"].get(k) for k in key}
        if stored != key:
            raise DataError(f"{images_dir}: {key['train_images']} training images of "
                            f"{H}x{W}, but {ckpt_path} was trained on {stored['train_images']} of "
                            f"{'x'.join(map(str, stored['image_size'] or []))}")
    # Keep the uint8 images on the GPU when they fit comfortably; else index them on the CPU.
    train = torch.from_numpy(np.ascontiguousarray(train_u8))
    if dev.type == "cuda" and train.numel() < 4 * 2 ** 30:
        train = train.to(dev)
    return _Data(train, held_u8, manifest, key)


def _build(config: VQConfig, hp: dict, size: int, dev: torch.device, ckpt: dict | None) -> _Nets:
    """Tokenizer, optional discriminator and their Adam optimisers: seeded, or restored from last.pt
    (RNG included)."""
    torch.manual_seed(int(hp["seed"]))
    nets = _Nets(VQModel(config).to(dev).train(), None)
    if hp["gan"]:
        nets.disc = PatchDiscriminator(n_layers=disc_layers_for(size)).to(dev).train()
    betas = (float(hp["beta1"]), float(hp["beta2"]))
    nets.opt = torch.optim.Adam(nets.model.parameters(), lr=float(hp["lr"]), betas=betas)
    if nets.disc is not None:
        nets.disc_opt = torch.optim.Adam(nets.disc.parameters(), lr=float(hp["lr"]), betas=betas)
    if ckpt is not None:
        nets.model.load_state_dict(ckpt["model"])
        nets.opt.load_state_dict(ckpt["optimizer"])
        if nets.disc is not None:
            nets.disc.load_state_dict(ckpt["discriminator"])
            nets.disc_opt.load_state_dict(ckpt["optimizer_disc"])
        set_rng_state(ckpt["rng"])
    return nets


def _save(path: Path, nets: _Nets, step: int, hp: dict, config: VQConfig) -> None:
    obj = {"format": CKPT_FORMAT, "format_version": CKPT_VERSION, "step": step,
           "model": {k: v.detach().cpu() for k, v in nets.model.state_dict().items()},
           "optimizer": nets.opt.state_dict(), "rng": rng_state(), "config": config.to_dict(), "train": hp}
    if nets.disc is not None:
        obj["discriminator"] = nets.disc.state_dict()
        obj["optimizer_disc"] = nets.disc_opt.state_dict()
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _clip_and_step(params, opt: torch.optim.Optimizer, max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


def _train_step(nets: _Nets, x: torch.Tensor, hp: dict, step: int, dev: torch.device) -> dict:
    """One step on x `[B, 3, H, W]` in [-1, 1]: the tokenizer's loss (reconstruction, codebook,
    and from --disc-start the generator's hinge loss), then the discriminator's. Returns the loss
    terms (tensors, None where off) and the reconstruction."""
    gan_on = nets.disc is not None and step + 1 >= int(hp["disc_start"])  # LlamaGen: global_step = step + 1
    with _autocast(dev):
        recon, vql = nets.model(x)
    recon = recon.float()
    rec = F.mse_loss(recon, x)
    loss = float(hp["rec_weight"]) * rec
    l1 = F.l1_loss(recon, x) if float(hp["l1_weight"]) else None
    if l1 is not None:
        loss = loss + float(hp["l1_weight"]) * l1
    codebook = vql.vq_loss.float() + vql.commit_loss.float() + vql.entropy_loss.float()
    loss = loss + float(hp["codebook_weight"]) * codebook
    g_adv = d_loss = None
    if gan_on:
        with _autocast(dev):
            g_adv = -nets.disc(recon).float().mean()  # hinge generator loss
        loss = loss + float(hp["disc_weight"]) * g_adv
    if not torch.isfinite(loss):
        raise DataError(f"loss is {loss.item()} at step {step + 1}; lower --lr")
    nets.opt.zero_grad(set_to_none=True)
    loss.backward()
    _clip_and_step(nets.model.parameters(), nets.opt, float(hp["max_grad_norm"]))
    if gan_on:
        with _autocast(dev):
            logits_real, logits_fake = nets.disc(x.detach()), nets.disc(recon.detach())
        d_loss = float(hp["disc_weight"]) * hinge_d_loss(logits_real.float(), logits_fake.float())
        nets.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        _clip_and_step(nets.disc.parameters(), nets.disc_opt, float(hp["max_grad_norm"]))
    return {"loss": loss, "rec": rec, "l1": l1, "vql": vql, "g_adv": g_adv, "d_loss": d_loss, "recon": recon}


def _log_row(done: int, t: dict, x: torch.Tensor, images_per_s: float, lr: float) -> dict:
    item = lambda v: v.item() if v is not None else None  # noqa: E731
    return {"step": done, "loss": t["loss"].item(), "rec_loss": t["rec"].item(), "l1_loss": item(t["l1"]),
            "vq_loss": t["vql"].vq_loss.item(), "commit_loss": t["vql"].commit_loss.item(),
            "entropy_loss": t["vql"].entropy_loss.item(), "gen_adv_loss": item(t["g_adv"]),
            "disc_loss": item(t["d_loss"]), "psnr": psnr_db(_to_unit(t["recon"]), _to_unit(x)).item(),
            "codebook_usage": float(t["vql"].codebook_usage), "images_per_s": images_per_s, "lr": lr}


def _fit(nets: _Nets, data: _Data, hp: dict, config: VQConfig, ckpt_path: Path, log_path: Path, start: int,
         sched: _Schedule, dev: torch.device) -> tuple[int, dict]:
    """Steps start .. sched.steps (or until the time limit), last.pt every save_every steps;
    returns (last step done, last log row)."""
    from tqdm import tqdm

    sampler = StepSampler(len(data.train), int(hp["batch_size"]), int(hp["seed"]))
    bar = tqdm(total=sched.steps, initial=start, disable=not sched.progress, file=sys.stderr, unit="step",
               desc="tokenizer", dynamic_ncols=True)
    log_f = open(log_path, "a")
    last, done = {}, start
    t_window, n_window = time.perf_counter(), 0
    try:
        for step in range(start, sched.steps):
            idx, flips = sampler(step)
            x = to_model_input(data.train[idx.to(data.train.device)].to(dev, non_blocking=True), flips)
            terms = _train_step(nets, x, hp, step, dev)
            done = step + 1
            n_window += len(idx)
            bar.update(1)
            if done % sched.log_every == 0 or done == sched.steps:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                last = _log_row(done, terms, x, n_window / max(time.perf_counter() - t_window, 1e-9), float(hp["lr"]))
                log_f.write(json.dumps(last) + "\n")
                log_f.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{last['psnr']:.2f}",
                                usage=f"{last['codebook_usage']:.3f}", refresh=False)
                t_window, n_window = time.perf_counter(), 0
            if done % sched.save_every == 0 and done != sched.steps:
                _save(ckpt_path, nets, done, hp, config)
            if sched.time_limit is not None and time.perf_counter() - sched.t_start > sched.time_limit:
                break
    finally:
        bar.close()
        log_f.close()
    return done, last


def train_tokenizer(images_dir, out_dir, *, preset: str | None = None, steps: int = 10000,
                    batch_size: int | None = None, lr: float | None = None, beta1: float | None = None,
                    beta2: float | None = None, max_grad_norm: float | None = None,
                    rec_weight: float | None = None, l1_weight: float | None = None,
                    codebook_weight: float | None = None, gan: bool | None = None,
                    disc_start: int | None = None, disc_weight: float | None = None,
                    seed: int | None = None, limit: int | None = None, device=None, resume: bool = False,
                    overwrite: bool = False, eval_limit: int = 1000, save_every: int = 1000,
                    log_every: int = 50, progress: bool = True, time_limit: float | None = None,
                    init=None) -> dict:
    """Train a VQ tokenizer on the train split of the image set ``images_dir``; returns a summary.

    Hyper-parameters left as ``None`` take ``DEFAULTS`` (or, with ``resume``, the values stored in
    ``out_dir/last.pt``; an explicit different value is then an error). ``steps`` is the total
    number of optimiser steps (a resumed run continues up to it). ``limit``: train on that many
    images spread over the train split. With ``time_limit`` (seconds) the run stops after the step
    that crosses it, saves, and can be resumed: training in pieces. After training, at most
    ``eval_limit`` held-out images (spread over the split) are encoded and decoded. ``init``: a
    tokenizer file whose weights start a new run (its config is the run's; a ``preset`` must match
    it), e.g. to fine-tune the bundled tokenizer at another image size. Bad data or arguments raise
    ``DataError`` with a one-line message.
    """
    t_start = time.perf_counter()
    given = {"preset": preset, "batch_size": batch_size, "lr": lr, "beta1": beta1, "beta2": beta2,
             "max_grad_norm": max_grad_norm, "rec_weight": rec_weight, "l1_weight": l1_weight,
             "codebook_weight": codebook_weight, "gan": gan, "disc_start": disc_start,
             "disc_weight": disc_weight, "seed": seed, "limit": limit, "init": None}
    if int(steps) < 1 or int(save_every) < 1 or int(log_every) < 1 or int(eval_limit) < 0:
        raise DataError(f"steps, save_every and log_every must be >= 1 and eval_limit >= 0 (got {steps}, "
                        f"{save_every}, {log_every}, {eval_limit})")
    dev = resolve_device(device)
    with RunFolder(out_dir, fmt=CKPT_FORMAT, max_version=CKPT_VERSION, deploy=DEPLOY, resume=resume,
                   overwrite=overwrite) as run:
        ckpt, run.checkpoint = run.checkpoint, None
        start_from = _init_tokenizer(init, preset, ckpt)
        if start_from is not None:
            given.update(preset=start_from.preset, init=str(init))
        hp = _hyperparameters(given, ckpt, run.ckpt_path, steps)
        config = VQConfig.from_dict(ckpt["config"]) if ckpt is not None else VQ_PRESETS[hp["preset"]]
        data = _load_data(Path(images_dir), hp, config, ckpt, run.ckpt_path, dev)
        hp.update(data.key, images=str(images_dir))
        nets = _build(config, hp, min(data.key["image_size"]), dev, ckpt)
        if start_from is not None:
            nets.model.load_state_dict(start_from.state)
            del start_from
        start = int(ckpt["step"]) if ckpt is not None else 0
        del ckpt
        run.start(start)
        sched = _Schedule(int(steps), int(save_every), int(log_every), progress, time_limit, t_start)
        done, last = _fit(nets, data, hp, config, run.ckpt_path, run.log_path, start, sched, dev)
        _save(run.ckpt_path, nets, done, hp, config)  # last.pt first, then the deploy file made from it
        save_tokenizer(run.out / DEPLOY, nets.model)
    held = data.held[spread(len(data.held), eval_limit)] if eval_limit else data.held[:0]
    result = evaluate(nets.model, held, int(hp["batch_size"]), dev, progress) if len(held) else None
    if not last and run.log_path.is_file():  # resumed at the final step: report the logged values
        lines = run.log_path.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    H, W = data.key["image_size"]
    f = config.downsample_factor
    return {
        "steps": done, "complete": done == steps, "preset": hp["preset"], "images": len(data.train),
        "image_size": [H, W], "grid": [H // f, W // f], "codebook_size": config.codebook_size,
        "final_loss": last.get("loss"), "train_psnr": last.get("psnr"), "codebook_usage": last.get("codebook_usage"),
        "holdout_images": result["images"] if result else 0, "holdout_images_total": len(data.held),
        "holdout_psnr": result["psnr"] if result else None,
        "holdout_codebook_usage": result["codebook_usage"] if result else None,
        "device": str(dev), "seconds": round(time.perf_counter() - t_start, 3),
        "checkpoint": str(run.ckpt_path), "tokenizer": str(run.out / DEPLOY), "log": str(run.log_path),
        "source": data.manifest.get("source"),
    }

def format_summary(s: dict) -> str:
    of = f" of {s['holdout_images_total']}" if s.get("holdout_images_total", 0) > s["holdout_images"] else ""
    held = (f"held-out PSNR {s['holdout_psnr']:.2f} dB on {s['holdout_images']}{of} images, "
            f"held-out codebook usage {s['holdout_codebook_usage']:.3f}" if s["holdout_psnr"] is not None
            else "no held-out images")
    usage = f"{s['codebook_usage']:.3f}" if s.get("codebook_usage") is not None else "n/a"
    train = f"{s['train_psnr']:.2f} dB" if s.get("train_psnr") is not None else "n/a"
    return (f"trained {s['preset']} for {s['steps']} steps ({s['seconds']:.1f} s): {held}; train PSNR "
            f"{train}, codebook usage {usage}; wrote {s['tokenizer']}")
