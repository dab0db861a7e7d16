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

import glob
import json
from pathlib import Path

import numpy as np

from lasad_engine.io import UserError, atomic_path, atomic_write_text, one_line

IMAGES_FORMAT, CODES_FORMAT, VERSION = "lasad-images", "lasad-codes", 1
MAX_COUNT = 1 << 40  # no manifest describes more items than this


class DataError(UserError):
    """Bad or missing training data; the message is one line naming the file and the problem."""


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """An `.npy` file (memory-mapped with `mmap`); a missing or damaged one is one DataError line."""
    if not Path(path).is_file():
        raise DataError(f"{path}: missing (listed in the manifest beside it)")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({one_line(e, 120)})") from None


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_text(Path(folder) / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def read_manifest(folder: str | Path, kind: str) -> dict:
    """The manifest of an image set (`kind` IMAGES_FORMAT) or code set (CODES_FORMAT), its fields
    checked for type and range: a malformed one is one DataError line naming the field."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        folder = Path(folder)
        backups = sorted(folder.parent.glob(f".{glob.escape(folder.name)}.*.old")) if not folder.exists() else []
        if backups:
            raise DataError(f"{folder}: missing; a replacement that was killed left the previous set in "
                            f"{backups[-1].name}: run the same lasad-train data command again to restore it")
        raise DataError(f"{folder}: no manifest.json (make it with lasad-train {'data' if kind == IMAGES_FORMAT else 'codes'})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({one_line(e, 120)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: format {found!r}, expected {kind!r}")
    (_check_images if kind == IMAGES_FORMAT else _check_codes)(manifest, path)
    return manifest


def _int(manifest: dict, key: str, path: Path, low: int = 0, high: int = MAX_COUNT, value=None) -> int:
    """manifest[key] (or `value`), an integer in [low, high]; else one DataError line."""
    value = manifest.get(key, "missing") if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DataError(f"{path}: {key} is {one_line(repr(value), 60)}, expected an integer in [{low}, {high}]")
    return value


def _file_name(value, what: str, path: Path) -> str:
    """A plain file name inside the set's folder (no folders, no '..')."""
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value in (".", ".."):
        raise DataError(f"{path}: {what} is {one_line(repr(value), 60)}, expected a file name in the set's folder")
    return value


def _check_images(m: dict, path: Path) -> None:
    _int(m, "count", path)
    size = m.get("size")
    if not (isinstance(size, list) and len(size) == 2):
        raise DataError(f"{path}: size is {one_line(repr(size), 60)}, expected [height, width]")
    for v in size:
        _int(m, "size", path, 1, 1 << 16, value=v)
    sets = m.get("label_sets", [])
    if not isinstance(sets, list):
        raise DataError(f"{path}: label_sets is {one_line(repr(sets), 60)}, expected a list of names")
    for name in sets:
        _file_name(f"labels-{name}.npy" if isinstance(name, str) else name, "a label set name", path)


def _check_codes(m: dict, path: Path) -> None:
    grid = m.get("grid")
    if not (isinstance(grid, list) and len(grid) == 2):
        raise DataError(f"{path}: grid is {one_line(repr(grid), 60)}, expected [height, width]")
    for v in grid:
        _int(m, "grid", path, 1, 1 << 12, value=v)
    _int(m, "vocab_size", path, 1, 1 << 31)
    classes = _int(m, "num_classes", path, 1, 1 << 31)
    names = m.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) == classes
                                  and all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: class_names must be null or a list of {classes} strings")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise DataError(f"{path}: shards is {one_line(repr(shards), 60)}, expected a list")
    total = 0
    for k, s in enumerate(shards):
        if not isinstance(s, dict):
            raise DataError(f"{path}: shard {k} is {one_line(repr(s), 60)}, expected an object")
        _file_name(s.get("codes"), f"shard {k}'s codes", path)
        _file_name(s.get("labels"), f"shard {k}'s labels", path)
        total += _int(s, f"shard {k}'s count", path, value=s.get("count", "missing"))
    if _int(m, "count", path) != total:
        raise DataError(f"{path}: count {m['count']} does not match its shards ({total})")


def spread(n: int, limit: int | None) -> np.ndarray:
    """int64 [min(n, limit)]: indices of `limit` of `n` items spread evenly over them (item
    floor(i·n/limit) for i < limit), all n when `limit` is None or ≥ n. The `--limit N` of the
    data, tokenizer and codes stages: deterministic, and it keeps every class of a class-ordered set."""
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.arange(limit, dtype=np.int64) * n // limit


def load_images(folder: str | Path, label_set: str | None = None, split: int | None = None):
    """(images uint8 [N, H, W, 3], labels int64 [N] or None, class names or None, manifest)."""
    folder = Path(folder)
    manifest = read_manifest(folder, IMAGES_FORMAT)
    images = load_npy(folder / "images.npy", mmap=True)
    n = manifest["count"]
    if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{folder}/images.npy: expected uint8 [{n}, H, W, 3] (the manifest's count), got "
                        f"{images.dtype} {list(images.shape)}")
    labels = names = None
    if label_set is not None:
        if label_set not in manifest.get("label_sets", []):
            raise DataError(f"{folder}: label set {label_set!r} is not one of {', '.join(manifest.get('label_sets', []))}")
        labels = load_npy(folder / f"labels-{label_set}.npy")
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{folder}/labels-{label_set}.npy: expected integer [{n}], got {labels.dtype} {list(labels.shape)}")
        try:
            names = json.loads((folder / f"classes-{label_set}.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{folder}/classes-{label_set}.json: not readable JSON ({one_line(e, 100)})") from None
        if not isinstance(names, list):
            raise DataError(f"{folder}/classes-{label_set}.json: expected a list of class names")
    if split is not None:
        where = load_npy(folder / "split.npy")
        if where.shape != (n,):
            raise DataError(f"{folder}/split.npy: expected [{n}], got {list(where.shape)}")
        keep = where == split
        images, labels = images[keep], (labels[keep] if labels is not None else None)
    return images, labels, names, manifest


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
