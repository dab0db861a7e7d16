"""On-disk formats shared by the `lasad-train` stages (one definition; every stage reads these).

Image set (`lasad-train data ... OUT`):
    OUT/images.npy          uint8 [N, H, W, 3], RGB (composited on white where there was alpha)
    OUT/labels-{set}.npy    int64 [N] for each label set (e.g. identity, subgroup, group; "class"
                            for a folder-per-class set), -1 where an image has no label in that set
    OUT/classes-{set}.json  list of class names, index = label
    OUT/split.npy           uint8 [N]: 0 = train, 1 = held out (validation / FID reference)
    OUT/manifest.json       {"format": "lasad-images", "version": 1, "source": ..., "count": N,
                             "size": [H, W], "label_sets": [...], "sources": {...}}
    OUT/ATTRIBUTION.md      licences and authors of the pictures

Code set (`lasad-train codes IMAGES VQ OUT`):
    OUT/codes-{k:05d}.npy   int32 [n, h, w] token grids (shard k)
    OUT/labels-{k:05d}.npy  int64 [n]
    OUT/manifest.json       {"format": "lasad-codes", "version": 1, "grid": [h, w], "vocab_size": V,
                             "label_set": ..., "num_classes": C, "class_names": [...], "flip": bool,
                             "shards": [{"codes": ..., "labels": ..., "count": n}], "count": total,
                             "tokenizer": path, "images": path}
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from lasad_engine.io import UserError, atomic_path, atomic_write_text, one_line

IMAGES_FORMAT, CODES_FORMAT, VERSION = "lasad-images", "lasad-codes", 1


class DataError(UserError):
    """Bad or missing training data; the message is one line naming the file and the problem."""


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_text(Path(folder) / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def read_manifest(folder: str | Path, kind: str) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{folder}: no manifest.json (make it with lasad-train {'data' if kind == IMAGES_FORMAT else 'codes'})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("format") != kind:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {kind!r}")
    return manifest


def load_images(folder: str | Path, label_set: str | None = None, split: int | None = None):
    """(images uint8 [N, H, W, 3], labels int64 [N] or None, class names or None, manifest)."""
    folder = Path(folder)
    manifest = read_manifest(folder, IMAGES_FORMAT)
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = names = None
    if label_set is not None:
        if label_set not in manifest.get("label_sets", []):
            raise DataError(f"{folder}: label set {label_set!r} is not one of {', '.join(manifest.get('label_sets', []))}")
        labels = np.load(folder / f"labels-{label_set}.npy")
        names = json.loads((folder / f"classes-{label_set}.json").read_text())
    if split is not None:
        keep = np.load(folder / "split.npy") == split
        images, labels = images[keep], (labels[keep] if labels is not None else None)
    return images, labels, names, manifest


def rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states as tensors and plain values (weights_only-safe),
    saved in every resumable training checkpoint."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def pack_image_set(folder: str | Path, npz: str | Path) -> Path:
    """One compressed file holding a whole image set (to carry it where nothing can be fetched)."""
    folder = Path(folder)
    read_manifest(folder, IMAGES_FORMAT)
    arrays = {p.stem: np.load(p) for p in sorted(folder.glob("*.npy"))}
    texts = {p.name: p.read_text() for p in sorted(folder.glob("*.json")) if p.name != "manifest.json"}
    texts["manifest.json"] = (folder / "manifest.json").read_text()
    with atomic_path(npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays, __texts__=np.array(json.dumps(texts)))
    return Path(npz)


def unpack_image_set(npz: str | Path, folder: str | Path) -> Path:
    """Inverse of pack_image_set; the manifest is written last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(npz) as data:
        texts = json.loads(str(data["__texts__"]))
        for name in data.files:
            if name != "__texts__":
                save_npy(folder / f"{name}.npy", data[name])
    for name, text in texts.items():
        if name != "manifest.json":
            atomic_write_text(folder / name, text)
    atomic_write_text(folder / "manifest.json", texts["manifest.json"])
    return folder


def split_file(path: str | Path, folder: str | Path, max_bytes: int = 15 << 20) -> list[Path]:
    """Cut a file into `<name>.part000`, `.part001`, ... of at most `max_bytes` each (checkpoints
    leave a machine that returns files of bounded size); `join_files` puts them back."""
    path, folder = Path(path), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(path, "rb") as f:
        while True:
            chunk = f.read(max_bytes)
            if not chunk and parts:
                break
            part = folder / f"{path.name}.part{len(parts):03d}"
            with atomic_path(part) as tmp:
                Path(tmp).write_bytes(chunk)
            parts.append(part)
            if len(chunk) < max_bytes:
                break
    return parts


def join_files(first_part: str | Path, out: str | Path) -> Path:
    """Inverse of split_file: `first_part` is any `<name>.partNNN`; writes `out` atomically."""
    first_part = Path(first_part)
    stem = first_part.name.rsplit(".part", 1)[0]
    parts = sorted(first_part.parent.glob(f"{stem}.part[0-9][0-9][0-9]"))
    if not parts:
        raise DataError(f"{first_part}: no parts named {stem}.partNNN beside it")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
    return Path(out)


def read_training_checkpoint(path: str | Path, fmt: str, version: int, version_key: str = "version") -> dict:
    """A resumable training checkpoint (weights_only), checked for its format and version; any
    problem is one DataError line. The tokenizer and GPT trainers each have their `fmt`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
        raise DataError(f"{path}: not a readable training checkpoint ({one_line(e)})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise DataError(f"{path}: not a {fmt} checkpoint")
    if obj.get(version_key) != version:
        raise DataError(f"{path}: {fmt} checkpoint version {obj.get(version_key)!r} is not supported (reads {version})")
    return obj
