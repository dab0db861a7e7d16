"""Load benchmark of lasad-serve over HTTP on loopback: open-loop Poisson arrivals against the
server under each admission policy, beside the engine's own offline numbers, in one run.

    python benchmarks/serve_bench.py --out DIR [--presets lasad-B,lasad-XL] [--slots 64]
    python benchmarks/serve_bench.py --out DIR --checkpoint my-model          # a trained model

For each preset (random bf16 weights; or `--checkpoint`):
1. offline, in this process: one call of `slots` images (the engine's throughput with that many
   slots) and one image alone (batch-1 latency), on the same GPU;
2. for each policy (`continuous`: lasad's slot scheduler; `static`: a batcher that starts a batch
   when the previous one ended, after waiting `--batch-wait` s to fill it; `lock`: one request at a
   time, what a lock around the pipeline gives), a `lasad-serve` subprocess, then:
   - one request at a time (closed loop): the latency of a lone request;
   - Poisson arrivals at `--rates` × the offline throughput (requests of one image, mixed classes
     and seeds; `--grids` mixes token grids), each for `--duration` s: throughput, latency
     p50/p90/p99, time to first row (a `--stream-fraction` of the requests stream their rows),
     slot occupancy (sampled from /health), rejections (429), and the server's host time per
     decode step (/metrics);
3. a JSON with device, date, commit and the command, and a plot of p50/p99 latency against offered
   load per policy.

Requests ask for `response_format: "tokens"` by default (the engine's work, without VQ decoding
and PNG encoding of random-weight noise); `--format b64_json` measures those too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repo import ROOT as REPO  # noqa: E402

import torch  # noqa: E402

from lasad_engine import LasadConfig, LasadGen, save_checkpoint  # noqa: E402
from lasad_engine.engine import LasadEngine, SamplingParams  # noqa: E402

PARAMS = dict(cfg_scale=4.0, top_k=2000, temperature=1.0)  # LlamaGen's demo sampler, as engine_bench


def commit() -> str:
    """The checkout's commit (LASAD_COMMIT where the tree travels without its .git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LASAD_COMMIT", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def offline(model, device, slots: int, grid) -> dict:
    """The engine in this process: `slots` images in one call, and one image alone."""
    params = SamplingParams(**PARAMS)
    engine = LasadEngine(model, backend="cuda" if device.type == "cuda" else "torch", device=device, max_batch=slots)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed(n):
        sync()
        t = time.perf_counter()
        engine.generate([i % model.config.num_classes for i in range(n)], grid=grid, params=params,
                        generator=torch.Generator().manual_seed(n))
        sync()
        return time.perf_counter() - t

    timed(1)
    timed(slots)  # graphs of both buckets captured
    one = statistics.median(timed(1) for _ in range(5))
    full = statistics.median(timed(slots) for _ in range(3))
    engine.close()
    return {"batch1_ms": 1e3 * one, "images_per_s": slots / full, "batch_ms": 1e3 * full}


