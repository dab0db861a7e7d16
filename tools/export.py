"""`lasad-export [CKPT] OUT`: the decode step as ONNX (`.onnx`) or as a TensorRT plan (`.plan`).

CKPT is anything `resolve_checkpoint` takes: "default" (the bundled model, also when CKPT is left
out), a model folder (`save_pretrained`), or a ckpt.pt / .safetensors file.

    lasad-export step.onnx                         # the bundled model
    lasad-export ckpt.pt step.onnx                 # LasadStep custom node (+ step.sampler.onnx)
    lasad-export ckpt.pt step.onnx --portable      # standard ONNX ops only
    lasad-export ckpt.pt step.onnx --dtype fp16 --rows 16   # fp16 weights, 16 fixed rows (GPU graphs)
    lasad-export ckpt.pt step.onnx --weights int8  # decode matrices int8 + per-channel scales (QDQ)
    lasad-export ckpt.pt engine.plan --onnx-dir build/onnx --timing-cache build/trt.cache
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from lasad_engine.cli import FiniteFloat, OneLineCommand
from lasad_engine.params import MAX_BATCH, MAX_TEMPERATURE, MAX_TOP_K, WEIGHT_CHOICES

FORMATS = ("onnx", "plan")
DTYPES = ("fp32", "fp16", "bf16")  # tools/onnx_export.py DTYPES (this module imports no torch for --help)
QDQ_MIN_OPSET = {"int8": 13, "fp8": 19}  # tools/onnx_export.py QDQ_MIN_OPSET
TENSORRT_HINT = ("building a .plan needs NVIDIA TensorRT >= 10.9 with its Python plugin API, Triton >= 3.3 and "
                 "a GPU TensorRT supports: pip install -e '.[tensorrt]' in lasad's folder "
                 "(or export ONNX: lasad-export CKPT step.onnx)")


NAME = "lasad-export"


def relative_tokenizer(meta: dict, tokenizer: Path | None, written: Path) -> dict:
    """`meta` with the tokenizer named relative to the folder of the file it is written into, as
    checkpoints name theirs, so that an export and its tokenizer can move together."""
    if tokenizer is None:
        return meta
    return {**meta, "tokenizer": os.path.relpath(tokenizer, Path(written).resolve().parent)}


@click.command(NAME, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, metavar="[CHECKPOINT] OUT", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Default: from OUT's suffix.")
@click.option("--portable", is_flag=True, help="The LASAD step in standard ONNX ops instead of the LasadStep node.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, MAX_BATCH),
              help="Images per step; the graph takes up to 2x this many rows (CFG).")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(14, 21))
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="Weights and activations (ONNX output). The state and the logits stay fp32.")
@click.option("--weights", type=click.Choice(WEIGHT_CHOICES), default=None,
              help="The decode matrices: float (in --dtype), int8 or fp8 (opset >= 19): stored quantised with one "
                   "fp32 scale per output channel, each read through a DequantizeLinear (onnxruntime and TensorRT "
                   "run it) [default: as the checkpoint holds them].")
@click.option("--rows", type=click.IntRange(1, 2 * MAX_BATCH), default=None,
              help="A fixed row count (2x images with CFG) instead of a dynamic axis: for onnxruntime's "
                   "CUDA graphs (ONNX output). Default: dynamic, up to 2x --max-batch.")
@click.option("--sampler/--no-sampler", default=True, show_default=True,
              help="Also write OUT's stem + .sampler.onnx (ONNX output only).")
@click.option("--temperature", default=1.0, show_default=True, type=FiniteFloat(0, MAX_TEMPERATURE))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0, MAX_TOP_K))
@click.option("--top-p", default=1.0, show_default=True, type=FiniteFloat(0, 1, min_open=True))
@click.option("--onnx-dir", type=click.Path(path_type=Path), default=None,
              help="For .plan: keep the intermediate ONNX here.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="For .plan: TensorRT timing cache.")
@click.option("--force", is_flag=True, help="Replace OUT (and the files written beside it) if they exist.")
@click.option("-v", "--verbose", is_flag=True, help="TensorRT builder log.")
def main(paths, fmt, portable, max_batch, opset, dtype, weights, rows, sampler, temperature, top_k, top_p, onnx_dir,
         timing_cache, force, verbose):
    """Export one LASADGen decode step (ids, pos, width, past states -> logits, present states).

    CHECKPOINT: 'default' (the bundled model; the default when left out), a model folder
    (save_pretrained), ckpt.pt or .safetensors. OUT: a .onnx or .plan file.
    """
    if len(paths) not in (1, 2):
        raise click.UsageError(f"give OUT, or CHECKPOINT and OUT ({len(paths)} paths given)")
    checkpoint, out = (None, paths[0]) if len(paths) == 1 else paths
    fmt = fmt or {".onnx": "onnx", ".plan": "plan"}.get(out.suffix.lower())
    if fmt is None:
        raise click.UsageError(f"OUT {str(out)!r} must end in .onnx or .plan (or pass --format onnx|plan)")
    if fmt == "plan":
        try:
            import tensorrt  # noqa: F401
            import tensorrt.plugin  # noqa: F401
        except ImportError:
            raise click.ClickException(TENSORRT_HINT) from None
        from lasad_plugins.lasad_step.defs import check_versions
        check_versions()
    if fmt == "plan" and (dtype != "fp32" or rows is not None):
        raise click.UsageError("--dtype and --rows apply to ONNX output; a .plan is built from the fp32 step")
    if rows is not None and rows > 2 * max_batch:  # the engine runs at most 2 x max_batch rows (CFG)
        raise click.UsageError(f"--rows {rows} is more than 2 x --max-batch {max_batch} (the rows of {max_batch} "
                               f"images with CFG); pass --max-batch {-(-rows // 2)} or at most {2 * max_batch} rows")
    if weights in QDQ_MIN_OPSET and opset < QDQ_MIN_OPSET[weights]:
        raise click.UsageError(f"--weights {weights} needs --opset {QDQ_MIN_OPSET[weights]} or later "
                               f"(DequantizeLinear of {weights}), got {opset}")
    targets = _outputs(out, fmt, sampler, onnx_dir)
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise click.ClickException(f"{existing[0]} exists; pass --force to replace it"
                                   + (f" (and {len(existing) - 1} more file(s) this export writes)" if len(existing) > 1 else ""))
    from lasad_engine.checkpoint import file_fingerprint, followed_tokenizer, load_checkpoint, resolve_checkpoint, \
        stored_weights
    from lasad_engine.io import check_writable, remove_stale_temps
    from lasad_engine.params import check_memory, memory_stage

    for p in targets:
        check_writable(p, "output")
    checkpoint = resolve_checkpoint(checkpoint)
    # the file's own form (a quantised checkpoint stays quantised, on the CPU too), then --weights
    model = load_checkpoint(checkpoint, weights=stored_weights(checkpoint))
    cfg = model.config
    # The exporters trace with example inputs of the largest batch: the states of 2 x max_batch
    # rows, and the sampler's logits and noise.
    check_memory(cfg.state_nbytes(2 * max_batch) + 4 * 3 * max_batch * cfg.vocab_size, _cpu(),
                 f"tracing an export for --max-batch {max_batch}", "use a smaller --max-batch")
    meta = {**model.checkpoint_meta, "checkpoint_sha256": file_fingerprint(checkpoint)}
    tok = meta.get("tokenizer")
    if isinstance(tok, str):  # the checkpoint names it relative to itself
        tok = (Path(checkpoint).parent / tok).resolve()
        # the name the export records (relative_tokenizer), as the reader will follow it or not
        if followed_tokenizer(os.path.relpath(tok, out.parent.resolve()), out) is None:
            click.echo(f"note: the tokenizer {tok} lies outside {out.parent}; lasad opens only tokenizers in an "
                       f"exported file's folder, so running {out.name} needs --tokenizer {tok} (or a copy beside it)",
                       err=True)
    else:
        tok = None
    for folder in {p.parent for p in targets}:
        remove_stale_temps(folder)
    with memory_stage(f"exporting the step for --max-batch {max_batch}",
                      "free memory, or pass a smaller --max-batch (the trace holds 2 x --max-batch rows of state)"):
        _export(model, out, fmt, portable, max_batch, opset, meta, tok, dtype, weights, rows, sampler, temperature,
                top_k, top_p, onnx_dir, timing_cache, verbose)


def _export(model, out, fmt, portable, max_batch, opset, meta, tok, dtype, weights, rows, sampler, temperature,
            top_k, top_p, onnx_dir, timing_cache, verbose):
    """Write the step (and its sampler graph) as ONNX, or build the plan; print what was written."""
    from lasad_engine.quant import weights_format

    from .onnx_export import export_sampler, export_step
    if fmt == "onnx":
        export_step(model, out, portable=portable, max_batch=max_batch, opset=opset,
                    meta=relative_tokenizer(meta, tok, out), dtype=dtype, rows=rows, weights=weights)
        written = [str(out)]
        if sampler:
            s = out.with_name(out.stem + ".sampler.onnx")
            export_sampler(s, vocab=model.config.vocab_size, max_batch=max_batch, temperature=temperature,
                           top_k=top_k, top_p=top_p, opset=opset)
            written.append(str(s))
        click.echo(json.dumps({"written": written, "form": "portable" if portable else "custom",
                               "opset": opset, "max_batch": max_batch, "dtype": dtype,
                               "weights": weights or weights_format(model),
                               "rows": rows or "dynamic"}, allow_nan=False))
        return
    from .trt_build import build_plan
    with tempfile.TemporaryDirectory() as tmp:
        folder = onnx_dir or Path(tmp)
        step = Path(folder) / (out.stem + ".onnx")
        export_step(model, step, portable=portable, max_batch=max_batch, opset=opset,
                    meta=relative_tokenizer(meta, tok, step), weights=weights)
        build_plan(step, out, max_rows=2 * max_batch, opset=opset, timing_cache=timing_cache, verbose=verbose,
                   meta=relative_tokenizer(meta, tok, out))
    click.echo(json.dumps({"written": [str(out), str(out.with_suffix(".json"))], "opset": opset}))


def _cpu():
    import torch
    return torch.device("cpu")


def _outputs(out: Path, fmt: str, sampler: bool, onnx_dir) -> list[Path]:
    """Every file an export may write: OUT, its external-data file, the sampler graph beside it
    (ONNX), or the plan's engine.json and the kept intermediate ONNX (plan)."""
    if fmt == "onnx":
        files = [out, out.with_name(out.name + ".data")]
        if sampler:
            files.append(out.with_name(out.stem + ".sampler.onnx"))
        return files
    files = [out, out.with_suffix(".json")]
    if onnx_dir is not None:
        step = Path(onnx_dir) / (out.stem + ".onnx")
        files += [step, step.with_name(step.name + ".data")]
    return files


if __name__ == "__main__":
    main()
