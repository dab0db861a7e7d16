"""`lasad-train codes IMAGES VQ OUT`: encode an image set into token grids for GPT training.

Writes the code-set layout of ``lasad_train.formats`` (int32 ``codes-{k:05d}.npy`` shards of
``[n, h, w]``, int64 ``labels-{k:05d}.npy``, ``manifest.json`` last, so a folder with a manifest
is always complete). With ``flip`` (the default, as LlamaGen's ``extract_codes_c2i.py``) every
image also gets its horizontally mirrored copy, interleaved: row ``2i`` is image ``i``, row
``2i + 1`` its mirror. Images without a label in the chosen label set (label ``-1``) are dropped
and counted in the manifest (``dropped_unlabelled``).

Readers: ``load_codes(folder)`` (everything in memory, int64) and ``CodeDataset(folder)`` (a torch
Dataset over memory-mapped shards returning ``(codes int64 [h*w], label int64)``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lasad_engine.checkpoint import file_fingerprint
from lasad_engine.io import one_line
from lasad_engine.params import resolve_device

from .folders import clean_stale_siblings, replace_folder, staging_folder
from .formats import (CODES_FORMAT, IMAGES_FORMAT, VERSION, DataError, load_images, load_npy, read_manifest,
                      save_npy, spread, write_manifest)

SPLITS = {"train": 0, "holdout": 1, "all": None}
FLIP_ORDER = "interleaved: row 2i is image i, row 2i+1 its horizontal mirror"


def _default_label_set(label_sets: list) -> str | None:
    if not label_sets:
        return None
    return "class" if "class" in label_sets else label_sets[0]


def _check_out(out: Path, images_dir: Path) -> None:
    """OUT may be new, empty or an earlier code set (replaced whole); anything else is refused."""
    if out.resolve() == images_dir.resolve():
        raise DataError(f"{out}: the output folder must differ from the image set; choose another output folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another output folder")
    if not any(out.iterdir()):
        return
    try:
        found = json.loads((out / "manifest.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != CODES_FORMAT:
        raise DataError(f"{out} holds another kind of data set or other files (no code-set manifest.json); "
                        "choose another output folder")


@dataclass
class _Selection:
    """The images to encode (uint8 `[n, H, W, 3]`), their labels (int64 `[n]`, all >= 0) and what
    the manifest records about how they were chosen."""

    images: np.ndarray
    labels: np.ndarray
    names: list
    label_set: str | None
    considered: int
    dropped: int
    source: dict
    split_digest: str | None


def _split_digest(images_dir: Path, labels: np.ndarray | None) -> str | None:
    """SHA-256 prefix of the image set's split.npy and its labels of the chosen label set (all
    images, before any selection), None without a split file. The same images built at another
    --size give the same digest, so code sets of several sizes can be checked to share one
    train / held-out split (`load_code_sets`)."""
    path = images_dir / "split.npy"
    if not path.is_file():
        return None
    h = hashlib.sha256(np.ascontiguousarray(load_npy(path), dtype=np.uint8).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _select(images_dir: Path, label_set: str | None, split: str, limit: int | None) -> _Selection:
    """The split's images (`limit`: that many, spread over the split), unlabelled ones dropped."""
    img_manifest = read_manifest(images_dir, IMAGES_FORMAT)
    if label_set is None:
        label_set = _default_label_set(list(img_manifest.get("label_sets", [])))
    all_labels = load_images(images_dir, label_set)[1]
    digest = _split_digest(images_dir, all_labels)
    images, labels, names, _ = load_images(images_dir, label_set, SPLITS[split])
    if labels is None:  # no label sets at all: one class
        labels, names = np.zeros(len(images), dtype=np.int64), ["all"]
    keep = spread(len(images), limit)
    images, labels = images[keep], np.asarray(labels, dtype=np.int64)[keep]
    if labels.size and (labels.max() >= len(names) or labels.min() < -1):
        raise DataError(f"{images_dir}/labels-{label_set}.npy: labels outside [-1, {len(names) - 1}]")
    labelled = labels >= 0
    dropped, considered = int((~labelled).sum()), len(images)
    if dropped:
        images, labels = images[labelled], labels[labelled]
    if len(images) == 0:
        raise DataError(f"{images_dir}: no labelled images in split {split!r} of label set {label_set!r}")
    return _Selection(images, labels, list(names), label_set, considered, dropped, img_manifest, digest)


