"""`LasadPipeline`: class labels in, pictures out (generation + VQ decoding), diffusers-style.

The pipeline is the edge of the Python API: it turns names into ids, keyword arguments into
`SamplingParams`, and returns everything `lasad-run` writes (images, tokens, timings), so the CLI
adds nothing but files. Calls from many threads (or `await pipe.agenerate(...)` from asyncio) run
at once: their images join the engine's decode loop at its next step and share its batch, and
each call VQ-decodes its own images in its own thread (on a GPU, on the caller's stream), off the
decode loop. Each call gets exactly the images it would get alone.
The conventions of diffusers / Hugging Face hold: `from_pretrained(dir)` / `save_pretrained(dir)`
(the folder layout is in pretrained.py), `.to(device, dtype)`, `set_progress_bar_config(...)`.
"""

from __future__ import annotations

import difflib
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends import ARTIFACT_BACKENDS
from .checkpoint import CheckpointError, file_fingerprint, followed_tokenizer, load_checkpoint, resolve_checkpoint, \
    trained_grids
from .engine import LasadEngine
from .io import safe_text
from .params import MAX_IMAGES, WEIGHT_CHOICES, ClassLabels, EngineError, Grid, OutOfRange, SamplingParams, check_memory, \
    memory_stage, parse_grid, resolve_device

OUTPUT_TYPES = ("pil", "np", "pt", "tokens")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODE_BATCH = 16  # images VQ-decoded together


@torch.no_grad()
def decode_codes(tokenizer, tokens: torch.Tensor, device, batch: int = DECODE_BATCH) -> torch.Tensor:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision(value) -> str:
    """"fp32" | "bf16" | "fp16", or the torch dtype of one of them -> its name."""
    if isinstance(value, torch.dtype):
        for name, dtype in PRECISIONS.items():
            if dtype == value:
                return name
    if value not in PRECISIONS:
        raise EngineError(f"precision={value!r} is not one of {', '.join(PRECISIONS)} "
                          f"(or torch.float32, torch.bfloat16, torch.float16)")
    return value


