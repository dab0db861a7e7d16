"""The lasad checkpoint formats.

- `ckpt.pt`: `{"format": "lasad", "format_version": 1, "config": {...}, "model": state_dict,
  "meta": {...}}`, plain tensors and JSON-compatible values only, so it is readable with
  `torch.load(path, weights_only=True)` (training checkpoints add optimizer/step/RNG entries
  beside these keys; loaders here ignore them).
- deploy form, `*.safetensors`: the state dict, with `format`, `format_version`, `config` (JSON)
  and `meta` (JSON) in the safetensors metadata.
- a model folder in Hugging Face's layout (`LasadPipeline.save_pretrained`, lasad_engine/pretrained.py):
  `config.json` (the LasadConfig), `model.safetensors` (the deploy form), `vq.safetensors` (the
  tokenizer, named in the weights' meta relative to the folder) and a model card `README.md`.

`resolve_checkpoint` is the one place a name or path becomes a file: `default` is the bundled
model, a folder is read as the layout above, a file is itself.

Loading is strict: the error names the missing and unexpected keys. A corrupt, foreign or
newer-version file gives one `CheckpointError` line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .config import LasadConfig
from .io import UserError, atomic_path, clean_state_dict, key_diff, loads_strict, nonfinite_tensor, \
    one_line as _reason, read_small_file, special_file, torch_load_reason
from . import quant
from .model import LasadGen, upgrade_state_dict
from .ops.linear import QUANT_DTYPES
from .params import MAX_GRID_SIDE

FORMAT = "lasad"
FORMAT_VERSION = 1

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_NAME = "default"
DEFAULT_CHECKPOINT = ASSETS / "default.safetensors"
DEFAULT_CARD = ASSETS / "default.card.json"  # model-card facts of the bundled model (docs/demo-model.md)
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, CARD_FILE = "config.json", "model.safetensors", "vq.safetensors", "README.md"
CONFIG_EXTRA_KEYS = ("model_type", "format_version", "lasad_version")  # config.json keys beside the LasadConfig
CHECKPOINT_CHOICES = ("'default' (the bundled model), a model folder (config.json + model.safetensors, as "
                      "save_pretrained writes it), or a ckpt.pt / .safetensors / step.onnx / engine.plan file")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one line naming the file and the reason."""


