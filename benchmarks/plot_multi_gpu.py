"""Plot the one- vs two-GPU loss agreement (benchmarks/results/*-loss-agreement.json).

    python benchmarks/plot_multi_gpu.py benchmarks/results/2026-11-29-h200x2-loss-agreement.json docs/img/multi-gpu-loss.png

Top: the loss of every step, one GPU (batch 64 in one piece) and two GPUs (DDP, 32 + 32).
Bottom: each run minus its reference at the same step (the batches are the same): two GPUs vs one
GPU in the same micro-batches (bit-identical: a flat zero line), and the one-GPU runs that differ
only in micro-batching or precision, the scale of the numerical noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DIFFS = [  # (run, reference, label)
    ("n2", "n1-accum2", "2 GPUs − 1 GPU in the same micro-batches (identical)"),
    ("n2", "n1", "2 GPUs − 1 GPU (batch in one piece), bf16"),
    ("n1-accum4", "n1", "1 GPU: micro-batches of 16 − one piece, bf16"),
    ("f1-accum2", "f1", "1 GPU: micro-batches of 32 − one piece, fp32"),
]


def main(src: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = {n: dict(rows) for n, rows in json.loads(Path(src).read_text())["losses"].items()}
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for name, label in (("n1", "1 GPU, batch 64"), ("n2", "2 GPUs (DDP, NCCL), 32 + 32")):
        steps = sorted(losses[name])
        axes[0].plot(steps, [losses[name][s] for s in steps], label=label, lw=1.2)
    axes[0].set_ylabel("training loss (nats)")
    axes[0].set_title("lasad-B, same seed and batches, dropouts off")
    axes[0].legend()
    axes[1].axhline(0, color="grey", lw=0.8)
    for run, ref, label in DIFFS:
        if run in losses and ref in losses:
            steps = sorted(set(losses[run]) & set(losses[ref]))
            axes[1].plot(steps, [losses[run][s] - losses[ref][s] for s in steps], lw=1, label=label)
    axes[1].set_ylabel("loss difference")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    from lasad_engine.io import atomic_path
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    print(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2])