def _default_backend(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "torch"


class LasadPipeline:
    """Generate images with a LASADGen checkpoint and its VQ tokenizer.

    >>> with LasadPipeline.from_pretrained("default", device="cpu") as pipe:  # the bundled model
    ...     out = pipe([207], generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("emoji.png")
    """

    def __init__(self, model, tokenizer=None, *, backend: str | None = None, device=None,
                 max_batch: int = 8, use_cuda_graph: bool = True, artifact=None, threads: int | None = None,
                 max_queue: int | None = None, policy: str = "continuous", batch_wait: float = 0.0,
                 reproducible: bool = False, step_kernel: str = "ops"):
        self.device = resolve_device(device)
        # CPU decode: one thread unless told otherwise (see scheduler.cpu_threads); no effect on CUDA.
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise EngineError(f"threads={threads!r} must be a positive integer")
        self._threads = threads
        self._backend_given = backend is not None  # else .to() picks the new device's default
        self.backend = backend or _default_backend(self.device)
        self.artifact = artifact
        self._engine_options = dict(max_batch=max_batch, use_cuda_graph=use_cuda_graph, max_queue=max_queue,
                                    policy=policy, batch_wait=batch_wait, reproducible=reproducible,
                                    step_kernel=step_kernel)
        self._progress_config: dict | None = None
        self.model, self.tokenizer = self._place(model, tokenizer, self.device, None)
        self.engine = self._build_engine()
        self.checkpoint_path = getattr(model, "checkpoint_path", None)
        self.checkpoint_id = getattr(model, "checkpoint_id", None)
        self.tokenizer_refused: str | None = None  # why the tokenizer a checkpoint names was not loaded
        self._lock = threading.RLock()

    @property
    def decode_threads(self) -> int | None:
        return (self._threads or 1) if self.device.type == "cpu" else None

    @property
    def on_meta(self) -> bool:
        """True when the weights live in an exported step (ONNX / plan), not in this process."""
        return self.model.output.weight.device.type == "meta"

    def _place(self, model, tokenizer, device: torch.device, dtype: torch.dtype | None):
        """The model on `device` (in `dtype`; quantised weights keep their format), the tokenizer
        on `device` (it stays fp32)."""
        if model.output.weight.device.type != "meta":
            from .quant import activation_dtype, check_device, weights_format
            check_device(weights_format(model), device)
            if model.output.weight.device != device or (dtype is not None and activation_dtype(model) != dtype):
                model = model.to(device=device, dtype=dtype)
        if tokenizer is not None and next(tokenizer.parameters()).device != device:
            tokenizer = tokenizer.to(device)
        return model.eval(), (tokenizer.eval() if tokenizer is not None else None)

    def _build_engine(self) -> LasadEngine:
        return LasadEngine(self.model, backend=self.backend, device=self.device, artifact=self.artifact,
                           threads=self.decode_threads, **self._engine_options)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None = None, *, tokenizer=None, backend=None,
                        device=None, precision: str | torch.dtype | None = None, max_batch: int = 8,
                        use_cuda_graph: bool = True, threads: int | None = None, weights: str | None = None,
                        **engine_options) -> "LasadPipeline":
        """Load a checkpoint (default: the bundled model) and the tokenizer it names.

        Args:
            path: "default" (the model inside the package; also when None), a model folder
                (`save_pretrained`'s layout), `ckpt.pt`, `*.safetensors`, or an exported
                `step.onnx` / `engine.plan` (checkpoint.resolve_checkpoint).
            tokenizer: VQ checkpoint path, overriding the one in the checkpoint's `meta`.
            backend: torch | cuda | onnxruntime | tensorrt. Default: cuda on a GPU, else torch
                (the artifact's backend for an exported step).
            device: Default: cuda if available, else cpu.
            precision: fp32 | bf16 | fp16 (or the torch dtype) for the weights (the state stays
                fp32). Default: bf16 on CUDA, fp32 on CPU.
            threads: CPU threads for the token decode (default 1: see `scheduler.cpu_threads`).
            weights: the decode matrices' form, "float" | "int8" | "fp8" (lasad_engine/quant.py):
                int8 / fp8 store them with one fp32 scale per output channel, dequantised inside
                the GEMM kernels (half the bytes a step streams; fp8 needs compute capability
                8.9+); the activations stay in `precision`. Default: as the checkpoint holds
                them (a quantised checkpoint is dequantised on a CPU). An exported step's form was
                fixed by `lasad-export --weights`.
            max_queue, policy, batch_wait, reproducible, step_kernel: the engine's (`LasadEngine`).
        """
        if weights is not None and weights not in WEIGHT_CHOICES:
            raise EngineError(f"weights={safe_text(repr(weights), 40)} is not one of {', '.join(WEIGHT_CHOICES)}")
        device = resolve_device(device)
        if weights is not None:
            from .quant import check_device
            check_device(weights, device)  # before anything is loaded
        precision = _precision(precision or ("bf16" if device.type == "cuda" else "fp32"))
        path = resolve_checkpoint(path)
        artifact = None
        if path.suffix in ARTIFACT_BACKENDS:  # the weights live in the exported graph or plan
            kind = ARTIFACT_BACKENDS[path.suffix]
            backend = backend or kind
            if backend != kind:
                raise EngineError(f"{path} is an exported step: it runs with backend {kind}, not {backend}")
            if weights is not None:
                raise EngineError(f"{path} is an exported step: its weights' form was fixed when it was exported "
                                  "(lasad-export --weights)")
            model, artifact = _artifact_model(path, kind), path
        else:
            model = load_checkpoint(path, device=device, dtype=PRECISIONS[precision], weights=weights)
        tok, refused = _load_named_tokenizer(tokenizer, model.checkpoint_meta.get("tokenizer"), path, device)
        pipe = cls(model, tok, backend=backend, device=device, max_batch=max_batch,
                   use_cuda_graph=use_cuda_graph, artifact=artifact, threads=threads, **engine_options)
        pipe.tokenizer_refused = refused
        return pipe

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "default", **options) -> "LasadPipeline":
        """A model folder written by `save_pretrained` (config.json, model.safetensors,
        vq.safetensors, README.md), or "default" (the bundled model), or any checkpoint file.
        Takes the keywords of `from_checkpoint` (tokenizer, backend, device, precision, max_batch,
        use_cuda_graph, threads, weights), and diffusers' `torch_dtype=` as another name for
        `precision=`.

        >>> with LasadPipeline.from_pretrained("my-model", device="cpu") as pipe:
        ...     pipe(["handshake"]).images[0].save("handshake.png")
        """
        if "torch_dtype" in options:
            torch_dtype = options.pop("torch_dtype")
            if options.get("precision") is not None and torch_dtype is not None:
                raise EngineError("give torch_dtype= or precision=, not both (they name the same thing)")
            options["precision"] = options.get("precision") or torch_dtype
        return cls.from_checkpoint(name_or_path, **options)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False,
                        card: dict | None = None) -> Path:
        """Write the model, its tokenizer and a model card as a folder that `from_pretrained`,
        `lasad-run --checkpoint DIR` and the other tools read (layout: lasad_engine/pretrained.py).

        Written into a temporary folder beside `folder`, then renamed into place: never
        half-written. The weights keep their current dtype.

        Args:
            folder: the folder to create; an existing one with files in it is refused unless
                `overwrite=True` (then it is replaced as a whole).
            card: model-card facts merged over the checkpoint's own (keys in
                pretrained.CARD_KEYS: license, training_data, metrics, ...); kept in the meta.
        Returns:
            the folder's path.
        """
        from .pretrained import CARD_KEYS, write_pretrained
        if self.on_meta:
            raise EngineError(f"this pipeline runs an exported step ({self.checkpoint_path}); save_pretrained "
                              "needs the weights: load the checkpoint it was exported from")
        if card is not None and (not isinstance(card, dict) or set(card) - set(CARD_KEYS)):
            bad = sorted(set(card) - set(CARD_KEYS)) if isinstance(card, dict) else [type(card).__name__]
            raise EngineError(f"card: unknown entries {', '.join(map(str, bad))}; use {', '.join(CARD_KEYS)}")
        meta = dict(getattr(self.model, "checkpoint_meta", None) or {})
        if card:
            meta["card"] = {**meta.get("card", {}), **card}
        if self.checkpoint_id:
            meta["source_sha256"] = self.checkpoint_id
        with self._lock:
            return write_pretrained(folder, self.model, self.tokenizer, meta=meta, overwrite=overwrite)

    def to(self, device=None, dtype: str | torch.dtype | None = None, *, backend: str | None = None
           ) -> "LasadPipeline":
        """Move the model and the tokenizer to `device`, cast the model's weights to `dtype`
        ("fp32" | "bf16" | "fp16" or the torch dtype; the decode state and the VQ decoder stay
        fp32), and rebuild the engine. `pipe.to("cuda")`, `pipe.to(torch.float16)` and
        `pipe.to("cuda", torch.bfloat16)` work as in diffusers. Returns the pipeline.

        Not free: the weights are copied, the decode buffers are allocated again, CUDA graphs are
        captured again on the next call, and an exported step gets a new session. Do it once, not
        per call. The backend follows the device (torch on CPU, cuda on a GPU) unless one was
        chosen, here or when the pipeline was made. An exported step's dtype is fixed by
        `lasad-export --dtype`.
        """
        if dtype is None and (isinstance(device, torch.dtype) or device in PRECISIONS):
            device, dtype = None, device  # pipe.to(torch.float16), pipe.to("fp16")
        with self._lock:
            if self.engine is None:
                raise EngineError("this pipeline was closed")
            new_device = resolve_device(device) if device is not None else self.device
            new_dtype = PRECISIONS[_precision(dtype)] if dtype is not None else None
            if self.on_meta and new_dtype is not None:
                raise EngineError(f"{self.checkpoint_path} is an exported step: its dtype was fixed when it was "
                                  "exported (lasad-export --dtype)")
            old = (self.model, self.tokenizer, self.device, self.backend, self._backend_given,
                   None if self.on_meta else self.dtype)
            if backend is not None:
                self.backend, self._backend_given = backend, True
            elif not self._backend_given:
                self.backend = _default_backend(new_device)
            self.engine.close(drain=True)  # calls in flight finish first
            self.engine = None
            try:
                self.model, self.tokenizer = self._place(self.model, self.tokenizer, new_device, new_dtype)
                self.device = new_device
                self.engine = self._build_engine()
            except BaseException:
                model, tokenizer, self.device, self.backend, self._backend_given, dtype0 = old
                self.model, self.tokenizer = self._place(model, tokenizer, self.device, dtype0)
                self.engine = self._build_engine()
                raise
            if self.device.type == "cuda" or old[2].type == "cuda":
                torch.cuda.empty_cache()
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """Switch the progress bar of later calls (diffusers' name): `disable=False` turns it on,
        `disable=True` off; other keywords go to tqdm (`file=`, `desc=`, `leave=`, `ncols=` ...).
        A call's `progress=True` / `False` overrides it. Without this, calls show no bar."""
        self._progress_config = dict(kwargs)

    def _progress(self, progress: bool | None):
        """What the engine gets: False, or a dict of tqdm keywords (the configured ones)."""
        config = self._progress_config
        if progress is None:
            progress = config is not None and not config.get("disable", False)
        if not progress:
            return False
        return {k: v for k, v in (config or {}).items() if k != "disable"} or True

    def grid_note(self, grid) -> str | None:
        """One line for a grid the model was not trained at (lasad-run prints it on stderr);
        None at a trained grid (the config's, or each of meta["trained_grids"] of a model trained
        at several sizes). Generation itself does not change: any grid runs with the same memory
        per image (docs/model.md), but only the trained ones were ever learned."""
        cfg = self.model.config
        trained = trained_grids(cfg, getattr(self.model, "checkpoint_meta", None))
        g = parse_grid(grid, (cfg.grid_height, cfg.grid_width))
        if tuple(g) in trained:
            return None
        sizes = " and ".join(f"{h}x{w}" for h, w in trained)
        return (f"note: this model was trained at {sizes} tokens; {g.h}x{g.w} runs "
                "(constant memory) but was never trained, so do not expect usable pictures")

    @property
    def sampling_defaults(self) -> SamplingParams:
        """What a call uses for the sampling keywords it leaves out: the model's recommended
        settings (a checkpoint's meta["sampling"], chosen for that model; Hugging Face models
        carry theirs as a generation config), the rest LlamaGen's defaults."""
        return self.sampling_params()

    def sampling_params(self, **given) -> SamplingParams:
        """The SamplingParams of a call given these sampling keywords (None = left out)."""
        recommended = (getattr(self.model, "checkpoint_meta", None) or {}).get("sampling")
        return SamplingParams.resolve(given, recommended, str(self.checkpoint_path or "the model"))

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (diffusers' `pipe.dtype`), which the activations follow; the decode
        state and the VQ decoder are fp32, and quantised decode matrices keep their format
        (`weights`)."""
        from .quant import activation_dtype
        return activation_dtype(self.model)

    @property
    def weights(self) -> str:
        """The decode matrices' form: "float" (in `dtype`), "int8" or "fp8" (lasad_engine/quant.py);
        an exported step's as recorded at export."""
        if self.on_meta:
            return getattr(self.model, "weights_form", "float")
        from .quant import weights_format
        return weights_format(self.model)

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
        if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
            return int(label)  # the range is checked once, by ClassLabels
        if not isinstance(label, str):
            raise EngineError(f"class {safe_text(repr(label), 80)} is neither an id nor a name")
        key = label.strip().lower()
        lowered = self._name_index()
        if key in lowered:
            return lowered[key]
        if key.isascii() and key.isdigit() and len(key) <= 18:
            return int(key)
        shown = safe_text(repr(label), 80)
        if not names:
            raise OutOfRange(f"class {shown} is not an id, and this checkpoint carries no class names; use 0..{C - 1}")
        close = difflib.get_close_matches(key[:200], list(lowered), n=3, cutoff=0.6)
        hint = (f"; did you mean {', '.join(safe_text(repr(names[lowered[c]]), 60) for c in close)}?" if close
                else "; see --list-classes")
        raise OutOfRange(f"unknown class {shown}{hint}")

    def _name_index(self) -> dict[str, int]:
        """Lower-cased class name -> id (the first of equal names), built once."""
        if getattr(self, "_names_lowered", None) is None:
            index: dict[str, int] = {}
            for i, n in enumerate(self.class_names or []):
                index.setdefault(n.strip().lower(), i)
            self._names_lowered = index
        return self._names_lowered

    def class_labels(self, labels) -> ClassLabels:
        """Ids or names (one, or a list) -> validated ClassLabels."""
        if isinstance(labels, ClassLabels):
            if labels.num_classes == self.model.config.num_classes:
                return labels  # validated once already
            labels = labels.ids
        if isinstance(labels, (int, str, np.integer)):
            labels = [labels]
        if isinstance(labels, torch.Tensor):
            if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
                raise EngineError(f"class labels of dtype {labels.dtype}: pass integer ids or names")
            labels = labels.reshape(-1).tolist()
        elif isinstance(labels, np.ndarray):
            if labels.dtype.kind not in "iu":
                raise EngineError(f"class labels of dtype {labels.dtype}: pass integer ids or names")
            labels = labels.reshape(-1).tolist()
        if isinstance(labels, (dict, bytes, set)) or not hasattr(labels, "__iter__"):
            raise EngineError(f"class labels {type(labels).__name__}: pass an id, a name, or a list of them")
        labels = list(itertools.islice(labels, MAX_IMAGES + 1))  # any iterable (range, generator), bounded
        if len(labels) > MAX_IMAGES:
            raise EngineError(f"{len(labels)} class labels: at most {MAX_IMAGES} per request")
        return ClassLabels.of([self.class_id(c) for c in labels], self.model.config.num_classes)

    @torch.no_grad()
    def __call__(self, class_labels, cfg_scale: float | None = None, cfg_interval: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", callback=None,
                 grid=None, progress: bool | None = None, params: SamplingParams | None = None
                 ) -> LasadPipelineOutput:
        """Generate one image per entry of `class_labels` (ids or names).

        Args:
            class_labels: an id, a name, or a list of them (one image each).
            cfg_scale, cfg_interval, temperature, top_k, top_p: sampling (SamplingParams). One
                left out takes the model's recommended value (`sampling_defaults`: the
                checkpoint's meta["sampling"]), else LlamaGen's sample_c2i.py default (cfg 4.0,
                top-k 2000, temperature 1.0).
            generator: a torch.Generator (CPU or the pipeline's device) for the noise; the same
                seed gives the same tokens on every backend.
            output_type: pil | np | pt | tokens.
            callback: called as callback(step, tokens) after every token step.
            grid: (h, w) or "HxW"; default the trained grid (see `grid_note`).
            progress: a tqdm bar over the tokens on stderr; None: as `set_progress_bar_config`
                says (off unless it was called).
            params: a SamplingParams that replaces the five sampling keywords.
        Returns:
            LasadPipelineOutput(images, tokens int64 [n, h, w], seconds).
        """
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise EngineError(f"output_type={safe_text(repr(output_type), 60)} is not one of {', '.join(OUTPUT_TYPES)}")
        if params is None:
            params = self.sampling_params(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                                          top_k=top_k, top_p=top_p)
        req, grid, t0 = self._submit(class_labels, params, generator, output_type, callback, grid, progress)
        tokens = self.engine.wait(req).view(-1, grid.h, grid.w)
        return self._finish(tokens, output_type, t0)

    async def agenerate(self, class_labels, *, output_type: str = "pil", **kw) -> LasadPipelineOutput:
        """`pipe(...)` for asyncio: `out = await pipe.agenerate([207], generator=...)`. The
        images join the decode loop's batch as a thread's call does; the VQ decode runs in a worker
        thread, so the event loop never blocks. A cancelled task cancels its images."""
        import asyncio
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise EngineError(f"output_type={safe_text(repr(output_type), 60)} is not one of {', '.join(OUTPUT_TYPES)}")
        params = kw.pop("params", None)
        if params is None:
            params = self.sampling_params(**{k: kw.pop(k, None) for k in
                                             ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")})
        unknown = sorted(set(kw) - {"generator", "grid", "callback", "progress"})
        if unknown:
            raise EngineError(f"unknown argument {unknown[0]!r} of agenerate")
        req, grid, t0 = self._submit(class_labels, params, kw.get("generator"), output_type, kw.get("callback"),
                                     kw.get("grid"), kw.get("progress"))
        try:
            await req.wrap()
        except BaseException:
            req.cancel()
            raise
        return await asyncio.to_thread(
            lambda: self._finish(self.engine.wait(req).view(-1, grid.h, grid.w), output_type, t0))

    def _submit(self, class_labels, params, generator, output_type, callback, grid, progress):
        """Validate a call and queue its images: (request, grid, start time)."""
        if params is None or not isinstance(params, SamplingParams):
            raise EngineError(f"params={type(params).__name__}: pass a SamplingParams (or the sampling keywords)")
        if callback is not None and not callable(callback):
            raise EngineError(f"callback={type(callback).__name__} is not callable")
        cfg = self.model.config
        with self._lock:  # held for the engine's identity only (.to() swaps it)
            if self.engine is None:
                raise EngineError("this pipeline was closed")
            labels = self.class_labels(class_labels)
            grid = parse_grid(grid, (cfg.grid_height, cfg.grid_width))
            if output_type != "tokens":
                self._check_decodable(len(labels), grid, output_type)
            t0 = time.perf_counter()
            req = self.engine.submit(labels, grid=grid, params=params, generator=generator, callback=callback,
                                     progress=self._progress(progress))
        return req, grid, t0

    def _finish(self, tokens: torch.Tensor, output_type: str, t0: float) -> LasadPipelineOutput:
        """A request's tokens -> the call's output: VQ decode in the calling thread (its stream)."""
        _sync(self.device)
        t1 = time.perf_counter()
        seconds = {"generate": t1 - t0}
        if output_type == "tokens":
            return LasadPipelineOutput(tokens, tokens, seconds)
        n, h, w = tokens.shape
        with memory_stage(f"VQ-decoding {n} image(s) of {h}x{w} tokens",
                          "use fewer images per call (-n), a smaller grid, or output_type='tokens'"):
            images = self.decode(tokens)  # float [n, 3, H, W] in [0, 1]
        arr = None if output_type == "pt" else to_uint8(images)
        seconds["vq_decode"] = time.perf_counter() - t1
        if output_type == "pt":
            return LasadPipelineOutput(images, tokens, seconds)
        if output_type == "np":
            return LasadPipelineOutput(arr, tokens, seconds)
        from PIL import Image
        return LasadPipelineOutput([Image.fromarray(a) for a in arr], tokens, seconds)

    def _check_decodable(self, n: int, grid: Grid, output_type: str) -> None:
        """The VQ decoder and the pictures, checked against free memory before the first token:
        the decoder's peak for one batch (`decode_bytes`) plus the n images it returns."""
        self._require_tokenizer()
        f = self.tokenizer.downsample_factor if hasattr(self.tokenizer, "downsample_factor") else 1
        pixels = 3 * grid.h * f * grid.w * f
        # decode_codes: the float batches, their concatenation and two element-wise results;
        # to_uint8 and PIL: a scaled float copy and the uint8 arrays.
        kept = n * pixels * (12 if output_type == "pt" else 17)
        estimate = getattr(self.tokenizer, "decode_bytes", None)
        peak = estimate(min(n, DECODE_BATCH), grid.h, grid.w) if estimate is not None else 0
        check_memory(peak + kept, self.device, f"VQ-decoding {n} image(s) of {grid.h}x{grid.w} tokens",
                     "use fewer images per call, a smaller grid, or output_type='tokens'")

    def _require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise EngineError(self.tokenizer_refused or "this checkpoint names no VQ tokenizer; pass tokenizer=... "
                              "(--tokenizer) or use output_type='tokens'")

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, batch: int = DECODE_BATCH) -> torch.Tensor:
        """VQ-decode tokens `[n, h, w]` to float images `[n, 3, H, W]` in [0, 1]."""
        self._require_tokenizer()
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
    form = meta.get("weights")  # lasad-export records the form of the weights it wrote
    model.weights_form = form if form in WEIGHT_CHOICES else "float"
    return model


def _load_named_tokenizer(given, named, checkpoint: Path, device):
    """(tokenizer, why not): `given` by the user, else the one the checkpoint names, else None.

    A checkpoint names its tokenizer relative to its own folder; a name that
    `checkpoint.followed_tokenizer` does not follow is not opened, and the pipeline then serves
    tokens, and asks for `tokenizer=` (--tokenizer) when images are wanted.
    """
    from .tokenizer import load_tokenizer
    if given is not None:
        vq, source = Path(given), "--tokenizer"
    elif named is None:
        return None, None
    else:
        if not isinstance(named, str) or not named:
            raise CheckpointError(f"{checkpoint}: damaged metadata (tokenizer is {safe_text(repr(named), 60)})")
        vq = followed_tokenizer(named, checkpoint)
        if vq is None:
            return None, (f"{checkpoint} names its tokenizer {safe_text(named, 120)!r}, outside the checkpoint's "
                          "folder; lasad opens only tokenizer files inside it: pass tokenizer=PATH (--tokenizer "
                          "PATH) to use that file")
        source = f"named by {checkpoint}"
    if vq.is_dir():
        raise CheckpointError(f"{vq}: is a folder, not a tokenizer file ({source})")
    if not vq.is_file():
        raise CheckpointError(f"{vq}: tokenizer file not found ({source})")
    try:
        return load_tokenizer(vq, device=device), None
    except (ValueError, OSError) as e:
        raise CheckpointError(str(e)) from None
