"""`lasad-run`: generate images from a checkpoint (default: the bundled model) into a PNG grid."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from . import __version__
from .backends import BACKENDS
from .params import MAX_BATCH, MAX_CFG_SCALE, MAX_IMAGES, MAX_SEED, MAX_TEMPERATURE, MAX_TOKENS, MAX_TOP_K, \
    WEIGHT_CHOICES

EXIT_USAGE, EXIT_ERROR = 2, 1
# A run predicted (from the rate of its first steps) to take longer than this gets a warning.
LONG_JOB_SECONDS = 3600.0
ETA_PROBE_STEPS = 8
# After a signal, the clean-up (removing temps, rolling back a commit) has this long before the
# process ends regardless.
SIGNAL_GRACE_SECONDS = 5.0


class FiniteFloat(click.FloatRange):
    """click's FloatRange that also refuses NaN and infinities (which compare false with any
    bound, so a plain range lets them through)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


@contextlib.contextmanager
def _signals_as_interrupts():
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt, so the same clean-up runs whatever
    stops a command (temporary files removed, a commit rolled back); a second signal stops at
    once. Yields the list of signals received. Signals the caller ignores (nohup) stay ignored."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    active, deferred = [True], [False]
    main_id = threading.main_thread().ident

    def handler(signum, frame):
        if not deferred[0]:
            if got:  # asked twice: stop now
                _exit_signalled(None, signum)
            got.append(signum)
            # A library may swallow the interrupt (an import it cuts short can turn it into an
            # ImportError that the library catches); the process still ends within the grace time.
            watchdog = threading.Timer(SIGNAL_GRACE_SECONDS, _exit_signalled, (None, signum))
            watchdog.daemon = True
            watchdog.start()
        deferred[0] = False  # else: sent again by _interrupt_after_import, the import being over
        if _inside_import(frame):
            # Raised inside an import that C++ started (torch's extension importing its Python
            # parts), the exception would cross pybind11 and end in std::terminate: the signal is
            # sent again once the import is over, and raised then.
            deferred[0] = True
            threading.Thread(target=_interrupt_after_import, args=(main_id, signum, active), daemon=True).start()
            return
        raise KeyboardInterrupt

    def unraisable(info):
        # The interrupt was raised where Python cannot propagate it (a weakref or import-lock
        # callback: "Exception ignored in ..." plus a traceback) and the command went on: stop now.
        if got and isinstance(info.exc_value, KeyboardInterrupt):
            _exit_signalled(None, got[0])
        previous_hook(info)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            previous[sig] = signal.signal(sig, handler)
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield got
    finally:
        active[0] = False
        sys.unraisablehook = previous_hook
        for sig, h in previous.items():
            signal.signal(sig, h)


