"""`LasadPipeline`: class labels in, pictures out (generation + VQ decoding), diffusers-style.

The pipeline is the edge of the Python API: it turns names into ids, keyword arguments into
`SamplingParams`, and returns everything `lasad-run` writes (images, tokens, timings), so the CLI
adds nothing but files. Calls are serialised by a lock (the engine's buffers are shared).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends import ARTIFACT_BACKENDS
from .checkpoint import CheckpointError, file_fingerprint, load_checkpoint
from .engine import LasadEngine
from .params import ClassLabels, EngineError, Grid, SamplingParams, parse_grid, resolve_device

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "default.safetensors"
OUTPUT_TYPES = ("pil", "np", "pt", "tokens")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    or the tokens; tokens: int64 [n, h, w] (always); seconds: {"generate", "vq_decode"}."""

    images: object
    tokens: torch.Tensor
    seconds: dict = field(default_factory=dict)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """torch's intra-op threads set to `n` for the duration (None: unchanged). Decode-sized
    matrix products ([2, 384] x [384, 1152] for the bundled model) gain nothing from more threads
    and lose badly when another process holds a core (docs/performance.md, "CPU")."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LasadPipeline:
    """Generate images with a LASADGen checkpoint and its VQ tokenizer.

    >>> with LasadPipeline.from_checkpoint() as pipe:          # the bundled model
    ...     out = pipe([207], generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("emoji.png")
    """

    def __init__(self, model, tokenizer=None, *, backend: str | None = None, device=None,
                 max_batch: int = 8, use_cuda_graph: bool = True, artifact=None, threads: int | None = None):
        self.device = resolve_device(device)
        # CPU decode: one thread unless told otherwise (see cpu_threads); no effect on CUDA.
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise EngineError(f"threads={threads!r} must be a positive integer")
        self.decode_threads = (threads or 1) if self.device.type == "cpu" else None
        backend = backend or ("cuda" if self.device.type == "cuda" else "torch")
        on_meta = model.output.weight.device.type == "meta"  # an exported step carries the weights
        if not on_meta and model.output.weight.device != self.device:
            model = model.to(self.device)
        self.model = model.eval()
        if tokenizer is not None and next(tokenizer.parameters()).device != self.device:
            tokenizer = tokenizer.to(self.device)
        self.tokenizer = tokenizer.eval() if tokenizer is not None else None
        self.engine = LasadEngine(self.model, backend=backend, device=self.device, max_batch=max_batch,
                                  use_cuda_graph=use_cuda_graph, artifact=artifact)
        self.backend = backend
        self.checkpoint_path = getattr(model, "checkpoint_path", None)
        self.checkpoint_id = getattr(model, "checkpoint_id", None)
        self._lock = threading.RLock()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None = None, *, tokenizer=None, backend=None,
                        device=None, precision: str | None = None, max_batch: int = 8,
                        use_cuda_graph: bool = True, threads: int | None = None) -> "LasadPipeline":
        """Load a checkpoint (default: the bundled model) and the tokenizer it names.

        Args:
            path: `ckpt.pt`, `*.safetensors`, or an exported `step.onnx` / `engine.plan`.
                Default: the model inside the package.
            tokenizer: VQ checkpoint path, overriding the one in the checkpoint's `meta`.
            backend: torch | cuda | onnxruntime | tensorrt. Default: cuda on a GPU, else torch
                (the artifact's backend for an exported step).
            device: Default: cuda if available, else cpu.
            precision: fp32 | bf16 | fp16 for the weights (the state stays fp32). Default: bf16 on
                CUDA, fp32 on CPU.
            threads: CPU threads for the token decode (default 1: see `cpu_threads`).
        """
        device = resolve_device(device)
        if precision is None:
            precision = "bf16" if device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise EngineError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
        path = Path(path) if path is not None else DEFAULT_CHECKPOINT
        artifact = None
        if path.suffix in ARTIFACT_BACKENDS:  # the weights live in the exported graph or plan
            kind = ARTIFACT_BACKENDS[path.suffix]
            backend = backend or kind
            if backend != kind:
                raise EngineError(f"{path} is an exported step: it runs with backend {kind}, not {backend}")
            model, artifact = _artifact_model(path, kind), path
        else:
            model = load_checkpoint(path, device=device, dtype=PRECISIONS[precision])
        tok = _load_named_tokenizer(tokenizer, model.checkpoint_meta.get("tokenizer"), path, device)
        return cls(model, tok, backend=backend, device=device, max_batch=max_batch,
                   use_cuda_graph=use_cuda_graph, artifact=artifact, threads=threads)

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
        with self._lock:
            if self.engine is not None:
                self.engine.close()
                self.engine = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def class_id(self, label: int | str) -> int:
        """A class id from an int id, a name the checkpoint carries, or a digit string (a name
        first when the checkpoint has one spelled that way)."""
        C = self.model.config.num_classes
        names = self.class_names
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            return int(label)  # the range is checked once, by ClassLabels
        if not isinstance(label, str):
            raise EngineError(f"class {label!r} is neither an id nor a name")
        key = label.strip().lower()
        lowered = {n.lower(): i for i, n in enumerate(names or [])}
        if key in lowered:
            return lowered[key]
        if key.isdigit():
            return int(key)
        if not names:
            raise EngineError(f"class {label!r} is not an id, and this checkpoint carries no class names; use 0..{C - 1}")
        close = difflib.get_close_matches(key, list(lowered), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(names[lowered[c]]) for c in close)}?" if close else "; see --list-classes"
        raise EngineError(f"unknown class {label!r}{hint}")

    def class_labels(self, labels) -> ClassLabels:
        """Ids or names (one, or a list) -> validated ClassLabels."""
        if isinstance(labels, ClassLabels):
            return labels
        if isinstance(labels, (int, str, np.integer)):
            labels = [labels]
        if isinstance(labels, torch.Tensor):
            labels = labels.reshape(-1).tolist()
        return ClassLabels.of([self.class_id(c) for c in labels], self.model.config.num_classes)

    @torch.no_grad()
    def __call__(self, class_labels, cfg_scale: float = 4.0, cfg_interval: int = -1,
                 temperature: float = 1.0, top_k: int = 2000, top_p: float = 1.0,
                 generator: torch.Generator | None = None, output_type: str = "pil", callback=None,
                 grid=None, progress: bool = False, params: SamplingParams | None = None
                 ) -> LasadPipelineOutput:
        """Generate one image per entry of `class_labels` (ids or names).

        `params` (a SamplingParams) replaces the five sampling keywords when given.
        Returns LasadPipelineOutput(images, tokens, seconds); see `output_type` in OUTPUT_TYPES.
        """
        if output_type not in OUTPUT_TYPES:
            raise EngineError(f"output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if params is None:
            params = SamplingParams(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                                    top_k=top_k, top_p=top_p)
        cfg = self.model.config
        with self._lock:
            if self.engine is None:
                raise EngineError("this pipeline was closed")
            labels = self.class_labels(class_labels)
            grid = parse_grid(grid, (cfg.grid_height, cfg.grid_width))
            if output_type != "tokens":
                self._check_decodable(len(labels), grid)
            _sync(self.device)
            t0 = time.perf_counter()
            with cpu_threads(self.decode_threads):
                tokens = self.engine.generate(labels, grid=grid, params=params, generator=generator,
                                              callback=callback, progress=progress)
            _sync(self.device)
            t1 = time.perf_counter()
            seconds = {"generate": t1 - t0}
            if output_type == "tokens":
                return LasadPipelineOutput(tokens, tokens, seconds)
            images = self.decode(tokens)  # float [n, 3, H, W] in [0, 1]
            arr = None if output_type == "pt" else to_uint8(images)
            seconds["vq_decode"] = time.perf_counter() - t1
        if output_type == "pt":
            return LasadPipelineOutput(images, tokens, seconds)
        if output_type == "np":
            return LasadPipelineOutput(arr, tokens, seconds)
        from PIL import Image
        return LasadPipelineOutput([Image.fromarray(a) for a in arr], tokens, seconds)

    def _check_decodable(self, n: int, grid: Grid) -> None:
        """The VQ decoder's memory, checked before the first token is generated."""
        if self.tokenizer is None:
            raise EngineError("this checkpoint names no VQ tokenizer; pass tokenizer=... or use output_type='tokens'")
        estimate = getattr(self.tokenizer, "decode_bytes", None)
        if estimate is None:
            return
        from .engine import _check_memory
        _check_memory(estimate(min(n, 16), grid.h, grid.w), self.device, f"VQ-decoding a {grid.h}x{grid.w} grid")

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """VQ-decode tokens `[n, h, w]` to float images `[n, 3, H, W]` in [0, 1]."""
        if self.tokenizer is None:
            raise EngineError("this checkpoint names no VQ tokenizer; pass tokenizer=... or use output_type='tokens'")
        return decode_codes(self.tokenizer, tokens, self.device, batch)


def _artifact_model(path: Path, kind: str):
    """A model on the meta device with an exported step's config: the buffers' shapes, no weights."""
    from .model import LasadGen
    if kind == "tensorrt":
        from .backends.trt import read_plan_config
        cfg, record = read_plan_config(path)
        meta = record.get("meta", {})
    else:
        from .backends.ort import read_onnx_config
        cfg, meta, _ = read_onnx_config(path)
    with torch.device("meta"):
        model = LasadGen(cfg)
    model.checkpoint_meta, model.checkpoint_id, model.checkpoint_path = meta, file_fingerprint(path), path
    return model


def _load_named_tokenizer(given, named, checkpoint: Path, device):
    """The VQ tokenizer: `given` by the user, else the one the checkpoint names (relative to the
    checkpoint's folder), else None."""
    from .tokenizer import load_tokenizer
    vq = given or named
    if vq is None:
        return None
    vq = Path(vq)
    if not vq.is_absolute() and given is None:
        vq = checkpoint.parent / vq  # checkpoints name their tokenizer relative to themselves
    if not vq.is_file():
        raise CheckpointError(f"{vq}: tokenizer file not found (named by {checkpoint})")
    try:
        return load_tokenizer(vq, device=device)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
