"""How closely the loss curves of training runs on the same batches agree (the multi-GPU evidence).

    python benchmarks/loss_agreement.py MULTI_DIR [--one-gpu n1,...] [--two-gpu n2,...] [--out result.json]

MULTI_DIR holds one folder per run with the trainer's log.jsonl (benchmarks/device/multi_gpu.sh's step 6:
n1, n1-repeat, n1-accum2, n1-accum4 on one GPU; n2, n2-repeat, n2-accum2 on two). Every run draws
the batch of step s from (seed, s) alone, so the losses of two runs at one step are paired: they
differ only by what the runs compute differently (the split of the batch into micro-batches or
ranks, the order of the sums, bf16 rounding), and that difference grows along the trajectory.

Printed and written: for every pair of runs, the largest |difference| over steps 1-20 (warm-up,
before the trajectories part), the mean difference and the mean |difference| over steps 41-200;
for every run, its mean loss over steps 101-200 (the same 100 batches for all). The two-GPU runs
agree with one GPU "within bf16 noise" when their mean losses lie inside the range that the
one-GPU runs in other micro-batchings span, widened by that range's own size (a two-sided check
with as many runs as we have, not a significance test).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path


def read_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows}


def pair_stats(a: dict[int, float], b: dict[int, float]) -> dict:
    """b − a on the steps both logged."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise ValueError("the two runs logged no step in common")
    early = [abs(b[s] - a[s]) for s in steps if s <= 20]
    late = [b[s] - a[s] for s in steps if 40 < s <= 200]
    out = {"steps_compared": len(steps), "max_abs_diff_steps_le_20": max(early) if early else None,
           "identical_steps": sum(b[s] == a[s] for s in steps)}
    if late:
        out["mean_diff_steps_41_200"] = sum(late) / len(late)
        out["mean_abs_diff_steps_41_200"] = sum(abs(d) for d in late) / len(late)
    return out


def window_mean(losses: dict[int, float], lo: int = 101, hi: int = 200) -> float | None:
    vals = [v for s, v in losses.items() if lo <= s <= hi]
    return sum(vals) / len(vals) if vals else None


def agreement(runs: dict[str, dict[int, float]], one_gpu: list[str], two_gpu: list[str]) -> dict:
    """The pairwise table, the per-run window means and the verdict (see the module docstring)."""
    pairs = {f"{b} - {a}": pair_stats(runs[a], runs[b]) for a, b in itertools.combinations(sorted(runs), 2)}
    means = {name: window_mean(r) for name, r in runs.items()}
    ref = [means[n] for n in one_gpu if n in runs and means[n] is not None]
    test = {n: means[n] for n in two_gpu if n in runs and means[n] is not None}
    verdict = None
    if len(ref) >= 2 and test:
        lo, hi = min(ref), max(ref)
        width = hi - lo
        inside = {n: lo - width <= m <= hi + width for n, m in test.items()}
        verdict = {"one_gpu_range_steps_101_200": [lo, hi], "allowed": [lo - width, hi + width],
                   "two_gpu_means": test, "within": inside, "all_within": all(inside.values())}
    return {"pairs": pairs, "mean_loss_steps_101_200": means, "verdict": verdict}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("multi_dir", type=Path)
    ap.add_argument("--one-gpu", default="n1,n1-repeat,n1-accum2,n1-accum4")
    ap.add_argument("--two-gpu", default="n2,n2-repeat,n2-accum2")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    one, two = [n for n in a.one_gpu.split(",") if n], [n for n in a.two_gpu.split(",") if n]
    runs = {n: read_losses(a.multi_dir / n) for n in one + two if (a.multi_dir / n / "log.jsonl").is_file()}
    if not runs:
        print(f"no run of {', '.join(one + two)} has a log.jsonl under {a.multi_dir}", file=sys.stderr)
        return 1
    result = {"runs": sorted(runs), "losses": {n: [[s, r[s]] for s in sorted(r)] for n, r in runs.items()},
              **agreement(runs, one, two)}
    for k, v in result["pairs"].items():
        print(f"{k:24s} " + " ".join(f"{kk}={vv:.3g}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in v.items()))
    for k, v in result["mean_loss_steps_101_200"].items():
        print(f"mean loss 101-200 {k:12s} {v:.4f}" if v is not None else f"{k}: no steps 101-200")
    print("verdict:", json.dumps(result["verdict"]))
    if a.out:
        from lasad_engine.io import atomic_path
        with atomic_path(a.out) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
