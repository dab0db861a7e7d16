"""The decode engine: a model, a backend and the slot scheduler that runs them.

A generation of an image on an h×w grid is N = h·w identical steps. The engine owns one decode
loop (`scheduler.SlotScheduler`) over a pool of image slots: every call — `generate` from any
thread, `agenerate` from asyncio, `teacher_forced_logits`, the server — submits a request and
waits for it; the loop admits its images into free slots at the next step and advances every
image in flight by one token per step, so concurrent callers share the batch instead of waiting
on each other. Each call still gets exactly its own images: an image's tokens depend on its
request (labels, settings, seed, its index) and never on what else runs.

Each step reads its inputs from fixed buffers, updates the state slots in place, samples the next
ids on the device and writes them back into the id buffer and the token rows. Nothing in a step
allocates and nothing syncs with the host, so when the backend is capturable the whole step
(model + sampler) is captured once per bucket as a CUDA graph (`graphs.CudaGraphRunner`) and
replayed; a backend that graphs its own part (onnxruntime) runs it, then the sampler and
bookkeeping replay as a graph of their own. The same loop drives teacher forcing (forced tokens
overwrite the sampled ones), so the loop the parity tests prove is the loop users run.
"""

from __future__ import annotations

import torch

from .backends import Backend, make_backend
from .model import LasadState
from .params import MAX_BATCH, ClassLabels, EngineError, Grid, SamplingParams, check_memory, parse_grid, with_index
from .scheduler import POLICIES, QueueFull, Request, RequestFailed, SlotScheduler

__all__ = ["LasadEngine", "SamplingParams", "EngineError", "QueueFull", "RequestFailed", "parse_grid",
           "image_seeds", "POLICIES"]


def estimate_buffer_bytes(model, max_images: int, n_tokens: int) -> int:
    """Bytes the scheduler's buffers will hold (state pool, logits, tables, token rows), computed
    before allocating anything."""
    cfg = model.config
    rows = 1 << max(0, (2 * max_images - 1).bit_length())
    return (cfg.state_nbytes(rows + 1) + 2 * 4 * rows * cfg.vocab_size + 7 * 8 * rows
            + 9 * 8 * max_images + 8 * (max_images + 1) * n_tokens)


