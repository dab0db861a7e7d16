"""Weight-only int8 (and fp8) decode beside bf16, in one GPU call (issue 29): µs per step of the
graph-captured `cuda` engine (the same kernels path: Triton fused linears, the LASAD step kernel,
one CUDA graph with the sampler) and the teacher-forced logit error per preset.

    python benchmarks/int8_bench.py --out DIR [--presets lasad-B,lasad-XL,lasad-XXL] [--batches 1,64]

Random weights as benchmarks/engine_bench.py makes them (LlamaGen's init, std 0.02, a random
head), 256 tokens per image, CFG (rows = 2 x images), cfg 4.0, top-k 2000. Variants per preset:

- `bf16`: bf16 weights and activations (the baseline);
- `int8`: the decode matrices int8 with per-channel scales (lasad_engine/quant.py), the head too;
- `int8_nohead`: the head left in bf16 (the issue asks for the head in or out by measurement);
- `int8_rule`: int8 with the hand rule's tiles only (ops.linear.QUANT_FOLLOWS_FLOAT_POLICY empty);
- `int8_float_tiles`: int8 with the bf16 measurements' tiles at 1-4 rows too (what `int8` did
  until the H100's numbers of 2026-12-07 chose the hand rule there);
- `int8_i2f`: int8 converted by Triton's own int8 -> float conversion (I2F) instead of the byte
  permutes the engine uses on a GPU (ops.linear.INT8_ASM);
- `fp8`: e4m3 weights, where the GPU has compute capability 8.9+.

`--quant-policy FILE`: the quantised GEMMs take the tiles benchmarks/int8_gemv_sweep.py chose
(its JSON's "policy") instead of ops.linear's QUANT_TILE_POLICY / QUANT_MM_TILES.

Each row is written to DIR/int8_bench.json as soon as it is measured; a variant that fails is
recorded with its error and the run goes on. Teacher-forced logits (2 images, CFG rows, fp32
reference = the same weights in fp32 through the same engine): relative error of bf16, int8 and
fp8 against it, and of int8 against bf16.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo  # noqa: E402,F401  (the checkout importable as installed)

from lasad_engine import LasadGen, quant  # noqa: E402
from lasad_engine.engine import LasadEngine, SamplingParams  # noqa: E402
from lasad_engine.ops import linear as L  # noqa: E402

from engine_bench import random_model  # noqa: E402

PARAMS = SamplingParams(cfg_scale=4.0, top_k=2000)
TARGETS = {"speedup_1_image": {"lasad-XL": 1.4, "lasad-XXL": 1.4, "lasad-B": 1.0}, "speedup_64_images": 1.0}


def variant_model(fp32: LasadGen, variant: str) -> LasadGen:
    """bf16 activations; the decode matrices quantised from the fp32 weights (not from bf16)."""
    m = copy.deepcopy(fp32)
    if variant.startswith("int8"):
        quant.quantize_(m, "int8", head=variant != "int8_nohead")
    elif variant == "fp8":
        quant.quantize_(m, "fp8")
    return m.to(torch.bfloat16)


def time_steps(model, batch: int, device, repeats: int) -> dict:
    cfg = model.config
    labels = torch.arange(batch) % cfg.num_classes
    engine = LasadEngine(model, backend="cuda", device=device, max_batch=batch)
    try:
        engine.generate(labels, params=PARAMS, generator=torch.Generator(device).manual_seed(0))  # compile, capture
        times = []
        for r in range(repeats):
            gen = torch.Generator(device).manual_seed(r)
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            engine.generate(labels, params=PARAMS, generator=gen)
            torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t) * 1e6 / cfg.seq_len)
    finally:
        engine.close()
    return {"us_per_step": statistics.median(times), "us_per_step_runs": times}


def teacher_forced(model, tokens, labels) -> torch.Tensor:
    engine = LasadEngine(model, backend="cuda", max_batch=len(labels))
    try:
        return engine.teacher_forced_logits(tokens, labels, cfg_rows=True)
    finally:
        engine.close()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).norm() / b.norm()).item())


def tiles_used(cfg, rows: int, quantized: bool, device) -> dict:
    """The tiles each decode GEMM of one layer (and the head) gets at this row count."""
    out = {}
    shapes = {"qfv": (cfg.dim, 2 * cfg.n_head * cfg.head_k_dim + cfg.n_head * cfg.head_v_dim, True, 1, False),
              "o_proj": (cfg.n_head * cfg.head_v_dim, cfg.dim, True, cfg.n_head if cfg.output_norm == "group" else 1,
                         False),
              "w13": (cfg.dim, cfg.ffn_dim, True, 1, True), "w2": (cfg.ffn_dim, cfg.dim, False, 1, False),
              "head": (cfg.dim, cfg.vocab_size, True, 1, False)}
    for name, (K, n_out, norm, groups, swiglu) in shapes.items():
        if rows > L.ROWS_MAX:   # quantised: quant_mm, the norm and SwiGLU as their own launches (ops.linear)
            out[name] = ("quant_mm" + (" after the norm" if norm else "") + (", then SwiGLU" if swiglu else "")
                         if quantized else "library (cuBLAS)")
            continue
        t = L.tile_policy(rows, n_out, K, device, quantized=quantized)
        if t is None:
            t = L.linear_tiles(min(rows, L.ROWS_MAX), n_out, K, groups=groups, has_norm=norm, swiglu=swiglu,
                               sms=L._sm_count(device))
        out[name] = t if isinstance(t, str) else {"block_n": t.block_n, "split_k": t.split_k, "mma": t.mma,
                                                  "num_warps": t.num_warps}
    return out


def load_policy(path: Path) -> None:
    """ops.linear's quantised tile tables from int8_gemv_sweep.py's measured choices."""
    pol = json.loads(path.read_text())["policy"]
    for e in pol["quant_tile_policy"]:
        L.QUANT_TILE_POLICY[(e["band"], e["n_out"], e["K"])] = L.LinearTiles(**e["tiles"])
    for e in pol["quant_mm_tiles"]:
        L.QUANT_MM_TILES[(e["N"], e["K"])] = L.MmTiles(**e["tiles"])
    print(f"tiles from {path}: {len(L.QUANT_TILE_POLICY)} few-row, {len(L.QUANT_MM_TILES)} many-row", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--presets", default="lasad-B,lasad-XL,lasad-XXL")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--variants", default="bf16,int8,int8_i2f,int8_nohead,fp8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quant-policy", type=Path, action="append", default=[],
                    help="int8_gemv_sweep.py's JSON: its chosen tiles (repeat for sweeps of other row counts)")
    a = ap.parse_args()
    for pol in a.quant_policy:
        load_policy(pol)
    device = torch.device("cuda")
    cap = torch.cuda.get_device_capability(device)
    import triton
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device), "compute_capability": f"{cap[0]}.{cap[1]}",
              "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
              "commit": commit, "command": " ".join(["python"] + sys.argv), "params": PARAMS.__dict__,
              "targets": TARGETS, "rows": [], "logits": [], "errors": []}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "int8_bench.json"

    def save():
        path.write_text(json.dumps(record, indent=1) + "\n")

    variants = [v for v in a.variants.split(",") if v != "fp8" or cap >= quant.FP8_CAPABILITY]
    t_start = time.perf_counter()
    for preset in a.presets.split(","):
        fp32 = random_model(preset, device, torch.float32)  # the reference of the logit error
        cfg = fp32.config
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=gen).to(device)
        logits = {}
        try:
            logits["fp32"] = teacher_forced(fp32, tokens, [3, 207])
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            record["errors"].append({"preset": preset, "what": "fp32 reference", "error": repr(e)[:500]})
        for variant in variants:
            L.QUANT_FOLLOWS_FLOAT_POLICY = ({L.ROWS_MAX} if variant != "int8_rule" else set()) | (
                {L.FMA_ROWS_MAX} if variant == "int8_float_tiles" else set())
            L.INT8_ASM = variant != "int8_i2f"
            try:
                model = variant_model(fp32, variant)
                if variant != "int8_rule" and "fp32" in logits:
                    logits[variant] = teacher_forced(model, tokens, [3, 207])
                for batch in (int(b) for b in a.batches.split(",")):
                    row = {"preset": preset, "variant": variant, "images": batch, "rows": 2 * batch,
                           "weight_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                               if not n.startswith(("tok_embeddings", "cls_embedding"))),
                           "tiles": tiles_used(cfg, 2 * batch, variant != "bf16", device)}
                    row.update(time_steps(model, batch, device, a.repeats))
                    base = next((r for r in record["rows"] if r["preset"] == preset and r["images"] == batch
                                 and r["variant"] == "bf16"), None)
                    if base is not None and variant != "bf16":
                        row["speedup_vs_bf16"] = base["us_per_step"] / row["us_per_step"]
                    record["rows"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k not in ("tiles", "us_per_step_runs")}),
                          flush=True)
                    save()
                del model
            except Exception as e:  # noqa: BLE001 - one variant failing leaves the others
                record["errors"].append({"preset": preset, "variant": variant, "error": repr(e)[:500],
                                         "traceback": traceback.format_exc()[-2000:]})
                print(f"{preset} {variant}: FAILED {e!r}"[:300], flush=True)
                save()
            finally:
                L.QUANT_FOLLOWS_FLOAT_POLICY = {L.ROWS_MAX}
                L.INT8_ASM = True
                torch.cuda.empty_cache()
        if "fp32" in logits:
            entry = {"preset": preset, "tokens": cfg.seq_len, "images": 2, "cfg_rows": True}
            for v, lg in logits.items():
                if v != "fp32":
                    entry[f"{v}_vs_fp32"] = rel(lg, logits["fp32"])
            for v in ("int8", "int8_nohead", "fp8"):
                if v in logits and "bf16" in logits:
                    entry[f"{v}_vs_bf16"] = rel(logits[v], logits["bf16"])
            record["logits"].append(entry)
            print(json.dumps(entry), flush=True)
        del fp32, logits
        torch.cuda.empty_cache()
        save()
    record["seconds"] = time.perf_counter() - t_start
    save()
    print(f"wrote {path} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