def _inside_import(frame) -> bool:
    """Whether `frame` runs under the import machinery (a module being imported)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt_after_import(thread_id: int, signum: int, active: list, poll: float = 0.01) -> None:
    """Send `signum` to thread `thread_id` (the main thread: a blocking call there returns early)
    as soon as it is out of every import, while `active[0]` (still inside `_signals_as_interrupts`)."""
    while active[0]:
        frame = sys._current_frames().get(thread_id)
        if frame is None:
            return
        if not _inside_import(frame):
            signal.pthread_kill(thread_id, signum)
            return
        del frame
        time.sleep(poll)


def _exit_signalled(prog: str | None, signum: int):
    """One line, then exit 128 + signum at once. After a signal the process must end; skipping
    the interpreter's teardown also avoids crashes in libraries whose import the signal cut
    short (torch, numpy). The clean-up of this command's files has already run (the exception
    unwound through it)."""
    what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
    name = prog or os.path.basename(sys.argv[0]) or "lasad"
    try:
        sys.stdout.flush()
        sys.stderr.write(f"{name}: {what}; no half-written file is left\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)


class OneLineErrors:
    """Mixin for click commands and groups: every error a user can cause ends as one line on
    stderr and a non-zero exit code (2 for usage, 1 otherwise, 128 + the signal when interrupted:
    130 for Ctrl-C, 143 for SIGTERM)."""

    def main(self, args=None, prog_name=None, **kwargs):
        prog = prog_name or self.name
        with _signals_as_interrupts() as got:
            try:
                return super().main(args, prog_name=prog_name, standalone_mode=False, **kwargs)
            except BaseException as e:
                if got:  # a signal, whatever error it became (an import it cut short may fail later)
                    _exit_signalled(prog, got[0])
                code, message = _one_line(prog, e)
                if code is None:
                    raise
                if message:
                    click.echo(message, err=True)
                sys.exit(code)


def _one_line(prog: str, e: BaseException) -> tuple[int | None, str | None]:
    """(exit code, one line) for an error a user can cause; (None, None) for anything else."""
    from .io import UserError

    if isinstance(e, click.exceptions.NoArgsIsHelpError):
        click.echo(e.ctx.get_help())
        return 0, None
    if isinstance(e, click.UsageError):
        return EXIT_USAGE, f"{prog}: error: {' '.join(e.format_message().split())} (see {prog} --help)"
    if isinstance(e, (click.ClickException, UserError, OSError)):
        msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
        if isinstance(e, OSError):
            from .io import disk_hint
            msg += disk_hint(e)  # a full disk: what to change
        return getattr(e, "exit_code", EXIT_ERROR) or EXIT_ERROR, f"{prog}: error: {' '.join(msg.split())}"
    if isinstance(e, (MemoryError, RuntimeError)):  # torch's allocators raise RuntimeError
        from .params import is_out_of_memory, out_of_memory_line
        if is_out_of_memory(e):
            return EXIT_ERROR, f"{prog}: error: " + out_of_memory_line(
                e, "running", "free memory, or ask for less: a smaller --max-batch, fewer images, a smaller grid")
    if isinstance(e, (click.Abort, KeyboardInterrupt)):  # raised in-process, without a signal
        return 128 + signal.SIGINT, f"{prog}: interrupted; no half-written file is left"
    return None, None


class OneLineCommand(OneLineErrors, click.Command):
    pass


def image_grid(images, nrow: int, pad: int = 2):
    """uint8 [n, H, W, 3] -> one [rows·(H+pad)+pad, nrow·(W+pad)+pad, 3] grid on white."""
    import numpy as np

    n, H, W, C = images.shape
    ncol = max(1, min(nrow, n))
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (H + pad) + pad, ncol * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y:y + H, x:x + W] = img
    return grid


def save_png(path: Path, array) -> None:
    from .io import atomic_path
    with atomic_path(path) as tmp:
        write_png(tmp, array)


def write_png(path, array) -> None:
    from PIL import Image
    Image.fromarray(array).save(path, format="PNG")


def default_output(ids: list[int], seed: int, grid=None) -> Path:
    """`lasad_<ids>_seed<seed>[_<h>x<w>].png`: every class id up to 8 classes; beyond, the first
    four, the count of the others and 8 hex digits of a hash of the whole list (distinct lists get
    distinct names, and the name stays far below the file system's 255 bytes). The grid is named
    when it is given (lasad-run gives it when it is not the model's trained grid)."""
    if len(ids) <= 8:
        tag = "-".join(str(i) for i in ids)
    else:
        digest = hashlib.sha256(",".join(str(i) for i in ids).encode()).hexdigest()[:8]
        tag = "-".join(str(i) for i in ids[:4]) + f"-+{len(ids) - 4}more-{digest}"
    size = f"_{grid[0]}x{grid[1]}" if grid is not None else ""
    return Path(f"lasad_{tag}_seed{seed}{size}.png")


MAX_NUMBERED = 10_000


def _taken(p: Path) -> bool:
    return any(f.exists() or f.is_symlink() for f in (p, p.with_suffix(".json"), p.with_suffix("")))


def claim_output(output: Path):
    """(`output`, or the first of `<stem>-2.png`, `<stem>-3.png`, ... that no other running lasad
    holds and whose PNG, JSON record and `--save-individual` folder are all absent; its hold;
    whether `output` itself was held by another run).
    The name is held (io.hold_output) before it is checked and until the run's files are
    committed, so two runs that start at the same moment in one folder get two names, and a
    default name never replaces an earlier run's files."""
    from .io import hold_output
    busy = False  # whether the name asked for is held by a running process (for the message)
    for n in range(1, MAX_NUMBERED + 1):
        candidate = output if n == 1 else output.with_name(f"{output.stem}-{n}{output.suffix}")
        lock = hold_output(candidate)
        if lock is None:  # another running lasad-run writes it
            busy = busy or n == 1
            continue
        if not _taken(candidate):
            return candidate, lock, busy
        lock.release()
    raise click.ClickException(f"{output} and {MAX_NUMBERED - 1} numbered names beside it are taken; "
                               "pass --output FILE.png")


def hold_named_output(output: Path):
    """The hold on an `--output` name; refused in one line when another running lasad-run holds it
    (its files would replace this run's, or these its)."""
    from .io import hold_output, output_holder
    lock = hold_output(output)
    if lock is None:
        raise click.ClickException(f"--output {str(output)!r} is being written by another running lasad-run"
                                   f"{output_holder(output)}; wait for it to finish or choose another name")
    return lock


class LongJobWarning:
    """A pipeline callback that times the first steps of a run and warns once on stderr when
    the whole run would take longer than LONG_JOB_SECONDS at that rate."""

    def __init__(self, total_steps: int, device, probe: int = ETA_PROBE_STEPS):
        self.total, self.device, self.probe = total_steps, device, probe
        self.calls, self.t1, self.estimate = 0, None, None

    def _now(self) -> float:
        if self.device.type == "cuda":
            import torch
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, step, tokens) -> None:
        self.calls += 1
        if self.calls == 1:  # the first step pays one-time costs (graph capture): time from here
            self.t1 = self._now()
        elif self.calls == 1 + self.probe and self.estimate is None:
            per_step = (self._now() - self.t1) / self.probe
            self.estimate = per_step * (self.total - self.calls)
            if self.estimate > LONG_JOB_SECONDS:
                click.echo(f"warning: this run will take about {self.estimate / 3600:.1f} hours "
                           f"({self.total} steps at {per_step * 1e3:.1f} ms each, measured on {self.device}); "
                           "Ctrl-C stops it and keeps nothing half-written", err=True)


NAME = "lasad-run"


@click.command(NAME, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--class", "classes", multiple=True, metavar="ID|NAME",
              help="Class to draw (repeatable): an id, or a name where the checkpoint carries names.")
@click.option("-n", "--num-samples", default=4, show_default=True, type=click.IntRange(1, MAX_IMAGES),
              help="Images per class.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
              help="Random seed (default 0, printed on stderr when not given).")
@click.option("--cfg-scale", default=None, type=FiniteFloat(-MAX_CFG_SCALE, MAX_CFG_SCALE),
              help="Classifier-free guidance scale (1 = off) [default: the model's recommended, else 4.0].")
@click.option("--cfg-interval", default=None, type=click.IntRange(-1, MAX_TOKENS),
              help="Guidance only for positions <= this; -1 = every step [default: the model's, else -1].")
@click.option("--temperature", default=None, type=FiniteFloat(0, MAX_TEMPERATURE),
              help="Sampling temperature, 0 = greedy [default: the model's, else 1.0].")
@click.option("--top-k", default=None, type=click.IntRange(0, MAX_TOP_K),
              help="Keep the k most likely tokens, 0 = off [default: the model's, else 2000 as LlamaGen].")
@click.option("--top-p", default=None, type=FiniteFloat(0, 1, min_open=True),
              help="Top-p, 1 = off [default: the model's, else 1].")
@click.option("--grid", default=None, metavar="HxW",
              help="Token grid to generate, e.g. 32x32 (default: the checkpoint's trained grid).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Decode backend (default: cuda on a GPU, else torch).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="'default' (the bundled model; the default), a model folder (save_pretrained), ckpt.pt, "
                   ".safetensors, step.onnx or engine.plan.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="VQ tokenizer checkpoint (default: the one the checkpoint names, if it lies in the checkpoint's folder).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Weight precision; the state stays fp32 (default: bf16 on CUDA, fp32 on CPU).")
@click.option("--weights", type=click.Choice(WEIGHT_CHOICES), default=None,
              help="The decode matrices: float (in --precision), int8 or fp8 (one scale per output channel, "
                   "dequantised inside the GEMM kernels: half the bytes per step; fp8 needs compute capability "
                   "8.9+) [default: as the checkpoint holds them; a quantised one is dequantised on a CPU].")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, MAX_BATCH),
              help="Images decoded together (buffers are sized for this).")
@click.option("--no-cuda-graph", is_flag=True, help="Replay nothing: launch every kernel (debugging).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024),
              help="CPU threads for the token decode (default 1: decode-sized products gain nothing from more).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="PNG grid to write, replaced if it exists (default: lasad_<class ids>_seed<seed>.png, "
                   "_<h>x<w> added for a --grid other than the model's; beyond 8 classes the ids are "
                   "<first 4>-+<N>more-<hash>; a default name never replaces an earlier run's files: "
                   "-2, -3, ... is added).")
@click.option("--nrow", default=None, type=click.IntRange(1, MAX_IMAGES), help="Images per grid row (default: num-samples).")
@click.option("--save-individual", is_flag=True, help="Also write <output stem>/<i:06d>.png for every image.")
@click.option("--json", "json_out", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--list-classes", is_flag=True, help="List the checkpoint's classes and exit.")
@click.version_option(__version__, "--version", prog_name="lasad-run")
def run_main(**options):
    """Generate class-conditional images with LASADGen and write them as a PNG grid."""
    with contextlib.ExitStack() as held:  # the output's name, held until its files are committed
        return _run(held, **options)


def _run(held, classes, num_samples, seed, cfg_scale, cfg_interval, temperature, top_k, top_p, grid,
         backend, checkpoint, tokenizer, device, precision, weights, max_batch, no_cuda_graph, threads, output, nrow,
         save_individual, json_out, no_progress, list_classes):
    from .io import check_writable, safe_text, special_file
    from .params import parse_grid

    if tokenizer is not None and tokenizer.is_dir():
        raise click.ClickException(f"tokenizer {str(tokenizer)!r} is a folder, not a tokenizer file")
    if tokenizer is not None and not tokenizer.is_file():
        kind = special_file(tokenizer)
        raise click.ClickException(f"tokenizer {str(tokenizer)!r} " + (f"is {kind}, not a tokenizer file" if kind
                                                                        else "does not exist"))
    if not classes and not list_classes:
        raise click.UsageError("no class given: pass --class ID (or --list-classes)")
    given = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p)
    # each given value is checked by its option's type before anything is loaded; SamplingParams
    # checks them again, with the model's recommendation, once the model is there
    if grid is not None:
        grid = parse_grid(grid, None)
    if len(classes) * num_samples > MAX_IMAGES:
        raise click.UsageError(f"{len(classes)} classes x {num_samples} samples: at most {MAX_IMAGES} images per run")
    if output is not None and not list_classes:
        if output.suffix.lower() != ".png":
            raise click.UsageError(f"--output {str(output)!r} must end in .png")
        # every file it names (the grid, its JSON record, the --save-individual folder) before any work
        for f in _output_files(output, len(classes) * num_samples if save_individual else 0)[:3]:
            check_writable(f, "--output" if f == output else f"--output {str(output)!r}: the file")
        held.enter_context(hold_named_output(output))
    t0 = time.perf_counter()
    from .params import memory_stage
    from .pipeline import LasadPipeline
    with memory_stage("loading the model and allocating its decode buffers",
                      "free memory, or pass a smaller --max-batch (the buffers are sized for it) or --precision bf16"):
        pipe = LasadPipeline.from_checkpoint(checkpoint, tokenizer=tokenizer, backend=backend, device=device,
                                             precision=precision, max_batch=max_batch,
                                             use_cuda_graph=not no_cuda_graph, threads=threads, weights=weights)
    with pipe:
        cfg = pipe.model.config
        if list_classes:
            names = cfg.class_names or []
            for i in range(cfg.num_classes):
                click.echo(f"{i}\t{safe_text(names[i])}" if names else str(i))
            return
        note = pipe.model.checkpoint_meta.get("note")
        if note:
            click.echo(f"note: {safe_text(pipe.checkpoint_path.name, 80)}: {safe_text(note)}", err=True)
        labels = pipe.class_labels([c for c in classes for _ in range(num_samples)])
        ids = labels.tolist()[::num_samples]
        grid = parse_grid(grid, (cfg.grid_height, cfg.grid_width))
        if pipe.grid_note(grid):
            click.echo(pipe.grid_note(grid), err=True)
        if seed is None:
            seed = 0
            click.echo("seed: 0 (the default; --seed N for others)", err=True)
        if output is None:
            trained = grid == (cfg.grid_height, cfg.grid_width)
            named = default_output(ids, seed, None if trained else grid)
            output, lock, busy = claim_output(named)
            held.enter_context(lock)
            if output != named:
                why = "is being written by another running lasad-run" if busy else "is from an earlier run"
                click.echo(f"{named} {why}: writing {output} (--output FILE.png names the file)", err=True)
        files = _output_files(output, len(labels) if save_individual else 0)
        for f in files[:3]:  # the files this run writes (the rest share the third's folder and length)
            check_writable(f, "output")
        _check_grid_memory(pipe, len(labels), nrow or num_samples, grid)
        _remove_stale_temps({f.parent for f in files[:3]})
        import torch
        t_load = time.perf_counter() - t0
        params = pipe.sampling_params(**given)  # the model's recommendation fills what was left out
        eta = LongJobWarning(-(-len(labels) // pipe.max_batch) * grid.tokens, pipe.device)
        with memory_stage(f"generating {len(labels)} image(s) of {grid.h}x{grid.w} tokens",
                          "free memory, or pass a smaller --max-batch or --grid"):
            out = pipe(labels, params=params, generator=torch.Generator(pipe.device).manual_seed(seed),
                       output_type="np", grid=grid, progress=not no_progress, callback=eta)
        record = {
            "output": str(output), "individual": [str(f) for f in files[2:]], "classes": ids,
            "class_names": [cfg.class_names[i] for i in ids] if cfg.class_names else None,
            "num_samples": num_samples, "seed": seed, "cfg_scale": params.cfg_scale,
            "cfg_interval": params.cfg_interval, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p, "grid": list(grid), "backend": pipe.backend, "device": str(pipe.device),
            "precision": precision or str(pipe.dtype).split(".")[-1], "weights": pipe.weights,
            "cuda_graph": not no_cuda_graph, "max_batch": max_batch,
            "checkpoint": str(pipe.checkpoint_path), "checkpoint_sha256": pipe.checkpoint_id,
            "lasad_version": __version__, "torch": torch.__version__,
            "seconds": {"load": round(t_load, 3), **{k: round(v, 3) for k, v in out.seconds.items()}},
            "ms_per_image": round(out.seconds["generate"] * 1e3 / len(labels), 2),
            "state_bytes": pipe.state_nbytes,
        }
        text = json.dumps(record, indent=2, allow_nan=False) + "\n"
        _commit(files, image_grid(out.images, nrow or num_samples), text, out.images)
    if json_out:
        click.echo(json.dumps(record, allow_nan=False))
    else:
        click.echo(f"wrote {output} ({len(labels)} images, {grid.h}x{grid.w} tokens) in {out.seconds['generate']:.2f} s "
                   f"+ {out.seconds['vq_decode']:.2f} s VQ decode; parameters in {output.with_suffix('.json')}")


def _output_files(output: Path, individual: int) -> list[Path]:
    """The grid, its JSON record, then `individual` per-image PNGs in the folder <output stem>/."""
    folder = output.with_suffix("")
    return [output, output.with_suffix(".json")] + [folder / f"{i:06d}.png" for i in range(individual)]


def _check_grid_memory(pipe, n: int, nrow: int, grid) -> None:
    """The PNG grid (uint8, 2 px padding) beside the n images, checked before the first token;
    the pipeline checks its own decoding memory."""
    from .params import check_memory
    f = getattr(pipe.tokenizer, "downsample_factor", 1)
    H, W = grid.h * f, grid.w * f
    ncol = max(1, min(nrow, n))
    grid_bytes = 3 * (-(-n // ncol) * (H + 2) + 2) * (ncol * (W + 2) + 2)
    check_memory(grid_bytes + 3 * n * H * W, pipe.device if pipe.device.type == "cpu" else _cpu(),
                 f"a PNG grid of {n} images of {H}x{W} pixels", "use fewer images per run or --nrow")


def _cpu():
    import torch
    return torch.device("cpu")


def _remove_stale_temps(folders) -> None:
    from .io import remove_stale_temps
    for folder in folders:
        removed = remove_stale_temps(folder)
        if removed:
            click.echo(f"removed {len(removed)} temporary file(s) left in {folder} by an interrupted run", err=True)


def _commit(files: list[Path], grid, record: str, images) -> None:
    """Write the grid, its record and the per-image files as one commit: afterwards either all
    are from this run or none changed (io.atomic_paths)."""
    from .io import atomic_paths
    with atomic_paths(files) as temps:
        write_png(temps[0], grid)
        Path(temps[1]).write_text(record)
        for tmp, img in zip(temps[2:], images):
            write_png(tmp, img)


if __name__ == "__main__":
    run_main()
