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

Files in OUT_DIR:
    last.pt         resumable checkpoint (``torch.load(..., weights_only=True)`` reads it):
                    {"format": "lasad-vq-train", "version": 1, "step", "model", "optimizer",
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
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lasad_engine.cli import OneLineCommand
from lasad_engine.params import resolve_device
from lasad_engine.io import atomic_path, atomic_write_text, one_line
from lasad_engine.tokenizer import VQ_PRESETS, VQConfig, VQModel, save_tokenizer

from .formats import DataError, load_images, read_training_checkpoint, rng_state, set_rng_state

CKPT_FORMAT, CKPT_VERSION = "lasad-vq-train", 1
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
# RNG state (stored as tensors and plain Python values so weights_only loading accepts it)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: VQModel, images_u8, batch_size: int, device: torch.device) -> dict:
    """Encode + decode (the deploy path) every image: mean per-image PSNR in dB and the fraction
    of the codebook the images use."""
    was_training = model.training
    model.eval()
    total, n = 0.0, len(images_u8)
    used = torch.zeros(model.config.codebook_size, dtype=torch.bool, device=device)
    try:
        for i in range(0, n, batch_size):
            batch = torch.from_numpy(np.array(images_u8[i:i + batch_size])).to(device)
            x = to_model_input(batch)
            with _autocast(device):
                codes = model.encode(x)
                recon = model.decode_code(codes)
            used[codes.reshape(-1)] = True
            total += psnr_db(_to_unit(recon), _to_unit(x)).item() * len(batch)
    finally:
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


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(s + "\n" for s in keep))


