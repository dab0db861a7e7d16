"""`lasad-train`: data, tokenizer, codes and GPT training stages.

This module imports no torch: every command's options are declared here and its stage module
(`data`, `tokenizer_train`, `codes`, `gpt`) is imported when the command runs, so `--help` of the
group and of each command answers at once. Numbers are checked here, where the user gives them
(bounded ranges; NaN and infinity refused), and passed inward as plain values.

A SIGTERM is handled like Ctrl-C: the exception it raises unwinds the stage (temporary files are
removed, folders unlocked) and the command exits with 143 (128 + SIGTERM); Ctrl-C exits with 130.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import click

from lasad_engine import __version__
from lasad_engine.cli import OneLineCommand, OneLineErrors

from .options import (BATCH, BETA, EVERY, LIMIT_OPTION, NON_NEGATIVE, POSITIVE, SEED, STEPS, ByteSize, Finite,
                      RegistryChoice, Weights, lasad_presets, vq_presets)

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM; a BaseException, so `except Exception` lets it pass."""


def _on_sigterm(signum, frame):
    raise Terminated()


STAGES = {
    "data": ("lasad_train.data", "data_cmd"),
    "tokenizer": (__name__, "tokenizer_cmd"),
    "codes": (__name__, "codes_cmd"),
    "gpt": (__name__, "gpt_cmd"),
}


class LazyGroup(OneLineErrors, click.Group):
    """The stages, loaded by name; errors of every stage end as one line (the stages are
    OneLineCommand or groups of them), SIGTERM as `Terminated` (exit 143)."""

    def list_commands(self, ctx):
        return list(STAGES)

    def get_command(self, ctx, name):
        if name not in STAGES:
            return None
        import importlib
        module, attr = STAGES[name]
        return getattr(importlib.import_module(module), attr)

    def main(self, args=None, prog_name=None, **kwargs):
        own = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if own else None
        try:
            return super().main(args, prog_name, **kwargs)
        except Terminated:
            click.echo(f"{prog_name or self.name}: terminated", err=True)
            sys.exit(EXIT_TERMINATED)
        finally:
            if own:
                signal.signal(signal.SIGTERM, previous)


@click.group("lasad-train", cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="lasad-train")
def main():
    """Train LASADGen: build an image set, train the VQ tokenizer, extract codes, train the GPT."""


@click.command("tokenizer", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--preset", type=RegistryChoice(vq_presets), default=None,
              help="Tokenizer size [default: vq-f4-demo; on --resume: the run's].")
@click.option("--steps", type=STEPS, default=10000, show_default=True,
              help="Total optimiser steps (a resumed run continues up to this).")