def _load_vq(vq_path: Path, dev):
    from lasad_engine.tokenizer import load_tokenizer

    if not vq_path.is_file():
        raise DataError(f"{vq_path}: no such tokenizer file")
    try:
        return load_tokenizer(vq_path, device=dev)
    except ValueError as e:  # load_tokenizer's one-line messages
        raise DataError(one_line(e, 300)) from None


class _ShardWriter:
    """Code grids and labels into `codes-{k:05d}.npy` / `labels-{k:05d}.npy` of `shard_size` rows."""

    def __init__(self, folder: Path, shard_size: int, grid: tuple[int, int], dtype):
        self.folder, self.shard_size, self.grid, self.dtype = folder, shard_size, grid, dtype
        self.shards: list[dict] = []
        self._codes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def add(self, codes: np.ndarray, labels: np.ndarray) -> None:
        """codes `[n, h, w]`, labels `[n]`."""
        self._codes.append(codes.astype(self.dtype))
        self._labels.append(labels.astype(np.int64))
        if sum(len(c) for c in self._codes) >= self.shard_size:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        codes = np.concatenate(self._codes) if self._codes else np.zeros((0, *self.grid), self.dtype)
        labels = np.concatenate(self._labels) if self._labels else np.zeros((0,), np.int64)
        while len(codes) >= self.shard_size or (final and len(codes)):
            k, n = len(self.shards), min(self.shard_size, len(codes))
            entry = {"codes": f"codes-{k:05d}.npy", "labels": f"labels-{k:05d}.npy", "count": int(n)}
            save_npy(self.folder / entry["codes"], np.ascontiguousarray(codes[:n]))
            save_npy(self.folder / entry["labels"], np.ascontiguousarray(labels[:n]))
            self.shards.append(entry)
            codes, labels = codes[n:], labels[n:]
        self._codes, self._labels = ([codes], [labels]) if len(codes) else ([], [])


def _encode(model, sel: _Selection, writer: _ShardWriter, flip: bool, batch_size: int, dev, progress: bool) -> None:
    """Encode every selected image (and, with `flip`, its mirror right after it) into `writer`."""
    from tqdm import tqdm

    n = len(sel.images)
    bar = tqdm(total=n, disable=not progress, file=sys.stderr, unit="img", desc="codes", dynamic_ncols=True)
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                batch = torch.from_numpy(np.array(sel.images[i:i + batch_size])).to(dev)  # copy: memmaps are read-only
                x = batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
                labels = sel.labels[i:i + batch_size]
                if flip:  # interleave: image, mirror, image, mirror ...
                    x = torch.stack([x, x.flip(-1)], dim=1).reshape(-1, *x.shape[1:])
                    labels = np.repeat(labels, 2)
                writer.add(model.encode(x).cpu().numpy(), labels)
                bar.update(len(batch))
        writer.flush(final=True)
    finally:
        bar.close()


