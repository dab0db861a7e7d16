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
import sys
from pathlib import Path

import click
import numpy as np
import torch

from lasad_engine.cli import OneLineCommand
from lasad_engine.params import resolve_device
from lasad_engine.io import one_line

from .formats import CODES_FORMAT, VERSION, DataError, read_manifest, save_npy, write_manifest

SPLITS = {"train": 0, "holdout": 1, "all": None}
FLIP_ORDER = "interleaved: row 2i is image i, row 2i+1 its horizontal mirror"


def _default_label_set(label_sets: list) -> str | None:
    if not label_sets:
        return None
    return "class" if "class" in label_sets else label_sets[0]


def extract_codes(images_dir, vq_path, out_dir, *, label_set: str | None = None, split: str = "train",
                  flip: bool = True, shard_size: int = 4096, batch_size: int = 64, device=None,
                  progress: bool = True) -> dict:
    """Encode the image set ``images_dir`` with the tokenizer ``vq_path`` into ``out_dir``.

    ``label_set``: which labels to carry (default ``"class"`` if the set has it, else its first
    label set; an image set without label sets gives one class, label 0). ``split``: ``"train"``,
    ``"holdout"`` or ``"all"``. Returns the manifest written. Raises ``DataError`` / ``ValueError``
    with one-line messages.
    """
    from lasad_engine.tokenizer import load_tokenizer

    from .formats import IMAGES_FORMAT, load_images

    images_dir, vq_path, out_dir = Path(images_dir), Path(vq_path), Path(out_dir)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if int(shard_size) < 1 or int(batch_size) < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    if (out_dir / "manifest.json").is_file():
        try:
            read_manifest(out_dir, CODES_FORMAT)
        except DataError:
            raise DataError(f"{out_dir} holds another kind of data set (its manifest.json is not a "
                            "code set); choose another output folder") from None
    if out_dir.resolve() == images_dir.resolve():
        raise DataError(f"{out_dir}: the output folder must differ from the image set")

    img_manifest = read_manifest(images_dir, IMAGES_FORMAT)
    sets = list(img_manifest.get("label_sets", []))
    if label_set is None:
        label_set = _default_label_set(sets)
    images, labels, names, _ = load_images(images_dir, label_set, SPLITS[split])
    if labels is None:  # no label sets at all: one class
        labels, names = np.zeros(len(images), dtype=np.int64), ["all"]
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_dir}/images.npy: expected uint8 [N, H, W, 3], got "
                        f"{images.dtype} {list(images.shape)}")
    if len(labels) != len(images):
        raise DataError(f"{images_dir}/labels-{label_set}.npy: {len(labels)} labels for {len(images)} images")
    if labels.size and (labels.max() >= len(names) or labels.min() < -1):
        raise DataError(f"{images_dir}/labels-{label_set}.npy: labels outside [-1, {len(names) - 1}]")
    keep = labels >= 0
    dropped = int((~keep).sum())
    considered = len(images)
    if dropped:
        images, labels = images[keep], labels[keep]
    if len(images) == 0:
        raise DataError(f"{images_dir}: no labelled images in split {split!r} of label set {label_set!r}")

    if not vq_path.is_file():
        raise DataError(f"{vq_path}: no such tokenizer file")
    dev = resolve_device(device)
    model = load_tokenizer(vq_path, device=dev)
    f = model.config.downsample_factor
    H, W = images.shape[1:3]
    if H % f or W % f:
        raise DataError(f"{images_dir}: images are {H}x{W}, not a multiple of the tokenizer's "
                        f"downsample factor {f}")
    h, w = H // f, W // f
    vocab = model.config.codebook_size
    dtype = np.int32 if vocab <= np.iinfo(np.int32).max else np.int64

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # the folder is incomplete until the end
    shards: list[dict] = []
    buf_codes: list[np.ndarray] = []
    buf_labels: list[np.ndarray] = []

    def flush(final: bool) -> None:
        nonlocal buf_codes, buf_labels
        codes = np.concatenate(buf_codes) if buf_codes else np.zeros((0, h, w), dtype)
        labs = np.concatenate(buf_labels) if buf_labels else np.zeros((0,), np.int64)
        while len(codes) >= shard_size or (final and len(codes)):
            k = len(shards)
            n = min(shard_size, len(codes))
            entry = {"codes": f"codes-{k:05d}.npy", "labels": f"labels-{k:05d}.npy", "count": int(n)}
            save_npy(out_dir / entry["codes"], np.ascontiguousarray(codes[:n]))
            save_npy(out_dir / entry["labels"], np.ascontiguousarray(labs[:n]))
            shards.append(entry)
            codes, labs = codes[n:], labs[n:]
        buf_codes, buf_labels = ([codes], [labs]) if len(codes) else ([], [])

    from tqdm import tqdm

    n = len(images)
    bar = tqdm(total=n, disable=not progress, file=sys.stderr, unit="img", desc="codes", dynamic_ncols=True)
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                batch = torch.from_numpy(np.array(images[i:i + batch_size])).to(dev)  # copy: memmaps are read-only
                x = batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
                if flip:
                    # interleave: image, mirror, image, mirror ...
                    x = torch.stack([x, x.flip(-1)], dim=1).reshape(-1, *x.shape[1:])
                codes = model.encode(x).cpu().numpy().astype(dtype)
                labs = labels[i:i + batch_size]
                if flip:
                    labs = np.repeat(labs, 2)
                buf_codes.append(codes)
                buf_labels.append(labs.astype(np.int64))
                if sum(len(c) for c in buf_codes) >= shard_size:
                    flush(False)
                bar.update(len(batch))
        flush(True)
    finally:
        bar.close()

    # remove shards of an earlier, larger extraction into the same folder
    for p in list(out_dir.glob("codes-*.npy")) + list(out_dir.glob("labels-*.npy")):
        stem = p.stem.split("-", 1)[1]
        if stem.isdigit() and len(stem) == 5 and int(stem) >= len(shards):
            p.unlink()

    manifest = {
        "format": CODES_FORMAT, "version": VERSION, "grid": [h, w], "vocab_size": int(vocab),
        "label_set": label_set, "num_classes": len(names), "class_names": list(names),
        "flip": bool(flip), "flip_order": FLIP_ORDER if flip else None,
        "shards": shards, "count": int(sum(s["count"] for s in shards)),
        "images_encoded": int(n), "images_considered": int(considered), "dropped_unlabelled": dropped,
        "split": split, "image_size": [int(H), int(W)], "downsample_factor": int(f),
        "tokenizer": str(vq_path.resolve()), "tokenizer_config": model.config.to_dict(),
        "images": str(images_dir.resolve()), "images_source": img_manifest.get("source"),
    }
    write_manifest(out_dir, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _open_shards(folder: Path, mmap: bool):
    manifest = read_manifest(folder, CODES_FORMAT)
    try:
        h, w = (int(v) for v in manifest["grid"])
        shards = manifest["shards"]
        int(manifest["vocab_size"]), int(manifest["num_classes"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{folder}/manifest.json: missing or bad grid / shards / vocab_size / num_classes") from None
    out = []
    for s in shards:
        cp, lp = folder / s["codes"], folder / s["labels"]
        for p in (cp, lp):
            if not p.is_file():
                raise DataError(f"{p}: missing shard (listed in {folder}/manifest.json)")
        codes = np.load(cp, mmap_mode="r" if mmap else None)
        labels = np.load(lp, mmap_mode="r" if mmap else None)
        n = int(s["count"])
        if codes.shape != (n, h, w) or not np.issubdtype(codes.dtype, np.integer):
            raise DataError(f"{cp}: expected integer [{n}, {h}, {w}], got {codes.dtype} {list(codes.shape)}")
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{lp}: expected integer [{n}], got {labels.dtype} {list(labels.shape)}")
        out.append((codes, labels))
    if sum(len(c) for c, _ in out) != int(manifest.get("count", -1)):
        raise DataError(f"{folder}/manifest.json: count {manifest.get('count')} does not match its shards")
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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


@click.command("codes", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", type=click.Path(path_type=Path))
@click.argument("vq", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--label-set", default=None, metavar="NAME",
              help="Labels to carry [default: 'class' if the image set has it, else its first label set].")
@click.option("--split", type=click.Choice(list(SPLITS)), default="train", show_default=True,
              help="Which images to encode.")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="Also encode horizontally mirrored copies (as LlamaGen's extraction).")
@click.option("--shard-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Code grids per shard file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images encoded together.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
def codes_cmd(images, vq, out, label_set, split, flip, shard_size, batch_size, device, no_progress):
    """Encode the image set IMAGES with the tokenizer VQ into the code set OUT (for `lasad-train gpt`)."""
    try:
        m = extract_codes(images, vq, out, label_set=label_set, split=split, flip=flip, shard_size=shard_size,
                          batch_size=batch_size, device=device, progress=not no_progress)
    except (DataError, ValueError) as e:
        raise click.ClickException(one_line(e, 400)) from None
    h, w = m["grid"]
    dropped = f"; dropped {m['dropped_unlabelled']} unlabelled" if m["dropped_unlabelled"] else ""
    click.echo(f"wrote {m['count']} code grids ({h}x{w}, vocab {m['vocab_size']}, {m['num_classes']} classes "
               f"of label set {m['label_set']!r}{', with mirrors' if m['flip'] else ''}) in "
               f"{len(m['shards'])} shard(s) to {out}{dropped}")
