"""The slot scheduler: one decode loop that advances every image in flight by one token per step.

Every image owns a fixed slice of one preallocated state pool (its *slots*: 2 state rows with
classifier-free guidance, 1 without), so admission is a count of free slots and an image joins or
leaves the running batch without moving anyone else's state (vLLM's `state_batch_indices` /
`pad_slot_id`, docs/design.md "The slot scheduler"). Each step:

1. requests that wait are admitted into free slots (their slots zeroed, class ids at p = 0); a
   request's images may start at different steps, each keeps its own position;
2. the step's row table (per row: slot, position, grid width; per image: rows, guidance scale and
   interval, temperature, top-k, top-p, seed, where its tokens go) is rewritten, only when the set
   of images changed, into fixed device buffers;
3. the model step runs on the rows of a *bucket* (row and image counts rounded up to a power of
   two; padding rows point at a reserved dummy slot, padding images write nothing) — on a GPU one
   CUDA graph per bucket, captured once, replayed whatever images fill it;
4. the sampler (sampling.sample_images) picks each image's token from its own rows with noise that
   is a function of its seed and position only, writes it into both its rows and its token row;
   every position advances by one;
5. an image whose last token was written leaves: its tokens are copied out on the loop's stream
   (no host sync inside the loop) and its slots are free for the next step.

So the tokens of an image depend on its request (labels, settings, seed, its index in the
request) and never on what else runs: every op is row-wise, the bucket shapes are fixed, and the
noise is counter-based. On the CPU the row buckets start at 4 rows: MKL's GEMM rounds a row
differently below 4 rows (measured, docs/design.md).

Clients never step the model: `LasadEngine.generate`, its async form, teacher forcing and
`lasad-serve` submit requests and wait on them (`Request`), as vLLM's offline `LLM` and its
server share one engine loop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from .backends import Backend
from .graphs import CudaGraphRunner
from .model import LasadState
from .params import EngineError, Grid, SamplingParams, is_out_of_memory
from .sampling import SamplerTable, sample_images

POLICIES = ("continuous", "static", "lock")
IDLE_EXIT_S = 2.0  # an idle loop thread leaves after this long (a new request starts another)
MAX_AHEAD = 3  # CUDA: steps the loop may have queued on the device beyond the one running
CPU_MIN_ROWS = 4  # MKL rounds a row of a GEMM with fewer rows differently (measured, torch 2.13)


class QueueFull(EngineError):
    """The scheduler's queue is full: nothing of the request was admitted (HTTP 429)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(EngineError):
    """The request failed inside the loop (e.g. non-finite logits); nothing else was disturbed."""


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


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Clock:
    """The decode loop's step counter, shared with its images (an image's position is the
    steps run since it joined: no per-image work on a step where nothing happens to it)."""

    __slots__ = ("step",)

    def __init__(self):
        self.step = 0


@dataclass(eq=False)
class Image:
    """One image of a request: its slots, its position, where its tokens go."""

    request: "Request"
    index: int                 # in its request
    label: int
    seed: int
    steps: int                 # positions to run (N = h·w, or the forced tokens' length)
    rows: tuple = ()           # its state slots (cond, uncond) or (cond,)
    slot: int = -1             # its token row
    started: int = -1          # the loop step it joined at
    left: int = -1             # the loop step it left at (finished or cancelled)
    clock: _Clock | None = None

    @property
    def pos(self) -> int:
        """The position of its next step (0 before it joins; where it stopped once it left)."""
        if self.started < 0:
            return 0
        return (self.left if self.left >= 0 else self.clock.step) - self.started

    @property
    def watched(self) -> bool:
        """Whether its request needs the loop every step: forced tokens, a per-step hook or a
        progress bar (rows streamed alone need it once per image row)."""
        r = self.request
        return r.forced is not None or r.on_step is not None or r.progress is not None


