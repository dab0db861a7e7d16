"""The Hugging Face-style model folder, written by `LasadPipeline.save_pretrained(dir)` and read by
`LasadPipeline.from_pretrained(dir)`, `lasad-run --checkpoint DIR` and every tool that takes a
checkpoint (`checkpoint.resolve_checkpoint`):

    DIR/config.json        the LasadConfig, plus model_type "lasad", format_version, lasad_version
    DIR/model.safetensors  the deploy checkpoint (weights; config and meta in its metadata)
    DIR/vq.safetensors     the VQ tokenizer, named in the weights' meta relative to DIR
    DIR/README.md          the model card: licence, training data, measured metrics

The folder is written in full into a temporary folder beside DIR and renamed into place, so DIR is
never half-written. The model card is made from the checkpoint's meta: its "card" entry (keys in
CARD_KEYS) travels with the weights through every save and load, so a card survives round trips.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .checkpoint import (CARD_FILE, CONFIG_FILE, FORMAT, FORMAT_VERSION, TOKENIZER_FILE, WEIGHTS_FILE,
                         save_checkpoint, trained_grids)
from .io import UserError, atomic_write_text

# meta["card"]: what a model card says beyond the config. Every key is optional.
CARD_KEYS = {
    "name": "title of the card",
    "license": "SPDX id of the weights' licence (Hugging Face's `license:` field); default 'other'",
    "license_note": "one paragraph on the licence",
    "training_data": "what the model was trained on",
    "data_licences": "list of lines: each source of the training data and its licence",
    "trained": "how, where and how long it was trained",
    "metrics": "list of {name, value, how}",
    "limits": "list of lines: what the model does not do well",
}


class PretrainedError(UserError):
    """A model folder that cannot be written where asked."""


def config_json(config) -> dict:
    """The content of config.json: the LasadConfig's fields and what identifies the format."""
    return {"model_type": FORMAT, "format_version": FORMAT_VERSION, "lasad_version": __version__,
            **config.to_dict()}


