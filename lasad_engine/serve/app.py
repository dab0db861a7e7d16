"""The HTTP app of `lasad-serve` (FastAPI): the OpenAI Images schema in front of the slot scheduler.

`POST /v1/images/generations` takes OpenAI's fields (`prompt`, `n`, `size` in pixels,
`response_format`, `user`, `model`) and lasad's (`class`, `seed`, `guidance_scale`,
`cfg_interval`, `temperature`, `top_k`, `top_p`, `return_tokens`, `stream`). A class-conditional
model reads `prompt` as a class name or id, so `openai.OpenAI(base_url=...).images.generate(...)`
works unchanged (lasad's fields through `extra_body`). Each request's images join the engine's
decode loop at its next step; their tokens are VQ-decoded and PNG-encoded in a decoder thread of
their own (on a GPU, on a CUDA stream of its own), never on the decode loop or the event loop.

- Validation: a malformed body or a field out of range is a 422 (schema) or 400 (a value the model
  refuses: an unknown class, a size off the token grid) with one line naming the field and its
  allowed values, in OpenAI's error envelope; nothing in flight is disturbed.
- Admission: the engine's queue is bounded (`max_queue`); a request that does not fit gets 429
  with `Retry-After`. A client that disconnects, or a request past `timeout`, is cancelled and its
  slots are free at the next step.
- `stream: true`: server-sent events, one `image_generation.row` per finished image row (progress,
  the row's tokens with `return_tokens`), one `image_generation.completed` per image, then
  `done`. With `partial_images: P` (as OpenAI's field, 1..rows-1 here), P
  `image_generation.partial_image` events per image on the way: the rows finished so far
  VQ-decoded (the decoder's strip of those rows alone), the rest of the picture white.
- Reproducibility: image i of a request with seed s gets the noise of (s, i) whatever else runs,
  so the same request returns the same images under any load.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
import os
import queue
import secrets
import socket
import threading
import time
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine import QueueFull, RequestFailed, image_seeds
from ..io import UserError, one_line, safe_text
from ..params import MAX_SEED, Grid
from ..pipeline import DECODE_BATCH, LasadPipeline, to_uint8
from .metrics import Metrics

MAX_IMAGES_PER_REQUEST = 16
MAX_PARTIAL_IMAGES = 64  # the schema's bound; a request's own bound is its grid's rows - 1


class GenerationRequest(BaseModel):
    """The body of POST /v1/images/generations (OpenAI's Images fields, then lasad's)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str | int | None = Field(None, description="a class name or id (OpenAI's prompt)")
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WxH in pixels, a multiple of the tokenizer's factor")
    response_format: Literal["b64_json", "tokens"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    class_: str | int | None = Field(None, alias="class", description="the class (name or id); overrides prompt")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    guidance_scale: float | None = None
    cfg_interval: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    return_tokens: bool = False
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES)


