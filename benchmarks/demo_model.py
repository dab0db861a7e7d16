"""The bundled demo model's sampling sweep (docs/demo-model.md): tokens on the GPU, FID/KID here.

The GPU machine cannot hold the Inception file beside the repository (64 MiB travel), so the
sweep is split where the data is small: `sample` draws the tokens of every sampling setting on
the GPU (int16, 0.5 MB per 1,000 images) and `score` VQ-decodes them and scores them on any
machine with `lasad-eval fetch-inception`'s file, with exactly what `lasad-eval fid` computes
(`tools/fid.py`): the same 1,000 class labels (drawn from the held-out mix, seed 0), the same
892 held-out references, the same Inception features.

    python benchmarks/demo_model.py labels --ref data/emoji5 --out .carry/demo/labels.npy
    python benchmarks/demo_model.py sample --checkpoint runs/gpt/model.safetensors \\
        --labels .carry/demo/labels.npy --out sweep.npz                      # on the GPU
    python benchmarks/demo_model.py score --tokens sweep.npz --ref data/emoji5 --out sweep.json

A model trained at several sizes (docs/demo-model.md, "mixed resolution") is swept at one grid a
time: `sample --grid 24x24`, then `score --ref` the image set of that size (96 px with f = 4).

Sampling on the GPU is in fp32 with a generator on the GPU seeded as `lasad-eval fid` seeds its
own there (a CPU generator makes 1,000 images' noise on the host: 30 s a setting instead of
seconds); the sweep ranks settings, and the shipped one is then scored by `lasad-eval fid` itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

import numpy as np

import _repo  # noqa: F401  (the repository importable from a bare checkout)

# (cfg scale, top-k, temperature): LlamaGen's sampling knobs around its defaults (cfg 4, top-k 2000).
SWEEP = [(1.5, 0, 1.0), (2.0, 0, 1.0), (3.0, 0, 1.0), (4.0, 0, 1.0), (2.0, 2000, 1.0), (3.0, 2000, 1.0),
         (4.0, 2000, 1.0), (2.0, 0, 0.9), (3.0, 0, 0.9), (3.0, 500, 1.0)]
NUM, SEED, LABEL_SET = 1000, 0, "identity"


def key(cfg: float, top_k: int, temperature: float) -> str:
    return f"cfg{cfg:g}_k{top_k}_t{temperature:g}"


def labels_cmd(a):
    from lasad_train.formats import load_images
    from lasad_tools.fid import generation_labels
    _, ref_labels, _, _ = load_images(a.ref, LABEL_SET, 1)
    labels = np.asarray(generation_labels(ref_labels, NUM, SEED), np.int64)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(a.out, labels)
    print(f"{a.out}: {len(labels)} labels from {len(set(labels.tolist()))} classes")


def sample_cmd(a):
    import torch

    from lasad_engine.pipeline import LasadPipeline
    labels = np.load(a.labels).tolist()
    out = {}
    with LasadPipeline.from_checkpoint(a.checkpoint, device=a.device, precision="fp32", max_batch=a.batch,
                                       threads=a.threads) as pipe:
        for cfg, top_k, temperature in SWEEP if a.settings is None else [tuple(map(float, s.split(","))) for s in a.settings]:
            name = key(cfg, int(top_k), temperature)
            gen = torch.Generator(pipe.device).manual_seed(SEED)
            t0 = time.perf_counter()
            tokens = pipe(labels, cfg_scale=cfg, top_k=int(top_k), temperature=temperature, cfg_interval=-1, top_p=1.0,
                          generator=gen, output_type="tokens", grid=a.grid).tokens
            out[name] = tokens.cpu().numpy().astype(np.int16)
            print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
            # after every setting: a call cut short still returns what it drew
            np.savez_compressed(str(a.out) + ".tmp.npz", labels=np.asarray(labels), **out)
            Path(str(a.out) + ".tmp.npz").replace(a.out)


def score_cmd(a):
    import torch

    from lasad_engine.pipeline import decode_codes, to_uint8
    from lasad_engine.tokenizer import load_tokenizer
    from lasad_train.formats import load_images
    from lasad_tools.evaluate import DEFAULT_CACHE
    from lasad_tools.fid import InceptionFeatures, cached_features, score
    torch.set_num_threads(a.threads)
    data = np.load(a.tokens)
    feats = InceptionFeatures(a.inception or DEFAULT_CACHE / "default_1.pt", "cpu", 50)
    f_ref = cached_features(feats, lambda: load_images(a.ref, None, 1)[0], a.ref_features or None)
    vq = load_tokenizer(a.tokenizer, device="cpu").float().eval()
    rows = {}
    if a.out.is_file():
        rows = json.loads(a.out.read_text())["rows"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"date": datetime.date.today().isoformat(), "commit": commit, "tokens": str(a.tokens), "num": a.num,
              "command": "python benchmarks/demo_model.py score ...", "rows": rows}
    for name in a.only or data.files:
        if name == "labels" or name in rows:
            continue
        t0 = time.perf_counter()
        images = to_uint8(decode_codes(vq, torch.as_tensor(data[name][:a.num].astype(np.int64)), "cpu", 50))
        rows[name] = {**score(f_ref, feats(images)), "seconds": time.perf_counter() - t0}
        print(f"{name}: FID {rows[name]['fid']:.2f} KID {rows[name]['kid']:.4f}", flush=True)
        a.out.write_text(json.dumps(record, indent=1) + "\n")  # after every setting: a stopped run keeps its rows
    best = min(rows, key=lambda k: rows[k]["fid"])
    print(f"best FID: {best} {rows[best]['fid']:.2f} (KID {rows[best]['kid']:.4f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("labels")
    p.add_argument("--ref", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("sample")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the decode (the pipeline's default is 1; large batches gain from more)")
    p.add_argument("--settings", nargs="*", default=None, metavar="CFG,TOPK,TEMP")
    p.add_argument("--grid", default=None, metavar="HxW",
                   help="Token grid to draw, e.g. 24x24 (default: the model's); score against --ref of that size")
    p = sub.add_parser("score")
    p.add_argument("--tokens", type=Path, required=True)
    p.add_argument("--ref", type=Path, required=True)
    p.add_argument("--tokenizer", default="lasad_engine/assets/default-vq.safetensors")
    p.add_argument("--inception", type=Path, default=None)
    p.add_argument("--ref-features", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num", type=int, default=NUM,
                   help="Score the first N samples of each setting (a quicker ranking; FID is biased up at small N, KID is not)")
    p.add_argument("--only", nargs="*", default=None, metavar="SETTING", help="These settings, in this order")
    p.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    {"labels": labels_cmd, "sample": sample_cmd, "score": score_cmd}[a.cmd](a)


if __name__ == "__main__":
    main()