def train_tokenizer(images_dir, out_dir, *, preset: str | None = None, steps: int = 10000,
                    batch_size: int | None = None, lr: float | None = None, beta1: float | None = None,
                    beta2: float | None = None, max_grad_norm: float | None = None,
                    rec_weight: float | None = None, l1_weight: float | None = None,
                    codebook_weight: float | None = None, gan: bool | None = None,
                    disc_start: int | None = None, disc_weight: float | None = None,
                    seed: int | None = None, device=None, resume: bool = False, save_every: int = 1000,
                    log_every: int = 50, progress: bool = True, time_limit: float | None = None) -> dict:
    """Train a VQ tokenizer on the train split of the image set ``images_dir``; returns a summary.

    Hyper-parameters left as ``None`` take ``DEFAULTS`` (or, with ``resume``, the values stored in
    ``out_dir/last.pt``; an explicit different value is then an error). ``steps`` is the total
    number of optimiser steps (a resumed run continues up to it). With ``time_limit`` (seconds) the
    run stops after the step that crosses it, saves, and can be resumed: training in pieces. Raises ``DataError`` for bad data
    and ``ValueError`` for bad arguments, each with a one-line message.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    images_dir = Path(images_dir)
    given = {"preset": preset, "batch_size": batch_size, "lr": lr, "beta1": beta1, "beta2": beta2,
             "max_grad_norm": max_grad_norm, "rec_weight": rec_weight, "l1_weight": l1_weight,
             "codebook_weight": codebook_weight, "gan": gan, "disc_start": disc_start,
             "disc_weight": disc_weight, "seed": seed}
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if int(save_every) < 1 or int(log_every) < 1:
        raise ValueError("save_every and log_every must be >= 1")
    dev = resolve_device(device)

    ckpt_path, log_path, vq_path = out_dir / "last.pt", out_dir / "log.jsonl", out_dir / "vq.safetensors"
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise DataError(f"{ckpt_path}: nothing to resume (no such file)")
        ckpt = read_training_checkpoint(ckpt_path, CKPT_FORMAT, CKPT_VERSION)
        hp = dict(ckpt["train"])
        for k, v in given.items():
            if v is not None and v != hp.get(k):
                raise ValueError(f"{ckpt_path} was trained with {k}={hp.get(k)!r}; resuming with "
                                 f"{k}={v!r} would not continue the same run")
        if int(ckpt["step"]) > steps:
            raise ValueError(f"{ckpt_path} is at step {ckpt['step']}, past --steps {steps}")
    else:
        if ckpt_path.exists():
            raise DataError(f"{out_dir} already holds a run (last.pt): pass --resume to continue it "
                            "or choose another OUT_DIR")
        hp = {k: (DEFAULTS[k] if v is None else v) for k, v in given.items()}
        if hp["preset"] not in VQ_PRESETS:
            raise ValueError(f"unknown preset {hp['preset']!r}; known: {', '.join(sorted(VQ_PRESETS))}")
        if int(hp["batch_size"]) < 1:
            raise ValueError(f"batch_size must be >= 1 (got {hp['batch_size']})")
        if not hp["lr"] > 0:
            raise ValueError(f"lr must be > 0 (got {hp['lr']})")

    # ---- data
    train_u8, _, _, manifest = load_images(images_dir, None, split=0)
    held_u8, _, _, _ = load_images(images_dir, None, split=1)
    if len(train_u8) == 0:
        raise DataError(f"{images_dir}: the image set has no training images (split 0)")
    if train_u8.ndim != 4 or train_u8.shape[-1] != 3 or train_u8.dtype != np.uint8:
        raise DataError(f"{images_dir}/images.npy: expected uint8 [N, H, W, 3], got "
                        f"{train_u8.dtype} {list(train_u8.shape)}")
    config = VQConfig.from_dict(ckpt["config"]) if ckpt is not None else VQ_PRESETS[hp["preset"]]
    f = config.downsample_factor
    H, W = train_u8.shape[1:3]
    if H % f or W % f:
        raise DataError(f"{images_dir}: images are {H}x{W}, not a multiple of the tokenizer's "
                        f"downsample factor {f} (preset {hp['preset']})")
    data_key = {"train_images": int(len(train_u8)), "image_size": [int(H), int(W)]}
    if ckpt is not None:
        stored = {k: ckpt["train"].get(k) for k in data_key}
        if stored != data_key:
            raise DataError(f"{images_dir}: {data_key['train_images']} training images of "
                            f"{H}x{W}, but {ckpt_path} was trained on {stored['train_images']} of "
                            f"{'x'.join(map(str, stored['image_size'] or []))}")
    hp.update(data_key)
    hp["images"] = str(images_dir)

    # Keep the uint8 images on the GPU when they fit comfortably; else index them on the CPU.
    train_t = torch.from_numpy(np.array(train_u8))  # a writable copy (memmaps are read-only)
    if dev.type == "cuda" and train_t.numel() < 4 * 2 ** 30:
        train_t = train_t.to(dev)

    # ---- model, optimisers
    torch.manual_seed(int(hp["seed"]))
    model = VQModel(config).to(dev).train()
    disc = disc_opt = None
    n_disc = disc_layers_for(min(H, W))
    if hp["gan"]:
        disc = PatchDiscriminator(n_layers=n_disc).to(dev).train()
    betas = (float(hp["beta1"]), float(hp["beta2"]))
    opt = torch.optim.Adam(model.parameters(), lr=float(hp["lr"]), betas=betas)
    if disc is not None:
        disc_opt = torch.optim.Adam(disc.parameters(), lr=float(hp["lr"]), betas=betas)

    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if disc is not None:
            disc.load_state_dict(ckpt["discriminator"])
            disc_opt.load_state_dict(ckpt["optimizer_disc"])
        start = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
        _truncate_log(log_path, start)
        del ckpt
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        if log_path.exists():
            log_path.unlink()

    def save(step: int) -> None:
        obj = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "optimizer": opt.state_dict(), "rng": rng_state(), "config": config.to_dict(),
               "train": hp}
        if disc is not None:
            obj["discriminator"] = disc.state_dict()
            obj["optimizer_disc"] = disc_opt.state_dict()
        with atomic_path(ckpt_path) as tmp:
            torch.save(obj, tmp)

    sampler = StepSampler(len(train_t), int(hp["batch_size"]), int(hp["seed"]))
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, disable=not progress, file=sys.stderr, unit="step",
               desc="tokenizer", dynamic_ncols=True)
    log_f = open(log_path, "a")
    last = {}
    t_window, n_window = time.perf_counter(), 0
    done = start
    try:
        for step in range(start, steps):
            idx, flips = sampler(step)
            x = to_model_input(train_t[idx.to(train_t.device)].to(dev, non_blocking=True), flips)
            gan_on = disc is not None and step + 1 >= int(hp["disc_start"])  # LlamaGen: global_step = step + 1

            with _autocast(dev):
                recon, vql = model(x)
            recon = recon.float()
            rec = F.mse_loss(recon, x)
            loss = float(hp["rec_weight"]) * rec
            l1 = F.l1_loss(recon, x) if float(hp["l1_weight"]) else None
            if l1 is not None:
                loss = loss + float(hp["l1_weight"]) * l1
            codebook = vql.vq_loss.float() + vql.commit_loss.float() + vql.entropy_loss.float()
            loss = loss + float(hp["codebook_weight"]) * codebook
            g_adv = None
            if gan_on:
                with _autocast(dev):
                    g_adv = -disc(recon).float().mean()  # hinge generator loss
                loss = loss + float(hp["disc_weight"]) * g_adv
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if float(hp["max_grad_norm"]) > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(hp["max_grad_norm"]))
            opt.step()

            d_loss = None
            if gan_on:
                with _autocast(dev):
                    logits_real = disc(x.detach())
                    logits_fake = disc(recon.detach())
                d_loss = float(hp["disc_weight"]) * hinge_d_loss(logits_real.float(), logits_fake.float())
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                if float(hp["max_grad_norm"]) > 0:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), float(hp["max_grad_norm"]))
                disc_opt.step()

            done = step + 1
            n_window += len(idx)
            bar.update(1)
            if done % log_every == 0 or done == steps:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                now = time.perf_counter()
                psnr = psnr_db(_to_unit(recon), _to_unit(x)).item()
                last = {"step": done, "loss": loss.item(), "rec_loss": rec.item(),
                        "l1_loss": l1.item() if l1 is not None else None,
                        "vq_loss": vql.vq_loss.item(), "commit_loss": vql.commit_loss.item(),
                        "entropy_loss": vql.entropy_loss.item(),
                        "gen_adv_loss": g_adv.item() if g_adv is not None else None,
                        "disc_loss": d_loss.item() if d_loss is not None else None,
                        "psnr": psnr, "codebook_usage": float(vql.codebook_usage),
                        "images_per_s": n_window / max(now - t_window, 1e-9), "lr": float(hp["lr"])}
                log_f.write(json.dumps(last) + "\n")
                log_f.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{psnr:.2f}",
                                usage=f"{last['codebook_usage']:.3f}", refresh=False)
                t_window, n_window = time.perf_counter(), 0
            if done % save_every == 0 and done != steps:
                save(done)
            if time_limit is not None and time.perf_counter() - t_start > time_limit and done < steps:
                break
    finally:
        bar.close()
        log_f.close()

    save(done)
    save_tokenizer(vq_path, model)
    held = evaluate(model, held_u8, int(hp["batch_size"]), dev) if len(held_u8) else None
    if not last and log_path.is_file():  # resumed at the final step: report the logged values
        lines = log_path.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    return {
        "steps": done, "complete": done == steps, "preset": hp["preset"], "images": len(train_u8),
        "image_size": [int(H), int(W)], "grid": [int(H) // f, int(W) // f],
        "codebook_size": config.codebook_size,
        "final_loss": last.get("loss"), "train_psnr": last.get("psnr"),
        "codebook_usage": last.get("codebook_usage"),
        "holdout_images": held["images"] if held else 0,
        "holdout_psnr": held["psnr"] if held else None,
        "holdout_codebook_usage": held["codebook_usage"] if held else None,
        "device": str(dev), "seconds": round(time.perf_counter() - t_start, 3),
        "checkpoint": str(ckpt_path), "tokenizer": str(vq_path), "log": str(log_path),
        "source": manifest.get("source"),
    }


def format_summary(s: dict) -> str:
    held = (f"held-out PSNR {s['holdout_psnr']:.2f} dB on {s['holdout_images']} images, "
            f"held-out codebook usage {s['holdout_codebook_usage']:.3f}" if s["holdout_psnr"] is not None
            else "no held-out images")
    usage = f"{s['codebook_usage']:.3f}" if s.get("codebook_usage") is not None else "n/a"
    train = f"{s['train_psnr']:.2f} dB" if s.get("train_psnr") is not None else "n/a"
    return (f"trained {s['preset']} for {s['steps']} steps ({s['seconds']:.1f} s): {held}; train PSNR "
            f"{train}, codebook usage {usage}; wrote {s['tokenizer']}")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


@click.command("tokenizer", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(sorted(VQ_PRESETS)), default=None,
              help=f"Tokenizer size [default: {DEFAULT_PRESET}; on --resume: the checkpoint's].")
@click.option("--steps", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Total optimiser steps (a resumed run continues up to this).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per step [default: 64].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Adam learning rate [default: 1e-4].")
@click.option("--beta1", type=click.FloatRange(0, 1, max_open=True), default=None, help="Adam beta1 [default: 0.9, LlamaGen's].")
@click.option("--beta2", type=click.FloatRange(0, 1, max_open=True), default=None, help="Adam beta2 [default: 0.95, LlamaGen's].")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=None, help="Gradient clipping norm, 0 = off [default: 1].")
@click.option("--l1-weight", type=click.FloatRange(min=0), default=None, help="Extra L1 reconstruction loss weight [default: 0].")
@click.option("--codebook-weight", type=click.FloatRange(min=0), default=None, help="Codebook + commitment loss weight [default: 1].")
@click.option("--gan/--no-gan", default=None, help="PatchGAN discriminator with hinge loss [default: off].")
@click.option("--disc-start", type=click.IntRange(min=0), default=None, help="Step the GAN loss starts at [default: 20000].")
@click.option("--disc-weight", type=click.FloatRange(min=0), default=None, help="GAN loss weight [default: 0.5].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the initialisation and data order [default: 0].")
@click.option("--resume", is_flag=True, help="Continue the run in OUT_DIR/last.pt.")
@click.option("--save-every", type=click.IntRange(min=1), default=1000, show_default=True, help="Write last.pt every N steps.")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True, help="Append to log.jsonl every N steps.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop (and save) after the step that crosses this many seconds; --resume continues.")
def tokenizer_cmd(images, out_dir, preset, steps, batch_size, lr, beta1, beta2, max_grad_norm, l1_weight,
                  codebook_weight, gan, disc_start, disc_weight, device, seed, resume, save_every,
                  log_every, no_progress, time_limit):
    """Train the VQ image tokenizer on IMAGES (an image set from `lasad-train data`); write
    OUT_DIR/vq.safetensors, the resumable OUT_DIR/last.pt and OUT_DIR/log.jsonl."""
    try:
        summary = train_tokenizer(images, out_dir, preset=preset, steps=steps, batch_size=batch_size, lr=lr,
                                  beta1=beta1, beta2=beta2, max_grad_norm=max_grad_norm, l1_weight=l1_weight,
                                  codebook_weight=codebook_weight, gan=gan, disc_start=disc_start,
                                  disc_weight=disc_weight, seed=seed, device=device, resume=resume,
                                  save_every=save_every, log_every=log_every, progress=not no_progress,
                                  time_limit=time_limit)
    except (DataError, ValueError, FloatingPointError) as e:
        raise click.ClickException(one_line(e, 400)) from None
    click.echo(format_summary(summary))
