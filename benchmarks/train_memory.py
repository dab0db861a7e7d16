"""Check `lasad_train.memory`'s estimate against the peak memory of real training steps on a CPU.

Each shape runs in a fresh process: two AdamW steps of LasadGen (torch chunked form, fp32) at a
16x16 grid, the peak resident memory above the process's baseline (`ru_maxrss`) against the
estimate's total. Prints a table, writes JSON (date, device, commit) to --out.

    python benchmarks/train_memory.py --out benchmarks/results
"""

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import _repo  # noqa: F401  (the repository importable from a bare checkout)

SHAPES = [("lasad-tiny", 8, 4096), ("lasad-tiny", 32, 4096), ("lasad-tiny", 16, 16384), ("lasad-tiny", 64, 16384),
          ("lasad-S", 4, 4096), ("lasad-S", 16, 4096), ("lasad-B", 4, 16384), ("lasad-B", 8, 16384)]


def measure(preset: str, batch: int, vocab: int) -> dict:
    """One shape, in this process: estimate, then two real steps."""
    import torch
    import torch.nn.functional as F

    from lasad_engine import LasadConfig, LasadGen
    from lasad_train.memory import estimate
    cfg = LasadConfig.from_preset(preset, vocab_size=vocab, num_classes=100, grid_height=16, grid_width=16)
    mem = estimate(cfg)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = LasadGen(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randint(0, vocab, (batch, 256)), torch.randint(0, 100, (batch,))
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, y, backend="torch").flatten(0, 1), x.flatten()).backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    return {"preset": preset, "batch": batch, "vocab": vocab, "estimate_GiB": mem.total(batch) / 2**30,
            "measured_peak_GiB": peak / 2**30, "measured_over_estimate": peak / mem.total(batch)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--one", nargs=3, metavar=("PRESET", "BATCH", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    rows = []
    for preset, batch, vocab in SHAPES:
        p = subprocess.run([sys.executable, __file__, "--one", preset, str(batch), str(vocab)],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"date": datetime.date.today().isoformat(), "device": f"CPU, {platform.processor() or platform.machine()}",
              "commit": commit, "command": "python benchmarks/train_memory.py", "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{result['date']}-cpu-train-memory.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'shape':<24}{'estimate GiB':>14}{'peak GiB':>10}{'peak/est':>10}")
    for r in rows:
        print(f"{r['preset'] + ' b' + str(r['batch']) + ' V' + str(r['vocab']):<24}{r['estimate_GiB']:>14.2f}"
              f"{r['measured_peak_GiB']:>10.2f}{r['measured_over_estimate']:>10.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
