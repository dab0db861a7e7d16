"""Threads sharing one LasadPipeline: N threads asking for one image each, against one call of the
same N images, and against the same threads one request at a time (the `lock` policy: what a lock
around the pipeline gave before the slot scheduler), all in one process on one device.

    python benchmarks/pipeline_threads.py --out DIR [--threads 8] [--device cpu|cuda] [--checkpoint default]

Writes DIR/pipeline_threads.json (seconds for all N, each thread's wait, whether every thread's
tokens equal the single call's) with the device, date, commit and command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401  (the checkout importable as installed)

import torch  # noqa: E402

from lasad_engine.io import atomic_write_text  # noqa: E402
from lasad_engine.pipeline import LasadPipeline  # noqa: E402
from lasad_tools.profiling import environment  # noqa: E402


def threads_run(pipe, n: int) -> tuple[float, list, list]:
    waits, tokens = [0.0] * n, [None] * n

    def call(i):
        t = time.perf_counter()
        tokens[i] = pipe([i], generator=torch.Generator().manual_seed(i), output_type="tokens").tokens
        waits[i] = time.perf_counter() - t

    t0 = time.perf_counter()
    ts = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, waits, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default="default")
    args = ap.parse_args()
    n = args.threads
    out = {"benchmark": "pipeline_threads", **environment(torch.device(args.device), "python benchmarks/pipeline_threads.py"),
           "threads": n}
    with LasadPipeline.from_checkpoint(args.checkpoint, device=args.device, max_batch=n) as pipe:
        pipe([0], generator=torch.Generator().manual_seed(0), output_type="tokens")  # warm-up
        t = time.perf_counter()
        single = pipe(list(range(n)), output_type="tokens",
                      generator=torch.Generator().manual_seed(0)).tokens  # one call of all n
        out["one_call_s"] = time.perf_counter() - t
        # the same images as n calls (each thread's seed: its own generator, so compare per image)
        ref = [pipe([i], generator=torch.Generator().manual_seed(i), output_type="tokens").tokens for i in range(n)]
        del single
        secs, waits, toks = threads_run(pipe, n)
        out["threads_continuous"] = {"seconds": secs, "median_wait_s": statistics.median(waits), "max_wait_s": max(waits),
                                     "tokens_equal_alone": all(torch.equal(a, b) for a, b in zip(toks, ref))}
    with LasadPipeline.from_checkpoint(args.checkpoint, device=args.device, max_batch=n, policy="lock") as pipe:
        pipe([0], generator=torch.Generator().manual_seed(0), output_type="tokens")
        secs, waits, toks = threads_run(pipe, n)
        out["threads_lock"] = {"seconds": secs, "median_wait_s": statistics.median(waits), "max_wait_s": max(waits),
                               "tokens_equal_alone": all(torch.equal(a, b) for a, b in zip(toks, ref))}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "pipeline_threads.json", json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
