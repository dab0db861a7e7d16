"""ONNX at scale: export a lasad-XL decode step (random weights, fp32, over protobuf's 2 GB), load
it with onnx, check it, and run three steps on onnxruntime's CPU provider against LasadGen.step.

    python benchmarks/onnx_xl_roundtrip.py --out benchmarks/results/2026-12-02-cpu-xl-onnx-roundtrip.json \
        [--preset lasad-XL] [--forms portable,custom] [--workdir DIR] [--rows 4]

Each form runs in its own child process (one model, one export, one session at a time: the
machine has 24 GB). The custom form's LasadStep nodes run as onnxruntime-extensions' Python op,
as the onnxruntime backend runs them; its graph is rewritten for that into a sibling file that
points at the same external data (a session cannot be made from an in-memory model over 2 GB).
Exits non-zero when a step's relative error exceeds --tol; writes the JSON either way and
prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repo import ROOT  # noqa: E402  (the checkout importable as installed)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_model(preset: str, seed: int):
    """A model with every weight random at the scale of its fan-in (the default init zeroes the
    head and sets the norms to one, which would hide errors)."""
    import torch

    from lasad_engine import LasadConfig, LasadGen
    gen = torch.Generator().manual_seed(seed)
    model = LasadGen(LasadConfig.from_preset(preset)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2 and "embedding" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def ort_model_path(path: Path) -> Path:
    """For the custom form: the graph (no weights) with the LasadStep nodes in onnxruntime-
    extensions' domain, written beside `path` so that it finds the same external data."""
    import onnx

    from lasad_engine.backends.ort import _register_custom_op
    from lasad_plugins import contract as C
    from onnxruntime_extensions import _ocos
    _register_custom_op()
    proto = onnx.load(str(path), load_external_data=False)
    domain = _ocos.default_opset_domain()
    for n in proto.graph.node:
        if n.op_type == C.OP_TYPE and n.domain == C.DOMAIN:
            n.domain = domain
            keep = [a for a in n.attribute if a.name not in C.PARSER_ATTRIBUTES]
            del n.attribute[:]
            n.attribute.extend(keep)
    for imp in proto.opset_import:
        if imp.domain == C.DOMAIN:
            imp.domain = domain
    out = path.with_name(path.stem + ".ort.onnx")
    onnx.save_model(proto, str(out))
    return out


