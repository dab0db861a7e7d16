"""A training checkpoint as a folder of bounded safetensors shards (`lasad-train gpt
--resume-format shards`): the same content as `last.pt`, in files that a machine returning files of
bounded size can give back, with AdamW's moments optionally rounded to bfloat16.

    OUT/state/index.json                {"format": "lasad-train-state", "format_version": 1, "step": S,
                                         "shards": [{"file", "bytes", "sha256"}, ...],
                                         "tensors": {name: {"dtype", "shape", "stored", "parts"}},
                                         "tree": the checkpoint with each tensor as {"__tensor__": name}}
    OUT/state/shard-00000.safetensors   at most `shard_bytes` bytes each (header included)

A tensor's name is its path in the checkpoint (`model/tok_embeddings.weight`,
`optimizer/state/output.weight/exp_avg`, `rng/torch`); one larger than a shard is cut into pieces
of its flattened elements (`name#0`, `name#1`, ... in `parts`: [shard, entry, elements]). Every
tensor is stored as it is, except AdamW's first and second moments (`exp_avg`, `exp_avg_sq`) when
`moments="bf16"`: rounded to bfloat16 (half the bytes; bf16 has fp32's exponent range, so tiny
second moments do not underflow as they would in fp16) and cast back to their dtype on load.
Step counts, weights, RNG states and every other value are kept exactly; the rest of the
checkpoint (step, args, config, RNG words, the optimizer's hyper-parameters) is JSON in the index.

Writing: the shards and the index (last) go into a folder beside OUT/state, which then replaces it
whole (`folders.replace_folder`): a kill at any point leaves the previous state complete, and the
next run removes the staging folder (`folders.clean_stale_siblings`). Reading checks the index's
every field, each shard's size and sha256, each entry's dtype and element count: a problem is one
`DataError` line naming the file and what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from lasad_engine.checkpoint import file_fingerprint
from lasad_engine.io import loads_strict, one_line

from .folders import replace_folder, staging_folder
from .formats import DataError

STATE_DIR, INDEX = "state", "index.json"
STATE_FORMAT, STATE_VERSION = "lasad-train-state", 1
DEFAULT_SHARD_BYTES = 16 << 20
MIN_SHARD_BYTES = 64 << 10      # room for a header of long tensor names beside the data
MOMENT_CHOICES = ("bf16", "fp32")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
TENSOR = "__tensor__"           # the JSON tree's stand-in for a tensor: {"__tensor__": name}
SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HEADER_BASE = 512              # the length prefix, the metadata, braces and the alignment padding


def _entry_overhead(entry: str, ndim: int) -> int:
    """An upper bound on the bytes one tensor adds to a safetensors header:
    `"entry":{"dtype":"BF16","shape":[..],"data_offsets":[a,b]},` with 20-digit numbers."""
    return len(json.dumps(entry)) + 48 + 21 * (ndim + 2)


def _piece_bytes(piece) -> int:
    """What one piece (`save_state`'s tuple) adds to its shard, header entry included."""
    name, entry, t, store, first, count = piece
    n = t.numel() if count is None else count
    return n * torch.empty((), dtype=store).element_size() + _entry_overhead(entry, t.dim() if count is None else 1)


def _flatten(obj, path: tuple, tensors: dict):
    """`obj` as JSON with every tensor replaced by {TENSOR: its path} (collected in `tensors`)."""
    if isinstance(obj, torch.Tensor):
        name = "/".join(path)
        if name in tensors or any("/" in p or "#" in p for p in path):
            raise ValueError(f"training state: the tensor name {name!r} is ambiguous")
        tensors[name] = obj
        return {TENSOR: name}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"training state: {'/'.join(path) or 'the top level'} has keys that are not strings")
        if TENSOR in obj:
            raise ValueError(f"training state: {'/'.join(path)} holds the reserved key {TENSOR!r}")
        return {k: _flatten(v, path + (k,), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, path + (str(i),), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state: {'/'.join(path)} is a {type(obj).__name__}, neither a tensor nor JSON")


def _is_moment(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 4 and parts[0] == "optimizer" and parts[1] == "state" and parts[3] in MOMENT_KEYS


def save_state(folder: str | Path, obj: dict, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
               moments: str = "bf16") -> dict:
    """Write the checkpoint dict `obj` (tensors, and JSON values in dicts and lists) as `folder`,
    replacing an earlier one whole. Returns the index."""
    folder = Path(folder)
    if moments not in MOMENT_CHOICES:
        raise ValueError(f"moments={moments!r} is not one of {', '.join(MOMENT_CHOICES)}")
    if shard_bytes < MIN_SHARD_BYTES:
        raise ValueError(f"shard_bytes={shard_bytes} is below the minimum {MIN_SHARD_BYTES}")
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(obj, (), tensors)
    json.dumps(tree, allow_nan=False)  # fails here, before anything is written, if a value is not JSON
    meta, pieces = {}, []  # pieces: (name, entry, tensor to store, first element, elements)
    for name, t in tensors.items():
        store = torch.bfloat16 if moments == "bf16" and _is_moment(name) and t.dtype == torch.float32 else t.dtype
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"training state: {name} has dtype {t.dtype}, which the state cannot store")
        size = torch.empty((), dtype=store).element_size()
        room = shard_bytes - _HEADER_BASE - _entry_overhead(f"{name}#{t.numel()}", 1)
        meta[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "stored": DTYPE_NAMES[store], "parts": []}
        if t.numel() * size + _entry_overhead(name, t.dim()) <= shard_bytes - _HEADER_BASE:
            pieces.append((name, name, t, store, 0, None))
            continue
        per = room // size
        for i, first in enumerate(range(0, t.numel(), per)):
            pieces.append((name, f"{name}#{i}", t, store, first, min(per, t.numel() - first)))
    shards, used = [], []  # first fit, largest first: few shards, each as full as it can be
    for need, piece in sorted(((_piece_bytes(p), p) for p in pieces), key=lambda x: -x[0]):
        k = next((k for k, u in enumerate(used) if u + need <= shard_bytes), len(shards))
        if k == len(shards):
            shards.append([])
            used.append(_HEADER_BASE)
        shards[k].append(piece)
        used[k] += need

    tmp = staging_folder(folder)
    try:
        listed = []
        for k, shard in enumerate(shards):
            data = {}
            for name, entry, t, store, first, count in shard:
                value = t.detach() if count is None else t.detach().reshape(-1)[first:first + count]
                value = value.to("cpu", store).clone(memory_format=torch.contiguous_format)
                data[entry] = value
                meta[name]["parts"].append([k, entry, value.numel()])
            path = tmp / f"shard-{k:05d}.safetensors"
            _save_file(data, path, {"format": STATE_FORMAT, "shard": str(k)})
            del data
            size = path.stat().st_size
            if size > shard_bytes:  # the header bound above is wrong: never hand out a file over the limit
                raise RuntimeError(f"{path.name}: {size} bytes, over the shard size {shard_bytes}")
            listed.append({"file": path.name, "bytes": size, "sha256": file_fingerprint(path, 64)})
        index = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "step": obj.get("step"),
                 "moments": moments, "shard_bytes": shard_bytes, "shards": listed, "tensors": meta, "tree": tree}
        (tmp / INDEX).write_text(json.dumps(index, allow_nan=False) + "\n")  # last: the folder is complete
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _save_file(data: dict, path: Path, metadata: dict) -> None:
    """safetensors' save_file; its write failures (a full disk: "... (os error 28)") as the OSError
    they are, which the command line reports as one line with what to change."""
    from safetensors import torch as st
    try:
        st.save_file(data, str(path), metadata=metadata)
    except Exception as e:  # noqa: BLE001 - SafetensorError is not an OSError
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def remove_state(folder: str | Path) -> None:
    """Remove a state folder this module wrote (one holding index.json or shards only)."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink() and all(
            p.name == INDEX or SHARD_NAME.fullmatch(p.name) for p in folder.iterdir()):
        shutil.rmtree(folder)


def state_step(folder: str | Path) -> int | None:
    """The step a state folder's index records (None: no readable index)."""
    try:
        step = loads_strict((Path(folder) / INDEX).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _fail(path: Path, what: str, todo: str = "") -> DataError:
    return DataError(f"{path}: {what}{'; ' + todo if todo else ''}")


def _is_int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def load_state(folder: str | Path) -> dict:
    """The checkpoint dict a state folder holds (CPU tensors, moments back in their dtype), after
    checking the index, every shard's size and sha256 and every entry; one DataError line
    naming the file otherwise."""
    folder = Path(folder)
    index_path = folder / INDEX
    again = f"copy the whole {folder.name}/ folder again from where it was saved, or resume from another copy"
    if not index_path.is_file():
        raise _fail(index_path, "missing (a state folder without its index is incomplete)", again)
    try:
        index = loads_strict(index_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _fail(index_path, f"not readable JSON ({one_line(e, 100)})", again) from None
    if not isinstance(index, dict) or index.get("format") != STATE_FORMAT:
        raise _fail(index_path, f"not a {STATE_FORMAT} index")
    version = index.get("format_version")
    if not _is_int(version, 1) or version > STATE_VERSION:
        raise _fail(index_path, f"{STATE_FORMAT} format version {version!r}; this lasad reads versions 1 to "
                    f"{STATE_VERSION}")
    shards, meta, tree = index.get("shards"), index.get("tensors"), index.get("tree")
    if not isinstance(shards, list) or not isinstance(meta, dict) or not isinstance(tree, dict):
        raise _fail(index_path, "damaged: 'shards' must be a list, 'tensors' and 'tree' objects", again)
    files = []
    for k, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and SHARD_NAME.fullmatch(s["file"])
                and _is_int(s.get("bytes")) and isinstance(s.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", s["sha256"])):
            raise _fail(index_path, f"damaged: shard entry {k} is not {{file: shard-NNNNN.safetensors, bytes, sha256}}",
                        again)
        path = folder / s["file"]
        if not path.is_file():
            raise _fail(path, f"missing (the index lists {len(shards)} shards)",
                        f"copy it back beside {INDEX}, or resume from a complete copy of {folder.name}/")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise _fail(path, f"{size} bytes, the index says {s['bytes']} (damaged, cut short or from another save)",
                        "copy it again from where the state was saved")
        digest = file_fingerprint(path, 64)
        if digest != s["sha256"]:
            raise _fail(path, f"sha256 {digest[:16]}... is not the index's {s['sha256'][:16]}... (the file is damaged)",
                        "copy it again from where the state was saved")
        files.append(path)
    wanted: dict[int, list] = {}
    for name, m in meta.items():
        ok = (isinstance(m, dict) and m.get("dtype") in DTYPES and m.get("stored") in DTYPES
              and isinstance(m.get("shape"), list) and all(_is_int(d) for d in m["shape"])
              and isinstance(m.get("parts"), list) and m["parts"])
        if ok:
            for p in m["parts"]:
                ok = ok and isinstance(p, list) and len(p) == 3 and _is_int(p[0]) and p[0] < len(files) \
                    and isinstance(p[1], str) and _is_int(p[2])
        if not ok:
            raise _fail(index_path, f"damaged: the entry of tensor {name!r} is not {{dtype, stored, shape, parts}}",
                        again)
        if sum(p[2] for p in m["parts"]) != math.prod(m["shape"]):
            raise _fail(index_path, f"damaged: the parts of {name} hold {sum(p[2] for p in m['parts'])} elements, "
                        f"its shape {m['shape']} {math.prod(m['shape'])}", again)
        for p in m["parts"]:
            wanted.setdefault(p[0], []).append(p)
    pieces = _read_pieces(files, meta, wanted)
    tensors = {}
    for name, m in meta.items():
        parts = [pieces[(p[0], p[1])] for p in m["parts"]]
        flat = parts[0].reshape(-1) if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])
        tensors[name] = flat.reshape(m["shape"]).to(DTYPES[m["dtype"]])
    used = set()
    obj = _unflatten(tree, tensors, used, index_path)
    if used != set(tensors):
        extra = sorted(set(tensors) - used)
        raise _fail(index_path, f"damaged: {len(extra)} tensor(s) the tree does not use ({extra[0]}, ...)", again)
    if index.get("step") != obj.get("step"):
        raise _fail(index_path, f"damaged: step {index.get('step')!r} and the tree's {obj.get('step')!r} differ", again)
    return obj


def _read_pieces(files: list[Path], meta: dict, wanted: dict) -> dict:
    """{(shard, entry): tensor} of every part the index lists, dtype and size checked."""
    from safetensors import safe_open
    stored = {(p[0], p[1]): (name, m["stored"], p[2]) for name, m in meta.items() for p in m["parts"]}
    out = {}
    for k, parts in sorted(wanted.items()):
        path = files[k]
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for _, entry, count in parts:
                    name, dtype, _ = stored[(k, entry)]
                    if entry not in keys:
                        raise _fail(path, f"holds no tensor {entry!r}, which the index lists for {name}",
                                    "copy the state folder again whole (its shards belong to one save)")
                    t = f.get_tensor(entry)
                    if DTYPE_NAMES.get(t.dtype) != dtype or t.numel() != count:
                        raise _fail(path, f"{entry} is {DTYPE_NAMES.get(t.dtype, t.dtype)} of {t.numel()} elements, "
                                    f"the index says {dtype} of {count}",
                                    "copy the state folder again whole (its shards belong to one save)")
                    out[(k, entry)] = t
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files
            raise _fail(path, f"not a readable safetensors file ({one_line(e, 100)})",
                        "copy it again from where the state was saved") from None
    return out


def _unflatten(tree, tensors: dict, used: set, index_path: Path):
    if isinstance(tree, dict):
        if set(tree) == {TENSOR}:
            name = tree[TENSOR]
            if not isinstance(name, str) or name not in tensors:
                raise _fail(index_path, f"damaged: the tree names a tensor {one_line(repr(name), 80)} the index "
                            "does not list", "copy the state folder again whole")
            used.add(name)
            return tensors[name]
        return {k: _unflatten(v, tensors, used, index_path) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unflatten(v, tensors, used, index_path) for v in tree]
    return tree