def _model_of(model: torch.nn.Module) -> LasadGen:
    inner = model
    while not isinstance(inner, LasadGen):
        inner = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
        if inner is None:
            raise TypeError(f"expected a LasadGen (or a compiled/DDP wrapper of one), got {type(model).__name__}")
    return inner


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, meta: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write `model` (a LasadGen, possibly compiled or wrapped) atomically.

    Args:
        path: `*.safetensors` for the deploy form, anything else for the `.pt` form.
        meta: JSON-compatible metadata kept in either form (class names, tokenizer, ...).
        extra: more top-level entries for the `.pt` form (optimizer state, step, RNG ...).
    """
    path = Path(path)
    config = _model_of(model).config.to_dict()
    state = {k: v.detach().contiguous() for k, v in clean_state_dict(model.state_dict()).items()}
    meta = dict(meta or {})
    json.dumps(meta, allow_nan=False)  # fail before writing anything if meta is not JSON
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            if extra:
                raise ValueError("extra entries are only kept in the .pt form")
            from safetensors.torch import save_file
            save_file({k: v.cpu() for k, v in state.items()}, tmp, metadata={
                "format": FORMAT, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(config, allow_nan=False), "meta": json.dumps(meta, allow_nan=False)})
        else:
            torch.save({**(extra or {}), "format": FORMAT, "format_version": FORMAT_VERSION,
                        "config": config, "model": state, "meta": meta}, tmp)
    return path


def resolve_checkpoint(name_or_path: str | os.PathLike | None = None) -> Path:
    """The file a checkpoint argument names.

    Args:
        name_or_path: None or "default": the bundled model (a file or folder of that name in the
            working directory wins, as a local folder wins over a hub id in Hugging Face's
            `from_pretrained`); a folder: its `model.safetensors`, after checking that its
            `config.json`, when there is one, describes those weights; a file: itself.
    Returns:
        the path of a checkpoint file (or of an exported step / plan). Anything else raises one
        CheckpointError line listing the choices.
    """
    if name_or_path is None:
        return DEFAULT_CHECKPOINT
    path = Path(name_or_path)
    if path.is_dir():
        return _folder_weights(path)
    if path.is_file():
        return path
    if str(name_or_path) == DEFAULT_NAME:
        return DEFAULT_CHECKPOINT
    kind = special_file(path)
    if kind is not None:
        raise CheckpointError(f"{name_or_path}: is {kind}, not a checkpoint; give {CHECKPOINT_CHOICES}")
    raise CheckpointError(f"{name_or_path}: no such checkpoint file or folder; give {CHECKPOINT_CHOICES}")


def _folder_weights(folder: Path) -> Path:
    """`folder/model.safetensors`, checked against `folder/config.json` when the folder has one (a
    training run's folder has the weights only; they carry their config)."""
    weights = folder / WEIGHTS_FILE
    kind = special_file(weights)
    if kind is not None:
        raise CheckpointError(f"{weights}: is {kind}, not a weights file")
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        listing = f"it holds {', '.join(found[:6])}{' ...' if len(found) > 6 else ''}" if found else "it is empty"
        raise CheckpointError(f"{folder}: a folder without {WEIGHTS_FILE} ({listing}); give {CHECKPOINT_CHOICES}")
    config_file = folder / CONFIG_FILE
    if not (config_file.exists() or config_file.is_symlink()):
        return weights
    try:
        text = read_small_file(config_file, inside=folder)  # a regular file in the folder, of sane size
    except UserError as e:
        raise CheckpointError(str(e)) from None
    try:
        given = loads_strict(text)
        if not isinstance(given, dict):
            raise ValueError(f"top level is {type(given).__name__}, not an object")
        if given.get("model_type", FORMAT) != FORMAT:
            raise ValueError(f"model_type {_reason(repr(given['model_type']), 60)}, not {FORMAT!r}")
        version = given.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise CheckpointError(f"{config_file}: format_version {_reason(repr(version), 60)}; this lasad reads "
                                  f"versions 1 to {FORMAT_VERSION}")
        cfg = LasadConfig.from_dict({k: v for k, v in given.items() if k not in CONFIG_EXTRA_KEYS})
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: not a lasad config ({_reason(e)})") from None
    try:
        from safetensors import safe_open
        with safe_open(str(weights), framework="pt") as f:
            stored = LasadConfig.from_dict(loads_strict((f.metadata() or {})["config"]))
    except Exception:  # noqa: BLE001 - read_checkpoint names what is wrong with the weights
        return weights
    a, b = cfg.to_dict(), stored.to_dict()
    differ = [k for k in a if a[k] != b[k]]
    if differ:
        shown = ", ".join(f"{k} ({a[k]!r} vs {b[k]!r})" if k != "class_names" else k for k in differ[:3])
        raise CheckpointError(f"{folder}: {CONFIG_FILE} and {WEIGHTS_FILE} disagree on {shown}; "
                              f"{CONFIG_FILE} must describe the weights beside it")
    return weights


def followed_tokenizer(named: str, checkpoint: str | os.PathLike) -> Path | None:
    """The tokenizer file a checkpoint (or an exported step) names, relative to its own folder,
    when lasad follows that name: a file inside the folder, or the package's bundled tokenizer
    (exports of the bundled model name it); None for a name that is absolute or leaves the folder
    (`..`, a link out), which a file from elsewhere must not make lasad open."""
    folder = Path(checkpoint).parent.resolve()
    vq = (folder / named).resolve()
    if vq.is_relative_to(ASSETS) and vq.is_file():
        return vq
    if Path(named).is_absolute() or not vq.is_relative_to(folder):
        return None
    return vq


def read_checkpoint(path: str | os.PathLike) -> tuple[LasadConfig, dict, dict]:
    """Read (config, state_dict, meta) from either form, without building a model. `path` goes
    through `resolve_checkpoint` ("default", a model folder, or a file)."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                version, config, meta = header.get("format_version"), header.get("config"), header.get("meta", "{}")
                if header.get("format") != FORMAT or config is None:
                    raise CheckpointError(f"{path}: a safetensors file but not a lasad checkpoint (no lasad config "
                                          "in its metadata)")
                try:
                    version, config, meta = int(version), loads_strict(config), loads_strict(meta)
                except (TypeError, ValueError) as e:
                    raise CheckpointError(f"{path}: damaged lasad metadata ({_reason(e)})") from None
                cfg = _config(path, version, config, meta)  # checked before any tensor is read
                state = {k: f.get_tensor(k) for k in f.keys()}
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files
            raise CheckpointError(f"{path}: not a readable safetensors file ({_reason(e)})") from None
    else:
        obj = read_envelope(path, FORMAT, FORMAT_VERSION)
        version, config, state, meta = obj["format_version"], obj.get("config"), obj.get("model"), obj.get("meta", {})
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a lasad checkpoint (no state dict under 'model')")
        cfg = _config(path, version, config, meta)
    if path.resolve() == DEFAULT_CHECKPOINT and "card" not in meta:
        meta = {**meta, "card": json.loads(DEFAULT_CARD.read_text())}
    return cfg, clean_state_dict(state), meta


def _config(path: Path, version, config, meta) -> LasadConfig:
    """The checkpoint's config, every field checked (LasadConfig), and its meta a JSON object."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r}; this lasad reads versions 1 to {FORMAT_VERSION}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged lasad metadata (meta is a {type(meta).__name__}, not an object)")
    try:
        json.dumps(meta, allow_nan=False)  # what lasad writes from it (exports, records) stays JSON
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged lasad metadata (meta is not JSON: {_reason(e)})") from None
    try:
        return LasadConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config ({_reason(e)})") from None


def read_envelope(path: str | os.PathLike, fmt: str, max_version: int, *, what: str = "checkpoint") -> dict:
    """The one reader of lasad's `.pt` files (models, tokenizers, training state): a dict with
    `format` == fmt and `format_version` <= max_version (files from before the key was unified
    carry `version`), loaded with `weights_only=True` (no pickled code runs) and memory-mapped.
    Every problem is one `CheckpointError` line naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a {what} file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        reason = torch_load_reason(e)
        if reason.startswith("it holds pickled"):
            raise CheckpointError(f"{path}: not a {fmt} {what}: {reason}") from None
        raise CheckpointError(f"{path}: not a readable {what} ({reason})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise CheckpointError(f"{path}: not a {fmt} {what}: {_foreign(obj, fmt)}")
    version = obj.get("format_version", obj.get("version"))
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= max_version:
        raise CheckpointError(f"{path}: {fmt} format version {version!r}; this lasad reads versions 1 to {max_version}")
    obj["format_version"] = version
    return obj


def _foreign(obj, fmt: str) -> str:
    """What a torch file that is not a lasad envelope holds, for the error message."""
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return (f"a bare state dict of {len(obj)} tensors without a config; "
                "save the model with lasad_engine.save_checkpoint")
    if "format" in obj:
        return f"its format is {str(obj.get('format'))[:40]!r}, not {fmt!r}"
    keys = ", ".join(str(k)[:20] for k in list(obj)[:5])
    return f"a dict with keys {keys} and no 'format': {fmt!r} entry (saved by another program or an older lasad)"


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, weights: str | None = None) -> LasadGen:
    """Build the model a checkpoint describes and load its weights strictly.

    The model is built on the meta device (nothing allocated), the file's tensors are checked
    against it by name, shape and dtype, and only then assigned (gpt-fast's `_load_model`), so a
    config that does not match its weights costs nothing and says which keys differ. Returned in
    eval mode on `device`, in `dtype` (default fp32); the checkpoint's `meta` is kept as
    `model.checkpoint_meta`, its SHA-256 prefix as `model.checkpoint_id`. `path` is anything
    `resolve_checkpoint` takes ("default", a model folder, a file).

    `weights` (params.WEIGHT_CHOICES) is the form of the decode matrices (lasad_engine/quant.py):
    "int8" / "fp8" quantise a float file's matrices as they are stored (before any cast to
    `dtype`) or keep a file's own quantised ones (a file quantised in the other format is
    refused); "float" keeps a float file and dequantises a quantised one to `dtype`. None: as the
    file holds them, except that a quantised file is dequantised on a CPU, where int8 weights
    save no time.
    """
    path = resolve_checkpoint(path)
    cfg, state, meta = read_checkpoint(path)
    with torch.device("meta"):
        model = LasadGen(cfg)
    state = upgrade_state_dict(state)
    device = torch.device(device)
    state = _weights_form(path, state, model, weights, device)
    quant.make_quant_modules_(model, quant.quantized_modules(state))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: keys do not match the config: {key_diff(missing, unexpected)}")
    for name, t in expected.items():
        got = state[name]
        fixed = t.dtype in QUANT_DTYPES or name.endswith(quant.SCALE_SUFFIX)  # a quantised matrix's dtype is its format
        ok = isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(t.shape) and (
            got.dtype == t.dtype if fixed else got.is_floating_point() and got.dtype not in QUANT_DTYPES)
        if not ok:
            if not isinstance(got, torch.Tensor):
                what = type(got).__name__
            elif tuple(got.shape) != tuple(t.shape):
                what = str(tuple(got.shape))
            else:  # the dtype is what is wrong
                what = f"{tuple(got.shape)} {str(got.dtype).removeprefix('torch.')}"
            kind = str(t.dtype).removeprefix("torch.") if fixed else "float"
            raise CheckpointError(f"{path}: {name} is {what}, the config needs a {kind} tensor of shape {tuple(t.shape)}")
    bad = nonfinite_tensor(state)
    if bad is not None:
        raise CheckpointError(f"{path}: weight {bad} holds NaN or infinite values; the checkpoint is damaged "
                              "(or was saved from a diverged run)")
    dtype = dtype or torch.float32
    from .params import check_memory
    cast = {k: v.dtype not in QUANT_DTYPES and not k.endswith(quant.SCALE_SUFFIX) for k, v in state.items()}
    copies = sum(v.numel() * (dtype.itemsize if cast[k] else v.element_size()) for k, v in state.items()
                 if (cast[k] and v.dtype != dtype) or v.device != device)
    check_memory(copies, device, f"loading {Path(path).name}", "use --precision bf16 or another device")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) if cast[k] else v.to(device) for k, v in state.items()},
                          strict=True, assign=True)
    model.checkpoint_meta = meta
    model.checkpoint_id = file_fingerprint(path)
    model.checkpoint_path = Path(path)
    return model.eval()


def stored_weights(path: str | os.PathLike) -> str:
    """The form of the decode matrices a checkpoint file stores: "float", "int8" or "fp8"
    (read from the names and dtypes of its tensors, not their data)."""
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".weight")}
        except Exception as e:  # noqa: BLE001 - read_checkpoint names what is wrong with the file
            raise CheckpointError(f"{path}: not a readable safetensors file ({_reason(e)})") from None
        found = {"I8": "int8", "F8_E4M3": "fp8"}
        formats = {found[d] for d in dtypes.values() if d in found}
    else:
        state = read_envelope(path, FORMAT, FORMAT_VERSION).get("model")
        formats = set(quant.quantized_modules(state).values()) if isinstance(state, dict) else set()
    return formats.pop() if len(formats) == 1 else "float"


def _weights_form(path: Path, state: dict, model: LasadGen, weights: str | None, device: torch.device) -> dict:
    """The state dict with its decode matrices in the form `weights` asks (load_checkpoint)."""
    from .params import WEIGHT_CHOICES
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"weights={weights!r} is not one of {', '.join(WEIGHT_CHOICES)}")
    formats = quant.quantized_modules(state)
    allowed = set(quant.target_names(model, head=True))
    for name, fmt in formats.items():
        if name not in allowed:
            raise CheckpointError(f"{path}: {name}{quant.SCALE_SUFFIX}: lasad quantises only the decode matrices "
                                  f"({', '.join(quant.LAYER_TARGETS)}, {quant.HEAD}), not {name}")
        if fmt is None:
            raise CheckpointError(f"{path}: {name}{quant.SCALE_SUFFIX} beside a weight that is not int8 or "
                                  "float8_e4m3fn; the checkpoint is damaged")
    stored = set(formats.values())
    if len(stored) > 1:
        raise CheckpointError(f"{path}: mixes quantised weight formats {', '.join(sorted(stored))}")
    stored = stored.pop() if stored else None
    if weights is None:
        weights = stored if stored is not None and device.type != "cpu" else "float"
    if weights == "float":
        return quant.dequantize_state(state) if stored else state
    if stored is None:
        return quant.quantize_state(state, weights, model.config.n_layer)
    if stored != weights:
        raise CheckpointError(f"{path}: holds {stored} weights; loading them as {weights} would quantise them "
                              f"twice: use weights={stored!r} or 'float', or the float checkpoint")
    return state


def file_fingerprint(path: str | os.PathLike, length: int = 16) -> str:
    """SHA-256 of the file's bytes, first `length` hex digits (recorded beside generated images)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def trained_grids(config: LasadConfig, meta: dict | None) -> list[tuple[int, int]]:
    """The token grids (h, w) a model was trained at: its meta's "trained_grids" (`lasad-train
    gpt` writes it; a run on code sets of several sizes lists each, the config's grid first), else
    the config's grid alone. The meta is untrusted: an entry that is not a list of [h, w] sides in
    1..MAX_GRID_SIDE is ignored and the config's grid stands."""
    own = (config.grid_height, config.grid_width)
    listed = (meta or {}).get("trained_grids")
    if not isinstance(listed, list) or not listed or len(listed) > 64:
        return [own]
    grids = []
    for g in listed:
        if not (isinstance(g, (list, tuple)) and len(g) == 2 and all(
                isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_GRID_SIDE for s in g)):
            return [own]
        grids.append((g[0], g[1]))
    return grids if own in grids else [own]
