"""The decode runtime: buffers allocated once, one decode step (model + sampling) per position,
backends behind one interface.

A generation of n images on an h×w grid is N = h·w identical steps. Each step reads the input ids,
the position and this step's noise from fixed buffers, updates the recurrent state in place,
samples the next ids on the device and writes them back into the id buffer (both CFG halves)
and into the token buffer. Nothing in a step allocates and nothing syncs with the host, so the
`cuda` backend captures the whole step once as a CUDA graph and replays it N times.

Backends:
- `torch`: eager, CPU or GPU, the torch reference of the step op; the reference for the others.
- `cuda`: the Triton step kernel, and the whole step (sampling included) captured as a CUDA graph.
- `onnxruntime`, `tensorrt`: run an exported step (the export issue); named here so that the
  interface and the errors are the same for all.
"""

from __future__ import annotations

from typing import Callable

import torch

from .model import LasadGen, LasadState
from .params import EngineError, SamplingParams, parse_grid, resolve_device  # noqa: F401 (re-exported)
from .sampling import draw_noise, sample

BACKENDS = ("torch", "cuda", "onnxruntime", "tensorrt")
# Noise is drawn from the caller's generator in blocks of this many steps: the blocking is a
# constant, so the same seed gives the same noise (and tokens) whatever max_batch or backend.
NOISE_BLOCK = 16


class DecodeBuffers:
    """Every tensor a generation touches, allocated once per (max images, device) and grown only
    when a larger grid is asked for. Views for a request of n images are slices of the same
    storage, so their addresses never change between steps or images.

    state:   LasadState for 2·max_images rows (fp32 [L, R, H, K, V] + pos + width + logits)
    ids:     int64 [R]          the step's input ids (class / null ids at p = 0, tokens after)
    noise:   fp32 NOISE_BLOCK·max_images·V, viewed as [NOISE_BLOCK, n, V]
    tokens:  int64 max_images·N, viewed as [n, N]
    cfg_scale: fp32 [] ; cfg_interval: int64 []   (data, so one captured step serves any value)
    """

    def __init__(self, model: LasadGen, max_images: int, device: torch.device):
        cfg = model.config
        self.max_images, self.vocab = max_images, cfg.vocab_size
        self.state = model.allocate_state(2 * max_images, device)
        self.ids = torch.zeros(2 * max_images, dtype=torch.int64, device=device)
        self.noise = torch.ones(NOISE_BLOCK * max_images * cfg.vocab_size, device=device)
        self.tokens = torch.zeros(max_images * cfg.seq_len, dtype=torch.int64, device=device)
        self.cfg_scale = torch.ones((), device=device)
        self.cfg_interval = torch.full((), -1, dtype=torch.int64, device=device)

    def ensure_tokens(self, n_tokens: int) -> bool:
        """Grow the token buffer for a larger grid; True when it was reallocated."""
        if self.tokens.numel() >= self.max_images * n_tokens:
            return False
        self.tokens = torch.zeros(self.max_images * n_tokens, dtype=torch.int64, device=self.tokens.device)
        return True

    def noise_view(self, n: int) -> torch.Tensor:
        return self.noise[: NOISE_BLOCK * n * self.vocab].view(NOISE_BLOCK, n, self.vocab)

    def tokens_view(self, n: int, n_tokens: int) -> torch.Tensor:
        return self.tokens[: n * n_tokens].view(n, n_tokens)

    @property
    def nbytes(self) -> int:
        extra = (self.ids, self.noise, self.tokens, self.cfg_scale, self.cfg_interval)
        return self.state.nbytes + sum(t.numel() * t.element_size() for t in extra)


class TorchBackend:
    """Eager execution of the step on any device, through the torch reference of the step op."""

    name = "torch"
    kernel = "torch"

    def __init__(self, model: LasadGen, device: torch.device):
        self.model, self.device = model, device

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, state: LasadState) -> torch.Tensor:
        """The model part of one step: `LasadGen.step` semantics, this backend's kernels."""
        return self.model.step(ids, pos, state, kernel=self.kernel)

    def run(self, key: tuple, fn: Callable[[], None]) -> None:
        """Run one step function. `key` identifies what the function bakes in (for graphs)."""
        fn()

    def prepare(self, key: tuple, fn: Callable[[], None], reset: Callable[[], None]) -> None:
        """Called before a generation with the step it will run; nothing to do when eager."""

    def close(self) -> None:
        pass


