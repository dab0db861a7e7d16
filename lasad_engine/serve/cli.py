"""`lasad-serve`: load a checkpoint, capture the step graphs, serve HTTP with uvicorn.

SIGTERM or Ctrl-C: the server stops admitting, finishes the images in flight within `--grace`
seconds, and exits 0.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from ..backends import BACKENDS
from ..cli import OneLineCommand
from ..params import MAX_BATCH
from ..scheduler import POLICIES

NAME = "lasad-serve"


@click.command(NAME, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="'default' (the bundled model; the default), a model folder, ckpt.pt, .safetensors, step.onnx "
                   "or engine.plan.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="VQ tokenizer (default: the one the checkpoint names).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--slots", default=64, show_default=True, type=click.IntRange(1, MAX_BATCH),
              help="Image slots: images generated at once (each holds its state: 2 rows with guidance).")
@click.option("--max-queue", default=None, type=click.IntRange(0, 1 << 20),
              help="Images that may wait beyond the free slots before requests get 429 [default: 4 x slots].")
@click.option("--max-images", default=16, show_default=True, type=click.IntRange(1, 1 << 16),
              help="Images per request (n).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Decode backend (default: cuda on a GPU, else torch).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Weight precision (default: bf16 on CUDA, fp32 on CPU).")
@click.option("--policy", type=click.Choice(POLICIES), default="continuous", show_default=True,
              help="continuous: images join the running batch at any step; static: a batch starts when the last "
                   "ended (after --batch-wait); lock: one request at a time (the last two for comparisons).")
@click.option("--batch-wait", default=0.02, show_default=True, type=click.FloatRange(0, 60),
              help="Seconds the static policy waits to fill a batch.")
@click.option("--reproducible", is_flag=True,
              help="Every step runs all slots: byte-identical images under any load on a GPU too, at the cost of "
                   "a lone request's latency (on a CPU the default is already load-invariant).")
@click.option("--step-kernel", type=click.Choice(["ops", "persistent"]), default="ops", show_default=True,
              help="cuda backend: one kernel per fused op, or one persistent kernel for steps of 1-2 images.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(0.1, 86400),
              help="Seconds a request may take before it is cancelled (504).")
@click.option("--grace", default=60.0, show_default=True, type=click.FloatRange(0, 86400),
              help="Seconds to finish the images in flight after SIGTERM / Ctrl-C.")
@click.option("--no-warmup", is_flag=True, help="Capture each bucket's graph on first use instead of at start-up.")
@click.option("--model-id", default="default", show_default=True, help="The name /v1/models reports.")
@click.option("--threads", default=None, type=click.IntRange(1, 1024), help="CPU threads of the decode loop.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_main(checkpoint, tokenizer, host, port, slots, max_queue, max_images, backend, device, precision, policy,
               batch_wait, reproducible, step_kernel, timeout, grace, no_warmup, model_id, threads, log_level):
    """Serve a LASADGen checkpoint over HTTP (OpenAI Images API) with continuous batching in state slots."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise click.ClickException(f"lasad-serve needs the [serve] extra ({e.name} is missing): "
                                   "pip install -e '.[serve]' in lasad's folder") from None
    from ..pipeline import LasadPipeline
    # The decode loop and the event loop share the GIL. The loop gives it up at every wait for the
    # GPU (and inside each graph launch) and then waits for a busy event loop to be made to hand
    # it back, after the switch interval: Python's default 5 ms stalls the GPU; on an H100 at 0.5 ms
    # lasad-B's loop still took 1.1 ms of host time per 0.7 ms step under load; 0.1 ms.
    sys.setswitchinterval(1e-4)
    pipe = LasadPipeline.from_checkpoint(checkpoint, tokenizer=tokenizer, backend=backend, device=device,
                                         precision=precision, max_batch=slots, threads=threads,
                                         max_queue=4 * slots if max_queue is None else max_queue,
                                         policy=policy, batch_wait=batch_wait, reproducible=reproducible,
                                         step_kernel=step_kernel)
    app = create_app(pipe, model_id=model_id, max_images=max_images, timeout=timeout, grace=grace,
                     warmup=not no_warmup)
    # keep-alive longer than clients' pools keep idle connections (httpx: 5 s, uvicorn's default too):
    # with equal timeouts a client reuses a connection the server is closing, and the request fails
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace,
                            lifespan="on", timeout_keep_alive=75)
    server = uvicorn.Server(config)
    click.echo(f"{NAME}: {pipe.checkpoint_path} on {pipe.device} ({pipe.backend}), {slots} slots, policy {policy}; "
               f"http://{host}:{port}/v1/images/generations", err=True)
    # uvicorn drains on SIGTERM / Ctrl-C, then hands the signal back to the handler it found: a
    # handler that only notes it makes a drained stop exit 0
    stopped = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    server.run()
    if not server.started:
        raise click.ClickException(f"could not serve on {host}:{port} (see the log above)")
    stats = pipe.engine.stats()
    click.echo(f"{NAME}: stopped{' (' + signal.Signals(stopped[0]).name + ')' if stopped else ''}; "
               f"{stats['images']} images in {stats['steps']} steps", err=True)
