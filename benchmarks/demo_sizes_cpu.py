"""What a larger bundled model would cost a CPU user (issue 28: a better model inside the 40 MB
budget, with `lasad-run --class 207` no more than 1.5x today's CPU time). Each candidate GPT size
gets random weights and the shipped model's metadata, is saved as the bundled file would be (fp16,
and int8 with per-channel scales), and is run through `lasad-run -c 207 --device cpu` beside the
shipped model in the same run; the seconds are those `lasad-run` reports for generating (the VQ
decode is the same for every size and reported apart).

    python benchmarks/demo_sizes_cpu.py --out sizes.json [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401

from lasad_engine import LasadConfig, LasadGen, quant, save_checkpoint  # noqa: E402
from lasad_engine.checkpoint import read_checkpoint  # noqa: E402

ASSETS = _repo.ROOT / "lasad_engine" / "assets"
# overrides of the shipped config: more layers, or a wider model (head dims kept at 64)
SIZES = {"shipped (5 layers, 384 wide)": None, "7 layers": dict(n_layer=7), "10 layers": dict(n_layer=10),
         "6 layers, 448 wide": dict(n_layer=6, dim=448, n_head=7, ffn_dim=1216),
         "6 layers, 512 wide": dict(n_layer=6, dim=512, n_head=8, ffn_dim=1376)}


def run(ckpt: Path, repeats: int) -> dict:
    gen, vq = [], []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeats):
            r = subprocess.run(["lasad-run", "--checkpoint", str(ckpt), "--tokenizer", str(ASSETS / "default-vq.safetensors"),
                                "-c", "207", "--device", "cpu", "-o", os.path.join(d, "x.png")],
                               capture_output=True, text=True)
            m = re.search(r"in ([0-9.]+) s \+ ([0-9.]+) s VQ decode", r.stdout + r.stderr)
            if r.returncode or not m:
                raise SystemExit(f"lasad-run failed on {ckpt}: {(r.stderr or r.stdout)[-400:]}")
            gen.append(float(m.group(1)))
            vq.append(float(m.group(2)))
    return {"generate_s": gen, "generate_median_s": statistics.median(gen), "vq_decode_median_s": statistics.median(vq)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    shipped = ASSETS / "default.safetensors"
    cfg, _, meta = read_checkpoint(shipped)
    config = cfg.to_dict()
    meta.pop("card", None)   # read_checkpoint adds the bundled model's card; the file itself has none
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=_repo.ROOT).stdout.strip()
    rec = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit, "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "command": " ".join(["python"] + sys.argv), "sizes": []}
    base = None
    with tempfile.TemporaryDirectory() as d:
        for name, over in SIZES.items():
            model = LasadGen(LasadConfig(**{**config, **(over or {})})).half()
            path = shipped
            if over is not None:   # the shipped file itself for the shipped size, else random weights
                path = Path(d) / "m.safetensors"
                save_checkpoint(path, model, meta=meta)
            row = {"size": name, "overrides": over, **run(path, a.repeats),
                   "parameters": sum(p.numel() for p in model.parameters()), "fp16_file_mb": path.stat().st_size / 1e6}
            qpath = Path(d) / "q.safetensors"
            save_checkpoint(qpath, quant.quantize_(model, "int8"), meta=meta)   # norms, embeddings stay fp16
            row["int8_file_mb"] = qpath.stat().st_size / 1e6
            base = base or row["generate_median_s"]
            row["cpu_time_vs_shipped"] = row["generate_median_s"] / base
            rec["sizes"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "generate_s"}), flush=True)
    a.out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