class CudaBackend(TorchBackend):
    """The Triton step kernel, and the whole decode step captured once per (images, sampling
    settings, buffers) as a CUDA graph, then replayed. Captures share one memory pool."""

    name = "cuda"
    kernel = "triton"

    def __init__(self, model: LasadGen, device: torch.device, use_cuda_graph: bool = True,
                 fused: bool = True):
        if device.type != "cuda":
            raise EngineError(f"backend 'cuda' needs a CUDA device, got device={device}")
        super().__init__(model, device)
        self.use_cuda_graph = use_cuda_graph
        # One side stream for every warm-up and capture: cuBLAS keeps a workspace per stream it
        # has seen, so a fresh stream per capture would grow memory with every new grid.
        self.stream = torch.cuda.Stream(device)
        if fused:
            from .fused import FusedDecoder
            self.decode = FusedDecoder(model, kernel=self.kernel)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def prepare(self, key, fn, reset):
        if not self.use_cuda_graph or key in self.graphs:
            return
        # Warm up on a side stream (Triton compiles, cuBLAS picks kernels), then capture. Both
        # mutate the buffers, so the caller resets them afterwards.
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                reset()
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        reset()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            fn()
        self.graphs[key] = graph

    def run(self, key, fn):
        graph = self.graphs.get(key)
        if graph is None:
            fn()
        else:
            graph.replay()

    def close(self):
        self.graphs.clear()
        self.pool = None


def make_backend(name: str, model: LasadGen, device: torch.device, use_cuda_graph: bool = True,
                 fused: bool = True, onnx_path=None):
    if name == "torch":
        return TorchBackend(model, device)
    if name == "cuda":
        return CudaBackend(model, device, use_cuda_graph, fused)
    if name == "onnxruntime":
        if onnx_path is None:
            raise EngineError("backend 'onnxruntime' runs an exported decode step: "
                              "lasad-export CKPT step.onnx, then load step.onnx")
        from .ort import OnnxRuntimeBackend
        return OnnxRuntimeBackend(model, device, onnx_path)
    if name == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise EngineError("backend 'tensorrt' needs NVIDIA TensorRT >= 10.8 on a GPU it supports: "
                              "pip install 'lasad[tensorrt]'; or use one of: torch, cuda, onnxruntime") from None
        if onnx_path is None or str(onnx_path).endswith(".onnx"):
            raise EngineError("backend 'tensorrt' runs an engine.plan: lasad-export CKPT engine.plan, then load it")
        from .trt import TensorRTBackend
        return TensorRTBackend(model, device, onnx_path, use_cuda_graph)
    raise EngineError(f"backend={name!r} is not one of {', '.join(BACKENDS)}")


