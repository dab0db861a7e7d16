"""The spatial-aware-decay ablation, end to end, at a scale set by the arguments.

    python benchmarks/ablation.py --work /tmp/ablation --out docs/ablation [--gpt-steps 1500] [--device cpu]

One image set (Fashion-MNIST: 32×32, 10 classes), one VQ tokenizer (f = 4: 8×8 tokens), one code
set; then the same GPT shape, budget and seed for each variant: row_start none (plain HGRN2),
unit (LASAD's default), reset, and no decay (plain linear attention). Each gets its held-out
teacher-forced loss, FID and KID of generated images against the held-out real ones, and a sample
grid. Writes OUT/ablation.json and OUT/<variant>.png; every stage resumes from what is on disk.

Meant for the GPU machine (device="cuda"): on a 2-core CPU the f = 4 tokenizer trains at about
14 images/s, and encoding the 70k images alone takes longer than a session allows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VARIANTS = {  # name -> lasad-train gpt options
    "none": ["--row-start", "none"],
    "unit": ["--row-start", "unit"],
    "reset": ["--row-start", "reset"],
    "no-decay": ["--no-decay"],
}


def sh(*args):
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True)


def heldout_loss(model_path: Path, codes_dir: Path, device) -> float:
    from lasad_engine import load_checkpoint
    from lasad_train.codes import load_codes
    model = load_checkpoint(model_path, device=device)
    codes, labels, _ = load_codes(codes_dir)
    codes = torch.as_tensor(np.asarray(codes)).flatten(1)
    labels = torch.as_tensor(np.asarray(labels))
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(codes), 256):
            x, y = codes[i:i + 256].to(device), labels[i:i + 256].to(device)
            total += F.cross_entropy(model(x, y).flatten(0, 1), x.flatten(), reduction="sum").item()
            n += x.numel()
    return total / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vq-steps", type=int, default=600)
    ap.add_argument("--gpt-steps", type=int, default=1500)
    ap.add_argument("--gpt-batch", type=int, default=64)
    ap.add_argument("--num-fid", type=int, default=500)
    ap.add_argument("--num-ref", type=int, default=1000)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--inception", type=Path, required=True)
    args = ap.parse_args()
    w, lt = args.work, [sys.executable, "-m", "lasad_train.cli"]
    w.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}
    if not (w / "fmnist" / "manifest.json").is_file():
        sh(*lt, "data", "fashion-mnist", w / "fmnist")
    timings["data"] = time.time() - t0
    if not (w / "vq" / "vq.safetensors").is_file():
        sh(*lt, "tokenizer", w / "fmnist", w / "vq", "--preset", "vq-f4-demo", "--steps", args.vq_steps,
           "--batch-size", 32, "--device", args.device, "--no-progress", "--log-every", 50)
    timings["tokenizer"] = time.time() - t0
    for split in ("train", "holdout"):
        if not (w / f"codes-{split}" / "manifest.json").is_file():
            sh(*lt, "codes", w / "fmnist", w / "vq" / "vq.safetensors", w / f"codes-{split}", "--split", split,
               "--no-flip", "--device", args.device, "--no-progress", "--batch-size", 256)
    timings["codes"] = time.time() - t0
    shape = ["--preset", "lasad-tiny", "--set", "dim=128", "--set", "n_layer=4", "--set", "n_head=2",
             "--set", "head_k_dim=64"]
    results = {}
    for name, opts in VARIANTS.items():
        run = w / f"gpt-{name}"
        if not (run / "model.safetensors").is_file() or json.loads(
                (run / "log.jsonl").read_text().splitlines()[-1])["step"] < args.gpt_steps:
            sh(*lt, "gpt", w / "codes-train", run, *shape, *opts, "--steps", args.gpt_steps, "--batch-size",
               args.gpt_batch, "--lr", "1e-3", "--warmup", 100, "--seed", 0, "--device", args.device,
               "--no-progress", "--log-every", 50, "--save-every", 500, "--resume")
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        results[name] = {"train_loss": float(np.mean([r["loss"] for r in log[-5:]])),
                         "heldout_loss": heldout_loss(run / "model.safetensors", w / "codes-holdout", args.device)}
        fid_json = run / "fid.json"
        if not fid_json.is_file():
            sh(sys.executable, "-m", "lasad_tools.evaluate", "fid", "--ref", w / "fmnist", "--label-set", "class",
               "--checkpoint", run / "model.safetensors", "--num", args.num_fid, "--cfg-scale", args.cfg_scale,
               "--inception", args.inception, "--device", args.device, "-o", fid_json, "--num-ref", args.num_ref,
               "--ref-features", w / "ref-features.npy")
        results[name].update({k: v for k, v in json.loads(fid_json.read_text()).items() if k in ("fid", "kid", "kid_std")})
        png = args.out / f"{name}.png"
        sh(sys.executable, "-m", "lasad_engine.cli", "--checkpoint", run / "model.safetensors",
           *sum((["-c", str(c)] for c in range(10)), []), "-n", 4, "--nrow", 8, "--cfg-scale", args.cfg_scale,
           "--seed", 0, "--device", args.device, "--no-progress", "-o", png)
        timings[f"gpt-{name}"] = time.time() - t0
        (args.out / "ablation.json").write_text(json.dumps({"results": results, "args": {
            k: str(v) for k, v in vars(args).items()}, "seconds": timings}, indent=1))
        print(name, results[name], flush=True)


if __name__ == "__main__":
    main()