def _dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_pretrained(folder: str | os.PathLike, model, tokenizer=None, *, meta: dict | None = None,
                     overwrite: bool = False) -> Path:
    """Write a model folder (layout in the module docstring) atomically.

    Args:
        folder: the folder to create. An existing empty folder is filled; an existing folder
            with files is refused unless `overwrite`, and then replaced as a whole.
        model: a LasadGen; its weights are written in their current dtype.
        tokenizer: the VQModel, or None (the folder then names no tokenizer).
        meta: the checkpoint meta to keep ("card" makes the model card; "tokenizer" is replaced).
    """
    from .tokenizer import save_tokenizer

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PretrainedError(f"{folder}: exists and is not a folder; give a folder for save_pretrained")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise PretrainedError(f"{folder}: folder exists and is not empty; pass overwrite=True to replace it")
    meta = {**(meta or {}), "tokenizer": TOKENIZER_FILE if tokenizer is not None else None}
    json.dumps(meta)  # not JSON-compatible: fail before anything is written
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_checkpoint(tmp / WEIGHTS_FILE, model, meta=meta)
        if tokenizer is not None:
            save_tokenizer(tmp / TOKENIZER_FILE, tokenizer)
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(config_json(model.config), indent=2) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        from .quant import weights_format
        if weights_format(model) != "float":  # the decode matrices' own format beside the rest's dtype
            dtype += f"; decode matrices {weights_format(model)} with per-channel scales"
        atomic_write_text(tmp / CARD_FILE, model_card(model.config, meta, folder=str(folder),
                                                      n_params=n_params, dtype=dtype))
        os.chmod(tmp, _dir_mode())  # mkdtemp makes 0700
        _move_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` onto `folder`. rename(2) replaces a missing or empty folder in
    one step; a folder with files is first moved aside (and put back if the second rename fails),
    so at every moment `folder` is either the old complete folder, absent, or the new one."""
    if not folder.exists() or not any(folder.iterdir()):
        os.replace(tmp, folder)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    os.replace(folder, trash / folder.name)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(trash / folder.name, folder)
        raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(trash)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def model_card(config, meta: dict, *, folder: str, n_params: int, dtype: str) -> str:
    """The model card (README.md) of a model folder: YAML front matter as the Hugging Face Hub
    reads it, then the model, its files, how to run it, data, training, metrics, limits, licence."""
    card = meta.get("card") or {}
    cfg = config
    licence = card.get("license") or "other"
    example = (cfg.class_names[0] if cfg.class_names else "0")
    grids = [f"{h}x{w}" for h, w in trained_grids(cfg, meta)]
    lines = [
        "---",
        f"license: {licence}",
        "library_name: lasad",
        "tags: [lasad, lasadgen, class-conditional, image-generation, autoregressive, linear-attention]",
        "---",
        "",
        f"# {card.get('name') or Path(folder).name}",
        "",
        "A LASADGen model ([arXiv 2507.01652](https://arxiv.org/abs/2507.01652)): class-conditional "
        "autoregressive image generation whose attention is linear with a spatial-aware decay, so its decode "
        "state is a fixed size whatever the image size. Written by lasad's `LasadPipeline.save_pretrained`.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {_params(n_params)} ({dtype} weights) |",
        f"| layers / width / heads | {cfg.n_layer} / {cfg.dim} / {cfg.n_head} (d_k {cfg.head_k_dim}) |",
        f"| trained token grid{'s' if len(grids) > 1 else ''} | {', '.join(grids)} |",
        f"| VQ codebook | {cfg.vocab_size} entries |",
        f"| classes | {cfg.num_classes}{' (names in config.json)' if cfg.class_names else ''} |",
        f"| row start | {cfg.row_start}{'' if cfg.decay else ' (no decay: plain linear attention)'} |",
        f"| decode state per image | {cfg.state_nbytes(1) / 2**20:.2f} MiB fp32 (x2 with classifier-free guidance) |",
        "",
        "## Files",
        "",
        f"- `{CONFIG_FILE}`: the model's shape (lasad's `LasadConfig`)",
        f"- `{WEIGHTS_FILE}`: the weights (config and meta also in the safetensors metadata)",
    ]
    if meta.get("tokenizer"):
        lines.append(f"- `{meta['tokenizer']}`: the VQ tokenizer that turns tokens into pixels")
    lines += [
        f"- `{CARD_FILE}`: this card",
        "",
        "## Use",
        "",
        "With lasad installed (from its repository: `pip install -e .`):",
        "",
        "```bash",
        f"lasad-run --checkpoint {folder} --class {example if ' ' not in example else repr(example)}",
        "```",
        "",
        "```python",
        "from lasad_engine import LasadPipeline",
        "",
        f"with LasadPipeline.from_pretrained({folder!r}, device=\"cpu\") as pipe:",
        f"    pipe([{example!r}]).images[0].save(\"sample.png\")",
        "```",
        "",
        "## Training data",
        "",
        card.get("training_data") or "Not recorded in the checkpoint.",
    ]
    if card.get("data_licences"):
        lines += [""] + [f"- {line}" for line in card["data_licences"]]
    lines += ["", "## Training", ""]
    trained = [card["trained"]] if card.get("trained") else []
    if meta.get("step") is not None:
        trained.append(f"Steps: {meta['step']}." + (" EMA weights." if meta.get("ema") else ""))
    lines.append(" ".join(trained) or "Not recorded in the checkpoint.")
    lines += ["", "## Measured", ""]
    metrics = card.get("metrics") or []
    if metrics:
        lines += ["| metric | value | how |", "|---|---|---|"]
        lines += [f"| {m.get('name', '')} | {m.get('value', '')} | {m.get('how', '')} |" for m in metrics]
    else:
        lines.append("No measurements recorded in the checkpoint's meta.")
    lines += ["", "## Limits", "",
              f"- Trained at {' and '.join(grids)} tokens. Other grids run with the same memory per "
              "image, but were never trained: do not expect usable pictures from them."]
    lines += [f"- {line}" for line in card.get("limits") or []]
    lines += ["", "## Licence", "", card.get("license_note") or (
        f"`{licence}`." if licence != "other" else "Not stated by whoever saved this model.")]
    return "\n".join(lines) + "\n"
