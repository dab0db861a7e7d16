"""Sampler benchmark and GPU check (not a test): today's torch sampler (torch.topk + sort) against the
one-launch Triton sampler (lasad_engine/ops/select.py), per decode step, as the engine calls it:
CFG rows, a [16, B, V] noise block read at `pos`, ids into both CFG halves and tokens[:, pos].

    python benchmarks/sampler_bench.py --out DIR [--rows 2,16,128,512] [--vocab 16384]

Timing: CUDA events around replays of one CUDA graph of --calls sampler calls, each on its own
logits buffer (a ring, so no call reads the previous one's input from L1) and its own position.
Checks, on the same calls: tokens equal to the torch sampler's, and to a float64 reference (sort in
float64); a mismatch counts as a failure unless the float64 scores of the two tokens are a near-tie
(relative gap < 1e-5), which float32 rounding may decide either way. Exit status 1 on a failure.
JSON in DIR/sampler.json; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401  (the checkout importable as installed)

from lasad_engine.ops.select import default_split, sample_triton  # noqa: E402
from lasad_engine.sampling import sample  # noqa: E402

SETTINGS = {"top-k 2000": dict(top_k=2000, top_p=1.0), "top-k 0": dict(top_k=0, top_p=1.0),
            "top-p 0.9": dict(top_k=0, top_p=0.9)}
TARGET_US = {2: 10.0, 512: 60.0}
NOISE_BLOCK = 16
CFG_SCALE = 4.0


def make_inputs(rows: int, vocab: int, calls: int, ring: int, device):
    """A ring of CFG logits [2·rows, V] (unconditional rows near the conditional ones, so the
    guided distribution is neither flat nor one-hot), the noise block and one position per call."""
    gen = torch.Generator(device=device).manual_seed(rows)
    logits = []
    for _ in range(ring):
        c = torch.randn(rows, vocab, device=device, generator=gen) * 1.5
        u = c + 0.3 * torch.randn(rows, vocab, device=device, generator=gen)
        t = torch.cat([c, u])
        t[:, 1::11] = t[:, 0::11][:, : t[:, 1::11].shape[1]]  # exact ties in every row
        logits.append(t)
    noise = torch.empty(NOISE_BLOCK, rows, vocab, device=device).exponential_(generator=gen)
    pos = [torch.tensor([p], device=device) for p in range(calls)]
    return logits, noise, pos


def graph_of_calls(fn, calls: int):
    """A CUDA graph of `calls` invocations fn(i); warmed up on a side stream first."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    return g


def time_graph(g, calls: int, replays: int) -> float:
    """µs per call."""
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def ref_ids64(logits, noise_t, top_k, top_p):
    """float64 reference ids [B] and the score of every token [B, V] (the exponential race)."""
    x = logits.double()
    c, u = x.chunk(2)
    x = u + CFG_SCALE * (c - u)
    V = x.shape[-1]
    ninf = torch.tensor(float("-inf"), dtype=torch.float64, device=x.device)
    if 0 < top_k < V:
        kth = torch.sort(x, dim=-1, descending=True).values[:, top_k - 1: top_k]
        x = torch.where(x >= kth, x, ninf)
    if top_p < 1.0:
        probs = torch.softmax(x, -1)
        s = torch.sort(probs, dim=-1, descending=True).values
        before = torch.cumsum(s, -1) - s
        n_keep = (before < top_p).sum(-1, keepdim=True).clamp(min=1)
        x = torch.where(probs >= s.gather(-1, n_keep - 1), x, ninf)
    score = torch.softmax(x, -1) / noise_t.double().clamp(min=torch.finfo(torch.float32).tiny)
    return score.argmax(-1), score


def check(name, got, want, scores):
    """Mismatches between two id vectors [calls, B]; near-ties (float64 gap < 1e-5) are reported."""
    bad, near = [], 0
    for c, b in (got != want).nonzero().tolist():
        s = scores[c][b]
        hi = max(float(s[got[c, b]]), float(s[want[c, b]]))
        gap = abs(float(s[got[c, b]]) - float(s[want[c, b]])) / hi
        if gap < 1e-5:
            near += 1
        else:
            bad.append(dict(call=c, row=b, got=int(got[c, b]), want=int(want[c, b]), gap=gap))
    return dict(name=name, compared=got.numel(), near_ties=near, failures=bad[:5], n_failures=len(bad))


