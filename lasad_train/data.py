"""`lasad-train data`: build an image set in the `formats.py` layout (images, label sets, split).

Three sources, each in two parts: a *fetch* step (npm / apt-get, subprocess, into a cache folder)
and a pure *build* step that reads already-unpacked files and writes OUT:

    emoji5         fetch_emoji5(cache)          -> build_emoji5(sources, emoji_json, out)
    fashion-mnist  fetch_fashion_mnist(cache)   -> build_fashion_mnist(folder, out)
    folder         (nothing to fetch)           -> build_folder(src, out)

OUT is built in a temporary folder beside it and swapped into place at the end
(`folders.replace_folder`), so a failure or a kill leaves an existing OUT whole and the next run
removes what a killed one left. `--limit N` takes N images spread evenly over the source (a quick try).

Examples::

    lasad-train data emoji5 /data/emoji5                 # ~8.9k 64x64 images, 4 label sets
    lasad-train data fashion-mnist /data/fmnist          # 70k 32x32 images, official split
    lasad-train data folder ~/pictures/pets /data/pets --size 64 --holdout 0.1
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import click
import numpy as np

from lasad_engine.cli import OneLineCommand, OneLineErrors
from lasad_engine.io import atomic_write_text, one_line

from . import formats
from .folders import clean_stale_siblings, replace_folder, staging_folder
from .formats import IMAGES_FORMAT, VERSION, DataError, spread
from .options import LIMIT_OPTION, SEED, Finite

# Emoji-5: five art styles of the same emoji, labels from emoji-datasource-google's emoji.json.

# style -> where it comes from and where its images lie inside the unpacked package.
# `registry`/`package`/`version` are pinned (datasets.md verified these); `images` is a glob
# relative to the package root; `ext` the image file extension.
EMOJI5_STYLES: dict[str, dict] = {
    "noto": dict(registry="npm", package="emoji-datasource-google", version="16.0.0",
                 images="img/google/64", ext=".png", title="Noto Color Emoji (Google)",
                 licence="Apache-2.0", author="Google LLC",
                 url="https://github.com/googlefonts/noto-emoji"),
    "twemoji": dict(registry="npm", package="emoji-datasource-twitter", version="16.0.0",
                    images="img/twitter/64", ext=".png", title="Twemoji (Twitter / X)",
                    licence="CC-BY-4.0", author="Copyright 2020 Twitter, Inc and other contributors "
                    "(now X Corp.); graphics licensed under CC-BY 4.0",
                    url="https://github.com/twitter/twemoji"),
    "fluent3d": dict(registry="npm", package="@lobehub/fluent-emoji-3d", version="1.1.0",
                     images="assets", ext=".webp", title="Fluent Emoji 3D (Microsoft)",
                     licence="MIT", author="Microsoft Corporation (packaged by LobeHub)",
                     url="https://github.com/microsoft/fluentui-emoji"),
    "openmoji": dict(registry="npm", package="openmoji", version="17.0.0",
                     images="color/svg", ext=".svg", title="OpenMoji",
                     licence="CC-BY-SA-4.0", author="OpenMoji, the open-source emoji and icon "
                     "project (HfG Schwaebisch Gmuend); images rasterised from the colour SVGs",
                     url="https://openmoji.org"),
    "emojione2": dict(registry="deb", package="ruby-gemojione", version="3.3.0-1",
                      images="usr/share/rubygems-integration/all/gems/gemojione-*/assets/png",
                      ext=".png", title="EmojiOne 2 (via the gemojione gem)",
                      licence="CC-BY-SA-4.0", author="Emoji One, Inc. (EmojiOne 2 artwork, "
                      "as shipped in Debian's ruby-gemojione)",
                      url="https://github.com/bonusly/gemojione"),
}
STYLES = tuple(EMOJI5_STYLES)
EMOJI_JSON_STYLE = "noto"  # emoji.json ships in emoji-datasource-google
EMOJI5_LABEL_SETS = ("identity", "subgroup", "group", "style")
DROP_CATEGORIES = ("Component",)  # skin-tone / hair swatches, not emoji of their own

DEFAULT_CACHE = Path("~/.cache/lasad")

# Fashion-MNIST (Debian dataset-fashion-mnist).

FASHION_DEB = dict(package="dataset-fashion-mnist", version="0.0~git20200523.55506a9-1",
                   folder="usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
FASHION_FILES = {  # split -> (images, labels), each also accepted gzipped
    0: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    1: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801

SPLIT_NAMES = ("train", "heldout")
SVG_WARNING = ("lasad-train data: warning: cairosvg is not importable (pip install cairosvg; it needs "
               "libcairo2), so the openmoji style is skipped")


def _log(msg: str) -> None:
    click.echo(msg, err=True)


# Image helpers.

def _open_image(path: Path):
    """Pillow image of `path`, fully loaded (first frame); DataError naming the file otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({one_line(e, 120)})") from None