FIELDS = [("class" if name == "class_" else name) for name in GenerationRequest.model_fields]


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 422: "invalid_request_error",
            429: "rate_limit_error", 503: "server_unavailable", 504: "timeout"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def _validation_line(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a body as one line naming the field (and the allowed values)."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON ({err.get('msg', '')}, at character {loc[-1] if loc else '?'})", None
    if kind == "extra_forbidden":
        return f"unknown field {field!r}; the fields are {', '.join(FIELDS)}", field
    if kind == "missing" and not loc:
        return "the body is empty: send a JSON object (e.g. {\"prompt\": \"207\"})", None
    if kind in ("model_attributes_type", "dict_type") and not loc:
        return "the body must be a JSON object of the fields " + ", ".join(FIELDS), None
    return f"{field}: {err.get('msg', 'invalid')} (got {safe_text(repr(err.get('input')), 60)})", field


class Decoder:
    """VQ-decodes finished requests off the decode loop: one thread (with a CUDA stream of its own
    on a GPU) that decodes what has arrived in batches of up to DECODE_BATCH images of one grid,
    then PNG-encodes them. `submit(tokens, loop, height=None) -> asyncio future of [b64 PNG]`; with
    `height` (pixels), each picture is padded with white rows below to that height (a partial
    image: the strip of the rows decoded so far)."""

    def __init__(self, pipe: LasadPipeline):
        self.pipe = pipe
        self.jobs: queue.Queue = queue.Queue()
        self.stream = torch.cuda.Stream(pipe.device) if pipe.device.type == "cuda" else None
        self.thread = threading.Thread(target=self._run, name="lasad-vq-decode", daemon=True)
        self.thread.start()

    def submit(self, tokens: torch.Tensor, loop, height: int | None = None) -> asyncio.Future:
        fut = loop.create_future()
        ready = None   # the tokens as the caller's stream has them: the decode stream waits for that
        if self.stream is not None and tokens.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(tokens.device))
        self.jobs.put((tokens, loop, fut, height, ready))
        return fut

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        if self.stream is not None:
            torch.cuda.set_device(self.pipe.device)   # resolve_device gave it its index
        with torch.inference_mode():
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                batch = [job]
                while sum(j[0].shape[0] for j in batch) < DECODE_BATCH:  # whatever else waits, same grid
                    try:
                        nxt = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self.jobs.put(None)
                        break
                    if nxt[0].shape[1:] != job[0].shape[1:] or nxt[3] != job[3]:
                        self.jobs.put(nxt)
                        break
                    batch.append(nxt)
                self._decode(batch)

    def _decode(self, batch) -> None:
        from PIL import Image
        try:
            ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
            with ctx:
                for job in batch:
                    if job[4] is not None:
                        self.stream.wait_event(job[4])
                tokens = torch.cat([job[0] for job in batch])
                arr = to_uint8(self.pipe.decode(tokens))
            height = batch[0][3]
            if height is not None and height > arr.shape[1]:
                arr = np.pad(arr, ((0, 0), (0, height - arr.shape[1]), (0, 0), (0, 0)), constant_values=255)
            out, i = [], 0
            for t, loop, fut, _, _ in batch:
                pngs = []
                for a in arr[i:i + t.shape[0]]:
                    buf = io.BytesIO()
                    Image.fromarray(a).save(buf, format="PNG")
                    pngs.append(base64.b64encode(buf.getvalue()).decode("ascii"))
                i += t.shape[0]
                out.append((loop, fut, pngs))
            for loop, fut, pngs in out:
                loop.call_soon_threadsafe(_set, fut, pngs, None)
        except BaseException as e:  # noqa: BLE001 - the waiting requests fail, the thread goes on
            for _, loop, fut, _, _ in batch:
                loop.call_soon_threadsafe(_set, fut, None, e)


def _set(fut: asyncio.Future, value, err) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(value)