def bench_rows(rows, vocab, calls, replays, ring, device, sweep):
    logits, noise, pos = make_inputs(rows, vocab, calls, ring, device)
    scale = torch.tensor(CFG_SCALE, device=device)
    active = torch.tensor(True, device=device)
    ids = torch.zeros(2 * rows, dtype=torch.int64, device=device)
    out = []
    for setting, kw in SETTINGS.items():
        variants = {"torch": dict(backend="torch"), "triton": dict(backend="triton")}
        if sweep and setting == "top-k 2000":
            for split in (1, 2, 4, 8, 16, 32):
                if rows * split <= 264 and vocab // split >= 256:
                    variants[f"triton split={split}"] = dict(split=split)
            for nw in (8, 16, 32):
                variants[f"triton split=1 warps={nw}"] = dict(split=1, num_warps=nw)
            for log_nb in (5, 8):
                variants[f"triton bits={log_nb}"] = dict(log_nb=log_nb)
        tokens = {}
        for name, v in variants.items():
            tok = torch.full((rows, calls), -1, dtype=torch.int64, device=device)
            common = dict(cfg=True, cfg_scale=scale, temperature=1.0, cfg_active=active, out=ids,
                          tokens=tok, **kw)
            if "backend" in v:
                fn = lambda i, v=v, common=common: sample(logits[i % ring], noise, pos=pos[i], **common, **v)
            else:
                fn = lambda i, v=v, common=common: sample_triton(logits[i % ring], noise, pos=pos[i], **common, **v)
            try:
                g = graph_of_calls(fn, calls)
                us = time_graph(g, calls, replays)
            except Exception as e:  # a variant that cannot run here is reported, not fatal
                out.append(dict(rows=rows, setting=setting, variant=name, error=repr(e)[:300]))
                print(json.dumps(out[-1]), flush=True)
                continue
            g.replay()
            torch.cuda.synchronize()
            tokens[name] = tok.T.clone()  # [calls, rows]
            del g
            row = dict(rows=rows, vocab=vocab, setting=setting, variant=name, us_per_step=round(us, 2))
            if name == "triton":
                row["default_split"] = default_split(rows, vocab, device)
            out.append(row)
            print(json.dumps(row), flush=True)
        scores, ref = [], []
        for i in range(calls):
            r, s = ref_ids64(logits[i % ring], noise[i % NOISE_BLOCK], **kw)
            ref.append(r)
            scores.append(s.cpu() if rows <= 16 else s)
        ref = torch.stack(ref)
        checks = [check(f"{n} == torch", t, tokens["torch"], scores) for n, t in tokens.items() if n != "torch"]
        checks.append(check("torch == float64", tokens["torch"], ref, scores))
        if "triton" in tokens:
            checks.append(check("triton == float64", tokens["triton"], ref, scores))
        for c in checks:
            c.update(rows=rows, setting=setting)
            print(json.dumps(c), flush=True)
        out.append(dict(rows=rows, setting=setting, checks=checks))
        del scores
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default="2,16,128,512", help="images per step (CFG doubles the logits rows)")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--no-sweep", action="store_true", help="only the default split / warps / bits")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("sampler_bench: needs a CUDA GPU; none is visible to torch", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda")
    t0 = time.time()
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        replays = 20 if rows <= 16 else 5
        results += bench_rows(rows, args.vocab, args.calls, replays, 4, device,
                              sweep=not args.no_sweep and rows in (2, 512))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    import triton
    doc = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(device),
               torch=torch.__version__, triton=triton.__version__,
               commit=os.environ.get("LASAD_COMMIT") or commit, seconds=round(time.time() - t0, 1),
               results=results)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "sampler.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, args.out / "sampler.json")

    failures = sum(c["n_failures"] for r in results if "checks" in r for c in r["checks"]
                   if "float64" not in c["name"] or c["name"].startswith("triton"))
    print(f"\n{'rows':>5} {'setting':<11} {'variant':<26} {'µs/step':>9} {'target':>7}")
    for r in results:
        if "us_per_step" in r:
            tgt = TARGET_US.get(r["rows"]) if r["setting"] == "top-k 2000" else None
            print(f"{r['rows']:>5} {r['setting']:<11} {r['variant']:<26} {r['us_per_step']:>9.2f} "
                  f"{'' if tgt is None else f'<= {tgt:g}':>7}")
        elif "error" in r:
            print(f"{r['rows']:>5} {r['setting']:<11} {r['variant']:<26} {'error':>9}")
    for r in results:
        for c in r.get("checks", []):
            if c["n_failures"] or c["near_ties"]:
                print(f"check rows={r['rows']} {r['setting']} {c['name']}: {c['n_failures']} failures, "
                      f"{c['near_ties']} near-ties of {c['compared']}")
    print(f"checks: {failures} token failures (triton vs torch and vs float64); {doc['seconds']} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
