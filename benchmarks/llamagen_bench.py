"""The baseline users run today, timed the way they run it: LlamaGen's own GPT and `generate()`
with `torch.compile(mode="reduce-overhead", fullgraph=True)` (its `sample_c2i.py --compile`),
random bf16 weights, CFG 4.0, top-k 2000, one image of 16×16 tokens; median of repeats after the
compile. LlamaGen's code is not part of lasad: clone it and pass the checkout (the README's numbers
were taken at its commit ce98ec4; it needs only torch):

    git clone https://github.com/FoundationVision/LlamaGen /path/to/LlamaGen
    python benchmarks/llamagen_bench.py --llamagen /path/to/LlamaGen --out DIR [--models GPT-B,GPT-XL]

`python benchmarks/engine_bench.py --out DIR --llamagen /path/to/LlamaGen` runs it beside lasad's
numbers. Writes DIR/llamagen.json (with the GPU and LlamaGen's commit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def time_generate(generate, model, cond, n_tokens: int, repeats: int) -> dict:
    kw = dict(cfg_scale=4.0, cfg_interval=-1, temperature=1.0, top_k=2000, top_p=1.0, sample_logits=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, cond, n_tokens, **kw)  # compiles
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        torch.manual_seed(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, cond, n_tokens, **kw)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"first_call_s": first, "ms": times, "ms_median": statistics.median(times),
            "ms_per_step": statistics.median(times) / n_tokens}


NEEDED = ("autoregressive/models/gpt.py", "autoregressive/models/generate.py", "utils/drop_path.py")


def check_checkout(path: Path) -> None:
    """One line (SystemExit) unless `path` holds LlamaGen's files that the benchmark imports."""
    missing = [f for f in NEEDED if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"llamagen_bench.py: {path} is not a LlamaGen checkout (no {missing[0]}): "
                         f"git clone https://github.com/FoundationVision/LlamaGen {path}")


def commit_of(path: Path) -> str | None:
    """LlamaGen's commit when `path` is the top of its own git checkout (not a copy inside another)."""
    import subprocess
    if not (path / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--llamagen", type=Path, required=True,
                    help="a LlamaGen checkout (git clone https://github.com/FoundationVision/LlamaGen)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="GPT-B,GPT-XL")
    ap.add_argument("--images", default="1", help="comma-separated images per batch (CFG doubles the rows)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    check_checkout(args.llamagen)
    if not torch.cuda.is_available():
        raise SystemExit("llamagen_bench.py: no CUDA GPU is visible to torch; this times LlamaGen on a GPU")
    sys.path.insert(0, str(args.llamagen.resolve()))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_models

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = GPT_models[name](vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1,
                                 model_type="c2i").cuda()
        with torch.no_grad():
            model.output.weight.normal_(std=0.02)  # LlamaGen zero-initialises the head
        model = model.to(torch.bfloat16).eval()
        model = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for n in (int(x) for x in args.images.split(",")):
            cond = torch.arange(n, device="cuda") % 1000
            with torch.no_grad():
                r = {"model": name, "images": n, "tokens": 256, **time_generate(generate, model, cond, 256, args.repeats)}
            rows.append(r)
            print(f"{name} images={n}: {r['ms_median']:.1f} ms per batch ({r['ms_per_step'] * 1e3:.0f} µs/step), "
                  f"first call {r['first_call_s']:.1f} s", flush=True)
            (args.out / "llamagen.json").write_text(json.dumps(
                {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "llamagen_commit": commit_of(args.llamagen),
                 "rows": rows}, indent=1))
        del model
        torch.cuda.empty_cache()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