class InstanceHeader:
    """ASGI middleware: `X-Lasad-Instance` on every response, naming the engine that answered (one
    per Ray Serve replica). Plain ASGI, not Starlette's BaseHTTPMiddleware, which would hide a
    client's disconnect from the route (and so never free its slots)."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (b"x-lasad-instance", value.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
        await self.app(scope, receive, send_with_header)


class ServerState:
    """What the routes share: the pipeline, the decoder, the metrics, readiness."""

    def __init__(self, pipe: LasadPipeline, *, model_id: str, max_images: int, timeout: float, grace: float,
                 warmup: bool):
        self.pipe, self.engine = pipe, pipe.engine
        self.model_id, self.max_images, self.timeout, self.grace, self.warmup = (model_id, max_images, timeout,
                                                                                  grace, warmup)
        self.metrics = Metrics(self.engine)
        self.decoder = Decoder(pipe) if pipe.tokenizer is not None else None
        self.ready = False
        self.draining = False
        self.created = int(time.time())
        cfg = pipe.model.config
        self.factor = getattr(pipe.tokenizer, "downsample_factor", None) if pipe.tokenizer is not None else None
        self.trained = Grid(cfg.grid_height, cfg.grid_width)

    def grid_of(self, size: str | None) -> Grid:
        """A size "WxH" in pixels -> the token grid (one-line errors naming the allowed sizes)."""
        cfg_size = self.default_size()
        if size is None:
            return self.trained
        f = self.factor or 1
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) <= 6 for p in parts):
            raise HTTPError(400, f"size {safe_text(repr(size), 40)} is not WxH in pixels, e.g. {cfg_size}", "size")
        w, h = (int(p) for p in parts)
        if w % f or h % f or not (1 <= h // f <= 1024 and 1 <= w // f <= 1024):
            raise HTTPError(400, f"size {w}x{h}: each side must be a multiple of {f} pixels (the tokenizer's factor) "
                                 f"between {f} and {1024 * f}; this model was trained at {cfg_size}", "size")
        return Grid(h // f, w // f)

    def default_size(self) -> str:
        f = self.factor or 1
        return f"{self.trained.w * f}x{self.trained.h * f}"


def create_app(pipe: LasadPipeline, *, model_id: str = "default", max_images: int = MAX_IMAGES_PER_REQUEST,
               timeout: float = 600.0, grace: float = 60.0, warmup: bool = True) -> FastAPI:
    """The app for a loaded pipeline (its engine's slots and queue bound as built)."""
    state = ServerState(pipe, model_id=model_id, max_images=max_images, timeout=timeout, grace=grace,
                        warmup=warmup)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if state.warmup:
            await asyncio.to_thread(state.engine.warmup)
        state.ready = True
        try:
            yield
        finally:
            state.draining = True
            await asyncio.to_thread(state.engine.close, drain=True, timeout=state.grace)
            if state.decoder is not None:
                await asyncio.to_thread(state.decoder.close)

    app = FastAPI(title="lasad-serve", version=__import__("lasad_engine").__version__, lifespan=lifespan)
    app.state.lasad = state
    app.add_middleware(InstanceHeader, value=f"{socket.gethostname()}:{os.getpid()}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        message, param = _validation_line(exc)
        state.metrics.requests.labels(status="422").inc()
        return _error(422, message, param)

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        state.metrics.requests.labels(status=str(exc.status)).inc()
        return _error(exc.status, exc.message, exc.param, exc.headers)

    @app.get("/health")
    async def health():
        status = ("failed" if state.engine.scheduler.error is not None else "draining" if state.draining
                  else "ok" if state.ready else "starting")
        body = {"status": status, "slots": state.engine.max_batch, **{k: state.engine.stats()[k]
                                                                      for k in ("active", "waiting")}}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.scrape(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        cfg = pipe.model.config
        return {"object": "list", "data": [{
            "id": state.model_id, "object": "model", "created": state.created, "owned_by": "lasad",
            "size": state.default_size(), "grid": list(state.trained), "num_classes": cfg.num_classes,
            "classes": cfg.class_names, "slots": state.engine.max_batch, "max_images_per_request": state.max_images,
            "sampling": pipe.sampling_defaults.__dict__}]}

    @app.post("/v1/images/generations")
    async def generate(body: GenerationRequest, request: Request):
        t0 = time.perf_counter()
        if state.draining or not state.ready:
            raise HTTPError(503, "the server is " + ("shutting down" if state.draining else "starting"))
        job = _prepare(state, body)
        loop = asyncio.get_running_loop()
        rows: asyncio.Queue = asyncio.Queue()
        first = []

        def on_row(index, row, tokens, event):  # the decode loop's thread
            if not first:
                first.append(time.perf_counter())
            if body.stream:
                loop.call_soon_threadsafe(rows.put_nowait, (index, row, tokens, event))

        try:
            # on_row for a stream only: a non-streamed image costs the decode loop nothing until its last step
            req = state.engine.submit(job["labels"], grid=job["grid"], params=job["params"], seeds=job["seeds"],
                                      on_row=on_row if body.stream else None,
                                      row_tokens=body.stream and (job["return_tokens"] or bool(job["partial_rows"])))
        except QueueFull as e:
            state.metrics.rejected.inc()
            raise HTTPError(429, str(e), headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from None
        except UserError as e:
            raise HTTPError(400, one_line(e)) from None
        if body.stream:
            return StreamingResponse(_events(state, job, req, rows, request, t0, first),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            tokens = await _await(state, req, request)
            data = await _items(state, job, tokens, loop)
        except HTTPError:
            raise
        except RequestFailed as e:
            raise HTTPError(500, one_line(e)) from None
        state.metrics.latency.observe(time.perf_counter() - t0)
        if first:
            state.metrics.first_row.observe(first[0] - t0)
        if req.first_step is not None:
            state.metrics.queue_wait.observe(max(0.0, req.first_step - req.submitted))
        state.metrics.requests.labels(status="200").inc()
        # plain JSON types already: json's C encoder directly, not FastAPI's jsonable_encoder walking
        # every token (a tenth of the event loop's time under load on the H100, py-spy)
        return JSONResponse({"created": int(time.time()), "model": state.model_id, "data": data})

    return app


def _prepare(state: ServerState, body: GenerationRequest) -> dict:
    """A request's typed values (labels, grid, params, seeds), or HTTPError(400) naming the field."""
    pipe = state.pipe
    if body.model is not None and body.model != state.model_id:
        raise HTTPError(400, f"model {safe_text(repr(body.model), 60)} is not served here; this server serves "
                             f"{state.model_id!r}", "model")
    if body.n > state.max_images:
        raise HTTPError(400, f"n={body.n}: at most {state.max_images} images per request on this server", "n")
    label = body.class_ if body.class_ is not None else body.prompt
    if label is None:
        raise HTTPError(400, "give the class: prompt (or class) is a class name or id; GET /v1/models lists them",
                        "prompt")
    try:
        class_id = pipe.class_id(label.strip() if isinstance(label, str) else label)
        labels = pipe.class_labels([class_id] * body.n)
    except UserError as e:
        raise HTTPError(400, one_line(e), "class" if body.class_ is not None else "prompt") from None
    if body.response_format == "b64_json" and state.decoder is None:
        raise HTTPError(400, "this server has no VQ tokenizer: ask for response_format 'tokens'", "response_format")
    grid = state.grid_of(body.size)
    given = dict(cfg_scale=body.guidance_scale, cfg_interval=body.cfg_interval, temperature=body.temperature,
                 top_k=body.top_k, top_p=body.top_p)
    try:
        params = pipe.sampling_params(**given)
    except UserError as e:
        msg = one_line(e).replace("cfg_scale", "guidance_scale")
        field = next((f for f in ("guidance_scale", "cfg_interval", "temperature", "top_k", "top_p") if f in msg), None)
        raise HTTPError(400, msg, field) from None
    if body.partial_images and not body.stream:
        raise HTTPError(400, f"partial_images={body.partial_images} needs stream: true (they come as events)",
                        "partial_images")
    if body.partial_images and body.response_format != "b64_json":
        raise HTTPError(400, "partial_images are pictures: ask for response_format 'b64_json'", "partial_images")
    if body.partial_images > grid.h - 1:
        raise HTTPError(400, f"partial_images={body.partial_images}: 0..{grid.h - 1} for a grid of {grid.h} rows",
                        "partial_images")
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    seeds = image_seeds(torch.Generator().manual_seed(seed), body.n)
    names = pipe.class_names
    return dict(labels=labels, grid=grid, params=params, seeds=seeds, seed=seed, class_id=class_id,
                class_name=names[class_id] if names else None, format=body.response_format,
                return_tokens=body.return_tokens or body.response_format == "tokens", n=body.n,
                partial_rows=partial_rows(grid.h, body.partial_images))


def partial_rows(rows: int, count: int) -> dict:
    """{rows finished: partial image index} for `count` partial images spread evenly over `rows`
    (count < rows: ceil(j * rows / (count + 1)) for j = 1..count, distinct and in 1..rows-1)."""
    return {-(-j * rows // (count + 1)): j - 1 for j in range(1, count + 1)}


async def _await(state: ServerState, req, request: Request):
    """The request's tokens `[n, N]` (on the host); cancels it when the client goes away or the
    server's timeout passes."""
    fut = req.wrap()
    deadline = time.perf_counter() + state.timeout
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                req.cancel()
                state.metrics.cancelled.inc()
                raise HTTPError(499, "client closed the request")
            if time.perf_counter() > deadline:
                req.cancel()
                state.metrics.cancelled.inc()
                raise HTTPError(504, f"the request took longer than the server's timeout ({state.timeout:g} s)")
    except asyncio.CancelledError:
        req.cancel()
        raise
    try:
        return await asyncio.to_thread(lambda: state.engine.wait(req).cpu())
    except Exception as e:  # noqa: BLE001
        if isinstance(e, RequestFailed):
            raise
        raise HTTPError(500, one_line(e)) from None


async def _items(state: ServerState, job: dict, tokens: torch.Tensor, loop) -> list:
    """The response's `data`: per image its PNG (b64_json) and/or tokens, and lasad's fields."""
    g = job["grid"]
    grid_tokens = tokens.view(-1, g.h, g.w)
    pngs = None
    if job["format"] == "b64_json":
        pngs = await state.decoder.submit(grid_tokens.to(state.pipe.device), loop)
    out = []
    for i in range(job["n"]):
        item = {"index": i, "class": job["class_id"], "class_name": job["class_name"], "seed": job["seed"],
                "revised_prompt": job["class_name"]}
        if pngs is not None:
            item["b64_json"] = pngs[i]
        if job["return_tokens"]:
            item["tokens"] = grid_tokens[i].tolist()
        out.append(item)
    return out


def _sse(event: str, data: dict) -> bytes:
    import json
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _events(state: ServerState, job: dict, req, rows: asyncio.Queue, request: Request, t0: float, first):
    """The server-sent events of a streamed request."""
    g = job["grid"]
    total = job["n"] * g.h
    seen = 0
    strips = [[None] * g.h for _ in range(job["n"])] if job["partial_rows"] else None
    fut = req.wrap()
    loop = asyncio.get_running_loop()
    try:
        while seen < total:
            getter = asyncio.ensure_future(rows.get())
            done, _ = await asyncio.wait({getter, fut}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if fut.done() and fut.exception() is not None:
                    break
                if await request.is_disconnected():
                    req.cancel()
                    state.metrics.cancelled.inc()
                    return
                continue
            index, row, tokens, event = getter.result()
            if event is not None:
                await asyncio.to_thread(event.synchronize)
                # made on the decode loop's stream, used on this thread's (a partial image's stack):
                # its memory is not the loop's to reuse before this stream is done with it
                tokens.record_stream(torch.cuda.current_stream(tokens.device))
            seen += 1
            data = {"type": "image_generation.row", "index": index, "row": row, "rows": g.h,
                    "progress": round(seen / total, 4)}
            if tokens is not None and job["return_tokens"]:
                data["tokens"] = tokens.tolist()
            yield _sse("image_generation.row", data)
            if strips is not None:
                strips[index][row] = tokens
                part = job["partial_rows"].get(row + 1)
                if part is not None:  # rows 0..row are all here: an image's rows finish in order
                    pngs = await state.decoder.submit(torch.stack(strips[index][:row + 1])[None], loop,
                                                      height=g.h * (state.factor or 1))
                    yield _sse("image_generation.partial_image", {
                        "type": "image_generation.partial_image", "index": index, "partial_image_index": part,
                        "rows": row + 1, "b64_json": pngs[0]})
        tokens = await _await(state, req, request)
        for item in await _items(state, job, tokens, loop):
            yield _sse("image_generation.completed", {"type": "image_generation.completed", **item})
        state.metrics.latency.observe(time.perf_counter() - t0)
        if first:
            state.metrics.first_row.observe(first[0] - t0)
        state.metrics.requests.labels(status="200").inc()
        yield _sse("done", {"type": "done", "created": int(time.time()), "model": state.model_id, "n": job["n"]})
    except HTTPError as e:
        yield _sse("error", {"error": {"message": e.message, "type": "server_error", "param": e.param}})
    except (asyncio.CancelledError, GeneratorExit):
        req.cancel()
        state.metrics.cancelled.inc()
        raise
    except Exception as e:  # noqa: BLE001 - the stream ends with the error, as one line
        yield _sse("error", {"error": {"message": one_line(e), "type": "server_error", "param": None}})
