"""Issue 29's GPU call, in one command: the int8/fp8 benchmark, the `gpu` tests of the quantised
path and the tokens of the bundled model's FID check, each in its own process with a time limit
(one part failing leaves the others), summarised in DIR/int8_gpu_call.json.

    python benchmarks/int8_gpu_call.py --out DIR [--presets lasad-B,lasad-XL,lasad-XXL] [--batches 1,64]

Parts (expected on an H100: about 4, 2 and 1 minutes; each part's time limit, 300 + 180 + 100 s,
keeps the whole under the device's 10 minutes a command; `--parts bench` runs one part):
- bench: benchmarks/int8_bench.py -> DIR/int8_bench.json (µs per step, bf16 vs int8 vs fp8, logit errors);
- tests: pytest -m gpu on tests/test_quant.py and tests/test_linear.py -> DIR/gpu_tests.txt;
- quality: benchmarks/int8_quality.py --device cuda --draw-only -> DIR/int8-quality.tokens.npz (1,000
  images per variant, bf16 vs int8 weights, the same labels and seeds), scored afterwards on a
  machine with Emoji-5 and the Inception file:
  `python benchmarks/int8_quality.py --ref data/emoji5 --out DIR/int8-quality.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, cmd: list[str], out: Path, limit_s: int) -> dict:
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        code, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code = "timeout"
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    (out / f"{name}.log").write_text(text)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    result = {"command": " ".join(cmd), "returncode": code, "seconds": round(time.perf_counter() - t, 1),
              "last_line": lines[-1][-300:] if lines else ""}
    print(name, json.dumps(result), flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--presets", default="lasad-B,lasad-XL,lasad-XXL")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--parts", default="bench,tests,quality")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    parts = {
        "bench": ([py, "benchmarks/int8_bench.py", "--out", str(a.out), "--presets", a.presets,
                   "--batches", a.batches], 300),
        "tests": ([py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_quant.py",
                   "tests/test_linear.py"], 180),
        "quality": ([py, "benchmarks/int8_quality.py", "--labels", "benchmarks/results/emoji5-holdout-labels-1000.npy",
                     "--device", "cuda", "--draw-only", "--batch", "500", "--variants", "float,int8",
                     "--out", str(a.out / "int8-quality.json")], 100),
    }
    summary = {"command": " ".join([py] + sys.argv)}
    for name in a.parts.split(","):
        cmd, limit = parts[name]
        summary[name] = run(name, cmd, a.out, limit)
        (a.out / "int8_gpu_call.json").write_text(json.dumps(summary, indent=1) + "\n")
    bench = a.out / "int8_bench.json"
    if bench.is_file():
        summary["bench_rows"] = [{k: r.get(k) for k in ("preset", "variant", "images", "us_per_step", "speedup_vs_bf16")}
                                 for r in json.loads(bench.read_text())["rows"]]
    (a.out / "int8_gpu_call.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