def _render_svg(path: Path, size: int, cairosvg):
    from PIL import Image

    try:
        png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            return im.copy()
    except Exception as e:  # cairosvg raises a variety of parser errors
        raise DataError(f"{path}: cannot rasterise SVG ({one_line(e, 120)})") from None


def _svg_module():
    """cairosvg if it imports (it needs the system libcairo2), else None."""
    try:
        import cairosvg
        return cairosvg
    except (ImportError, OSError):
        return None


def load_rgb(path: str | Path, size: int, square: str = "crop", exif: bool = False) -> np.ndarray:
    """One image file (raster, or SVG through cairosvg) -> uint8 [size, size, 3] on white."""
    path = Path(path)
    if path.suffix.lower() == ".svg":
        svg = _svg_module()
        if svg is None:
            raise DataError(f"{path}: SVG needs cairosvg (pip install cairosvg)")
        im = _render_svg(path, size, svg)
    else:
        im = _open_image(path)
    if exif:
        from PIL import ImageOps

        with contextlib.suppress(Exception):  # a bad EXIF block is not worth failing for
            im = ImageOps.exif_transpose(im)
    return to_rgb(im, size, square)


def _load_rgb_args(args) -> np.ndarray:
    return load_rgb(*args)


def load_many(paths, size: int, square: str = "crop", exif: bool = False, workers: int = 1) -> np.ndarray:
    """uint8 [len(paths), size, size, 3]; `workers` > 1 decodes in that many processes (SVG
    rasterising is pure Python, so threads would not help). Refused in one line, before anything
    is decoded, when the array (twice: it is also written out) would not fit in memory."""
    from .memory import available_bytes

    need, avail = 2 * len(paths) * size * size * 3, available_bytes()
    if avail is not None and need > avail:
        raise DataError(f"{len(paths)} images of {size}x{size} need about {need / 2**30:.1f} GiB of memory, "
                        f"{avail / 2**30:.1f} GiB are available: pass a smaller --size or --limit")
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    jobs = [(p, size, square, exif) for p in paths]
    if workers > 1 and len(jobs) >= 64:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            for i, img in enumerate(pool.map(_load_rgb_args, jobs, chunksize=32)):
                out[i] = img
    else:
        for i, job in enumerate(jobs):
            out[i] = _load_rgb_args(job)
    return out


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def to_rgb(im, size: int, square: str = "crop") -> np.ndarray:
    """Any Pillow image -> uint8 [size, size, 3] RGB, alpha composited on white.

    `square`: "crop" takes the centred square, "pad" pads the short side with white.
    The resize (LANCZOS) happens after compositing, so transparent pixels never bleed colour.
    """
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit / 32-bit / float grey
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a * (255.0 / 65535.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    rgb = white.convert("RGB")
    w, h = rgb.size
    if w != h:
        if square == "crop":
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            rgb = rgb.crop((left, top, left + s, top + s))
        else:
            s = max(w, h)
            canvas = Image.new("RGB", (s, s), (255, 255, 255))
            canvas.paste(rgb, ((s - w) // 2, (s - h) // 2))
            rgb = canvas
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


# Split and output.

def holdout_split(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """uint8 [N] split (0 = train, 1 = held out) holding out `fraction` of every class.

    Deterministic for a seed. A class of n images holds out floor(n·fraction) images, and the
    fractional parts are drawn (seeded, weighted by the remainder) so that the total is
    round(N·fraction); every class keeps at least one training image. Labels < 0 stay train.
    """
    labels = np.asarray(labels)
    split = np.zeros(len(labels), dtype=np.uint8)
    if fraction <= 0 or len(labels) == 0:
        return split
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    quota = counts * fraction
    take = np.minimum(np.floor(quota).astype(np.int64), counts - 1)
    remainder = np.where(take < counts - 1, quota - take, 0.0)
    extra = int(round(quota.sum())) - int(take.sum())
    eligible = np.flatnonzero(remainder > 0)
    extra = max(0, min(extra, len(eligible)))
    if extra:
        p = remainder[eligible] / remainder[eligible].sum()
        take[rng.choice(eligible, size=extra, replace=False, p=p)] += 1
    for c, k in zip(classes, take):
        if k > 0:
            members = np.flatnonzero(labels == c)
            split[rng.choice(members, size=int(k), replace=False)] = 1
    return split


def _prepare_out(out: Path) -> None:
    """Before a build: what a killed earlier build left beside OUT is restored or removed
    (`folders.clean_stale_siblings`), then OUT must be new, an empty folder, or an earlier image
    set; anything else is refused."""
    clean_stale_siblings(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; give a new folder path for OUT")
    if any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise DataError(f"{out}: exists and is not a lasad image set (no manifest.json); "
                        "remove it or choose another OUT")


def write_image_set(out: str | Path, images: np.ndarray, label_sets: dict, split: np.ndarray,
                    manifest: dict, attribution: str) -> dict:
    """Write the formats.py image-set layout beside OUT and swap it into place whole
    (`folders.replace_folder`: OUT is never left missing), after restoring or removing what a
    killed earlier run left beside OUT.

    Args:
        images: uint8 [N, H, W, 3].
        label_sets: {name: (labels int64 [N], class names [C])}.
        split: uint8 [N], 0 = train, 1 = held out.
        manifest: extra manifest keys ("source", "sources", ...); the layout keys are added here.
    Returns the manifest written.
    """
    out, manifest = Path(out), dict(manifest)
    _prepare_out(out)
    n, h, w, c = images.shape
    assert images.dtype == np.uint8 and c == 3, (images.dtype, images.shape)
    assert split.shape == (n,), split.shape
    full = {"format": IMAGES_FORMAT, "version": VERSION, "source": manifest.pop("source", None),
            "count": int(n), "size": [int(h), int(w)], "label_sets": list(label_sets),
            "num_classes": {k: len(names) for k, (_, names) in label_sets.items()},
            "splits": {name: int((split == i).sum()) for i, name in enumerate(SPLIT_NAMES)},
            **manifest}
    tmp = staging_folder(out)
    try:
        formats.save_npy(tmp / "images.npy", images)
        for name, (labels, names) in label_sets.items():
            labels = np.asarray(labels, dtype=np.int64)
            assert labels.shape == (n,) and labels.max(initial=-1) < len(names), name
            formats.save_npy(tmp / f"labels-{name}.npy", labels)
            atomic_write_text(tmp / f"classes-{name}.json", json.dumps(list(names), indent=0) + "\n")
        formats.save_npy(tmp / "split.npy", split.astype(np.uint8))
        atomic_write_text(tmp / "ATTRIBUTION.md", attribution)
        formats.write_manifest(tmp, full)  # last: a folder without it is not an image set
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return full


# Emoji-5 build (pure: reads unpacked package folders).

def _read_json(path: Path, what: str):
    if not path.is_file():
        raise DataError(f"{path}: no such file ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}; {what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({one_line(e, 120)})") from None


def load_emoji_meta(emoji_json: str | Path) -> list[dict]:
    """The emoji of emoji-datasource's emoji.json, Component entries dropped, in sort order."""
    path = Path(emoji_json)
    data = _read_json(path, "expected emoji.json of emoji-datasource-google")
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of emoji objects (emoji-datasource emoji.json)")
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise DataError(f"{path}: entry {i} is not an object (emoji-datasource emoji.json)")
        for key in ("unified", "short_name", "category", "subcategory"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise DataError(f"{path}: entry {i} has no {key!r} string "
                                "(needs unified, short_name, category, subcategory)")
    keep = [e for e in data if e["category"] not in DROP_CATEGORIES]
    return sorted(keep, key=lambda e: (e.get("sort_order", 0), e["unified"]))


def _stem_candidates(variant: dict) -> list[str]:
    """Lower-case file stems that may hold this emoji in one of the packages."""
    u = variant["unified"].lower()
    out = []
    if isinstance(variant.get("image"), str):
        out.append(variant["image"].rsplit(".", 1)[0].lower())
    out += [u, u.replace("-fe0f", "")]
    if isinstance(variant.get("non_qualified"), str):
        out.append(variant["non_qualified"].lower())
    parts = u.split("-")
    tags = [p for p in parts if p.startswith("e00") and p != "e007f"]
    if tags:  # Fluent 3D names tag sequences (England, Scotland, Wales) "1f3f4-e0067_e0062_..."
        out.append("-".join(p for p in parts if not p.startswith("e00")) + "-" + "_".join(tags))
    return list(dict.fromkeys(out))


def _style_dir(style: str, root: Path) -> Path:
    info = EMOJI5_STYLES[style]
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (the unpacked {info['package']} package for style {style!r})")
    found = sorted(root.glob(info["images"]))
    if found and found[-1].is_dir():
        return found[-1]
    if any(p.suffix.lower() == info["ext"] for p in root.iterdir()):
        return root  # the image folder itself
    raise DataError(f"{root}: no {info['images']}/*{info['ext']} (expected the unpacked "
                    f"{info['package']}@{info['version']} package for style {style!r})")


def _package_label(style: str, root: Path) -> str:
    """'npm:name@version' read from the package's package.json when there is one."""
    info = EMOJI5_STYLES[style]
    pj = root / "package.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        meta = json.loads(pj.read_text())
        return f"npm:{meta['name']}@{meta['version']}"
    return f"{info['registry']}:{info['package']}@{info['version']}"


def emoji5_attribution(styles, counts: dict[str, int]) -> str:
    lines = ["# Emoji-5: attribution and licences", "",
             "Each image is one emoji drawn in one art style, rescaled and composited on white.",
             "Labels (identity, subgroup, group) come from emoji-datasource-google's emoji.json (MIT).",
             "The images keep the licence of their art style:", ""]
    for s in styles:
        info = EMOJI5_STYLES[s]
        lines.append(f"- **{s}**: {info['title']} - {counts.get(s, 0)} images - licence **{info['licence']}** - "
                     f"{info['author']} - {info['url']} - from {info['registry']} `{info['package']}` {info['version']}")
    lines += ["", "CC-BY-4.0 (Twemoji) requires attribution; CC-BY-SA-4.0 (OpenMoji, EmojiOne) also requires "
              "that adapted images be shared under the same licence. Apache-2.0: "
              "https://www.apache.org/licenses/LICENSE-2.0 ; MIT: https://opensource.org/license/mit ; "
              "CC-BY-4.0: https://creativecommons.org/licenses/by/4.0/ ; "
              "CC-BY-SA-4.0: https://creativecommons.org/licenses/by-sa/4.0/", ""]
    return "\n".join(lines)


def build_emoji5(sources: dict, emoji_json: str | Path, out: str | Path, *, size: int = 64,
                 skin_tones: bool = False, holdout: float = 0.1, seed: int = 0,
                 source_info: dict | None = None, workers: int = 1, limit: int | None = None) -> dict:
    """Build Emoji-5 from unpacked package folders into OUT; returns the manifest.

    Args:
        sources: {style: package root} for any of STYLES (noto, twemoji, fluent3d, openmoji,
            emojione2); the images are looked up at EMOJI5_STYLES[style]["images"] under it
            (or directly in it).
        emoji_json: emoji-datasource-google's emoji.json (labels: unified, short_name,
            subcategory, category; "Component" entries are dropped).
        skin_tones: also take each emoji's skin-tone variants (same labels as the base emoji).
        holdout: fraction held out per identity class (split.npy = 1), seeded by `seed`.
        source_info: {style: "registry:package@version"} to record (default: read package.json).
        workers: processes that decode and rasterise the images.
        limit: take that many of the images found, spread evenly over them (style by style).
    Label sets: identity (one class per emoji with an image, named by short_name), subgroup,
    group and style; class tables are in emoji.json sort order.
    """
    t0 = time.perf_counter()
    _prepare_out(Path(out))
    unknown = sorted(set(sources) - set(STYLES))
    if unknown:
        raise DataError(f"unknown emoji5 style {unknown[0]!r}; choose from {', '.join(STYLES)}")
    if not sources:
        raise DataError(f"no emoji5 styles given; choose from {', '.join(STYLES)}")
    meta = load_emoji_meta(emoji_json)
    styles = [s for s in STYLES if s in sources]
    if "openmoji" in styles and _svg_module() is None:
        _log(SVG_WARNING)
        styles.remove("openmoji")

    # (style index, emoji index, path) for every image found, style by style.
    found = []
    for si, style in enumerate(styles):
        folder = _style_dir(style, Path(sources[style]))
        ext = EMOJI5_STYLES[style]["ext"]
        stems = {p.name[: -len(ext)].lower(): p for p in folder.iterdir()
                 if p.name.lower().endswith(ext) and not p.name.startswith(".")}
        for ei, e in enumerate(meta):
            variants = [e] + (list(e.get("skin_variations", {}).values()) if skin_tones else [])
            for v in variants:
                path = next((stems[c] for c in _stem_candidates(v) if c in stems), None)
                if path is not None:
                    found.append((si, ei, path))
    if not found:
        raise DataError(f"{emoji_json}: none of its emoji has an image in the given packages "
                        f"({', '.join(f'{s}={sources[s]}' for s in styles)})")
    found = [found[i] for i in spread(len(found), limit)]
    images = load_many([path for _, _, path in found], size, square="pad", workers=workers)

    used = sorted({ei for _, ei, _ in found})
    identity = {ei: k for k, ei in enumerate(used)}
    subgroups = list(dict.fromkeys(meta[ei]["subcategory"] for ei in used))
    groups = list(dict.fromkeys(meta[ei]["category"] for ei in used))
    sub_index, group_index = {s: k for k, s in enumerate(subgroups)}, {g: k for k, g in enumerate(groups)}
    ids = np.array([identity[ei] for _, ei, _ in found], dtype=np.int64)
    label_sets = {
        "identity": (ids, [meta[ei]["short_name"] for ei in used]),
        "subgroup": (np.array([sub_index[meta[ei]["subcategory"]] for _, ei, _ in found], dtype=np.int64), subgroups),
        "group": (np.array([group_index[meta[ei]["category"]] for _, ei, _ in found], dtype=np.int64), groups),
        "style": (np.array([si for si, _, _ in found], dtype=np.int64), styles),
    }
    split = holdout_split(ids, holdout, seed)
    counts = {s: int((label_sets["style"][0] == si).sum()) for si, s in enumerate(styles)}
    info = source_info or {}
    manifest = {
        "source": "emoji5",
        "split": {"by": "identity", "holdout": holdout, "seed": seed},
        "skin_tones": skin_tones, "limit": limit,
        "sources": {
            "labels": {"file": str(emoji_json), "package": info.get("labels", _package_label(EMOJI_JSON_STYLE, Path(emoji_json).parent))},
            **{s: {"package": info.get(s) or _package_label(s, Path(sources[s])), "path": str(sources[s]),
                   "licence": EMOJI5_STYLES[s]["licence"], "images": counts[s]} for s in styles},
        },
    }
    result = write_image_set(out, images, label_sets, split, manifest, emoji5_attribution(styles, counts))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


# Fetching (npm / apt-get into a cache folder; not exercised by the CPU tests).

def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise DataError(f"{cmd[0]} not found: it is needed to download {what}; install it, or put the "
                        "unpacked package in the cache folder (--cache)") from None
    except subprocess.CalledProcessError as e:
        lines = [ln for ln in (e.stderr or e.stdout or "").splitlines()
                 if ln.strip() and not ln.startswith(("W:", "npm warn", "npm notice"))]
        hint = "; run apt-get update first" if cmd[0] == "apt-get" else ""
        raise DataError(f"{' '.join(cmd)} failed (exit {e.returncode}): "
                        f"{one_line(lines[-1] if lines else 'no output', 150)}{hint}") from None


def _slug(name: str) -> str:
    return name.lstrip("@").replace("/", "-")


@contextlib.contextmanager
def _staging(cache: Path):
    tmp = Path(tempfile.mkdtemp(prefix=".fetch.", dir=cache))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_unless_there(src: Path, dest: Path) -> None:
    """Move an unpacked package into the cache; another process may have been faster."""
    try:
        os.rename(src, dest)
    except OSError:
        if not dest.is_dir():
            raise


def fetch_npm(name: str, version: str, cache: str | Path) -> Path:
    """npm pack NAME@VERSION into CACHE, unpack it once; returns the package root (.../package)."""
    cache = Path(cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / f"{_slug(name)}-{version}"
    if (dest / "package").is_dir():
        return dest / "package"
    tgz = cache / f"{_slug(name)}-{version}.tgz"
    with _staging(cache) as tmp:
        if not tgz.is_file():
            _log(f"lasad-train data: npm pack {name}@{version}")
            _run(["npm", "pack", "--silent", f"{name}@{version}"], tmp, f"{name}@{version}")
            packed = sorted(tmp.glob("*.tgz"))
            if not packed:
                raise DataError(f"npm pack {name}@{version} wrote no .tgz in {tmp}")
            os.replace(packed[0], tgz)
        try:
            with tarfile.open(tgz) as tar:
                try:
                    tar.extractall(tmp / "x", filter="data")
                except TypeError:  # Python without extraction filters
                    tar.extractall(tmp / "x")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{tgz}: cannot unpack ({one_line(e, 120)}); delete it to download again") from None
        if not (tmp / "x" / "package").is_dir():
            raise DataError(f"{tgz}: no package/ folder inside (not an npm tarball?)")
        _rename_unless_there(tmp / "x", dest)
    return dest / "package"


def fetch_deb(name: str, version: str, cache: str | Path) -> Path:
    """apt-get download NAME=VERSION into CACHE and dpkg -x it once; returns the unpacked root."""
    cache = Path(cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / f"{name}_{version}"
    if dest.is_dir():
        return dest
    with _staging(cache) as tmp:
        debs = sorted(cache.glob(glob.escape(f"{name}_{version}_") + "*.deb"))
        if debs:
            deb = debs[-1]
        else:
            _log(f"lasad-train data: apt-get download {name}={version}")
            _run(["apt-get", "download", f"{name}={version}"], tmp, f"the Debian package {name}")
            got = sorted(tmp.glob("*.deb"))
            if not got:
                raise DataError(f"apt-get download {name}={version} wrote no .deb")
            deb = cache / got[0].name
            os.replace(got[0], deb)
        _run(["dpkg", "-x", str(deb), str(tmp / "x")], cache, f"the Debian package {name}")
        _rename_unless_there(tmp / "x", dest)
    return dest


def fetch_emoji5(cache: str | Path, styles=STYLES) -> tuple[dict, Path, dict]:
    """Download (or reuse) the packages of `styles`; returns (sources, emoji.json, source_info)."""
    sources, info = {}, {}
    for style in dict.fromkeys([EMOJI_JSON_STYLE, *styles]):
        spec = EMOJI5_STYLES[style]
        fetch = fetch_npm if spec["registry"] == "npm" else fetch_deb
        root = fetch(spec["package"], spec["version"], cache)
        sources[style] = root
        info[style] = f"{spec['registry']}:{spec['package']}@{spec['version']}"
    emoji_json = sources[EMOJI_JSON_STYLE] / "emoji.json"
    info["labels"] = info[EMOJI_JSON_STYLE]
    if EMOJI_JSON_STYLE not in styles:
        del sources[EMOJI_JSON_STYLE]
    return sources, emoji_json, info


def fetch_fashion_mnist(cache: str | Path) -> Path:
    """The folder holding the four Fashion-MNIST idx files (from the Debian package)."""
    return fetch_deb(FASHION_DEB["package"], FASHION_DEB["version"], cache) / FASHION_DEB["folder"]


# Fashion-MNIST build (pure: reads idx files).

def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """uint8 array of an idx file (gzipped or not) whose magic number must be `magic`."""
    path = Path(path)
    kind = {IDX_IMAGES: "idx3 images", IDX_LABELS: "idx1 labels"}.get(magic, "idx")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({one_line(e, 120)})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an idx file ({len(raw)} bytes)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DataError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} ({kind})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != need:
        raise DataError(f"{path}: header says {'x'.join(map(str, dims))} = {need} bytes of data, "
                        f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: no {name}[.gz] (expected the four Fashion-MNIST idx files: "
                    f"{', '.join(n for pair in FASHION_FILES.values() for n in pair)})")


def _fit_grey(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, h, w] -> [N, size, size]: pad with black when size is at most 4 larger, else resize."""
    n, h, w = x.shape
    if (h, w) == (size, size):
        return x
    if 0 <= size - h <= 4 and 0 <= size - w <= 4:
        top, left = (size - h) // 2, (size - w) // 2
        return np.pad(x, ((0, 0), (top, size - h - top), (left, size - w - left)))
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im, "L").resize((size, size), Image.LANCZOS)) for im in x]) \
        if n else np.zeros((0, size, size), np.uint8)


def fashion_attribution() -> str:
    return ("# Fashion-MNIST: attribution and licence\n\n"
            "Fashion-MNIST, Copyright (c) 2017 Zalando SE, https://github.com/zalandoresearch/fashion-mnist ,"
            " licence **MIT**. Han Xiao, Kashif Rasul, Roland Vollgraf: Fashion-MNIST: a Novel Image Dataset "
            "for Benchmarking Machine Learning Algorithms, arXiv:1708.07747 (2017).\n"
            f"Taken from the Debian package `{FASHION_DEB['package']}` {FASHION_DEB['version']}; "
            "28x28 grey, padded or resized and repeated to RGB.\n")


def build_fashion_mnist(folder: str | Path, out: str | Path, *, size: int = 32, source_info: str | None = None,
                        limit: int | None = None) -> dict:
    """Fashion-MNIST idx files in FOLDER -> image set OUT (label set "class", split = official
    train 0 / test 1); returns the manifest. Sizes 28-32 pad with black, others resize. `limit`:
    that many images spread over the 70,000 (both splits in proportion)."""
    t0 = time.perf_counter()
    folder = Path(folder)
    _prepare_out(Path(out))
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (expected the Fashion-MNIST idx files)")
    parts, labels, splits = [], [], []
    for split, (img_name, lab_name) in FASHION_FILES.items():
        img_path, lab_path = _find_idx(folder, img_name), _find_idx(folder, lab_name)
        x, y = read_idx(img_path, IDX_IMAGES), read_idx(lab_path, IDX_LABELS)
        if len(x) != len(y):
            raise DataError(f"{lab_path}: {len(y)} labels for {len(x)} images in {img_path.name}")
        if len(y) and y.max() >= len(FASHION_CLASSES):
            raise DataError(f"{lab_path}: label {int(y.max())} out of range 0..{len(FASHION_CLASSES) - 1}")
        parts.append(x)
        labels.append(y.astype(np.int64))
        splits.append(np.full(len(y), split, dtype=np.uint8))
    keep = spread(sum(len(y) for y in labels), limit)
    grey = _fit_grey(np.concatenate(parts)[keep], size)
    labels, splits = [np.concatenate(labels)[keep]], [np.concatenate(splits)[keep]]
    images = np.repeat(grey[..., None], 3, axis=-1)
    manifest = {
        "source": "fashion-mnist", "limit": limit,
        "split": {"by": "official", "train": "train-*", "heldout": "t10k-*"},
        "sources": {"fashion-mnist": {"package": source_info or str(folder), "path": str(folder), "licence": "MIT"}},
    }
    result = write_image_set(out, images, {"class": (np.concatenate(labels), FASHION_CLASSES)},
                             np.concatenate(splits), manifest, fashion_attribution())
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


# Folder-per-class build.

def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan_folder(src: str | Path) -> tuple[list[str], list[list[Path]]]:
    """(class names, image paths per class) of a folder with one sub-folder per class."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: no such folder (expected one sub-folder of images per class)")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{src}: no class sub-folders (expected SRC/<class name>/<images>)")
    exts = _image_extensions()
    files = []
    for name in classes:
        root = src / name
        paths = sorted(p for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in exts and not _hidden(p, root))
        if not paths:
            raise DataError(f"{root}: class folder has no images (.png, .jpg, .webp, .gif, .bmp, .tif, ... "
                            "that Pillow reads; hidden files are ignored)")
        files.append(paths)
    return classes, files


def build_folder(src: str | Path, out: str | Path, *, size: int = 64, holdout: float = 0.1, seed: int = 0,
                 workers: int = 1, limit: int | None = None) -> dict:
    """SRC/<class>/<images> -> image set OUT (label set "class", classes = sorted folder names);
    images centre-cropped to a square, composited on white, resized to `size`. `limit`: that
    many images spread evenly over the sorted list (so every class keeps its share)."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if out.resolve().is_relative_to(src.resolve()):
        raise DataError(f"{out}: OUT must not be inside SRC {src}")
    _prepare_out(out)
    classes, files = scan_folder(src)
    n = sum(len(p) for p in files)
    keep = spread(n, limit)
    paths = [p for paths in files for p in paths]
    images = load_many([paths[i] for i in keep], size, square="crop", exif=True, workers=workers)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(p) for p in files])[keep]
    split = holdout_split(labels, holdout, seed)
    manifest = {
        "source": "folder", "limit": limit,
        "split": {"by": "class", "holdout": holdout, "seed": seed},
        "sources": {"folder": {"path": str(src.resolve()), "images": n,
                               "per_class": {name: len(p) for name, p in zip(classes, files)}}},
    }
    attribution = (f"# Attribution\n\nImages from the user folder `{src.resolve()}` ({n} images, "
                   f"{len(classes)} classes). Their licences are those of that folder's owners.\n")
    result = write_image_set(out, images, {"class": (labels, classes)}, split, manifest, attribution)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


# CLI.

class DataCommand(OneLineCommand):
    """A DataError (bad input files or values) ends as one line on stderr, exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DataError as e:
            raise click.ClickException(str(e)) from None


class DataGroup(OneLineErrors, click.Group):
    command_class = DataCommand


def build_subset(src: str | Path, out: str | Path, *, label_set: str, min_count: int = 1) -> dict:
    """Image set OUT = the images of SRC whose class in `label_set` has at least `min_count`
    images (over both splits), with that label set alone, renumbered 0..C-1 in SRC's class order.
    The split is SRC's; the attribution is copied. E.g. the ablation's task: Emoji-5 subgroups
    with at least 40 images."""
    src, out = Path(src), Path(out)
    _prepare_out(out)
    images, labels, names, manifest = formats.load_images(src, label_set)
    if min_count < 1:
        raise DataError(f"min_count {min_count} must be >= 1")
    counts = np.bincount(labels[labels >= 0], minlength=len(names))
    kept = np.flatnonzero(counts >= min_count)
    if len(kept) == 0:
        raise DataError(f"{src}: no class of label set {label_set!r} has {min_count} or more images "
                        f"(the largest has {int(counts.max(initial=0))})")
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    keep = np.flatnonzero((labels >= 0) & (remap[np.maximum(labels, 0)] >= 0))
    split = np.load(src / "split.npy")[keep]
    attribution = (src / "ATTRIBUTION.md").read_text() if (src / "ATTRIBUTION.md").is_file() else ""
    t = time.time()
    m = write_image_set(out, np.ascontiguousarray(images[keep]),
                        {label_set: (remap[labels[keep]], [names[k] for k in kept])}, split,
                        {"source": {"subset_of": str(src), "source": manifest.get("source"),
                                    "label_set": label_set, "min_count": int(min_count),
                                    "classes_kept": int(len(kept)), "classes_in_source": len(names)}},
                        attribution)
    return {**m, "seconds": time.time() - t}


def _summary(out: Path, m: dict) -> None:
    classes = ", ".join(f"{k} {v}" for k, v in m["num_classes"].items())
    click.echo(f"{out}: {m['count']} images {m['size'][0]}x{m['size'][1]} "
               f"(train {m['splits']['train']}, held out {m['splits']['heldout']}); classes: {classes}; "
               f"{m['seconds']:.1f} s")


HOLDOUT = Finite(0, 1, max_open=True)
SIZE = click.IntRange(4, 4096)
WORKERS = click.option("--workers", default=default_workers(), show_default="CPU cores, at most 8",
                       type=click.IntRange(1, 256), help="Processes that decode the images.")


@click.group("data", cls=DataGroup, context_settings={"help_option_names": ["-h", "--help"]})
def data_cmd():
    """Build an image set (images.npy, labels-*.npy, classes-*.json, split.npy, manifest.json)."""


@data_cmd.command("emoji5")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cache", type=click.Path(path_type=Path), default=str(DEFAULT_CACHE / "emoji5"),
              show_default=True, help="Where the npm / Debian packages are downloaded and unpacked (reused).")
@click.option("--size", default=64, show_default=True, type=SIZE, help="Image side in pixels.")
@click.option("--skin-tones/--no-skin-tones", default=False, show_default=True,
              help="Also take the skin-tone variants (labelled as their base emoji).")
@click.option("--holdout", default=0.1, show_default=True, type=HOLDOUT,
              help="Fraction of every identity class held out (split.npy = 1).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the split.")
@click.option("--style", "styles", multiple=True, type=click.Choice(STYLES),
              help="Art style to include (repeatable; default: all five).")
@LIMIT_OPTION
@WORKERS
def emoji5_cmd(out, cache, size, skin_tones, holdout, seed, styles, limit, workers):
    """Emoji-5: ~1.9k emoji in five art styles (Noto, Twemoji, Fluent 3D, OpenMoji, EmojiOne 2),
    label sets identity / subgroup / group / style. Downloads with npm and apt-get into --cache."""
    styles = list(styles) or list(STYLES)
    if "openmoji" in styles and _svg_module() is None:
        styles.remove("openmoji")  # build_emoji5 would warn after the download; say it before
        _log(SVG_WARNING)
        if not styles:
            raise DataError("no emoji5 style left to build (openmoji needs cairosvg)")
    sources, emoji_json, info = fetch_emoji5(Path(cache).expanduser(), styles)
    m = build_emoji5(sources, emoji_json, out, size=size, skin_tones=skin_tones, holdout=holdout,
                     seed=seed, source_info=info, workers=workers, limit=limit)
    per_style = ", ".join(f"{s} {v['images']}" for s, v in m["sources"].items() if s != "labels")
    _summary(out, m)
    click.echo(f"  per style: {per_style}")


@data_cmd.command("fashion-mnist")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cache", type=click.Path(path_type=Path), default=str(DEFAULT_CACHE / "fashion-mnist"),
              show_default=True, help="Where the Debian package is downloaded and unpacked (reused).")
@click.option("--size", default=32, show_default=True, type=SIZE,
              help="Image side: 28-32 pads the 28x28 images with black, other sizes resize them.")
@LIMIT_OPTION
def fashion_cmd(out, cache, size, limit):
    """Fashion-MNIST (Debian dataset-fashion-mnist): 70k grey images as RGB, label set "class",
    split = the official train (0) / test (1)."""
    folder = fetch_fashion_mnist(Path(cache).expanduser())
    m = build_fashion_mnist(folder, out, size=size, limit=limit,
                            source_info=f"deb:{FASHION_DEB['package']}@{FASHION_DEB['version']}")
    _summary(out, m)


@data_cmd.command("folder")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", default=64, show_default=True, type=SIZE, help="Image side in pixels.")
@click.option("--holdout", default=0.1, show_default=True, type=HOLDOUT,
              help="Fraction of every class held out (split.npy = 1).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the split.")
@LIMIT_OPTION
@WORKERS
def folder_cmd(src, out, size, holdout, seed, limit, workers):
    """Any folder with one sub-folder of images per class (class names = sorted folder names;
    hidden files ignored). Images are centre-cropped, composited on white and resized."""
    m = build_folder(src, out, size=size, holdout=holdout, seed=seed, workers=workers, limit=limit)
    _summary(out, m)


@data_cmd.command("subset")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--label-set", required=True, help="Label set whose classes are filtered (e.g. subgroup).")
@click.option("--min-count", default=1, show_default=True, type=click.IntRange(1, 1 << 40),
              help="Keep the classes with at least this many images (both splits).")
def subset_cmd(src, out, label_set, min_count):
    """The classes of SRC's LABEL_SET with at least --min-count images, as a new image set
    (that label set alone, renumbered; SRC's split), e.g. the 67 Emoji-5 subgroups with >= 40."""
    m = build_subset(src, out, label_set=label_set, min_count=min_count)
    _summary(out, m)


if __name__ == "__main__":  # pragma: no cover
    data_cmd(sys.argv[1:])
