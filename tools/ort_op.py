"""`python -m lasad_tools.ort_op build`: compile the LasadStep custom-op library for onnxruntime's
CUDA provider (plugins/ort/lasad_step_op.cc) and check that onnxruntime loads it.

    python -m lasad_tools.ort_op build                       # to the default place the backend looks
    python -m lasad_tools.ort_op build --out build/ --ort-include ~/ort/include/onnxruntime/core/session

Needs a C++17 compiler (g++, c++, clang++; or nvcc as the driver) and onnxruntime's C API header
`onnxruntime_c_api.h` (with the headers it includes). onnxruntime's wheels ship no headers, so
they come from --ort-include / $ORT_INCLUDE, or are downloaded once from microsoft/onnxruntime at
the installed version's tag (include/onnxruntime/core/session/). No CUDA toolkit is needed: the
library opens the driver at run time and runs PTX that Triton compiles when a session is made.
The backend finds the library at $LASAD_ORT_OP, else at the default place printed here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import click

from lasad_engine.cli import OneLineErrors
from lasad_engine.io import UserError, atomic_path

HEADER = "onnxruntime_c_api.h"
MIN_API_VERSION = 16  # KernelInfo/KernelContext functions and CreateKernelV2/KernelComputeV2
COMPILERS = ("g++", "c++", "clang++", "nvcc")
HEADER_URL = "https://raw.githubusercontent.com/microsoft/onnxruntime/v{version}/include/onnxruntime/core/session/{name}"
NAME = "lasad_tools.ort_op"


class BuildError(UserError):
    """What the build lacks, in one line."""


def find_compiler(given: str | None = None) -> str:
    """The C++ compiler: `given`, $CXX, or the first of COMPILERS on PATH."""
    for name in [given] if given else [os.environ.get("CXX"), *COMPILERS]:
        if name and shutil.which(name):
            return shutil.which(name)
    if given:
        raise BuildError(f"compiler {given!r} not found on PATH")
    raise BuildError(f"no C++ compiler found (looked for $CXX and {', '.join(COMPILERS)} on PATH): "
                     "install g++ (apt-get install g++) or pass --cxx")


def _includes(text: str) -> list[str]:
    return re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M)


def check_headers(folder: Path) -> int:
    """The C API version of the headers in `folder` (every quoted include present); one-line errors."""
    path = folder / HEADER
    if not path.is_file():
        raise BuildError(f"{folder}: no {HEADER} there (onnxruntime's C API header, from microsoft/onnxruntime "
                         "include/onnxruntime/core/session/)")
    text = path.read_text(errors="replace")
    missing = [h for h in _includes(text) if not (folder / h).is_file()]
    if missing:
        raise BuildError(f"{folder}: {HEADER} includes {', '.join(missing)}, which is not there")
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if m is None or int(m.group(1)) < MIN_API_VERSION:
        found = m.group(1) if m else "none"
        raise BuildError(f"{path}: ORT_API_VERSION {found}; the op needs onnxruntime >= 1.{MIN_API_VERSION} headers")
    return int(m.group(1))


def download_headers(version: str, folder: Path) -> Path:
    """Fetch onnxruntime_c_api.h and what it includes at tag v{version} into `folder`."""
    todo, done = [HEADER], set()
    tmp = Path(tempfile.mkdtemp(prefix=".ort-include-", dir=folder.parent if folder.parent.exists() else None))
    try:
        while todo:
            name = todo.pop()
            if name in done:
                continue
            url = HEADER_URL.format(version=version, name=name)
            with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - a fixed https URL
                text = r.read().decode()
            (tmp / name).write_text(text)
            done.add(name)
            todo += _includes(text)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(f"onnxruntime's C API headers are not installed (its wheels ship none) and downloading "
                         f"them for v{version} failed ({type(e).__name__}): pass --ort-include DIR with {HEADER} "
                         "from microsoft/onnxruntime include/onnxruntime/core/session/") from None
    return folder


def resolve_headers(given: Path | None, version: str) -> Path:
    """--ort-include, $ORT_INCLUDE, a cached download, or a new download."""
    given = given or (Path(os.environ["ORT_INCLUDE"]) if os.environ.get("ORT_INCLUDE") else None)
    if given is not None:
        check_headers(given)
        return given
    from lasad_plugins.ort import default_library_path
    cached = default_library_path().parent / "include"
    if not (cached / HEADER).is_file():
        download_headers(version, cached)
    check_headers(cached)
    return cached


def compile_library(compiler: str, headers: Path, out: Path) -> list[str]:
    """Compile plugins/ort/lasad_step_op.cc into `out` (atomically); returns the command."""
    from lasad_plugins.ort import SOURCE
    flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-Wall"]
    if Path(compiler).name == "nvcc":  # nvcc drives the host compiler; no device code here
        flags = ["-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC,-Wall", "-x", "cu"]
    with atomic_path(out) as tmp:
        cmd = [compiler, *flags, f"-I{headers}", str(SOURCE), "-o", tmp, "-ldl"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            first = next((ln for ln in lines if "error" in ln), lines[0] if lines else "no output")
            raise BuildError(f"{Path(compiler).name} failed to compile {SOURCE.name}: {first.strip()} "
                             f"({len(lines)} lines of output)")
    return cmd


def check_loads(library: Path) -> None:
    """onnxruntime registers the library's custom ops (no GPU needed for this)."""
    import onnxruntime as ort
    try:
        ort.SessionOptions().register_custom_ops_library(str(library))
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise BuildError(f"onnxruntime {ort.__version__} could not load {library}: {' '.join(str(e).split())[:300]}") from None


@click.group(NAME, cls=type("OrtOpGroup", (OneLineErrors, click.Group), {}),
             context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """The LasadStep custom-op library for onnxruntime's CUDA provider."""


@main.command("build")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for liblasad_ort_op.so. Default: where the onnxruntime backend looks "
                   "(~/.cache/lasad/ort-VERSION/); elsewhere, set LASAD_ORT_OP to the file.")
@click.option("--ort-include", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with onnxruntime_c_api.h (default: $ORT_INCLUDE, else downloaded for the installed version).")
@click.option("--cxx", default=None, help="C++ compiler (default: $CXX, else g++, c++, clang++, nvcc).")
@click.option("--check/--no-check", default=True, show_default=True, help="Load the library into onnxruntime.")
def build(out, ort_include, cxx, check):
    """Compile liblasad_ort_op.so."""
    try:
        import onnxruntime
    except ImportError:
        raise BuildError("onnxruntime is not installed: pip install onnxruntime-gpu") from None
    from lasad_plugins.ort import LIBRARY_NAME, default_library_path
    compiler = find_compiler(cxx)
    headers = resolve_headers(ort_include, onnxruntime.__version__)
    api = check_headers(headers)
    library = (out / LIBRARY_NAME) if out is not None else default_library_path()
    compile_library(compiler, headers, library)
    if check:
        check_loads(library)
    click.echo(json.dumps({"library": str(library), "compiler": compiler, "headers": str(headers),
                           "header_api_version": api, "onnxruntime": onnxruntime.__version__,
                           "backend_finds_it": library.resolve() == default_library_path().resolve()
                           or os.environ.get("LASAD_ORT_OP") == str(library)}))


if __name__ == "__main__":
    sys.exit(main())