class Server:
    """A lasad-serve subprocess."""

    def __init__(self, checkpoint, args, env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lasad_engine.serve", "--checkpoint", str(checkpoint), "--port", str(self.port),
               "--log-level", "warning", *args]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)

    def wait(self, httpx, timeout: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lasad-serve exited {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"lasad-serve did not become ready in {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def scrape(httpx, url) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def one_request(client, url, body, stream: bool) -> dict:
    t0 = time.perf_counter()
    rec = {"t_send": t0, "stream": stream}
    try:
        if stream:
            async with client.stream("POST", url + "/v1/images/generations", json={**body, "stream": True}) as r:
                rec["status"] = r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and "ttfr" not in rec and '"image_generation.row"' in line:
                        rec["ttfr"] = time.perf_counter() - t0
        else:
            r = await client.post(url + "/v1/images/generations", json=body)
            rec["status"] = r.status_code
    except Exception as e:  # noqa: BLE001 - a timeout or a refused connection is a result too
        rec["status"] = type(e).__name__
    rec["latency"] = time.perf_counter() - t0
    return rec


async def open_loop(url: str, rate: float, duration: float, n_classes: int, grids, fmt: str,
                    stream_fraction: float, seed: int, timeout: float, max_requests: int, t_start: float,
                    sample_occupancy: bool) -> dict:
    """Poisson arrivals at `rate` requests/s from `t_start` (a perf_counter time, one clock for
    every process) for `duration` s; every request awaited (bounded by `timeout`); raw records."""
    import httpx
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    occupancy, tasks = [], []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def sample():
            while True:
                try:
                    h = (await client.get(url + "/health", timeout=5)).json()
                    occupancy.append((time.perf_counter(), h["active"], h["waiting"]))
                except Exception:  # noqa: BLE001
                    pass
                await asyncio.sleep(0.2)

        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        sampler = asyncio.create_task(sample()) if sample_occupancy else None
        t_next = t_start + rng.expovariate(rate)
        late = []  # how far behind its schedule each request was sent: the client's own lag
        while t_next - t_start < duration and len(tasks) < max_requests:
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            late.append(time.perf_counter() - t_next)
            body = {"prompt": str(rng.randrange(n_classes)), "seed": rng.randrange(1 << 31), "response_format": fmt,
                    "size": rng.choice(grids)}
            tasks.append(asyncio.create_task(one_request(client, url, body, rng.random() < stream_fraction)))
            t_next += rng.expovariate(rate)
        t_sent = time.perf_counter()
        recs = await asyncio.gather(*tasks)
        if sampler is not None:
            sampler.cancel()
    return {"recs": recs, "occupancy": occupancy, "t_sent": t_sent, "late": late}


def client_process(kw: dict) -> dict:
    """One load-generating process (its own event loop and connection pool)."""
    return asyncio.run(open_loop(**kw))


def client_ready(_) -> int:
    """A spawned client has imported what it needs (run once per process before any load: on
    the H100 the first rate's clients were still importing when their first arrivals were due)."""
    import httpx  # noqa: F401
    return os.getpid()


def load(pool, n_clients: int, url: str, rate: float, duration: float, seed: int, **kw) -> dict:
    """Open-loop Poisson load at `rate` from `n_clients` processes at rate/n each (their sum is a
    Poisson process at `rate`): one Python client tops out near a hundred requests/s, well below
    what the server takes, and would measure itself."""
    t0 = time.perf_counter() + 1.0  # every client started before the first arrival
    jobs = [dict(url=url, rate=rate / n_clients, duration=duration, seed=1000 * seed + c, t_start=t0,
                 sample_occupancy=c == 0, **kw) for c in range(n_clients)]
    parts = list(pool.map(client_process, jobs))
    recs = [r for p in parts for r in p["recs"]]
    occupancy = parts[0]["occupancy"]
    late = [x for p in parts for x in p["late"]]
    sent_s = max(p["t_sent"] for p in parts) - t0
    t_end = max((r["t_send"] + r["latency"] for r in recs), default=t0)
    ok = [r for r in recs if r["status"] == 200]
    # steady state: completions while load was offered, after the first second (the ramp-up)
    w0, w1 = t0 + min(1.0, sent_s / 4), t0 + sent_s
    window = [r for r in ok if w0 <= r["t_send"] + r["latency"] <= w1]
    lat = [r["latency"] for r in ok]
    ttfr = [r["ttfr"] for r in ok if "ttfr" in r]
    occ = [a for t, a, w in occupancy if t0 + 1 <= t <= t0 + sent_s]
    errors = [r["status"] for r in recs if r["status"] not in (200, 429)]
    return {"offered_rps": len(recs) / sent_s if sent_s else 0.0, "target_rps": rate, "clients": n_clients,
            "sent": len(recs), "ok": len(ok), "rejected_429": sum(r["status"] == 429 for r in recs),
            "errors": len(errors), "error_kinds": sorted({str(e) for e in errors}),
            "client_lag_ms": {q: 1e3 * pct(late, q) for q in (50, 99)} if late else None,
            "throughput_images_per_s": len(window) / (w1 - w0) if w1 > w0 else 0.0,
            "completed_per_s_overall": len(ok) / (t_end - t0) if t_end > t0 else 0.0,
            "latency_ms": {q: (1e3 * pct(lat, q) if lat else None) for q in (50, 90, 99)},
            "ttfr_ms": {q: (1e3 * pct(ttfr, q) if ttfr else None) for q in (50, 99)},
            "mean_active_images": statistics.mean(occ) if occ else None, "seconds": sent_s}


def server_window(before: dict, after: dict) -> dict:
    """The server's own view of a window between two /metrics scrapes: where a request's time
    went (its queue wait, its whole stay) and what the decode loop did (steps/s, images per
    step, wall and host time per step)."""
    def d(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    def mean(hist):
        n = d(hist + "_count")
        return 1e3 * d(hist + "_sum") / n if n else None

    steps = d("lasad_steps_total")
    return {"steps": steps, "request_ms_mean": mean("lasad_request_latency_seconds"),
            "queue_wait_ms_mean": mean("lasad_queue_wait_seconds"),
            "images_per_step": d("lasad_images_stepped_total") / steps if steps else None,
            "rows_per_step": d("lasad_rows_stepped_total") / steps if steps else None,
            "step_us": 1e6 * d("lasad_step_seconds_total") / steps if steps else None,
            "host_us_per_step": 1e6 * d("lasad_host_seconds_total") / steps if steps else None}


def profile(pid: int, seconds: float, out: Path) -> dict | None:
    """py-spy (when installed) on the server for `seconds`: each thread's share of the samples,
    idle included, and the functions with the most samples; the raw stacks go to `out`."""
    spy = shutil.which("py-spy")
    if spy is None:
        return None
    r = subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "250",
                        "--threads", "--idle", "--nonblocking", "--format", "raw", "--output", str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        return {"error": (r.stderr or r.stdout)[-500:]}
    threads, frames = {}, {}
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        names = stack.split(";")
        threads[names[0]] = threads.get(names[0], 0) + int(n)
        for f in set(names[1:]):
            frames[f] = frames.get(f, 0) + int(n)
    return {"threads": threads, "top": sorted(frames.items(), key=lambda kv: -kv[1])[:40], "raw": out.name}


async def lone(httpx, url, n: int, n_classes: int, grid: str, fmt: str) -> list:
    async with httpx.AsyncClient(timeout=120) as client:
        out = []
        for i in range(n):
            rec = await one_request(client, url, {"prompt": str(i % n_classes), "seed": i, "response_format": fmt,
                                                  "size": grid}, False)
            if rec["status"] == 200:
                out.append(rec["latency"])
        return out


def run_preset(args, preset, device, env, results, pool) -> None:
    import httpx
    t_preset = time.perf_counter()
    if args.checkpoint:
        from lasad_engine.checkpoint import load_checkpoint
        ckpt = Path(args.checkpoint)
        model = load_checkpoint(ckpt, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        fmt = args.format
    else:
        cfg = LasadConfig.from_preset(preset)
        model = LasadGen(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        ckpt = Path(tempfile.mkdtemp()) / f"{preset}.pt"
        save_checkpoint(ckpt, model.to(torch.bfloat16))
        model = model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        fmt = "tokens"
    cfg = model.config
    f = args.factor
    grid_px = f"{cfg.grid_width * f}x{cfg.grid_height * f}"
    grids = [grid_px] + [g for g in args.grids.split(",") if g]
    rec = {"preset": preset, "checkpoint": str(args.checkpoint or "random bf16 weights"), "slots": args.slots,
           "format": fmt, "grids": grids}
    results["presets"].append(rec)
    rec["offline"] = offline(model, device, args.slots, (cfg.grid_height, cfg.grid_width))
    print(f"[{preset}] offline: {rec['offline']}", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sat = rec["offline"]["images_per_s"]
    rec["policies"] = {}
    for policy in args.policies.split(","):
        if time.perf_counter() - T0 > args.budget:
            rec["policies"][policy] = {"skipped": "over the time budget"}
            continue
        server = Server(ckpt, ["--slots", str(args.slots), "--policy", policy, "--max-queue", str(4 * args.slots),
                               "--batch-wait", str(args.batch_wait), "--max-images", "1",
                               *(["--device", args.device] if args.device else [])], env)
        pr = rec["policies"][policy] = {"rates": []}
        try:
            pr["startup_s"] = server.wait(httpx, 600)
            lat = asyncio.run(lone(httpx, server.url, args.lone, cfg.num_classes, grid_px, fmt))
            pr["lone_ms"] = {"median": 1e3 * statistics.median(lat), "min": 1e3 * min(lat)} if lat else None
            before = scrape(httpx, server.url)
            rates = [float(x) for x in (args.rates if policy == "continuous" else args.baseline_rates).split(",")]
            for k, frac in enumerate(rates):
                if time.perf_counter() - T0 > args.budget:
                    pr["rates"].append({"fraction": frac, "skipped": "over the time budget"})
                    continue
                spied, spy_thread = {}, None
                if args.profile and policy == "continuous" and k == len(rates) - 1:  # the heaviest load
                    def spy(name=f"{preset}-{policy}-x{frac}.pyspy.txt"):
                        time.sleep(2.0)
                        spied["server"] = profile(server.proc.pid, min(args.profile, args.duration - 2.5),
                                                  args.out / name)
                    spy_thread = threading.Thread(target=spy)
                    spy_thread.start()
                w0 = scrape(httpx, server.url)
                r = load(pool, args.clients, server.url, frac * sat, args.duration, seed=k, n_classes=cfg.num_classes,
                         grids=grids if policy == "continuous" else [grid_px], fmt=fmt,
                         stream_fraction=args.stream_fraction, timeout=args.timeout,
                         max_requests=max(1, args.max_requests // args.clients))
                r["server"] = server_window(w0, scrape(httpx, server.url))
                r["fraction_of_offline"] = frac
                if spy_thread is not None:
                    spy_thread.join()
                    r["profile"] = spied.get("server")
                pr["rates"].append(r)
                print(f"[{preset}/{policy}] x{frac}: {json.dumps({k: v for k, v in r.items() if k != 'profile'})}",
                      flush=True)
                if r.get("profile"):
                    print(f"[{preset}/{policy}] profile: {json.dumps(r['profile'])[:3000]}", flush=True)
            whole = server_window(before, scrape(httpx, server.url))  # every rate of this policy
            pr["steps"], pr["host_us_per_step"] = whole["steps"], whole["host_us_per_step"]
        except Exception as e:  # noqa: BLE001 - one policy failing leaves the others' numbers
            pr["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"[{preset}/{policy}] failed: {pr['error']}", flush=True)
        finally:
            pr["exit_code"] = server.stop()
            pr["server_log_tail"] = server.tail()[-1500:]
    rec["seconds"] = time.perf_counter() - t_preset
    verdict(rec)


def verdict(rec) -> None:
    """The issue's targets, from this run's numbers."""
    off = rec["offline"]
    cont = rec["policies"].get("continuous", {})
    rates = [r for r in cont.get("rates", []) if "throughput_images_per_s" in r]
    out = {}
    if rates:
        best = max(r["throughput_images_per_s"] for r in rates)
        out["saturation_images_per_s"] = best
        out["saturation_vs_offline"] = best / off["images_per_s"]
        near = min(rates, key=lambda r: abs(r["offered_rps"] - 0.8 * best))
        if near["latency_ms"][50]:
            out["p99_over_p50_at_80pct"] = near["latency_ms"][99] / near["latency_ms"][50]
            out["at_offered_rps"] = near["offered_rps"]
    if cont.get("lone_ms"):
        out["lone_vs_batch1"] = cont["lone_ms"]["median"] / off["batch1_ms"]
    rec["targets"] = out


T0 = time.perf_counter()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--presets", default="lasad-B,lasad-XL")
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint instead of random weights")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--policies", default="continuous,static,lock")
    ap.add_argument("--rates", default="0.25,0.5,0.8,1.0,1.25", help="continuous: x offline images/s")
    ap.add_argument("--baseline-rates", default="0.05,0.25,0.8", help="static and lock: x offline images/s")
    ap.add_argument("--grids", default="", help="other sizes in pixels mixed into continuous runs, e.g. 24x24")
    ap.add_argument("--factor", type=int, default=1, help="pixels per token (1: sizes are token grids)")
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--stream-fraction", type=float, default=0.1)
    ap.add_argument("--batch-wait", type=float, default=0.02)
    ap.add_argument("--lone", type=int, default=10, help="sequential requests for the lone latency")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--format", default="tokens", choices=["tokens", "b64_json"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which remaining runs are skipped")
    ap.add_argument("--clients", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                    help="load-generating processes (default: half the cores, at most 8)")
    ap.add_argument("--profile", type=float, default=0.0,
                    help="seconds of py-spy (if installed) on the server during the heaviest continuous load")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results = {"benchmark": "serve_bench", "date": time.strftime("%Y-%m-%d"), "commit": commit(),
               "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "presets": []}
    # spawned, not forked: this process has CUDA and torch's threads
    pool = ProcessPoolExecutor(args.clients, mp_context=__import__("multiprocessing").get_context("spawn"))
    pids = set()
    for _ in range(10):  # every process started and ready (the pool spawns them on demand)
        pids |= set(pool.map(client_ready, range(4 * args.clients)))
        if len(pids) >= args.clients:
            break
    try:
        for preset in args.presets.split(","):
            if time.perf_counter() - T0 > args.budget:
                results["presets"].append({"preset": preset, "skipped": "over the time budget"})
                continue
            try:
                run_preset(args, preset, device, env, results, pool)
            except Exception as e:  # noqa: BLE001
                results["presets"].append({"preset": preset, "error": f"{type(e).__name__}: {e}"[:2000]})
            (args.out / "serve_bench.json").write_text(json.dumps(results, indent=1))
    finally:
        pool.shutdown(cancel_futures=True)
        (args.out / "serve_bench.json").write_text(json.dumps(results, indent=1))
        plot(results, args.out / "serve_latency.png")
    for p in results["presets"]:
        print(p.get("preset"), json.dumps(p.get("targets", p.get("error", p.get("skipped")))))


def plot(results, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    presets = [p for p in results["presets"] if "policies" in p]
    if not presets:
        return
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4.2), squeeze=False)
    for ax, p in zip(axes[0], presets):
        for policy, pr in p["policies"].items():
            pts = [r for r in pr.get("rates", []) if r.get("latency_ms", {}).get(50)]
            if not pts:
                continue
            x = [r["offered_rps"] for r in pts]
            line, = ax.plot(x, [r["latency_ms"][50] for r in pts], "o-", label=f"{policy} p50")
            ax.plot(x, [r["latency_ms"][99] for r in pts], "s--", color=line.get_color(), label=f"{policy} p99")
        ax.axvline(p["offline"]["images_per_s"], color="gray", lw=0.8, ls=":", label="offline images/s")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests of 1 image / s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{p['preset']}, {p['slots']} slots ({results['device']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