def run_form(form: str, preset: str, workdir: Path, rows: int, seed: int) -> dict:
    """Export, load, check and step one form; returns its record (child process)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from lasad_plugins import contract as C
    from lasad_tools.onnx_export import export_step
    rec = {"form": form}
    t = time.perf_counter()
    model = random_model(preset, seed)
    cfg = model.config
    rec["parameters"] = model.num_parameters()
    rec["seconds_model"] = time.perf_counter() - t
    path = workdir / form / "step.onnx"
    t = time.perf_counter()
    export_step(model, path, portable=form == "portable", max_batch=rows // 2)
    rec["seconds_export"] = time.perf_counter() - t
    rec["files"] = {p.name: p.stat().st_size for p in sorted(path.parent.iterdir())}
    t = time.perf_counter()
    proto = onnx.load(str(path))  # the graph and its external data
    rec["seconds_onnx_load"] = time.perf_counter() - t
    rec["initializers"] = len(proto.graph.initializer)
    rec["initializer_bytes"] = sum(int(np.prod(i.dims)) * 4 for i in proto.graph.initializer)
    rec["large_constant_nodes"] = sum(n.op_type == "Constant" and len(n.attribute[0].t.raw_data) >= 1024
                                      for n in proto.graph.node)
    rec["lasad_step_nodes"] = sum(n.op_type == C.OP_TYPE for n in proto.graph.node)
    del proto
    t = time.perf_counter()
    onnx.checker.check_model(str(path), full_check=False)
    rec["seconds_checker"] = time.perf_counter() - t
    t = time.perf_counter()
    opts = ort.SessionOptions()
    model_path = path
    if form == "custom":
        from lasad_engine.backends.ort import _register_custom_op
        opts.register_custom_ops_library(_register_custom_op())
        model_path = ort_model_path(path)
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    rec["seconds_session"] = time.perf_counter() - t
    gen = torch.Generator().manual_seed(seed + 1)
    ids0 = torch.cat([torch.randint(0, cfg.num_classes, (rows // 2,), generator=gen),
                      torch.full((rows - rows // 2,), cfg.num_classes)])
    state = model.allocate_state(rows)
    past = [np.zeros((rows, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim), np.float32) for _ in range(cfg.n_layer)]
    steps = []
    ids = ids0
    for p in range(3):  # class token, then x_0 (a row start), then x_1
        pos = torch.tensor([p])
        t = time.perf_counter()
        feeds = {"ids": ids.numpy(), "pos": pos.numpy(), "width": state.width.numpy(),
                 **{C.PAST_STATE.format(i): past[i] for i in range(cfg.n_layer)}}
        out = sess.run(None, feeds)
        t_ort = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            ref = model.step(ids, pos, state, kernel="torch").clone()
        t_torch = time.perf_counter() - t
        logits, present = torch.from_numpy(out[0]), out[1:]
        err = ((logits.double() - ref.double()).norm() / ref.double().norm()).item()
        state_err = max(((torch.from_numpy(present[i]).double() - state.ssm[i].double()).norm()
                         / state.ssm[i].double().norm()).item() for i in range(cfg.n_layer))
        steps.append({"pos": p, "logits_rel_err": err, "state_rel_err_max": state_err,
                      "seconds_ort": t_ort, "seconds_torch": t_torch})
        past = [np.ascontiguousarray(x) for x in present]
        ids = torch.randint(0, cfg.vocab_size, (rows,), generator=gen)
    rec["steps"] = steps
    rec["peak_rss_gib"] = peak_rss_gib()
    return rec


def environment(command: str) -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch

    def git(*args):
        r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
        return r.stdout.strip() or None
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.node(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": command}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="lasad-XL")
    ap.add_argument("--forms", default="portable,custom")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one form, in this process
        rec = run_form(args.child, args.preset, args.workdir, args.rows, args.seed)
        args.out.write_text(json.dumps(rec))
        return 0
    command = "python benchmarks/onnx_xl_roundtrip.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"environment": environment(command), "preset": args.preset, "rows": args.rows, "tol": args.tol,
              "forms": []}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="xl-onnx-") as work:
        for form in args.forms.split(","):
            rec_path = Path(work) / f"{form}.json"
            t = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, "--child", form, "--preset", args.preset, "--rows",
                                str(args.rows), "--seed", str(args.seed), "--workdir", work, "--out", str(rec_path)],
                               capture_output=True, text=True)
            rec = json.loads(rec_path.read_text()) if r.returncode == 0 else {
                "form": form, "error": (r.stderr or r.stdout)[-2000:]}
            rec["seconds_total"] = time.perf_counter() - t
            result["forms"].append(rec)
            import shutil
            shutil.rmtree(Path(work) / form, ignore_errors=True)
    errs = [s["logits_rel_err"] for f in result["forms"] for s in f.get("steps", [])]
    errs += [s["state_rel_err_max"] for f in result["forms"] for s in f.get("steps", [])]
    result["pass"] = all("error" not in f for f in result["forms"]) and bool(errs) and max(errs) <= args.tol
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'form':9} {'params':>11} {'graph B':>9} {'data GiB':>9} {'export s':>9} {'session s':>9} "
          f"{'step s':>7} {'max logits err':>15} {'max state err':>14} {'RSS GiB':>8}")
    for f in result["forms"]:
        if "error" in f:
            print(f"{f['form']:9} ERROR {f['error'].splitlines()[-1] if f['error'] else ''}")
            continue
        files = f["files"]
        print(f"{f['form']:9} {f['parameters']:>11,} {files.get('step.onnx', 0):>9,} "
              f"{files.get('step.onnx.data', 0) / 2**30:>9.2f} {f['seconds_export']:>9.1f} {f['seconds_session']:>9.1f} "
              f"{max(s['seconds_ort'] for s in f['steps']):>7.2f} {max(s['logits_rel_err'] for s in f['steps']):>15.2e} "
              f"{max(s['state_rel_err_max'] for s in f['steps']):>14.2e} {f['peak_rss_gib']:>8.1f}")
    print("PASS" if result["pass"] else "FAIL", "->", args.out)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
