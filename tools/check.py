"""`lasad-check ARTIFACT [CKPT]`: prove a fast path equals the reference before trusting it.

CKPT is anything `resolve_checkpoint` takes; left out, the bundled model.

Teacher-forces the same random tokens (with the CFG rows) through the torch backend on CKPT and
through ARTIFACT's backend (step.onnx -> onnxruntime, engine.plan -> tensorrt, or CKPT itself with
--backend cuda), and compares every step's logits. Exit 0 when the relative error is within
--tol, 1 otherwise (one line saying by how much), as a CI gate for exports.

The default bound follows the exported step's dtype (`lasad-export --dtype`), measured against the
fp32 reference: fp32 1e-4; fp16 5e-3 (measured 1.0-1.4e-3 through onnxruntime's CPU provider on
random lasad-tiny / lasad-S weights); bf16 5e-2 (measured 1.2-1.7e-2 for the torch step in bf16;
onnxruntime's CPU provider has no bf16 kernels for the step's ops, so bf16 steps run on CUDA only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from lasad_engine.cli import FiniteFloat, OneLineCommand
from lasad_engine.params import MAX_BATCH, MAX_SEED, MAX_TOKENS

NAME = "lasad-check"
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 5e-2}  # the module docstring says where they come from
SHAPE_FIELDS = ("vocab_size", "num_classes", "n_layer", "dim", "n_head", "head_k_dim", "head_v_dim", "ffn_dim",
                "use_lower_bound")


class Mismatch(click.ClickException):
    exit_code = 1


@click.command(NAME, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "cuda"]), default=None,
              help="Default: from ARTIFACT's suffix (.onnx -> onnxruntime, .plan -> tensorrt).")
@click.option("--images", default=2, show_default=True, type=click.IntRange(1, MAX_BATCH),
              help="Sequences (x2 rows with CFG).")
@click.option("--steps", default=None, type=click.IntRange(1, MAX_TOKENS), help="Positions (default: the whole grid).")
@click.option("--tol", default=None, type=FiniteFloat(0, 1),
              help="Max relative error. Default by the step's dtype: fp32 1e-4, fp16 5e-3, bf16 5e-2.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEED))
@click.option("--device", default=None, help="Device of the reference (and of cuda/tensorrt).")
def main(artifact, checkpoint, backend, images, steps, tol, seed, device):
    """Teacher-forced logits of ARTIFACT against the torch reference of CHECKPOINT.

    CHECKPOINT: 'default' (the bundled model; the default when left out), a model folder
    (save_pretrained), ckpt.pt or .safetensors.
    """
    import torch

    from lasad_engine.checkpoint import load_checkpoint, resolve_checkpoint
    from lasad_engine.engine import LasadEngine
    from lasad_engine.params import check_memory, resolve_device

    from lasad_engine.backends import ARTIFACT_BACKENDS
    backend = backend or ARTIFACT_BACKENDS.get(artifact.suffix)
    if backend is None:
        raise click.UsageError(f"cannot tell the backend of {str(artifact)!r}: pass --backend")
    device = resolve_device(device or ("cpu" if backend == "onnxruntime" else None))
    dtype = "fp32"
    weights = None
    if backend == "onnxruntime":
        from lasad_engine.backends.ort import read_onnx_config, read_onnx_dtype
        # one line for a random, truncated or sampler .onnx, or a graph that breaks the step
        # contract (contract.check_step_graph), before anything else reads it
        art_cfg, art_meta, _ = read_onnx_config(artifact)
        dtype = read_onnx_dtype(artifact)
        # an export with int8 / fp8 weights (lasad-export --weights) is checked against the same
        # quantisation of the checkpoint, run by the torch definition
        weights = art_meta.get("weights") if art_meta.get("weights") in ("int8", "fp8") else None
    if tol is None:
        tol = TOLERANCES[dtype]
    checkpoint = resolve_checkpoint(checkpoint)
    model = load_checkpoint(checkpoint, device=device, weights=weights)
    cfg = model.config
    if backend == "onnxruntime":
        differ = [f for f in SHAPE_FIELDS if getattr(art_cfg, f) != getattr(cfg, f)]
        if differ:
            raise click.ClickException(f"{artifact} was exported from a model of another shape than {checkpoint} "
                                       f"({differ[0]} {getattr(art_cfg, differ[0])} vs {getattr(cfg, differ[0])})")
    T = steps or cfg.seq_len
    # Both runs keep every step's logits of 2 x images rows: refuse what cannot fit.
    check_memory(2 * 4 * 2 * images * T * cfg.vocab_size, device, f"{images} images x {T} steps of logits",
                 "use fewer --images or --steps")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (images, T), generator=gen).to(device)
    labels = torch.randint(0, cfg.num_classes, (images,), generator=gen).to(device)
    ref = LasadEngine(model, backend="torch", device=device, max_batch=images).teacher_forced_logits(
        tokens, labels, cfg_rows=True)
    path = None if backend == "cuda" else artifact
    got = LasadEngine(model, backend=backend, device=device, max_batch=images, artifact=path).teacher_forced_logits(
        tokens, labels, cfg_rows=True)
    err = ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    per_step = ((got - ref).double().norm(dim=(0, 2)) / ref.double().norm(dim=(0, 2)).clamp_min(1e-30))
    per_step = per_step.nan_to_num(nan=float("inf")).tolist()  # a NaN step is the worst step
    worst = max(range(T), key=lambda i: per_step[i])
    passed = math.isfinite(err) and err <= tol  # NaN compares false with everything: never a pass
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731 - JSON has no NaN or inf
    summary = {"artifact": str(artifact), "backend": backend, "rows": 2 * images, "steps": T, "rel_err": finite(err),
               "worst_step": worst, "worst_step_rel_err": finite(per_step[worst]), "tol": tol, "pass": passed}
    click.echo(json.dumps(summary, allow_nan=False))
    if not passed:
        raise Mismatch(f"{artifact} differs from {checkpoint}: relative error {err:.3e} > tol {tol:.1e} "
                       f"(worst at step {worst}: {per_step[worst]:.3e})")


if __name__ == "__main__":
    main()
