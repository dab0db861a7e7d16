"""Plots for docs/benchmarks.md from `lasad-profile` JSON files (matplotlib:
`pip install -e '.[plot]'` in lasad's folder).

    python -m lasad_tools.plot_profile profile-B.json profile-XL.json --out docs/img

Writes step_latency.png (per-step latency against tokens generated, with each engine's floor),
memory.png (steady decode memory against resolution, with lasad's state size) and
throughput.png (images/s against batch, with the bandwidth ceiling).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLORS = {"lasad": "tab:blue", "kv": "tab:red"}
LABELS = {"lasad": "lasad (LASAD state)", "kv": "KV-cache GPT (LlamaGen shape)"}


def _name(d: dict) -> str:
    c = d["config"]
    return {12: "lasad-B", 24: "lasad-L", 36: "lasad-XL", 48: "lasad-XXL"}.get(c["n_layer"], f"{c['n_layer']} layers")


def _latency(ax, d):
    for name, s in d["subjects"].items():
        lat = s["latency"]
        x = range(1, len(lat["step_ms"]) + 1)
        ax.plot(x, lat["step_ms"], color=COLORS[name], lw=0.8, label=f"{LABELS[name]}")
        ax.plot(x, lat["floor_step_ms"], color=COLORS[name], ls="--", lw=1, label=f"{name} floor (bytes / bandwidth)")
    g = lat["grid"]
    ax.set(title=f"{_name(d)}: one image with CFG, {g[0]}x{g[1]} tokens", xlabel="tokens generated",
           ylabel="ms per step", ylim=(0, None))


def _memory(ax, d):
    for name, s in d["subjects"].items():
        toks = [m["tokens"] for m in s["memory"]]
        # on a CPU there is no allocator counter: the engine buffers stand in
        ax.plot(toks, [m.get("steady_bytes", m["buffers_bytes"]) / 2**20 for m in s["memory"]], "o-",
                color=COLORS[name], label=f"{LABELS[name]}: decode memory")
        ax.plot(toks, [m["state_bytes"] / 2**20 for m in s["memory"]], "x--", color=COLORS[name],
                label=f"{name}: state / cache alone")
    ax.set(title=f"{_name(d)}: memory beyond the weights, 1 image with CFG", xlabel="tokens per image",
           ylabel="MiB", xscale="log", yscale="log")


def _throughput(ax, d):
    for name, s in d["subjects"].items():
        rows = [t for t in s["throughput"] if "images_per_s" in t]
        b = [t["batch"] for t in rows]
        ax.plot(b, [t["images_per_s"] for t in rows], "o-", color=COLORS[name], label=LABELS[name])
        ax.plot(b, [t["ceiling_images_per_s"] for t in rows], "--", color=COLORS[name],
                label=f"{name} ceiling (bytes / bandwidth)")
    ax.set(title=f"{_name(d)}: 256-token images, CFG", xlabel="images per batch", ylabel="images / s",
           xscale="log", yscale="log")


def plot(paths: list[Path], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(p).read_text()) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, draw in (("step_latency.png", _latency), ("memory.png", _memory), ("throughput.png", _throughput)):
        fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
        for ax, d in zip(axes[0], runs):
            draw(ax, d)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / filename)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


if __name__ == "__main__":
    args = sys.argv[1:]
    out = Path("docs/img")
    if "--out" in args:
        i = args.index("--out")
        out = Path(args[i + 1])
        args = args[:i] + args[i + 2:]
    if not args:
        sys.exit("usage: python -m lasad_tools.plot_profile PROFILE.json [...] [--out DIR]")
    for p in plot([Path(a) for a in args], out):
        print(p)
