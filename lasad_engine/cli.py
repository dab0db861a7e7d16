"""`lasad-run`: generate images from a checkpoint (default: the bundled model) into a PNG grid."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click
import numpy as np

from . import __version__
from .backends import BACKENDS

EXIT_USAGE, EXIT_ERROR = 2, 1


class OneLineErrors:
    """Mixin for click commands and groups: every error a user can cause ends as one line on
    stderr and a non-zero exit code (2 for usage, 1 otherwise, 130 when interrupted)."""

    def main(self, args=None, prog_name=None, **kwargs):
        from .io import UserError

        prog = prog_name or self.name
        try:
            return super().main(args, prog_name=prog_name, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            click.echo(f"{prog}: error: {e.format_message()} (see {prog} --help)", err=True)
            sys.exit(EXIT_USAGE)
        except (click.ClickException, UserError, OSError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            click.echo(f"{prog}: error: {' '.join(msg.split())}", err=True)
            sys.exit(getattr(e, "exit_code", EXIT_ERROR) or EXIT_ERROR)
        except click.Abort:
            click.echo(f"{prog}: aborted", err=True)
            sys.exit(130)


class OneLineCommand(OneLineErrors, click.Command):
    pass


def image_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """uint8 [n, H, W, 3] -> one [rows·(H+pad)+pad, nrow·(W+pad)+pad, 3] grid on white."""
    n, H, W, C = images.shape
    ncol = max(1, min(nrow, n))
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (H + pad) + pad, ncol * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y:y + H, x:x + W] = img
    return grid


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    from .io import atomic_path
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


NAME = "lasad-run"


@click.command(NAME, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--class", "classes", multiple=True, metavar="ID|NAME",
              help="Class to draw (repeatable): an id, or a name where the checkpoint carries names.")
@click.option("-n", "--num-samples", default=4, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Images per class.")
@click.option("--seed", type=click.IntRange(0, (1 << 63) - 1), default=None,
              help="Random seed (default 0, printed on stderr when not given).")
@click.option("--cfg-scale", default=4.0, show_default=True, type=float,
              help="Classifier-free guidance scale (1 = off).")
@click.option("--cfg-interval", default=-1, show_default=True, type=click.IntRange(min=-1),
              help="Guidance only for positions <= this; -1 = every step.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Sampling temperature (0 = greedy).")
@click.option("--top-k", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Keep the k most likely tokens (0 = off; LlamaGen's default).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Top-p (1 = off).")
@click.option("--grid", default=None, metavar="HxW",
              help="Token grid to generate, e.g. 32x32 (default: the checkpoint's trained grid).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Decode backend (default: cuda on a GPU, else torch).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="'default' (the bundled model; the default), a model folder (save_pretrained), ckpt.pt, "
                   ".safetensors, step.onnx or engine.plan.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="VQ tokenizer checkpoint (default: the one the checkpoint names).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Weight precision; the state stays fp32 (default: bf16 on CUDA, fp32 on CPU).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 65536),
              help="Images decoded together (buffers are sized for this).")
@click.option("--no-cuda-graph", is_flag=True, help="Replay nothing: launch every kernel (debugging).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024),
              help="CPU threads for the token decode (default 1: decode-sized products gain nothing from more).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="PNG grid to write (default: lasad_<classes>_seed<seed>.png).")
@click.option("--nrow", default=None, type=click.IntRange(min=1), help="Images per grid row (default: num-samples).")
@click.option("--save-individual", is_flag=True, help="Also write <output stem>/<i:06d>.png for every image.")
@click.option("--json", "json_out", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--list-classes", is_flag=True, help="List the checkpoint's classes and exit.")
@click.version_option(__version__, "--version", prog_name="lasad-run")
def run_main(classes, num_samples, seed, cfg_scale, cfg_interval, temperature, top_k, top_p, grid,
             backend, checkpoint, tokenizer, device, precision, max_batch, no_cuda_graph, threads, output, nrow,
             save_individual, json_out, no_progress, list_classes):
    """Generate class-conditional images with LASADGen and write them as a PNG grid."""
    from .params import MAX_IMAGES, SamplingParams, parse_grid

    if not classes and not list_classes:
        raise click.UsageError("no class given: pass --class ID (or --list-classes)")
    params = SamplingParams(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                            top_k=top_k, top_p=top_p)  # validated before anything is loaded
    if grid is not None:
        grid = parse_grid(grid, None)
    if len(classes) * num_samples > MAX_IMAGES:
        raise click.UsageError(f"{len(classes)} classes x {num_samples} samples: at most {MAX_IMAGES} images per run")
    if output is not None and output.suffix.lower() != ".png":
        raise click.UsageError(f"--output {str(output)!r} must end in .png")
    t0 = time.perf_counter()
    from .pipeline import LasadPipeline
    pipe = LasadPipeline.from_checkpoint(checkpoint, tokenizer=tokenizer, backend=backend, device=device,
                                         precision=precision, max_batch=max_batch,
                                         use_cuda_graph=not no_cuda_graph, threads=threads)
    with pipe:
        cfg = pipe.model.config
        if list_classes:
            names = cfg.class_names or []
            for i in range(cfg.num_classes):
                click.echo(f"{i}\t{names[i]}" if names else str(i))
            return
        note = pipe.model.checkpoint_meta.get("note")
        if note:
            click.echo(f"note: {pipe.checkpoint_path.name}: {note}", err=True)
        labels = pipe.class_labels([c for c in classes for _ in range(num_samples)])
        ids = labels.tolist()[::num_samples]
        grid = parse_grid(grid, (cfg.grid_height, cfg.grid_width))
        if pipe.grid_note(grid):
            click.echo(pipe.grid_note(grid), err=True)
        if seed is None:
            seed = 0
            click.echo("seed: 0 (the default; --seed N for others)", err=True)
        if output is None:
            output = Path(f"lasad_{'-'.join(str(i) for i in ids)}_seed{seed}.png")
        import torch
        t_load = time.perf_counter() - t0
        out = pipe(labels, params=params, generator=torch.Generator(pipe.device).manual_seed(seed),
                   output_type="np", grid=grid, progress=not no_progress)
        save_png(output, image_grid(out.images, nrow or num_samples))
        individual = []
        if save_individual:
            folder = output.with_suffix("")
            for i, img in enumerate(out.images):
                individual.append(str(folder / f"{i:06d}.png"))
                save_png(Path(individual[-1]), img)
        record = {
            "output": str(output), "individual": individual, "classes": ids,
            "class_names": [cfg.class_names[i] for i in ids] if cfg.class_names else None,
            "num_samples": num_samples, "seed": seed, "cfg_scale": params.cfg_scale,
            "cfg_interval": params.cfg_interval, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p, "grid": list(grid), "backend": pipe.backend, "device": str(pipe.device),
            "precision": precision or str(pipe.model.output.weight.dtype).split(".")[-1],
            "cuda_graph": not no_cuda_graph, "max_batch": max_batch,
            "checkpoint": str(pipe.checkpoint_path), "checkpoint_sha256": pipe.checkpoint_id,
            "lasad_version": __version__, "torch": torch.__version__,
            "seconds": {"load": round(t_load, 3), **{k: round(v, 3) for k, v in out.seconds.items()}},
            "ms_per_image": round(out.seconds["generate"] * 1e3 / len(labels), 2),
            "state_bytes": pipe.state_nbytes,
        }
        from .io import atomic_write_text
        atomic_write_text(output.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    if json_out:
        click.echo(json.dumps(record))
    else:
        click.echo(f"wrote {output} ({len(labels)} images, {grid.h}x{grid.w} tokens) in {out.seconds['generate']:.2f} s "
                   f"+ {out.seconds['vq_decode']:.2f} s VQ decode; parameters in {output.with_suffix('.json')}")


if __name__ == "__main__":
    run_main()