def image_seeds(generator: torch.Generator | None, n: int, device: torch.device | None = None) -> list[int]:
    """One noise seed per image, drawn from the caller's generator (torch's global CPU one if
    None): the tokens of an image depend on its request's generator and its index only."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise EngineError(f"generator={type(generator).__name__}: pass a torch.Generator (or None)")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if device is not None and gen_device.type not in ("cpu", device.type):
        raise EngineError(f"generator on {gen_device}: use a CPU generator or one on {device}")
    return torch.randint(0, 2**62, (n,), generator=generator, device=gen_device).tolist()


class LasadEngine:
    """Token-by-token generation with a constant memory footprint, for any number of callers.

    >>> engine = LasadEngine(model, backend="cuda", max_batch=64)
    >>> tokens = engine.generate([207, 360], params=SamplingParams(cfg_scale=4.0),
    ...                          generator=torch.Generator().manual_seed(0))  # [2, h, w]

    Args:
        model: a LasadGen (or a model with `allocate_state` / `step`).
        backend: torch | cuda | onnxruntime | tensorrt.
        device: default: the model's.
        max_batch: image slots, i.e. images in flight at once (2 state rows each).
        use_cuda_graph: capture each bucket's step as a CUDA graph (CUDA only).
        artifact: the exported step an onnxruntime / tensorrt backend runs.
        max_queue: images that may wait beyond the free slots; more raise QueueFull (None: no bound).
        policy: "continuous" (the default), "static" or "lock" (scheduler.SlotScheduler).
        batch_wait: seconds the "static" policy waits for a full batch.
        threads: torch CPU threads while the loop runs (None: unchanged).
        reproducible: every step runs every slot (scheduler.SlotScheduler): byte-identical tokens
            under any load on a GPU too, at the cost of a lone request's latency.
        step_kernel: "ops" (one kernel per fused op) or "persistent" (steps of 1-2 images as one
            persistent kernel; backend 'cuda' only: backends/cuda.py).
    """

    def __init__(self, model, *, backend: str = "torch", device=None, max_batch: int = 8,
                 use_cuda_graph: bool = True, artifact=None, max_queue: int | None = None,
                 policy: str = "continuous", batch_wait: float = 0.0, threads: int | None = None,
                 reproducible: bool = False, step_kernel: str = "ops"):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
            raise EngineError(f"max_batch={max_batch!r} must be an integer in 1..{MAX_BATCH}")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
            raise EngineError(f"max_queue={max_queue!r} must be a non-negative integer (or None: no bound)")
        self.model = model.eval()
        self.device = with_index(torch.device(device) if device is not None else model.output.weight.device)
        check_memory(estimate_buffer_bytes(model, max_batch, model.config.seq_len), self.device,
                     f"max_batch={max_batch}")
        self.backend: Backend = make_backend(backend, model, self.device, artifact)
        self.backend.cuda_graph = use_cuda_graph
        if step_kernel != "ops":
            if not hasattr(self.backend, "step_kernel"):
                raise EngineError(f"step_kernel={step_kernel!r} needs backend 'cuda' (this is {self.backend.name!r})")
            self.backend.step_kernel = step_kernel
        self.scheduler = SlotScheduler(model, self.backend, self.device, max_batch, use_cuda_graph=use_cuda_graph,
                                       max_queue=max_queue, policy=policy, batch_wait=batch_wait, threads=threads,
                                       reproducible=reproducible)
        self._max_batch = max_batch
        self.closed = False

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def state_nbytes(self) -> int:
        """Bytes of recurrent state held for max_batch images with CFG (2 rows each; the pool
        also holds the rows of its power-of-two buckets and a dummy row, `buffers.nbytes`)."""
        state = self.scheduler.state
        return state.state_bytes * 2 * self.max_batch // state.batch

    @property
    def buffers(self):
        """The scheduler's device buffers (`.nbytes`: what they hold besides the weights), None
        once closed."""
        return None if self.closed else _Buffers(self.scheduler)

    def close(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the decode loop (drain: finish the images in flight first, admitting none),
        free the graphs, the backend's resources and the buffers."""
        if self.closed:
            return
        self.closed = True
        self.scheduler.close(drain=drain, timeout=timeout)
        self.backend.close()

    def warmup(self, max_images: int | None = None) -> list:
        """Capture the CUDA graphs of every bucket up to `max_images` images before traffic."""
        return self.scheduler.warmup(None if max_images is None else 2 * max_images)

    # ----------------------------------------------------------------------------- requests

    def submit(self, labels, *, grid=None, params: SamplingParams = SamplingParams(),
               generator: torch.Generator | None = None, seeds: list[int] | None = None,
               callback=None, progress: bool | dict = False, on_row=None, row_tokens: bool = False,
               forced: torch.Tensor | None = None, on_step=None) -> Request:
        """Queue one request; returns at once with a `scheduler.Request` (a future: `.result()`,
        `.cancel()`, `.wrap()` for asyncio). Arguments as `generate`, plus `seeds` (one per image,
        instead of drawing them from `generator`), `on_row(image, row, tokens, event)` called
        in the loop's thread when an image row is complete (with `row_tokens`, the row's tokens
        `[w]` on the device, ready once `event` is; else None, None), `forced` tokens `[n, T]`
        (teacher forcing) and `on_step(request, images)`."""
        if self.closed:
            raise EngineError("this engine was closed")
        cfg = self.model.config
        labels = ClassLabels.of(labels, cfg.num_classes)  # teacher forcing passes its own (null allowed)
        grid = parse_grid(grid, (cfg.grid_height, cfg.grid_width))
        if not isinstance(params, SamplingParams):
            raise EngineError(f"params={type(params).__name__}: pass a SamplingParams")
        if callback is not None and not callable(callback):
            raise EngineError(f"callback={type(callback).__name__} is not callable")
        n = len(labels)
        N = grid.tokens if forced is None else forced.shape[1]
        check_memory(2 * 8 * n * N, self.device, f"{n} images of {N} tokens")
        if seeds is None:
            seeds = image_seeds(generator, n, self.device) if params.temperature != 0 else [0] * n
        elif len(seeds) != n:
            raise EngineError(f"{len(seeds)} seeds for {n} images")
        req = Request(labels.tolist(), grid, params, list(seeds), forced=forced, on_row=on_row, row_tokens=row_tokens,
                      progress=_progress(progress, n * N, f"{n} image{'s' * (n > 1)} {grid.h}x{grid.w}"))
        if callback is not None or on_step is not None:
            req.on_step = self._step_hook(callback, on_step, N)
        return self.scheduler.submit(req)

    def _step_hook(self, callback, on_step, N: int):
        scheduler, cached = self.scheduler, {}

        def hook(req, images):
            if on_step is not None:
                on_step(req, images)
            if callback is not None:  # images not (or no longer) in a slot: the dummy token row
                tables = scheduler.tables   # at this step: the token rows may have grown since submit
                rows = tables.tokens.view(-1, tables.n_tokens)
                dummy = rows.shape[0] - 1
                key = tuple(img.slot if img.slot >= 0 else dummy for img in req.images)
                if cached.get("key") != key:   # a host-to-device copy (a sync) only when the slots change
                    cached["key"], cached["slots"] = key, torch.tensor(key, device=rows.device)
                callback(req.steps_done - 1, rows.index_select(0, cached["slots"])[:, :N])
        return hook

    def wait(self, req: Request, timeout: float | None = None) -> torch.Tensor:
        """The tokens `[n, N]` of a submitted request, ready on the caller's current stream; a
        KeyboardInterrupt (Ctrl-C) while waiting cancels the request."""
        try:
            tokens, event = req.result(timeout)
        except BaseException:
            req.cancel()
            raise
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            tokens.record_stream(stream)
        if bool((tokens < 0).any()):
            img = int((tokens < 0).any(1).nonzero()[0])
            raise RequestFailed(f"image {img} of the request had non-finite logits (NaN); its tokens are void")
        return tokens

    @torch.no_grad()
    def generate(self, labels, *, grid=None, params: SamplingParams = SamplingParams(),
                 generator: torch.Generator | None = None, callback=None, progress: bool | dict = False
                 ) -> torch.Tensor:
        """Generate one image's tokens per label; safe to call from many threads at once (the
        calls share the decode loop's batch).

        Args:
            labels: class ids `[n]` (a list, tensor or ClassLabels; any n: images beyond the free
                slots wait for them; the tokens do not depend on it).
            grid: (h, w), "HxW" or a Grid. Default: the trained grid. Any size: the state does not grow.
            params: SamplingParams.
            generator: torch.Generator for the images' seeds (CPU or the engine's device).
                Default: torch's global CPU generator.
            callback: called as callback(step, tokens) after every step of the request, in the
                decode loop's thread; tokens `[n, N]` on the device.
            progress: show a tqdm bar on stderr (a dict: tqdm keywords, e.g. file=, desc=).
        Returns:
            int64 tokens `[n, h, w]` on the engine's device.
        """
        grid_ = parse_grid(grid, (self.model.config.grid_height, self.model.config.grid_width))
        req = self.submit(labels, grid=grid_, params=params, generator=generator, callback=callback,
                          progress=progress)
        return self.wait(req).view(-1, grid_.h, grid_.w)

    async def agenerate(self, labels, **kw) -> torch.Tensor:
        """`generate` for asyncio: `await engine.agenerate([207], params=..., generator=...)`; a
        cancelled task cancels its request."""
        cfg = self.model.config
        grid = parse_grid(kw.pop("grid", None), (cfg.grid_height, cfg.grid_width))
        req = self.submit(labels, grid=grid, **kw)
        try:
            await req.wrap()
        except BaseException:
            req.cancel()
            raise
        return self.wait(req).view(-1, grid.h, grid.w)

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: torch.Tensor, labels, *, width: int | None = None,
                              cfg_rows: bool = False) -> torch.Tensor:
        """The decode loop with the given tokens forced; returns the per-step logits `[rows, T, V]`
        (fp32), to compare with `LasadGen.forward`. With cfg_rows, the null-class rows run too
        (as in guided generation) and their logits follow the conditional ones."""
        cfg = self.model.config
        labels = ClassLabels.of(labels, cfg.num_classes, allow_null=True)
        n, T = tokens.shape
        width = cfg.grid_width if width is None else width
        params = SamplingParams(cfg_scale=2.0 if cfg_rows else 1.0, temperature=0.0, top_k=0)
        rows = 2 * n if cfg_rows else n
        check_memory(4 * rows * T * cfg.vocab_size, self.device, f"the logits of {rows} rows x {T} steps",
                     "use fewer images or steps")
        out = torch.empty(rows, T, cfg.vocab_size, device=self.device)
        logits = self.scheduler.tables.logits
        forced = tokens.to(self.device)

        def keep(req, images):
            for img in images:
                p = img.pos - 1
                for h, r in enumerate(self.scheduler._rows_of(img)):
                    out[img.index + h * n, p] = logits[r]

        req = self.submit(labels, grid=Grid(max(1, -(-T // width)), width), params=params, forced=forced,
                          on_step=keep)
        self.wait(req)
        return out

    def stats(self) -> dict:
        """The loop's counters: steps, images finished, rejected requests, seconds in steps."""
        return dict(self.scheduler.stats, active=len(self.scheduler.active), waiting=len(self.scheduler.waiting))


class _Buffers:
    """What `LasadEngine.buffers` reports."""

    def __init__(self, scheduler: SlotScheduler):
        self.state: LasadState = scheduler.state
        self.tables = scheduler.tables

    @property
    def nbytes(self) -> int:
        s = self.state
        return s.nbytes + self.tables.nbytes


def _progress(on: bool | dict, total: int, desc: str):
    """A tqdm bar over the tokens when `on` (a dict: tqdm keywords over the defaults), else None."""
    if not on:
        return None
    from tqdm import tqdm
    return tqdm(**{"total": total, "unit": "tok", "desc": desc, "leave": False, **(on if isinstance(on, dict) else {})})

