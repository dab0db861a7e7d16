"""`LasadPipeline`: class labels in, pictures out (generation + VQ decoding), diffusers-style."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint
from .engine import EngineError, LasadEngine, SamplingParams, resolve_device
from .model import LasadGen

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "default.safetensors"
OUTPUT_TYPES = ("pil", "np", "pt", "tokens")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORTED = {".onnx": "onnxruntime", ".plan": "tensorrt"}  # exported steps and the backend that runs each


@torch.no_grad()
def decode_codes(tokenizer, tokens: torch.Tensor, device, batch: int = 16) -> torch.Tensor:
    """VQ-decode int64 codes `[n, h, w]` in batches to float images `[n, 3, H, W]` in [0, 1]."""
    outs = [tokenizer.decode_code(t.to(device)).float() for t in tokens.split(batch)]
    return ((torch.cat(outs) + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images `[n, 3, H, W]` in [0, 1] -> uint8 `[n, H, W, 3]` on the host."""
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class LasadPipelineOutput:
    """images: list of PIL images, uint8 array [n, H, W, 3], float tensor [n, 3, H, W] in [0, 1],
    or the tokens; tokens: int64 [n, h, w] (always)."""

    images: object
    tokens: torch.Tensor


class LasadPipeline:
    """Generate images with a LASADGen checkpoint and its VQ tokenizer.

    >>> with LasadPipeline.from_checkpoint() as pipe:          # the bundled model
    ...     out = pipe([207], generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("emoji.png")
    """

    def __init__(self, model: LasadGen, tokenizer=None, *, backend: str | None = None, device=None,
                 max_batch: int = 8, use_cuda_graph: bool = True, onnx_path=None):
        self.device = resolve_device(device)
        backend = backend or ("cuda" if self.device.type == "cuda" else "torch")
        on_meta = model.output.weight.device.type == "meta"  # an exported step carries the weights
        self.model = (model if on_meta else model.to(self.device)).eval()
        self.tokenizer = tokenizer.to(self.device).eval() if tokenizer is not None else None
        self.engine = LasadEngine(self.model, backend=backend, device=self.device, max_batch=max_batch,
                                  use_cuda_graph=use_cuda_graph, onnx_path=onnx_path)
        self.backend = backend

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None = None, *, tokenizer=None, backend=None,
                        device=None, precision: str | None = None, max_batch: int = 8,
                        use_cuda_graph: bool = True) -> "LasadPipeline":
        """Load a checkpoint (default: the bundled model) and the tokenizer it names.

        Args:
            path: `ckpt.pt` or `*.safetensors`. Default: the model inside the package.
            tokenizer: VQ checkpoint path, overriding the one in the checkpoint's `meta`.
            backend: torch | cuda (| onnxruntime | tensorrt). Default: cuda on a GPU, else torch.
            device: Default: cuda if available, else cpu.
            precision: fp32 | bf16 | fp16 for the weights (the state stays fp32). Default: bf16 on
                CUDA, fp32 on CPU.
        """
        from .tokenizer import load_tokenizer

        device = resolve_device(device)
        if precision is None:
            precision = "bf16" if device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise EngineError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
        path = Path(path) if path is not None else DEFAULT_CHECKPOINT
        onnx_path = None
        if path.suffix in EXPORTED:  # the weights live in the exported graph or plan
            kind = EXPORTED[path.suffix]
            backend = backend or kind
            if backend != kind:
                raise EngineError(f"{path} is an exported step: it runs with backend {kind}, not {backend}")
            if kind == "tensorrt":
                from .trt import read_plan_config
                cfg, record = read_plan_config(path)
                meta = record.get("meta", {})
            else:
                from .ort import read_onnx_config
                cfg, meta, _ = read_onnx_config(path)
            with torch.device("meta"):  # the config and the buffers' shapes, no weights
                model = LasadGen(cfg)
            from .checkpoint import file_fingerprint
            model.checkpoint_meta, model.checkpoint_id, onnx_path = meta, file_fingerprint(path), path
        else:
            model = load_checkpoint(path, device=device, dtype=PRECISIONS[precision])
        vq = tokenizer or model.checkpoint_meta.get("tokenizer")
        tok = None
        if vq is not None:
            vq = Path(vq)
            if not vq.is_absolute() and tokenizer is None:
                vq = path.parent / vq  # checkpoints name their tokenizer relative to themselves
            if not vq.is_file():
                raise CheckpointError(f"{vq}: tokenizer file not found (named by {path})")
            try:
                tok = load_tokenizer(vq, device=device)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        pipe = cls(model, tok, backend=backend, device=device, max_batch=max_batch, use_cuda_graph=use_cuda_graph,
                   onnx_path=onnx_path)
        pipe.checkpoint_path = path
        return pipe

    # -- properties and lifetime ---------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    @property
    def state_nbytes(self) -> int:
        return self.engine.state_nbytes

    @property
    def class_names(self) -> list[str] | None:
        return self.model.config.class_names

    def close(self) -> None:
        """Free the decode buffers and captured graphs."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- classes -------------------------------------------------------------------------
    def class_id(self, label: int | str) -> int:
        """A class id from an id (int or digit string) or a name the checkpoint carries."""
        C = self.model.config.num_classes
        if isinstance(label, (int, np.integer)) or (isinstance(label, str) and label.strip().isdigit()):
            i = int(label)
            if not 0 <= i < C:
                raise EngineError(f"class {i} is out of range: this model has classes 0..{C - 1}")
            return i
        names = self.class_names
        if not names:
            raise EngineError(f"class {label!r} is not an id, and this checkpoint carries no class names; use 0..{C - 1}")
        lowered = {n.lower(): i for i, n in enumerate(names)}
        key = str(label).strip().lower()
        if key in lowered:
            return lowered[key]
        close = difflib.get_close_matches(key, list(lowered), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(names[lowered[c]]) for c in close)}?" if close else "; see --list-classes"
        raise EngineError(f"unknown class {label!r}{hint}")

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, class_labels, cfg_scale: float = 4.0, cfg_interval: int = -1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, output_type: str = "pil", callback=None,
                 grid=None, progress: bool = False) -> LasadPipelineOutput:
        """Generate one image per entry of `class_labels` (ids or names).

        Returns LasadPipelineOutput(images, tokens); see `output_type` in OUTPUT_TYPES.
        """
        if self.engine is None:
            raise EngineError("this pipeline was closed")
        if output_type not in OUTPUT_TYPES:
            raise EngineError(f"output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        labels = [self.class_id(c) for c in class_labels]
        params = SamplingParams(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                                top_k=top_k, top_p=top_p)
        tokens = self.engine.generate(labels, grid=grid, params=params, generator=generator,
                                      callback=callback, progress=progress)
        if output_type == "tokens":
            return LasadPipelineOutput(tokens, tokens)
        images = self.decode(tokens)  # float [n, 3, H, W] in [0, 1]
        if output_type == "pt":
            return LasadPipelineOutput(images, tokens)
        arr = to_uint8(images)
        if output_type == "np":
            return LasadPipelineOutput(arr, tokens)
        from PIL import Image
        return LasadPipelineOutput([Image.fromarray(a) for a in arr], tokens)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """VQ-decode tokens `[n, h, w]` to float images `[n, 3, H, W]` in [0, 1]."""
        if self.tokenizer is None:
            raise EngineError("this checkpoint names no VQ tokenizer; pass tokenizer=... or use output_type='tokens'")
        return decode_codes(self.tokenizer, tokens, self.device, batch)
