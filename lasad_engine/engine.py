"""The decode runtime: buffers allocated once, one decode loop, any backend, optional CUDA graph.

A generation of n images on an h×w grid is N = h·w identical steps. Each step reads the input ids,
the position and this step's noise from fixed buffers, updates the recurrent state in place,
samples the next ids on the device and writes them back into the id buffer (both CFG halves)
and into the token buffer. Nothing in a step allocates and nothing syncs with the host, so when
the backend is capturable the whole step (model + sampler) is captured once as a CUDA graph
(`graphs.CudaGraphRunner`) and replayed N times; a backend that graphs its own part (onnxruntime)
runs it, then the sampler and bookkeeping replay as a graph of their own. The same loop drives
teacher forcing (`forced` tokens overwrite the sampled ones), so the loop the parity tests prove
is the loop users run.

Calls on one engine are serialised by a lock: its buffers are shared, so two threads would
otherwise overwrite each other's state. A call that arrives while another runs waits for it, then
runs on the same buffers; its tokens are exactly those it gets alone. A server that wants parallel
requests uses one engine (or pipeline) per worker, or batches requests into one call.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from .backends import Backend, make_backend
from .graphs import CudaGraphRunner
from .model import LasadState
from .params import MAX_BATCH, ClassLabels, EngineError, Grid, SamplingParams, check_memory, parse_grid
from .sampling import draw_noise, sample

# Noise is drawn in blocks of this many steps, per image from that image's own generator (seeded
# from the caller's generator once per request): the tokens of an image depend on the seed and
# the image's place in the request, never on max_batch or the backend.
NOISE_BLOCK = 16


class DecodeBuffers:
    """Every tensor a generation touches, allocated once per (max images, device) and grown only
    when a larger grid is asked for. Views for a request of n images are slices of the same
    storage, so their addresses never change between steps or images.

    state:   LasadState for 2·max_images rows (fp32 [L, R, H, K, V] + pos + width + logits)
    ids:     int64 [R]          the step's input ids (class / null ids at p = 0, tokens after)
    noise:   fp32 [NOISE_BLOCK, max_images, V]
    tokens:  int64 max_images·N, viewed as [n, N]
    cfg_scale: fp32 [] ; cfg_interval: int64 []   (data, so one captured step serves any value)
    """

    def __init__(self, model, max_images: int, device: torch.device):
        cfg = model.config
        self.max_images, self.vocab = max_images, cfg.vocab_size
        self.state = model.allocate_state(2 * max_images, device)
        self.ids = torch.zeros(2 * max_images, dtype=torch.int64, device=device)
        self.noise = torch.ones(NOISE_BLOCK, max_images, cfg.vocab_size, device=device)
        self.tokens = torch.zeros(max_images * cfg.seq_len, dtype=torch.int64, device=device)
        self.cfg_scale = torch.ones((), device=device)
        self.cfg_interval = torch.full((), -1, dtype=torch.int64, device=device)
        self._views: dict[int, LasadState] = {}

    def ensure_tokens(self, n_tokens: int) -> bool:
        """Grow the token buffer for a larger grid; True when it was reallocated."""
        if self.tokens.numel() >= self.max_images * n_tokens:
            return False
        self.tokens = torch.zeros(self.max_images * n_tokens, dtype=torch.int64, device=self.tokens.device)
        return True

    def state_rows(self, rows: int) -> LasadState:
        if rows not in self._views:
            self._views[rows] = self.state.rows(rows)
        return self._views[rows]

    def tokens_view(self, n: int, n_tokens: int) -> torch.Tensor:
        return self.tokens[: n * n_tokens].view(n, n_tokens)

    @property
    def nbytes(self) -> int:
        extra = (self.ids, self.noise, self.tokens, self.cfg_scale, self.cfg_interval)
        return self.state.nbytes + sum(t.numel() * t.element_size() for t in extra)


def estimate_buffer_bytes(model, max_images: int, n_tokens: int) -> int:
    """Bytes DecodeBuffers will hold, computed before allocating anything."""
    cfg = model.config
    rows = 2 * max_images
    return (cfg.state_nbytes(rows) + 4 * rows * cfg.vocab_size + 8 * rows
            + 4 * NOISE_BLOCK * max_images * cfg.vocab_size + 8 * max_images * n_tokens)


class LasadEngine:
    """Token-by-token generation with a constant memory footprint.

    >>> engine = LasadEngine(model, backend="cuda", max_batch=8)
    >>> tokens = engine.generate([207, 360], params=SamplingParams(cfg_scale=4.0),
    ...                          generator=torch.Generator("cuda").manual_seed(0))  # [2, h, w]
    """

    def __init__(self, model, *, backend: str = "torch", device=None, max_batch: int = 8,
                 use_cuda_graph: bool = True, artifact=None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
            raise EngineError(f"max_batch={max_batch!r} must be an integer in 1..{MAX_BATCH}")
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else model.output.weight.device
        check_memory(estimate_buffer_bytes(model, max_batch, model.config.seq_len), self.device,
                     f"max_batch={max_batch}")
        self.backend: Backend = make_backend(backend, model, self.device, artifact)
        self.backend.cuda_graph = use_cuda_graph
        # the whole step as one graph; or, where the backend runs its own part (onnxruntime: its own
        # graphs), the sampler and bookkeeping after it, so a step costs the host two launches
        self.graphs = CudaGraphRunner(self.device) if use_cuda_graph and self.device.type == "cuda" else None
        self.buffers = DecodeBuffers(model, max_batch, self.device)
        self._max_batch = max_batch
        self._lock = threading.RLock()

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def state_nbytes(self) -> int:
        """Bytes of recurrent state held for max_batch images with CFG (2 rows each)."""
        return self.buffers.state.state_bytes

    def close(self) -> None:
        """Free the graphs, the backend's resources and the buffers (waits for a running call)."""
        with self._lock:
            if self.buffers is None:
                return
            if self.graphs is not None:
                self.graphs.close()
            self.backend.close()
            self.buffers = None

    def _check_request(self, n: int, n_tokens: int) -> None:
        """A request that fits: the engine is open, and a larger grid's token buffer and the
        tokens returned fit in memory (checked before the first step)."""
        if self.buffers is None:
            raise EngineError("this engine was closed")
        grow = 8 * self.max_batch * n_tokens if self.buffers.tokens.numel() < self.max_batch * n_tokens else 0
        check_memory(grow + 2 * 8 * n * n_tokens, self.device, f"{n} images of {n_tokens} tokens")

    def _step_parts(self, n: int, n_tokens: int, params: SamplingParams) -> tuple[Callable[[], None], ...]:
        """The decode step for n images as (model step, the rest: sampling and bookkeeping). Both
        read and write only fixed buffers, so either can be captured."""
        b = self.buffers
        rows = 2 * n if params.cfg else n
        state, ids = b.state_rows(rows), b.ids[:rows]
        noise, tokens = b.noise[:, :n], b.tokens_view(n, n_tokens)
        decode = self.backend.decode
        # on a GPU one sampler launch (Triton) that also reads the noise row at pos and writes
        # tokens[:, pos], whatever runs the model step; the torch backend keeps torch's sampler
        # (the reference path end to end)
        sampler = "torch" if self.backend.name == "torch" else None

        def model_step():
            decode(ids, state.pos, state)  # returns state.logits (the step contract)

        def rest():
            pos = state.pos
            active = (b.cfg_interval < 0) | (pos[0] <= b.cfg_interval)
            sample(state.logits, noise, cfg=params.cfg, cfg_scale=b.cfg_scale,
                   temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                   cfg_active=active, out=ids, pos=pos, tokens=tokens, backend=sampler)
            pos.add_(1)
        return model_step, rest

    def _reset(self, labels: torch.Tensor, params: SamplingParams, width: int) -> None:
        b, n = self.buffers, labels.shape[0]
        b.state.reset(width)
        self.backend.reset()
        b.ids[:n].copy_(labels)
        if params.cfg:
            b.ids[n:2 * n].fill_(self.model.config.null_class)
        b.cfg_scale.fill_(params.cfg_scale)
        b.cfg_interval.fill_(params.cfg_interval)

    def _image_generators(self, generator: torch.Generator | None, n: int) -> list[torch.Generator]:
        """One generator per image, seeded from the caller's (torch's global CPU one if None)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise EngineError(f"generator={type(generator).__name__}: pass a torch.Generator (or None)")
        device = generator.device if generator is not None else torch.device("cpu")
        if device.type not in ("cpu", self.device.type):
            raise EngineError(f"generator on {device}: use a CPU generator or one on {self.device}")
        seeds = torch.randint(0, 2**62, (n,), generator=generator, device=device).tolist()
        return [torch.Generator(device).manual_seed(s) for s in seeds]

    def decode(self, labels: ClassLabels, grid: Grid, params: SamplingParams, *,
               generators: list[torch.Generator] | None = None, forced: torch.Tensor | None = None,
               on_step: Callable[[int, LasadState, torch.Tensor], None] | None = None,
               progress: bool | dict = False) -> torch.Tensor:
        """The decode loop for at most max_batch images (validated inputs).

        Args:
            labels: ClassLabels of n ≤ max_batch images.
            grid: the token grid; N = h·w steps (or forced.shape[1]).
            params: SamplingParams (greedy needs no generators).
            generators: one per image, for the noise (sampling only).
            forced: int64 `[n, T]` tokens fed instead of the sampled ones (teacher forcing).
            on_step: called as on_step(p, state, tokens) after every step.
            progress: a tqdm bar on stderr (a dict: tqdm keywords, e.g. file=, desc=).
        Returns:
            int64 tokens `[n, N]`: a view of the engine's token buffer (copy it to keep it).
        """
        with self._lock:
            return self._decode(labels, grid, params, generators, forced, on_step, progress)

    def _decode(self, labels, grid, params, generators, forced, on_step, progress) -> torch.Tensor:
        ids_in, n = labels.ids.to(self.device), len(labels)
        if n > self.max_batch:
            raise EngineError(f"{n} images exceed max_batch={self.max_batch}")
        N = grid.tokens
        T = N if forced is None else forced.shape[1]
        self._check_request(n, max(N, T))
        b = self.buffers
        if b.ensure_tokens(max(N, T)) and self.graphs is not None:
            self.graphs.close()  # captured steps saw the old token buffer
        N = max(N, T)
        rows = 2 * n if params.cfg else n
        model_step, rest = self._step_parts(n, N, params)

        def step():
            model_step()
            rest()
        reset = lambda: self._reset(ids_in, params, grid.w)  # noqa: E731
        key = (n, N, params.graph_key())
        run = step
        if self.graphs is not None and self.backend.capturable:
            self.graphs.prepare(key, step, reset)  # the whole step, one replay
            run = lambda: self.graphs.replay(key)  # noqa: E731
        elif self.graphs is not None:  # a backend that runs (and graphs) its own part: the rest is ours
            self.graphs.prepare(key, rest, reset)

            def run():
                model_step()
                self.graphs.replay(key)
        reset()
        tokens, state, ids = b.tokens_view(n, N), b.state_rows(rows), b.ids[:rows]
        sampling = params.temperature != 0 and forced is None
        bar = _progress(progress, T, f"{n} image{'s' * (n > 1)} {grid.h}x{grid.w}")
        for p in range(T):
            if sampling and p % NOISE_BLOCK == 0:
                for i, g in enumerate(generators):
                    draw_noise(g, NOISE_BLOCK, 1, self.buffers.vocab, out=b.noise[:, i:i + 1])
            run()
            if forced is not None:
                f = forced[:, p]
                tokens[:, p].copy_(f)
                ids.copy_(torch.cat([f, f]) if params.cfg else f)
            if on_step is not None:
                on_step(p, self.backend.current(state), tokens)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return tokens[:, :T]

    @torch.no_grad()
    def generate(self, labels, *, grid=None, params: SamplingParams = SamplingParams(),
                 generator: torch.Generator | None = None, callback=None, progress: bool | dict = False
                 ) -> torch.Tensor:
        """Generate one image's tokens per label.

        Args:
            labels: class ids `[n]` (a list, tensor or ClassLabels; any n: split into chunks of
                max_batch; the tokens do not depend on the chunking).
            grid: (h, w), "HxW" or a Grid. Default: the trained grid. Any size: the state does not grow.
            params: SamplingParams.
            generator: torch.Generator for the noise (CPU or the engine's device). Default: torch's
                global CPU generator.
            callback: called as callback(step, tokens) after every step; tokens `[n_chunk, N]`.
            progress: show a tqdm bar on stderr (a dict: tqdm keywords, e.g. file=, desc=).
        Returns:
            int64 tokens `[n, h, w]` on the engine's device.
        """
        cfg = self.model.config
        labels = ClassLabels.of(labels, cfg.num_classes)
        grid = parse_grid(grid, (cfg.grid_height, cfg.grid_width))
        on_step = None if callback is None else (lambda p, state, tokens: callback(p, tokens))
        if not isinstance(params, SamplingParams):
            raise EngineError(f"params={type(params).__name__}: pass a SamplingParams")
        if callback is not None and not callable(callback):
            raise EngineError(f"callback={type(callback).__name__} is not callable")
        with self._lock:
            self._check_request(len(labels), grid.tokens)
            gens = self._image_generators(generator, len(labels)) if params.temperature != 0 else None
            out = []
            for start in range(0, len(labels), self.max_batch):
                chunk = labels[start:start + self.max_batch]
                g = None if gens is None else gens[start:start + self.max_batch]
                out.append(self.decode(chunk, grid, params, generators=g, on_step=on_step,
                                       progress=progress).clone().view(-1, grid.h, grid.w))
        return torch.cat(out) if len(out) > 1 else out[0]

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: torch.Tensor, labels, *, width: int | None = None,
                              cfg_rows: bool = False) -> torch.Tensor:
        """The decode loop with the given tokens forced; returns the per-step logits `[rows, T, V]`
        (fp32), to compare with `LasadGen.forward`. With cfg_rows, the null-class rows run too
        (as in guided generation) and their logits follow the conditional ones."""
        cfg = self.model.config
        labels = ClassLabels.of(labels, cfg.num_classes, allow_null=True)
        n, T = tokens.shape
        if n > self.max_batch:
            raise EngineError(f"{n} sequences exceed max_batch={self.max_batch}")
        width = cfg.grid_width if width is None else width
        params = SamplingParams(cfg_scale=2.0 if cfg_rows else 1.0, temperature=0.0, top_k=0)
        rows = 2 * n if cfg_rows else n
        check_memory(4 * rows * T * cfg.vocab_size, self.device, f"the logits of {rows} rows x {T} steps",
                     "use fewer images or steps")
        out = torch.empty(rows, T, cfg.vocab_size, device=self.device)

        def keep(p, state, _tokens):
            out[:, p] = state.logits

        with self._lock:
            self.decode(labels, Grid(max(1, -(-T // width)), width), params, forced=tokens.to(self.device),
                        on_step=keep)
        return out


def _progress(on: bool | dict, total: int, desc: str):
    """A tqdm bar over the tokens when `on` (a dict: tqdm keywords over the defaults), else None."""
    if not on:
        return None
    from tqdm import tqdm
    return tqdm(**{"total": total, "unit": "tok", "desc": desc, "leave": False, **(on if isinstance(on, dict) else {})})
