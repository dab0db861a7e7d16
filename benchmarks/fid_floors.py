"""The floors of the FID protocol at one image size (not a test): what no GPT can beat.

    python benchmarks/fid_floors.py --ref data/emoji5-96 --num 1000 --out floors-96.json

Against the image set's held-out images (the protocol's reference, `lasad-eval fid`), with the
same Inception features (`tools/fid.py`):
- `real_train`: `--num` training images drawn with `--seed` (the protocol's own floor: real
  pictures of the same classes that are not the references);
- `vq_reconstruction`: the same images encoded and decoded by the tokenizer (the floor of any GPT
  that draws through it), with their mean PSNR and the fraction of the codebook they use
  (`lasad_train.tokenizer_train.evaluate`, the tokenizer trainer's own check).
At 96 px with the bundled f = 4 tokenizer (trained at 64 px) the reconstructions are 24x24 codes:
this measures whether the tokenizer serves a second size before a GPT is trained on it.
Runs on a CPU (2 cores: about 3 minutes per 1,000 images at 64 px).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401  (the checkout importable as installed)

from lasad_engine.io import atomic_write_text  # noqa: E402
from lasad_engine.pipeline import decode_codes, to_uint8  # noqa: E402
from lasad_engine.tokenizer import load_tokenizer  # noqa: E402
from lasad_tools.fid import InceptionFeatures, cached_features, score  # noqa: E402
from lasad_tools.profiling import environment  # noqa: E402
from lasad_train.formats import load_images  # noqa: E402
from lasad_train.tokenizer_train import evaluate, to_model_input  # noqa: E402

DEFAULT_VQ = Path(__file__).resolve().parents[1] / "lasad_engine" / "assets" / "default-vq.safetensors"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", type=Path, required=True, help="an image set (lasad-train data)")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_VQ)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--inception", type=Path, default=Path.home() / ".cache/lasad/inception/default_1.pt")
    ap.add_argument("--ref-features", type=Path, default=None, help="cache of the reference features (.npy)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device(a.device)
    ref, _, _, _ = load_images(a.ref, None, 1)
    train, _, _, _ = load_images(a.ref, None, 0)
    pick = np.sort(np.random.default_rng(a.seed).choice(len(train), min(a.num, len(train)), replace=False))
    train = train[pick]
    feats = InceptionFeatures(a.inception, device, a.batch)
    f_ref = cached_features(feats, ref, a.ref_features)
    rows = {"real_train": score(f_ref, feats(train))}
    vq = load_tokenizer(a.tokenizer, device).eval()
    with torch.no_grad():
        codes = torch.cat([vq.encode(to_model_input(torch.from_numpy(np.array(train[i:i + a.batch])).to(device)))
                           for i in range(0, len(train), a.batch)])
        recon = to_uint8(decode_codes(vq, codes, device, a.batch))
    rows["vq_reconstruction"] = {**score(f_ref, feats(recon)),
                                 **{k: v for k, v in evaluate(vq, train, a.batch, device).items() if k != "images"}}
    out = {**environment(device, "python benchmarks/fid_floors.py"), "threads": torch.get_num_threads(),
           "ref": str(a.ref), "image_size": list(ref.shape[1:3]), "code_grid": list(codes.shape[1:]),
           "num_ref": len(ref), "num": len(train), "seed": a.seed, "tokenizer": str(a.tokenizer),
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(a.out, json.dumps(out, indent=1, default=float) + "\n")
    print(json.dumps({k: {m: v[m] for m in v if m in ("fid", "kid", "psnr")} for k, v in rows.items()}))


if __name__ == "__main__":
    main()
