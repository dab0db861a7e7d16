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
from pathlib import Path

import click

from lasad_engine.cli import OneLineCommand

NAME = "lasad-check"
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 5e-2}  # the module docstring says where they come from


class Mismatch(click.ClickException):
    exit_code = 1


@click.command(NAME, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "cuda"]), default=None,
              help="Default: from ARTIFACT's suffix (.onnx -> onnxruntime, .plan -> tensorrt).")
@click.option("--images", default=2, show_default=True, type=click.IntRange(min=1), help="Sequences (x2 rows with CFG).")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Positions (default: the whole grid).")
@click.option("--tol", default=None, type=click.FloatRange(min=0),
              help="Max relative error. Default by the step's dtype: fp32 1e-4, fp16 5e-3, bf16 5e-2.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="Device of the reference (and of cuda/tensorrt).")
def main(artifact, checkpoint, backend, images, steps, tol, seed, device):
    """Teacher-forced logits of ARTIFACT against the torch reference of CHECKPOINT.

    CHECKPOINT: 'default' (the bundled model; the default when left out), a model folder
    (save_pretrained), ckpt.pt or .safetensors.
    """
    import torch

    from lasad_engine.checkpoint import load_checkpoint, resolve_checkpoint
    from lasad_engine.engine import LasadEngine
    from lasad_engine.params import resolve_device

    from lasad_engine.backends import ARTIFACT_BACKENDS
    backend = backend or ARTIFACT_BACKENDS.get(artifact.suffix)
    if backend is None:
        raise click.UsageError(f"cannot tell the backend of {str(artifact)!r}: pass --backend")
    device = resolve_device(device or ("cpu" if backend == "onnxruntime" else None))
    if tol is None:
        tol = TOLERANCES[_artifact_dtype(artifact, backend)]
    checkpoint = resolve_checkpoint(checkpoint)
    model = load_checkpoint(checkpoint, device=device)
    cfg = model.config
    T = steps or cfg.seq_len
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (images, T), generator=gen).to(device)
    labels = torch.randint(0, cfg.num_classes, (images,), generator=gen).to(device)
    ref = LasadEngine(model, backend="torch", device=device, max_batch=images).teacher_forced_logits(
        tokens, labels, cfg_rows=True)
    path = None if backend == "cuda" else artifact
    got = LasadEngine(model, backend=backend, device=device, max_batch=images, artifact=path).teacher_forced_logits(
        tokens, labels, cfg_rows=True)
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    per_step = ((got - ref).double().norm(dim=(0, 2)) / ref.double().norm(dim=(0, 2)).clamp_min(1e-30)).tolist()
    worst = max(range(T), key=lambda i: per_step[i])
    summary = {"artifact": str(artifact), "backend": backend, "rows": 2 * images, "steps": T, "rel_err": err,
               "worst_step": worst, "worst_step_rel_err": per_step[worst], "tol": tol, "pass": err <= tol}
    click.echo(json.dumps(summary))
    if err > tol:
        raise Mismatch(f"{artifact} differs from {checkpoint}: relative error {err:.3e} > tol {tol:.1e} "
                       f"(worst at step {worst}: {per_step[worst]:.3e})")


def _artifact_dtype(artifact: Path, backend: str) -> str:
    if backend != "onnxruntime":
        return "fp32"
    import onnx
    props = {p.key: p.value for p in onnx.load(str(artifact), load_external_data=False).metadata_props}
    return props.get("lasad.dtype", "fp32")


if __name__ == "__main__":
    main()