def extract_codes(images_dir, vq_path, out_dir, *, label_set: str | None = None, split: str = "train",
                  flip: bool = True, shard_size: int = 4096, batch_size: int = 64, limit: int | None = None,
                  device=None, progress: bool = True) -> dict:
    """Encode the image set ``images_dir`` with the tokenizer ``vq_path`` into ``out_dir``.

    ``label_set``: which labels to carry (default ``"class"`` if the set has it, else its first
    label set; an image set without label sets gives one class, label 0). ``split``: ``"train"``,
    ``"holdout"`` or ``"all"``. ``limit``: encode that many images, spread over the split. The
    code set is written beside ``out_dir`` and swapped into place whole (`folders.replace_folder`).
    Returns the manifest written. Raises ``DataError`` with one-line messages.
    """
    images_dir, vq_path, out_dir = Path(images_dir), Path(vq_path), Path(out_dir)
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if int(shard_size) < 1 or int(batch_size) < 1 or (limit is not None and int(limit) < 1):
        raise DataError("shard_size, batch_size and limit must be >= 1")
    _check_out(out_dir, images_dir)
    sel = _select(images_dir, label_set, split, limit)
    dev = resolve_device(device)
    model = _load_vq(vq_path, dev)
    f = model.config.downsample_factor
    H, W = sel.images.shape[1:3]
    if H % f or W % f:
        raise DataError(f"{images_dir}: images are {H}x{W}, not a multiple of the tokenizer's "
                        f"downsample factor {f}")
    vocab = model.config.codebook_size
    clean_stale_siblings(out_dir)
    staging = staging_folder(out_dir)
    try:
        writer = _ShardWriter(staging, int(shard_size), (H // f, W // f),
                              np.int32 if vocab <= np.iinfo(np.int32).max else np.int64)
        _encode(model, sel, writer, flip, int(batch_size), dev, progress)
        manifest = {
            "format": CODES_FORMAT, "version": VERSION, "grid": [H // f, W // f], "vocab_size": int(vocab),
            "label_set": sel.label_set, "num_classes": len(sel.names), "class_names": sel.names,
            "flip": bool(flip), "flip_order": FLIP_ORDER if flip else None,
            "shards": writer.shards, "count": int(sum(s["count"] for s in writer.shards)),
            "images_encoded": len(sel.images), "images_considered": sel.considered,
            "dropped_unlabelled": sel.dropped, "split": split, "limit": limit, "image_size": [int(H), int(W)],
            "downsample_factor": int(f), "tokenizer": str(vq_path.resolve()),
            "tokenizer_sha256": file_fingerprint(vq_path), "tokenizer_config": model.config.to_dict(),
            "images": str(images_dir.resolve()), "images_source": sel.source.get("source"),
            "split_digest": sel.split_digest,
        }
        write_manifest(staging, manifest)  # last: a folder without it is not a code set
        replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _open_shards(folder: Path, mmap: bool):
    """(manifest, [(codes [n, h, w], labels [n]) per shard]) with every shard checked against the
    manifest (`formats.read_manifest` checks the manifest's own fields)."""
    manifest = read_manifest(folder, CODES_FORMAT)
    h, w = manifest["grid"]
    out = []
    for s in manifest["shards"]:
        cp, lp = folder / s["codes"], folder / s["labels"]
        for p in (cp, lp):
            if not p.is_file():
                raise DataError(f"{p}: missing shard (listed in {folder}/manifest.json)")
        codes, labels = load_npy(cp, mmap), load_npy(lp, mmap)
        n = s["count"]
        if codes.shape != (n, h, w) or not np.issubdtype(codes.dtype, np.integer):
            raise DataError(f"{cp}: expected integer [{n}, {h}, {w}], got {codes.dtype} {list(codes.shape)}")
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{lp}: expected integer [{n}], got {labels.dtype} {list(labels.shape)}")
        out.append((codes, labels))
    return manifest, out


def load_codes(folder) -> tuple[np.ndarray, np.ndarray, dict]:
    """(codes int64 [N, h, w], labels int64 [N], manifest) of a code set, checked against its
    manifest (shapes, code range, label range)."""
    folder = Path(folder)
    manifest, shards = _open_shards(folder, mmap=True)
    h, w = manifest["grid"]
    codes = np.empty((manifest["count"], h, w), dtype=np.int64)
    labels = np.empty((manifest["count"],), dtype=np.int64)
    at = 0
    for c, l in shards:
        codes[at:at + len(c)] = c
        labels[at:at + len(c)] = l
        at += len(c)
    if codes.size and (codes.min() < 0 or codes.max() >= manifest["vocab_size"]):
        raise DataError(f"{folder}: codes outside [0, {manifest['vocab_size'] - 1}]")
    if labels.size and (labels.min() < 0 or labels.max() >= manifest["num_classes"]):
        raise DataError(f"{folder}: labels outside [0, {manifest['num_classes'] - 1}]")
    return codes, labels, manifest


def load_code_sets(folders) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """`load_codes` of each folder, for one GPT trained at several grid sizes (one code set per
    grid, e.g. the same images encoded at 64 and 96 px). The sets must share what the GPT's
    config takes from them: the tokenizer (vocab_size; the tokenizer file's SHA-256 and its
    config where both manifests record them) and the label set (the class names in the same
    order), and, where both record it, the image set's train / held-out split (`split_digest`:
    a held-out image of one size must not be a training image of another). Each is one
    DataError line naming the two folders and the first difference."""
    folders = [Path(f) for f in folders]
    sets = [load_codes(f) for f in folders]
    first, m0 = folders[0], sets[0][2]
    seen = {tuple(m0["grid"]): first}
    for folder, (_, _, m) in zip(folders[1:], sets[1:]):
        grid = tuple(m["grid"])
        if grid in seen:
            raise DataError(f"{seen[grid]} and {folder} both hold {grid[0]}x{grid[1]} code grids: "
                            "pass one code set per grid size")
        seen[grid] = folder
        _require_same_source(first, m0, folder, m)
    return sets


def _require_same_source(first: Path, m0: dict, folder: Path, m: dict) -> None:
    """One DataError line when two code sets' tokenizer, classes or split differ (see load_code_sets)."""
    def differ(what: str, a, b, advice: str):
        raise DataError(f"{folder} has {what} {one_line(repr(b), 80)}, {first} has {one_line(repr(a), 80)}: "
                        f"{advice}")

    tokenizer = "encode every size with one tokenizer (lasad-train codes ... VQ ...)"
    if m["vocab_size"] != m0["vocab_size"]:
        differ("vocab_size", m0["vocab_size"], m["vocab_size"], tokenizer)
    for key in ("tokenizer_sha256", "tokenizer_config"):
        if m0.get(key) is not None and m.get(key) is not None and m0[key] != m[key]:
            differ(f"another tokenizer ({key})", m0[key], m[key], tokenizer)
    names0 = m0.get("class_names") or [str(i) for i in range(m0["num_classes"])]
    names = m.get("class_names") or [str(i) for i in range(m["num_classes"])]
    if names != names0:
        if len(names) != len(names0):
            differ("num_classes", len(names0), len(names), "encode every size with the same --label-set")
        k = next(i for i, (a, b) in enumerate(zip(names0, names)) if a != b)
        differ(f"class {k}", names0[k], names[k], "encode every size with the same --label-set of the same image set")
    if m0.get("split_digest") and m.get("split_digest") and m0["split_digest"] != m["split_digest"]:
        differ("another train / held-out split (split_digest)", m0["split_digest"], m["split_digest"],
               "build every size from the same source with the same --holdout and --seed")


class CodeDataset(torch.utils.data.Dataset):
    """A code set as a torch Dataset over memory-mapped shards: item ``i`` is
    ``(codes int64 [h*w], label int64 [])`` (raster order, as the GPT consumes them)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.manifest, self._shards = _open_shards(self.folder, mmap=True)
        self.grid = tuple(self.manifest["grid"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.num_classes = int(self.manifest["num_classes"])
        self.class_names = self.manifest.get("class_names")
        self._starts = []
        total = 0
        for c, _ in self._shards:
            self._starts.append(total)
            total += len(c)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} code grids")
        k = bisect.bisect_right(self._starts, i) - 1
        codes, labels = self._shards[k]
        j = i - self._starts[k]
        return (torch.from_numpy(np.array(codes[j], dtype=np.int64).reshape(-1)),
                torch.tensor(int(labels[j]), dtype=torch.int64))