@click.option("--batch-size", type=BATCH, default=None, help="Images per step [default: 64].")
@click.option("--lr", type=POSITIVE, default=None, help="Adam learning rate [default: 1e-4].")
@click.option("--beta1", type=BETA, default=None, help="Adam beta1 [default: 0.9, LlamaGen's].")
@click.option("--beta2", type=BETA, default=None, help="Adam beta2 [default: 0.95, LlamaGen's].")
@click.option("--max-grad-norm", type=NON_NEGATIVE, default=None, help="Gradient clipping norm, 0 = off [default: 1].")
@click.option("--l1-weight", type=NON_NEGATIVE, default=None, help="Extra L1 reconstruction loss weight [default: 0].")
@click.option("--codebook-weight", type=NON_NEGATIVE, default=None, help="Codebook + commitment loss weight [default: 1].")
@click.option("--gan/--no-gan", default=None, help="PatchGAN discriminator with hinge loss [default: off].")
@click.option("--disc-start", type=click.IntRange(0, 10**12), default=None, help="Step the GAN loss starts at [default: 20000].")
@click.option("--disc-weight", type=NON_NEGATIVE, default=None, help="GAN loss weight [default: 0.5].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
@click.option("--seed", type=SEED, default=None, help="Seed of the initialisation and data order [default: 0].")
@LIMIT_OPTION
@click.option("--eval-limit", type=click.IntRange(0, 1 << 40), default=1000, show_default=True,
              help="Held-out images evaluated after training, spread evenly over the split (0 = none).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT_DIR/last.pt (its hyper-parameters are kept).")
@click.option("--init", default=None, type=click.Path(path_type=Path), metavar="TOKENIZER",
              help="Start a new run from this tokenizer's weights (its size; e.g. the bundled one, to "
                   "fine-tune it at another image size) instead of a seeded initialisation.")
@click.option("--overwrite", is_flag=True, help="Start again in an OUT_DIR that holds a run (its files are replaced).")
@click.option("--save-every", type=EVERY, default=1000, show_default=True, help="Write last.pt every N steps.")
@click.option("--log-every", type=EVERY, default=50, show_default=True, help="Append to log.jsonl every N steps.")
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
@click.option("--time-limit", type=POSITIVE, default=None,
              help="Stop (and save) after the step that crosses this many seconds; --resume continues.")
def tokenizer_cmd(images, out_dir, no_progress, **options):
    """Train the VQ image tokenizer on IMAGES (an image set from `lasad-train data`); write
    OUT_DIR/vq.safetensors, the resumable OUT_DIR/last.pt and OUT_DIR/log.jsonl."""
    from .tokenizer_train import format_summary, train_tokenizer

    click.echo(format_summary(train_tokenizer(images, out_dir, progress=not no_progress, **options)))


@click.command("codes", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", type=click.Path(path_type=Path))
@click.argument("vq", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--label-set", default=None, metavar="NAME",
              help="Labels to carry [default: 'class' if the image set has it, else its first label set].")
@click.option("--split", type=click.Choice(["train", "holdout", "all"]), default="train", show_default=True,
              help="Which images to encode.")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="Also encode horizontally mirrored copies (as LlamaGen's extraction).")
@click.option("--shard-size", type=click.IntRange(1, 1 << 24), default=4096, show_default=True,
              help="Code grids per shard file.")
@click.option("--batch-size", type=click.IntRange(1, 1 << 16), default=64, show_default=True,
              help="Images encoded together.")
@LIMIT_OPTION
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
def codes_cmd(images, vq, out, no_progress, **options):
    """Encode the image set IMAGES with the tokenizer VQ into the code set OUT (for `lasad-train gpt`)."""
    from .codes import extract_codes

    m = extract_codes(images, vq, out, progress=not no_progress, **options)
    h, w = m["grid"]
    dropped = f"; dropped {m['dropped_unlabelled']} unlabelled" if m["dropped_unlabelled"] else ""
    click.echo(f"wrote {m['count']} code grids ({h}x{w}, vocab {m['vocab_size']}, {m['num_classes']} classes "
               f"of label set {m['label_set']!r}{', with mirrors' if m['flip'] else ''}) in "
               f"{len(m['shards'])} shard(s) to {out}{dropped}")


def parse_sets(sets, row_start: str | None, no_decay: bool) -> dict | None:
    """--set FIELD=VALUE (JSON values; a bare word is a string), --row-start and --no-decay as
    LasadConfig overrides; None when none is given (a resumed run keeps its own)."""
    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--set {item!r} is not FIELD=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if row_start:
        overrides["row_start"] = row_start
    if no_decay:
        overrides["decay"] = False
    return overrides or None


RUN = "on --resume: the run's"


@click.command("gpt", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("codes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", default=None, type=RegistryChoice(lasad_presets, case_sensitive=False),
              help=f"Model size [default: lasad-B; {RUN}].")
@click.option("--row-start", type=click.Choice(["none", "unit", "reset"]), default=None, help="Default: the preset's (unit).")
@click.option("--no-decay", is_flag=True, help="Ablation: linear attention without decay (log-decay 0 everywhere).")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Override any LasadConfig field (JSON value).")
@click.option("--steps", default=1000, show_default=True, type=STEPS, help="Total steps (a resumed run continues up to this).")
@click.option("--batch-size", default=None, type=BATCH,
              help=f"Global batch, in sequences of the smallest grid; steps at larger grids take about as many "
                   f"tokens [default: 256; {RUN}].")
@click.option("--mix", default=None, type=Weights(),
              help=f"With several CODES: the weight of each code set's grid in the choice of a step's grid, in their "
                   f"order, e.g. 1,1 [default: their token counts, so every code grid is drawn alike; {RUN}].")
@click.option("--lr", default=None, type=POSITIVE, help=f"AdamW learning rate [default: 1e-4; {RUN}].")
@click.option("--warmup", default=None, type=click.IntRange(0, 10**12), help=f"Linear warm-up steps [default: 0; {RUN}].")
@click.option("--cooldown", default=None, type=click.IntRange(0, 10**12),
              help=f"The last N of --steps fall linearly from --lr towards --min-lr [default: 0; {RUN}].")
@click.option("--min-lr", default=None, type=NON_NEGATIVE,
              help=f"Where the cool-down ends, at step --steps [default: 0; {RUN}].")
@click.option("--beta1", default=None, type=BETA, help=f"AdamW beta1 [default: 0.9; {RUN}].")
@click.option("--beta2", default=None, type=BETA, help=f"AdamW beta2 [default: 0.95; {RUN}].")
@click.option("--weight-decay", default=None, type=NON_NEGATIVE, help=f"On matrices only [default: 0.05; {RUN}].")
@click.option("--grad-clip", default=None, type=NON_NEGATIVE, help=f"Gradient-norm clip, 0 = off [default: 1.0; {RUN}].")
@click.option("--grad-accum", default=None, type=click.IntRange(1, 1 << 20),
              help=f"Micro-batches per step on each process: the same update in less memory [default: 1; {RUN}, "
                   "which may be changed].")
@click.option("--ema", default=None, type=Finite(0, 1, max_open=True), help=f"EMA decay, 0 = off [default: 0; {RUN}].")
@click.option("--seed", default=None, type=SEED, help=f"Initialisation and batch order [default: 0; {RUN}].")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default=None,
              help=f"Autocast on CUDA [default: bf16; {RUN}].")
@click.option("--fsdp", is_flag=True, help="Fully sharded data parallel (under torchrun; alone, on one GPU), bf16 mixed precision on CUDA.")
@click.option("--chunk-backend", type=click.Choice(["fla", "torch"]), default=None,
              help="LASAD training kernel (default: fla on CUDA, torch on CPU).")
@click.option("--save-every", default=500, show_default=True, type=EVERY)
@click.option("--log-every", default=10, show_default=True, type=EVERY)
@click.option("--device", default=None)
@click.option("--resume", is_flag=True,
              help="Continue the run in OUT (last.pt or state/; its hyper-parameters and optimizer state are kept).")
@click.option("--overwrite", is_flag=True, help="Start again in an OUT that holds a run (its files are replaced).")
@click.option("--resume-format", type=click.Choice(["pt", "shards"]), default=None,
              help="How the resumable state is saved: 'pt' = OUT/last.pt, one file, exact; 'shards' = OUT/state/, "
                   "safetensors files of at most --shard-size and an index with their sha256 (for machines that "
                   "return files of bounded size) [default: the form resumed from, else pt].")
@click.option("--moments", type=click.Choice(["bf16", "fp32"]), default=None,
              help="shards: AdamW's moments in bf16 (a quarter less state; not bit-exact on resume) or fp32 "
                   "(exact) [default: the run's, else bf16].")
@click.option("--shard-size", type=ByteSize(64 << 10, 1 << 40), default=None,
              help="shards: bytes per file at most, e.g. 16MiB [default: the run's, else 16MiB].")
@click.option("--kernel-cache", default=None, metavar="DIR",
              help="On CUDA, Triton's cache of compiled kernels and autotuning results (fla's) [default: "
                   "$TRITON_CACHE_DIR, else OUT/triton-cache].")
@click.option("--init", default=None, metavar="CKPT",
              help="Start a new run from these weights ('default', a model folder, ckpt.pt, .safetensors) instead "
                   "of random ones: fine-tuning, or training in pieces where last.pt cannot travel. The model they "
                   "hold must be the one --preset/--set and the code set make; the optimizer starts fresh.")
@click.option("--no-progress", is_flag=True,
              help="No progress bar: one plain stderr line per logged step instead (loss, lr, tokens/s, elapsed, ETA).")
@click.option("--time-limit", type=POSITIVE, default=None,
              help="Stop (and save) after the step that crosses this many seconds; --resume continues.")
@click.option("--no-save", is_flag=True, help="Write the log only, no checkpoints (speed and memory runs).")
@click.option("--no-memory-check", is_flag=True, help="Start even where the memory estimate says the run cannot fit.")
def gpt_cmd(codes, out, row_start, no_decay, sets, no_progress, no_save, no_memory_check, **options):
    """Train LASADGen on code sets (from lasad-train codes) into OUT. Several CODES of different grid
    sizes (one tokenizer, one label set, e.g. the same images at 64 and 96 px) train one model at
    every size: each step's batch comes from one grid, chosen by the seed and the step; the first
    CODES' grid is the model's default."""
    from .gpt import GPTTrainArgs, train_gpt

    folders = str(codes[0]) if len(codes) == 1 else [str(c) for c in codes]
    args = GPTTrainArgs(codes=folders, out=str(out), overrides=parse_sets(sets, row_start, no_decay),
                        progress=not no_progress, save=not no_save, memory_check=not no_memory_check, **options)
    summary = train_gpt(args)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
