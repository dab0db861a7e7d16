"""Plot the one- vs two-GPU loss curves of a multi-GPU results file.

    python benchmarks/plot_multi_gpu.py benchmarks/results/2026-11-29-h200x2-multi-gpu.json docs/img/multi-gpu-loss.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(src: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(Path(src).read_text())["lasad_B_loss_1_vs_2_gpus"]
    panels = [("with_default_dropouts", "dropouts 0.1 (defaults)"), ("dropout_off", "dropouts off")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for col, (key, title) in enumerate(panels):
        r = runs[key]
        for name, label in (("one_gpu", "1 GPU, batch 64"), ("two_gpus", "2 GPUs (DDP), 32 + 32")):
            rows = [x for x in r[name] if x["step"] <= 200]
            axes[0, col].plot([x["step"] for x in rows], [x["loss"] for x in rows], label=label, lw=1.2)
        axes[0, col].set_title(f"lasad-B, {title}")
        axes[0, col].set_ylabel("training loss (nats)")
        axes[0, col].legend()
        steps, diffs = zip(*r["diff_by_step"])
        axes[1, col].axhline(0, color="grey", lw=0.8)
        axes[1, col].plot(steps, diffs, color="black", lw=1)
        axes[1, col].set_ylabel("2 GPUs − 1 GPU")
        axes[1, col].set_xlabel("step")
    fig.tight_layout()
    from lasad_engine.io import atomic_path
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    print(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    main(sys.argv[1], sys.argv[2])
