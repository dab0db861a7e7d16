"""Console-script entry points that are interruptible from their first line.

A command spends its first second importing (click, numpy, torch) before its own error handling
(`cli.OneLineErrors`) runs; a Ctrl-C or SIGTERM then would end in a traceback. These entry
points install a handler before importing anything: a signal during start-up exits at once with
one line and 128 + the signal number (nothing has been written yet), and the command's own
handling takes over as soon as it runs. This module imports only the standard library.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    name = os.path.basename(sys.argv[0]) or "lasad"
    what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
    os.write(2, f"{name}: {what} while starting; nothing was written\n".encode())
    os._exit(128 + signum)


def startup_guard(module: str, attr: str):
    """An entry point that imports `module` and calls its `attr` with start-up signals handled."""
    def main():
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):  # not if ignored
                previous[sig] = signal.signal(sig, _interrupted_while_starting)
        try:
            command = getattr(importlib.import_module(module), attr)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return command()
    main.__name__ = main.__qualname__ = f"{attr}_guarded"
    return main


lasad_run = startup_guard("lasad_engine.cli", "run_main")
lasad_serve = startup_guard("lasad_engine.serve.cli", "serve_main")