@dataclass(eq=False)
class Request:
    """A submitted generation: a future of its tokens `[n, N]` (on the engine's device).

    `result(timeout)` waits for it (CancelledError if cancelled, RequestFailed / EngineError on
    failure); `cancel()` frees its slots at the next step; `wrap()` gives an asyncio future.
    """

    labels: list
    grid: Grid
    params: SamplingParams
    seeds: list
    forced: torch.Tensor | None = None
    on_step: Callable | None = None        # (request, images that advanced) after each of its steps
    on_row: Callable | None = None         # (image index, grid row, tokens [w] or None, event) per finished row
    row_tokens: bool = False               # on_row gets the row's tokens (a device copy each row)
    progress: object = None                # a tqdm bar
    priority: int = 0
    future: Future = field(default_factory=Future)
    images: list = field(default_factory=list)
    tokens: list = field(default_factory=list)   # per image: a device tensor [N], filled when it finishes
    submitted: float = field(default_factory=time.perf_counter)
    first_step: float | None = None
    cancelled: bool = False
    steps_done: int = 0
    finished_step: int = -1      # the loop step after which its last image left
    ready: object = None         # CUDA: an event on the submitting stream; the loop waits for it before
                                 # its first use of the caller's tensors (forced tokens, an on_step's outputs)

    @property
    def n(self) -> int:
        return len(self.labels)

    def cancel(self) -> None:
        """Stop generating: the request's images leave at the next step; waiters get CancelledError."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> torch.Tensor:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def wrap(self):
        import asyncio
        return asyncio.wrap_future(self.future)


class Tables:
    """The fixed device buffers a step reads (row table, image table, tokens) and their host
    mirrors. Rows: R_max = the pool's state rows; images: B_max = the image slots."""

    def __init__(self, rows: int, images: int, n_tokens: int, vocab: int, device: torch.device):
        self.device, self.rows, self.images = device, rows, images
        i64 = dict(dtype=torch.int64, device=device)
        # rows: ids (step input, written by the sampler), pos, width, slot; ids_prev for re-ordering
        self.ids = torch.zeros(rows, **i64)
        self.ids_prev = torch.zeros(rows, **i64)
        self.row_int = torch.zeros(5, rows, **i64)      # pos, width, slot, src (old row or -1), new id
        self.pos, self.width, self.slot, self.src, self.new_ids = self.row_int.unbind(0)
        self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        # images: int64 cond_row, uncond_row, cfg_interval, top_k, seed, tok_off; fp32 scale, temperature, top_p
        self.img_int = torch.zeros(6, images, **i64)
        self.img_f32 = torch.zeros(3, images, dtype=torch.float32, device=device)
        self.tokens = torch.zeros((images + 1) * n_tokens, **i64)  # the last row: a dummy
        self.n_tokens = n_tokens
        pin = device.type == "cuda"
        self.host_row = [torch.zeros(5, rows, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.host_img_int = [torch.zeros(6, images, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.host_img_f32 = [torch.zeros(3, images, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self.copied = [None, None]   # CUDA events: the host buffers' last copies are done
        self.turn = 0
        self.waited = 0.0            # seconds the host waited for those copies (this step)

    def step_rows(self, R: int, indexed: bool) -> "_Rows":
        """The first R rows as a backend's `decode` takes them (views of these buffers; the state
        slots only for an `indexed` backend, else row r runs on state row r)."""
        return _Rows(self.ids[:R], self.pos[:R], self.width[:R], self.slot[:R] if indexed else None, self.logits[:R])

    def table(self, n: int, k_max: int, use_p: bool) -> SamplerTable:
        ii, ff = self.img_int[:, :n], self.img_f32[:, :n]
        return SamplerTable(cond_row=ii[0], uncond_row=ii[1], cfg_scale=ff[0], cfg_interval=ii[2],
                            temperature=ff[1], top_k=ii[3], top_p=ff[2], seed=ii[4], tok_off=ii[5],
                            k_max=k_max, use_p=use_p)

    def host(self):
        """The next pair of host buffers (pinned on CUDA), once their previous copy is done."""
        t = self.turn
        self.turn ^= 1
        if self.copied[t] is not None:
            t0 = time.perf_counter()
            self.copied[t].synchronize()
            self.waited += time.perf_counter() - t0
        return self.host_row[t], self.host_img_int[t], self.host_img_f32[t], t

    def upload(self, row, img_int, img_f32, t) -> None:
        """Whole tables (a few KB), contiguous: pinned host to device without a sync."""
        nb = self.device.type == "cuda"
        self.row_int.copy_(row, non_blocking=nb)
        self.img_int.copy_(img_int, non_blocking=nb)
        self.img_f32.copy_(img_f32, non_blocking=nb)
        if nb:
            ev = torch.cuda.Event()
            ev.record()
            self.copied[t] = ev

    @property
    def nbytes(self) -> int:
        ts = (self.ids, self.ids_prev, self.row_int, self.logits, self.img_int, self.img_f32, self.tokens)
        return sum(t.numel() * t.element_size() for t in ts)


class SlotScheduler:
    """The decode loop over a pool of `max_images` image slots (2 state rows each) on one backend.

    Args:
        model: LasadGen (or a model with its `allocate_state` / `step`).
        backend: the Backend that runs the model step.
        device: where the buffers live.
        max_images: image slots (images in flight at once).
        use_cuda_graph: capture each bucket's step as a CUDA graph (CUDA only).
        max_queue: images that may wait beyond the slots before `submit` raises QueueFull.
        policy: "continuous" (join at any step), "static" (a batch starts when the previous one has
            finished, after waiting up to `batch_wait` s for a full batch) or "lock" (one request at
            a time): the last two are the baselines serve_bench compares against.
        threads: torch CPU threads while the loop runs (None: unchanged).
        reproducible: every step runs the full bucket (all slots' rows and images), whatever runs:
            every image then sees the same kernels at every step, so its tokens are byte-identical
            under any load on any device, at the cost of a lone image's latency. Without it the
            buckets follow the load; on the CPU they are still invariant (their row counts are
            multiples of 4), on a GPU a bucket of another size may pick another GEMM kernel
            (docs/serving.md, "Reproducibility").
    """

    def __init__(self, model, backend: Backend, device: torch.device, max_images: int, *,
                 use_cuda_graph: bool = True, max_queue: int | None = None, policy: str = "continuous",
                 batch_wait: float = 0.0, threads: int | None = None, reproducible: bool = False):
        if policy not in POLICIES:
            raise EngineError(f"policy={policy!r} is not one of {', '.join(POLICIES)}")
        cfg = model.config
        self.model, self.backend, self.device = model, backend, device
        self.max_images, self.policy, self.batch_wait, self.threads = max_images, policy, batch_wait, threads
        self.max_queue = max_queue
        self.indexed = getattr(backend, "indexed", True) and getattr(model, "supports_slots", True)
        self.min_rows = CPU_MIN_ROWS if device.type == "cpu" else 1
        self.state_rows = 2 * max_images
        self.rows_max = max(_pow2(self.state_rows), self.min_rows)
        fixed = getattr(backend, "fixed_rows", None)  # an export with its rows fixed (--rows): every step has them
        if fixed is not None:
            if self.state_rows > fixed:
                raise EngineError(f"{getattr(backend, 'path', 'the exported step')} was exported for {fixed} rows "
                                  f"(--rows): at most {fixed // 2} images at once (max_batch), or export it without --rows")
            self.rows_max = self.min_rows = fixed
        self.images_max = _pow2(max_images)
        self.reproducible = reproducible
        # the pool: state rows 0 .. rows_max-1 (images' slots, and padding rows of a backend that
        # is not indexed), then a dummy row that padding rows step on and that absorbs zeroing
        self.state: LasadState = model.allocate_state(self.rows_max + 1, device)
        self.dummy = self.state.batch - 1
        self.tables = Tables(self.rows_max, self.images_max, cfg.seq_len, cfg.vocab_size, device)
        self.sampler_backend = "torch" if backend.name == "torch" else None
        # the torch backend is the eager reference end to end: no graphs
        self.graphs = (CudaGraphRunner(device) if use_cuda_graph and device.type == "cuda" and self.sampler_backend is None
                       else None)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.free_rows = list(range(self.state_rows))
        self.free_slots = list(range(max_images))
        self.waiting: deque[Image] = deque()
        self.active: list[Image] = []
        self.row_images: list = []        # per row of the current table: (image, half) or None
        self.bucket = (0, 0)
        self.changed = True
        self.cv = threading.Condition()
        self.thread: threading.Thread | None = None
        self.looping = False  # a loop thread is running and has not decided to leave (under cv)
        self.stopping = False
        self.draining = False
        self.error: BaseException | None = None
        self.clock = _Clock()
        self.joined: list[Image] = []     # admitted since the last step: their requests' first step
        self.watched: list[Image] = []    # active images with per-step work (Image.watched)
        self.ends: dict[int, list[Image]] = {}  # loop step -> the images that finish with it
        self.row_ends: dict[int, list[Image]] = {}  # loop step -> unwatched images that finish a row
        # the steps issued but not yet run by the device: the loop runs at most MAX_AHEAD steps
        # ahead of the GPU and waits (without the GIL) on the oldest one's event
        self.ahead: deque = deque()
        self.stats = {"steps": 0, "images": 0, "rejected": 0, "step_seconds": 0.0, "host_seconds": 0.0,
                      "rows": 0, "images_stepped": 0}
        self.k_max, self.use_p = 0, False
        self.batch_opened: float | None = None
        self._fns: dict = {}  # (rows, images, k_max, use_p) -> the step's closures
        self.grow_tokens = 0  # the longest image asked for beyond the token rows (they grow when idle)

    # ----------------------------------------------------------------------------- clients

    def submit(self, request: Request) -> Request:
        """Queue a request (validated values); it joins at the next step its slots are free."""
        need = request.n
        with self.cv:
            if self.stopping or self.draining:
                raise EngineError("this engine is shutting down and admits no new request")
            if self.error is not None:
                raise EngineError(f"the decode loop stopped: {self.error}")
            if self.max_queue is not None and len(self.waiting) + need > self.max_queue + self._free_images():
                self.stats["rejected"] += 1
                raise QueueFull(f"the queue is full ({len(self.waiting)} images wait, {len(self.active)} run); "
                                f"retry in {self.retry_after():.1f} s", self.retry_after())
            self._check_tokens(request)
            if self.device.type == "cuda":
                request.ready = torch.cuda.Event()
                request.ready.record(torch.cuda.current_stream(self.device))
            N = request.forced.shape[1] if request.forced is not None else request.grid.tokens
            for i, (label, seed) in enumerate(zip(request.labels, request.seeds)):
                img = Image(request, i, label, seed, N)
                request.images.append(img)
                self.waiting.append(img)
            request.tokens = [None] * request.n
            self._ensure_thread()
            self.cv.notify_all()
        return request

    @property
    def step_count(self) -> int:
        return self.clock.step

    def _free_images(self) -> int:
        return len(self.free_slots)

    def retry_after(self) -> float:
        """Seconds until about one request's worth of images could be admitted (steps/s measured)."""
        rate = self.stats["steps"] / self.stats["step_seconds"] if self.stats["step_seconds"] else 0.0
        if not self.active or rate == 0:
            return 1.0
        left = min(img.steps - img.pos for img in self.active)
        return max(0.1, round(left / rate, 1))

    def _check_tokens(self, request: Request) -> None:
        N = request.forced.shape[1] if request.forced is not None else request.grid.tokens
        if N > self.tables.n_tokens:
            self.grow_tokens = max(self.grow_tokens, N)

    # ----------------------------------------------------------------------------- the loop

    def _ensure_thread(self) -> None:
        """(holding cv) A loop thread that will see the new work: the running one, or a new one
        when the last one left after idling (so an engine nobody holds can be freed)."""
        if not self.looping:
            self.looping = True
            self.thread = threading.Thread(target=self._run, name="lasad-decode-loop", daemon=True)
            self.thread.start()

    def close(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the loop. drain: finish the images in flight (admitting nothing new) first, for
        at most `timeout` s; whatever still runs or waits for a slot then fails ("closed")."""
        with self.cv:
            self.draining = True
            if not drain:
                self.stopping = True
            self.cv.notify_all()
        thread = self.thread
        if thread is not None and drain:
            deadline = None if timeout is None else time.monotonic() + timeout
            with self.cv:
                while self.active and self.looping:  # what waits for a slot is cancelled below
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self.cv.wait(timeout=left if left is not None else 0.5)
                self.stopping = True
                self.cv.notify_all()
        if thread is not None:
            thread.join()
        if self.graphs is not None:
            self.graphs.close()

    def _run(self) -> None:
        left_idle = False
        try:
            if self.device.type == "cuda":   # with its index (the engine's): this thread starts on device 0
                torch.cuda.set_device(self.device)
            with torch.inference_mode(), self._stream_ctx():
                while True:
                    what = self._idle_wait()
                    if what != "work":
                        left_idle = what == "idle"
                        break
                    with cpu_threads(self.threads):  # while there is work (the VQ decode runs beside it)
                        while True:
                            with self.cv:
                                if self.stopping:
                                    break
                                self._cancel_and_admit()
                                if not self.active:
                                    break
                            self._step()
                            with self.cv:
                                self.cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - every waiter must hear of it
            self.error = e
        finally:
            with self.cv:
                if not left_idle:
                    self.stopping = True
                    self.looping = False
                    err = self.error if self.error is not None else EngineError("this engine was closed")
                    for img in list(self.active) + list(self.waiting):
                        _fail(img.request, err)
                    self.active, self.waiting = [], deque()
                    self.joined, self.watched, self.ends, self.row_ends = [], [], {}, {}
                self.cv.notify_all()

    def _idle_wait(self) -> str:
        """Wait until there is work: "work"; "stop" when the loop must stop; "idle" when nothing
        came for IDLE_EXIT_S seconds (the thread leaves; the next submit starts another)."""
        with self.cv:
            self.cv.notify_all()
            idle_since = time.monotonic()
            while not self.stopping and not self.active and not self._admissible():
                if self.waiting and any(i.request.cancelled for i in self.waiting):
                    self._cancel_and_admit()
                    continue
                if not self.waiting and time.monotonic() - idle_since > IDLE_EXIT_S:
                    self.looping = False
                    return "idle"
                self.cv.wait(timeout=min(self._wait_time(), IDLE_EXIT_S))
            return "stop" if self.stopping else "work"

    def _stream_ctx(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _wait_time(self):
        if self.policy == "static" and self.waiting and self.batch_opened is not None:
            return max(0.0, self.batch_wait - (time.perf_counter() - self.batch_opened))
        return 0.5

    def _admissible(self) -> bool:
        """Whether waiting images may join now (policy and free slots)."""
        if not self.waiting or self.draining:
            return False
        img = self.waiting[0]
        if not self.free_slots:
            return False
        need = 2 if img.request.params.cfg else 1
        if len(self.free_rows) < need:
            return False
        if self.policy == "continuous":
            return True
        if self.active:
            return False  # static and lock: a new batch starts when the last one is done
        if self.policy == "lock":
            return True
        if self.batch_opened is None:
            self.batch_opened = time.perf_counter()
        full = len(self.waiting) >= self.max_images
        return full or time.perf_counter() - self.batch_opened >= self.batch_wait

    def _cancel_and_admit(self) -> None:
        """(holding cv) Drop cancelled images, admit what the policy allows into free slots."""
        keep = []
        for img in self.active:
            if img.request.cancelled:
                self._release(img)
                _cancel(img.request)
                self.changed = True
            else:
                keep.append(img)
        self.active = keep
        if any(img.request.cancelled for img in self.waiting):
            for img in [i for i in self.waiting if i.request.cancelled]:
                _cancel(img.request)
            self.waiting = deque(i for i in self.waiting if not i.request.cancelled)
        if self.grow_tokens > self.tables.n_tokens and not self.active:
            self._grow_tokens(self.grow_tokens)
        lock_request = None
        while self._admissible():
            img = self.waiting[0]
            if img.steps > self.tables.n_tokens:
                break  # waits until the loop is empty and the token rows grow
            if self.policy == "lock":
                if lock_request is None:
                    lock_request = img.request
                elif img.request is not lock_request:
                    break
            self.waiting.popleft()
            need = 2 if img.request.params.cfg else 1
            img.rows = tuple(self.free_rows[:need])
            del self.free_rows[:need]
            img.slot = self.free_slots.pop(0)
            img.clock, img.started = self.clock, self.step_count
            self.active.append(img)
            self.joined.append(img)
            self.ends.setdefault(img.started + img.steps, []).append(img)
            if img.watched:
                self.watched.append(img)
            elif img.request.on_row is not None:
                self.row_ends.setdefault(img.started + img.request.grid.w, []).append(img)
            self.changed = True
        self.batch_opened = None if not self.waiting else self.batch_opened

    def _release(self, img: Image) -> None:
        self.free_rows = sorted(self.free_rows + list(img.rows))
        self.free_slots = sorted(self.free_slots + [img.slot])
        img.rows, img.slot, img.left = (), -1, self.step_count
        if img.watched:
            self.watched.remove(img)

    def _grow_tokens(self, n_tokens: int) -> None:
        """(no image active) Token rows for longer images: new buffer, graphs captured again."""
        cfg = self.model.config
        self.tables = Tables(self.rows_max, self.images_max, n_tokens, cfg.vocab_size, self.device)
        self._fns.clear()
        if self.graphs is not None:
            self.graphs.close()
        self.changed = True

    # ----------------------------------------------------------------------------- one step

    def _layout(self):
        """Rows of the step in order: (image, half) per row, None for a free row in between.
        Indexed backends: compact, in admission order; others: row r is state row r."""
        if self.indexed:
            return [(img, h) for img in self.active for h in range(len(img.rows))]
        top = max((r for img in self.active for r in img.rows), default=-1) + 1
        layout = [None] * top
        for img in self.active:
            for h, r in enumerate(img.rows):
                layout[r] = (img, h)
        return layout

    def _rebuild(self) -> tuple[int, int]:
        """Write the row and image tables of the current images (only after a change); returns the
        bucket (rows, images)."""
        cfg = self.model.config
        layout = self._layout()
        R = max(_pow2(max(len(layout), 1)), self.min_rows)
        # the torch sampler (the reference) takes the images as they are; the kernel pads them
        B = len(self.active) if self.sampler_backend == "torch" else _pow2(max(len(self.active), 1))
        if self.reproducible:
            R = self.rows_max
            B = B if self.sampler_backend == "torch" else self.images_max
        if not self.indexed:
            R = min(R, self.rows_max)
        t = self.tables
        row, img_int, img_f32, turn = t.host()
        prev = {k: r for r, k in enumerate(self.row_images) if k is not None}
        new_slots, cols = [], []
        for r in range(R):
            key = layout[r] if r < len(layout) else None
            if key is None:  # padding: a dummy slot (indexed) or its own free state row
                cols.append((0, 1, self.dummy if self.indexed else r, -1, 0))
                continue
            img, h = key
            src = prev.get((img, h), -1)
            if src < 0:
                new_slots.append(img.rows[h])
            cols.append((img.pos, img.request.grid.w, img.rows[h], src, img.label if h == 0 else cfg.null_class))
        row[:, :R] = torch.tensor(cols, dtype=torch.int64).T
        row_of = {key: r for r, key in enumerate(layout) if key is not None}
        k_max, use_p, ints, floats = 0, False, [], []
        V = cfg.vocab_size
        for img in self.active:
            p = img.request.params
            k = min(p.top_k, V)
            k = k if 0 < k < V else 0
            unc = row_of[(img, 1)] if len(img.rows) > 1 else -1
            ints.append((row_of[(img, 0)], unc, p.cfg_interval, k, img.seed, img.slot * t.n_tokens))
            floats.append((p.cfg_scale, p.temperature, p.top_p))
            if p.temperature != 0:
                k_max, use_p = max(k_max, k), use_p or p.top_p < 1.0
        pad = B - len(ints)
        ints += [(-1, -1, -1, 0, 0, 0)] * pad
        floats += [(1.0, 1.0, 1.0)] * pad
        img_int[:, :B] = torch.tensor(ints, dtype=torch.int64).T
        img_f32[:, :B] = torch.tensor(floats, dtype=torch.float32).T
        self.k_max, self.use_p = k_max, use_p
        # the ids of rows that go on, moved to their new rows; class / null ids for new rows
        t.ids_prev.copy_(t.ids)
        t.upload(row, img_int, img_f32, turn)
        src = t.src[:R]
        t.ids[:R].copy_(torch.where(src >= 0, t.ids_prev.index_select(0, src.clamp(min=0)), t.new_ids[:R]))
        if new_slots:  # zero the joining rows' slots, indexed on the device (the others point at the dummy)
            self.backend.current(self.state).zero_rows(torch.where(src < 0, t.slot[:R], self.dummy))
        self.row_images = list(layout) + [None] * (R - len(layout))
        self.changed = False
        return R, B

    def _step_fn(self, R: int, B: int):
        """The step for bucket (R rows, B images), split into (model step, the rest): both read and
        write fixed buffers only, so either can be captured."""
        t = self.tables
        rows = t.step_rows(R, self.indexed)
        state = self.state
        table = t.table(B, self.k_max, self.use_p)
        decode, sampler = self.backend.decode, self.sampler_backend
        pos, ids, logits, tokens = t.pos[:R], t.ids[:R], t.logits[:R], t.tokens

        def model_step():
            decode(rows, state)

        def rest():
            sample_images(logits, table, pos, ids=ids, tokens=tokens, backend=sampler)
            pos.add_(1)
        return model_step, rest

    def _step(self) -> None:
        """One decode step of every image in flight; the host's own time (everything but the
        waits for the device) is counted in stats["host_seconds"]."""
        t0 = time.perf_counter()
        self.tables.waited = 0.0
        if self.changed:
            self.bucket = self._rebuild()
        R, B = self.bucket
        key = (R, B)
        fns = self._fns.get((R, B, self.k_max, self.use_p))
        if fns is None:  # the closures over this bucket's buffers (and the torch sampler's switches)
            fns = self._fns[(R, B, self.k_max, self.use_p)] = self._step_fn(R, B)
        model_step, rest = fns
        if self.graphs is None:
            model_step()
            rest()
        elif self.backend.capturable:
            if key not in self.graphs.graphs:
                self._capture(key, lambda: (model_step(), rest()))
            self.graphs.replay(key)
        else:
            if key not in self.graphs.graphs:
                self._capture(key, rest)
            model_step()
            self.graphs.replay(key)
        self.clock.step += 1
        self._bound_ahead()
        n_images = len(self.active)  # before the finished images leave
        self._after_step()
        dt = time.perf_counter() - t0
        self.stats["steps"] += 1
        self.stats["step_seconds"] += dt
        self.stats["host_seconds"] += dt - self.tables.waited
        self.stats["rows"] += R
        self.stats["images_stepped"] += n_images

    def _capture(self, key, fn) -> None:
        """Capture `fn` for a new bucket without touching the images in flight: warm-up and
        capture run with every row on the dummy slot and no image in the sampler's table, then the
        tables are written again."""
        t = self.tables
        R, B = key
        saved_slot, saved_pos = t.slot[:R].clone(), t.pos[:R].clone()
        saved_cond = t.img_int[0, :B].clone()
        saved_ids = t.ids[:R].clone()

        def quiet():
            t.slot[:R].fill_(self.dummy if self.indexed else 0)
            t.img_int[0, :B].fill_(-1)

        quiet()
        if not self.indexed:
            # non-indexed backends step their rows' own state: keep a copy of it across warm-up
            saved_state = self.backend.current(self.state).save_rows(R)
        self.graphs.prepare(key, fn, quiet)
        if not self.indexed:
            self.backend.current(self.state).load_rows(saved_state)
        t.slot[:R].copy_(saved_slot)
        t.pos[:R].copy_(saved_pos)
        t.img_int[0, :B].copy_(saved_cond)
        t.ids[:R].copy_(saved_ids)

    def _bound_ahead(self) -> None:
        """(CUDA) Keep at most MAX_AHEAD steps queued on the device: wait for the oldest one's
        event. The wait releases the GIL (the server's event loop runs meanwhile); without it the
        loop fills the launch queue and then blocks inside a launch with the GIL held, and what it
        reports as finished lags what the device has done by the queue's depth."""
        if self.device.type != "cuda":
            return
        ev = self.ahead.popleft() if len(self.ahead) >= MAX_AHEAD else torch.cuda.Event()
        if not ev.query():
            t0 = time.perf_counter()
            ev.synchronize()
            self.tables.waited += time.perf_counter() - t0
        ev.record()
        self.ahead.append(ev)

    def _after_step(self) -> None:
        """Host bookkeeping of the step that was just issued: the joining requests' first step,
        per-step work of watched images (forced tokens, rows, hooks), finished images. An image
        nobody watches costs nothing here until its last step."""
        t = self.tables
        step = self.step_count
        if self.joined:
            now = time.perf_counter()
            for img in self.joined:
                req = img.request
                if req.first_step is None and img.left < 0:
                    req.first_step = now
                    if req.ready is not None:  # its tensors as the submitting stream has them
                        torch.cuda.current_stream(self.device).wait_event(req.ready)
            self.joined = []
        advanced = {}
        for img in self.watched:
            req = img.request
            pos = img.pos  # the position after this step
            if req.forced is not None:
                f = req.forced[img.index, pos - 1].to(self.device)
                for row in self._rows_of(img):
                    t.ids[row].copy_(f)
                t.tokens[img.slot * t.n_tokens + pos - 1].copy_(f)
            if req.on_row is not None and pos % req.grid.w == 0:
                self._row_done(img, pos)
            if req.on_step is not None or req.progress is not None:
                advanced.setdefault(id(req), (req, []))[1].append(img)
        for img in self.row_ends.pop(step, ()):
            if img.left < 0:  # not cancelled since
                pos = img.pos
                self._row_done(img, pos)
                if pos < img.steps:
                    self.row_ends.setdefault(step + img.request.grid.w, []).append(img)
        for req, imgs in advanced.values():
            req.steps_done += 1
            if req.progress is not None:
                req.progress.update(len(imgs))
            if req.on_step is not None:
                try:
                    req.on_step(req, imgs)
                except BaseException as e:  # noqa: BLE001 - a client's hook fails its request only
                    req.cancelled = True
                    _fail(req, e)
        done = [img for img in self.ends.pop(step, ()) if img.left < 0]  # not cancelled before
        if not done:
            return
        with self.cv:
            for img in done:
                req = img.request
                start = img.slot * t.n_tokens
                req.tokens[img.index] = t.tokens[start:start + img.steps].clone()
                self._release(img)
                self.active.remove(img)
                self.stats["images"] += 1
                if all(x is not None for x in req.tokens) and not req.future.done():
                    req.finished_step = self.step_count
                    _finish(req, self.device)
            self.changed = True

    def _row_done(self, img: Image, pos: int) -> None:
        """An image row finished with this step: its request's on_row (with the row's tokens)."""
        req, t, w = img.request, self.tables, img.request.grid.w
        start = img.slot * t.n_tokens + pos - w
        row_tokens = t.tokens[start:start + w].clone() if req.row_tokens else None
        req.on_row(img.index, pos // w - 1, row_tokens, _event(self.device) if req.row_tokens else None)

    def _rows_of(self, img: Image) -> list:
        """The image's rows in the current table: [conditional, unconditional] (or [conditional])."""
        found = sorted((key[1], r) for r, key in enumerate(self.row_images) if key is not None and key[0] is img)
        return [r for _, r in found]

    # ----------------------------------------------------------------------------- warm-up

    def warmup(self, max_rows: int | None = None) -> list:
        """Capture the graphs of every bucket up to `max_rows` rows before serving (the loop must
        be idle). Returns the buckets captured."""
        if self.graphs is None:
            return []
        if self.reproducible:
            keys = [(self.rows_max, self.images_max)]
        else:
            keys, R = [], max(self.min_rows, 1)
            top = self.rows_max if max_rows is None else min(self.rows_max, _pow2(max_rows))
            while R <= top:  # rows of R/2 images with guidance .. R images without
                keys += [(R, B) for B in sorted({_pow2(max(1, R // 2)), R}) if B <= self.images_max]
                R *= 2
        caught = []
        with torch.inference_mode(), self._stream_ctx():
            for R, B in keys:
                if (R, B) in self.graphs.graphs:
                    continue
                self.k_max, self.use_p = 0, False
                model_step, rest = self._step_fn(R, B)
                fn = (lambda m=model_step, r=rest: (m(), r())) if self.backend.capturable else rest
                self._capture((R, B), fn)
                caught.append((R, B))
        if self.stream is not None:
            self.stream.synchronize()
        self.changed = True
        return caught


@dataclass
class _Rows:
    """The rows of one step, in the backend contract's terms (backends/base.py)."""

    ids: torch.Tensor
    pos: torch.Tensor
    width: torch.Tensor
    slots: torch.Tensor | None
    logits: torch.Tensor


def _event(device: torch.device):
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


def _finish(req: Request, device: torch.device) -> None:
    tokens = torch.stack(req.tokens)  # [n, N] on the loop's stream
    ev = _event(device)
    if req.progress is not None:
        req.progress.close()
    req.future.set_result((tokens, ev))


def _fail(req: Request, err) -> None:
    if req.future.done():
        return
    if req.progress is not None:
        req.progress.close()
    # an interrupt reaches the waiter as one; out of memory too, for the caller's memory_stage to name
    if isinstance(err, (EngineError, KeyboardInterrupt)) or is_out_of_memory(err):
        req.future.set_exception(err)
    else:
        req.future.set_exception(EngineError(f"the decode loop failed: {type(err).__name__}: {err}"))


def _cancel(req: Request) -> None:
    if not req.future.done():
        if req.progress is not None:
            req.progress.close()
        req.future.set_exception(CancelledError())