class LasadEngine:
    """Token-by-token generation with a constant memory footprint.

    >>> engine = LasadEngine(model, backend="cuda", max_batch=8)
    >>> tokens = engine.generate([207, 360], params=SamplingParams(cfg_scale=4.0),
    ...                          generator=torch.Generator("cuda").manual_seed(0))  # [2, h, w]
    """

    def __init__(self, model: LasadGen, *, backend: str = "torch", device=None, max_batch: int = 8,
                 use_cuda_graph: bool = True, fused: bool = True, onnx_path=None):
        if max_batch < 1:
            raise EngineError(f"max_batch={max_batch} must be >= 1")
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else model.output.weight.device
        self.backend = make_backend(backend, model, self.device, use_cuda_graph, fused, onnx_path)
        self.buffers = DecodeBuffers(model, max_batch, self.device)
        self._views: dict[int, LasadState] = {}

    @property
    def max_batch(self) -> int:
        return self.buffers.max_images

    @property
    def state_nbytes(self) -> int:
        """Bytes of recurrent state held for max_batch images with CFG (2 rows each)."""
        return self.buffers.state.state_bytes

    def close(self) -> None:
        """Free the graphs and the buffers."""
        self.backend.close()
        self.buffers = None
        self._views.clear()

    def _state(self, rows: int) -> LasadState:
        if rows not in self._views:
            self._views[rows] = self.buffers.state.rows(rows)
        return self._views[rows]

    # -- the decode step ---------------------------------------------------------------------
    def _step_fn(self, n: int, n_tokens: int, params: SamplingParams) -> Callable[[], None]:
        """The whole decode step for n images: model step, sampling, bookkeeping. Reads and
        writes only fixed buffers, so it can be captured."""
        b = self.buffers
        rows = 2 * n if params.cfg else n
        state, ids = self._state(rows), b.ids[:rows]
        noise, tokens = b.noise_view(n), b.tokens_view(n, n_tokens)
        decode = self.backend.decode
        # cuda: one sampler launch that also reads the noise row at pos and writes tokens[:, pos]
        sampler = "triton" if self.backend.name == "cuda" else "torch"

        def step():
            pos = state.pos
            logits = decode(ids, pos, state)
            active = (b.cfg_interval < 0) | (pos[0] <= b.cfg_interval)
            sample(logits, noise, cfg=params.cfg, cfg_scale=b.cfg_scale,
                   temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                   cfg_active=active, out=ids, pos=pos, tokens=tokens, backend=sampler)
            pos.add_(1)
        return step

    def _reset(self, labels: torch.Tensor, params: SamplingParams, width: int) -> None:
        b, n = self.buffers, labels.shape[0]
        b.state.reset(width)
        b.ids[:n].copy_(labels)
        if params.cfg:
            b.ids[n:2 * n].fill_(self.model.config.null_class)
        b.cfg_scale.fill_(params.cfg_scale)
        b.cfg_interval.fill_(params.cfg_interval)

    def _check_labels(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        C = self.model.config.num_classes
        if labels.numel() == 0:
            raise EngineError("no class labels given")
        bad = [int(x) for x in labels.tolist() if not 0 <= x <= C]
        if bad:
            raise EngineError(f"class {bad[0]} is out of range: this model has classes 0..{C - 1} ({C} = null class)")
        return labels.to(self.device)

    @torch.no_grad()
    def generate(self, labels, *, grid=None, params: SamplingParams = SamplingParams(),
                 generator: torch.Generator | None = None, callback=None, progress: bool = False
                 ) -> torch.Tensor:
        """Generate one image's tokens per label.

        Args:
            labels: class ids, `[n]` (any n: split into chunks of max_batch).
            grid: (h, w) or "HxW". Default: the trained grid. Any size: the state does not grow.
            params: SamplingParams.
            generator: torch.Generator for the noise (CPU or the engine's device). Default: torch's
                global CPU generator.
            callback: called as callback(step, tokens) after every step; tokens `[n, N]` (device).
            progress: show a tqdm bar on stderr.
        Returns:
            int64 tokens `[n, h, w]` on the engine's device.
        """
        labels = self._check_labels(labels)
        h, w = parse_grid(grid, (self.model.config.grid_height, self.model.config.grid_width))
        out = []
        for chunk in labels.split(self.max_batch):
            out.append(self._generate_chunk(chunk, h, w, params, generator, callback, progress))
        return torch.cat(out) if len(out) > 1 else out[0]

    def _generate_chunk(self, labels, h, w, params, generator, callback, progress):
        n, N, b = labels.shape[0], h * w, self.buffers
        if b.ensure_tokens(N):  # a larger grid than ever before: captured steps saw the old buffer
            self.backend.close()
        key = (n, N, params.graph_key())
        step = self._step_fn(n, N, params)
        self.backend.prepare(key, step, lambda: self._reset(labels, params, w))
        self._reset(labels, params, w)
        noise = b.noise_view(n)
        greedy = params.temperature == 0
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=N, unit="tok", desc=f"{n} image{'s' * (n > 1)} {h}x{w}", leave=False)
        for p in range(N):
            if p % NOISE_BLOCK == 0 and not greedy:
                draw_noise(generator, NOISE_BLOCK, n, self.model.config.vocab_size, out=noise)
            self.backend.run(key, step)
            if callback is not None:
                callback(p, b.tokens_view(n, N))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return b.tokens_view(n, N).clone().view(n, h, w)

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: torch.Tensor, labels, *, width: int | None = None,
                              cfg_rows: bool = False) -> torch.Tensor:
        """Drive this backend's step with given tokens; returns the per-step logits `[n, T, V]`
        (fp32), to compare with `LasadGen.forward`. With cfg_rows, the null-class rows run too
        (as in guided generation) and their logits are returned after the conditional ones."""
        labels = self._check_labels(labels)
        n, T = tokens.shape
        rows = 2 * n if cfg_rows else n
        if rows > 2 * self.max_batch:
            raise EngineError(f"{n} sequences exceed max_batch={self.max_batch}")
        width = self.model.config.grid_width if width is None else width
        b, state = self.buffers, self._state(rows)
        forced = tokens.to(self.device)
        if cfg_rows:
            forced = torch.cat([forced, forced])
        decode, ids = self.backend.decode, b.ids[:rows]

        def step():
            decode(ids, state.pos, state)

        params = SamplingParams(cfg_scale=4.0 if cfg_rows else 1.0)
        key = ("forced", rows)
        self.backend.prepare(key, step, lambda: self._reset(labels, params, width))
        self._reset(labels, params, width)
        out = torch.empty(rows, T, self.model.config.vocab_size, device=self.device)
        for p in range(T):
            if p > 0:
                ids.copy_(forced[:, p - 1])
            self.backend.run(key, step)
            state.pos.add_(1)
            out[:, p] = state.logits
        return out
