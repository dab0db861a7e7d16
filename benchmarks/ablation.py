"""The spatial-aware-decay ablation: four GPTs, same shape, data, budget and seed.

    # on the GPU machine: codes, the four trainings (side by side on one GPU), held-out loss, samples
    python benchmarks/ablation.py train --images SET --vq VQ --work W [--steps 3000] [--parallel]
    # anywhere (CPU is fine): decode the samples, FID / KID against SET's held-out images, grids
    python benchmarks/ablation.py evaluate --images SET --vq VQ --work W --out docs/ablation

Variants (`lasad-train gpt` options): row_start none (plain HGRN2), unit (LASAD's default), reset,
and no decay (plain linear attention, log-decay 0 everywhere). The task is an image set with one
label set, e.g. Emoji-5's subgroups with at least 40 images:

    lasad-train data subset data/emoji5 data/emoji5-sub40 --label-set subgroup --min-count 40

`train` writes W/train.json (steps reached, training and held-out loss, seconds) and, per
variant, W/samples-<v>.npy (tokens of generated images, labels drawn from the held-out class mix)
and W/grid-<v>.npy; `evaluate` writes OUT/ablation.json and OUT/<v>.png. Every stage skips what is
already on disk.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repo import ROOT  # noqa: E402,F401  (the checkout importable as installed)

from lasad_tools.evaluate import DEFAULT_CACHE  # noqa: E402

VARIANTS = {  # name -> lasad-train gpt options
    "none": ["--row-start", "none"],
    "unit": ["--row-start", "unit"],
    "reset": ["--row-start", "reset"],
    "no-decay": ["--no-decay"],
}
SHAPE = ["--preset", "lasad-S", "--set", "n_layer=4", "--set", "dim=256", "--set", "n_head=4"]
LT = [sys.executable, "-m", "lasad_train.cli"]
GRID_CLASSES = 8  # grid rows: the first classes of the label set, GRID_COLS samples each
GRID_COLS = 8


def sh(*args):
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True)


def log_rows(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def heldout_loss(model_path: Path, codes_dir: Path, device) -> float:
    """Mean next-token cross-entropy (nats) of a deploy checkpoint over a code set."""
    from lasad_engine import load_checkpoint
    from lasad_train.codes import load_codes
    model = load_checkpoint(model_path, device=device).eval()
    codes, labels, _ = load_codes(codes_dir)
    codes = torch.as_tensor(np.asarray(codes)).flatten(1)
    labels = torch.as_tensor(np.asarray(labels))
    total, n = 0.0, 0
    cuda = torch.device(device).type == "cuda"
    # bf16 autocast on CUDA, as in training (and the kernels it compiled; fp32 would compile anew)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for i in range(0, len(codes), 256):
            x, y = codes[i:i + 256].to(device), labels[i:i + 256].to(device)
            total += F.cross_entropy(model(x, y).float().flatten(0, 1), x.flatten(), reduction="sum").item()
            n += x.numel()
    return total / n


def sample_tokens(model_path: Path, labels: list[int], cfg_scale: float, seed: int, device, batch: int) -> np.ndarray:
    from lasad_engine.pipeline import LasadPipeline
    with LasadPipeline.from_checkpoint(model_path, device=device, max_batch=batch) as pipe:
        gen = torch.Generator(pipe.device).manual_seed(seed)
        out = pipe(labels, cfg_scale=cfg_scale, top_k=0, generator=gen, output_type="tokens", progress=False)
    return out.tokens.cpu().numpy().astype(np.int32)


def train(args) -> None:
    from lasad_tools.fid import generation_labels
    from lasad_train.formats import load_images
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    label_set = args.label_set
    t0 = time.time()
    for split, flip in (("train", "--flip"), ("holdout", "--no-flip")):
        if not (w / f"codes-{split}" / "manifest.json").is_file():
            sh(*LT, "codes", args.images, args.vq, w / f"codes-{split}", "--split", split, flip,
               "--label-set", label_set, "--device", args.device, "--no-progress", "--batch-size", 256)
    seconds = {"codes": round(time.time() - t0, 1)}
    common = [*SHAPE, "--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr, "--warmup",
              args.warmup, "--seed", 0, "--device", args.device, "--no-progress", "--log-every", 50,
              "--save-every", 10**9]
    if args.time_limit:
        common += ["--time-limit", args.time_limit]
    todo = [n for n in VARIANTS if not (log_rows(w / f"gpt-{n}") or [{"step": -1}])[-1]["step"] >= args.steps]
    procs = []
    for name in todo:
        resume = ["--resume"] if (w / f"gpt-{name}" / "last.pt").is_file() else []  # a new run refuses --resume
        cmd = [*LT, "gpt", w / "codes-train", w / f"gpt-{name}", *VARIANTS[name], *common, *resume]
        if args.parallel:
            print("+", " ".join(map(str, cmd)), "&", flush=True)
            log = open(w / f"gpt-{name}.out", "w")
            procs.append((name, subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)))
        else:
            sh(*cmd)
    for name, p in procs:
        if p.wait() != 0:
            sys.exit(f"ablation: variant {name} failed (exit {p.returncode}); see {w}/gpt-{name}.out")
    seconds["train"] = round(time.time() - t0, 1)

    _, ref_labels, names, _ = load_images(args.images, label_set, 1)
    labels = generation_labels(ref_labels, args.num_samples, args.seed)
    grid_labels = [c for c in range(min(GRID_CLASSES, len(names))) for _ in range(GRID_COLS)]
    np.save(w / "sample-labels.npy", np.asarray(labels, np.int64))
    results = {}
    for name in VARIANTS:
        run = w / f"gpt-{name}"
        rows = log_rows(run)
        model = run / "model.safetensors"
        results[name] = {
            "options": VARIANTS[name], "steps": rows[-1]["step"],
            "train_loss_last_200_steps": float(np.mean([r["loss"] for r in rows if r["step"] > rows[-1]["step"] - 200])),
            "heldout_loss": heldout_loss(model, w / "codes-holdout", args.device),
            "tokens_per_s_median": float(np.median([r["tokens_per_s"] for r in rows[1:]] or [0.0])),
        }
        for kind, labs in (("samples", labels), ("grid", grid_labels)):
            path = w / f"{kind}-{name}.npy"
            if not path.is_file():
                toks = sample_tokens(model, labs, args.cfg_scale, args.seed, args.device, args.sample_batch)
                np.save(path, toks)
        print(name, results[name], flush=True)
    seconds["total"] = round(time.time() - t0, 1)
    (w / "train.json").write_text(json.dumps({
        "results": results, "seconds": seconds, "shape": SHAPE, "label_set": label_set,
        "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}, indent=1))


def evaluate(args) -> None:
    from lasad_engine.cli import image_grid, save_png
    from lasad_engine.io import atomic_write_text
    from lasad_engine.pipeline import decode_codes, to_uint8
    from lasad_engine.tokenizer import load_tokenizer
    from lasad_tools.fid import InceptionFeatures, score
    from lasad_train.formats import load_images

    w, out = args.work, args.out
    out.mkdir(parents=True, exist_ok=True)
    trained = json.loads((w / "train.json").read_text())
    vq = load_tokenizer(args.vq, device=args.device).float().eval()
    ref = np.asarray(load_images(args.images, None, 1)[0])
    feats = InceptionFeatures(args.inception, args.device, args.batch_size)
    ref_path = w / "ref-features.npy"
    f_ref = np.load(ref_path) if ref_path.is_file() else feats(ref)
    np.save(ref_path, f_ref)

    def decode(tokens: np.ndarray) -> np.ndarray:
        return to_uint8(decode_codes(vq, torch.as_tensor(tokens, dtype=torch.int64), args.device, 64))

    results = {}
    for name, row in trained["results"].items():
        scores_path = w / f"scores-{name}.json"
        if scores_path.is_file():
            scores = json.loads(scores_path.read_text())
        else:
            scores = score(f_ref, feats(decode(np.load(w / f"samples-{name}.npy"))))
            scores_path.write_text(json.dumps(scores))
        results[name] = {**row, **scores}
        save_png(out / f"{name}.png", image_grid(decode(np.load(w / f"grid-{name}.npy")), nrow=GRID_COLS, pad=0))
        print(name, {k: results[name][k] for k in ("steps", "heldout_loss", "fid", "kid")}, flush=True)
    atomic_write_text(out / "ablation.json", json.dumps({**trained, "results": results,
                                                         "evaluate_args": {k: str(v) for k, v in vars(args).items() if k != "func"}},
                                                        indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(required=True)
    t = sub.add_parser("train", help="codes, the four trainings, held-out loss, sample tokens (GPU)")
    t.add_argument("--images", type=Path, required=True, help="image set with --label-set (lasad-train data)")
    t.add_argument("--vq", type=Path, required=True, help="tokenizer (.safetensors)")
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--label-set", default="subgroup")
    t.add_argument("--device", default="cuda")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--time-limit", type=float, default=None, help="per variant, seconds (a safety stop)")
    t.add_argument("--parallel", action="store_true", help="train the four variants side by side")
    t.add_argument("--num-samples", type=int, default=1000)
    t.add_argument("--sample-batch", type=int, default=500)
    t.add_argument("--cfg-scale", type=float, default=2.0)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=train)
    e = sub.add_parser("evaluate", help="decode the samples, FID / KID, sample grids")
    e.add_argument("--images", type=Path, required=True)
    e.add_argument("--vq", type=Path, required=True)
    e.add_argument("--work", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--inception", type=Path, default=DEFAULT_CACHE / "default_1.pt")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=50)
    e.set_defaults(func=evaluate)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
