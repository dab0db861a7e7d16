"""The step kernel compiled ahead of time to PTX with a fixed launch ABI (docs/tensorrt.md).

A runtime that launches PTX itself (TensorRT's AOT plugins; later an onnxruntime custom-op
library) passes exactly the node's inputs, then its int32 scalars, then its outputs:

    qfv, lower_bound, past_state, start, H, S, o, present_state       (8 parameters)

`compile_step_kernel` compiles `step.lasad_step_plugin_kernel` (the engine's `_lasad_step_body`
behind the plugin's argument order; one definition of the kernel) with Triton and makes the entry
conform to that ABI and to the driver that will load it:
- Triton >= 3.3 appends hidden parameters to every kernel entry (global and profile scratch
  pointers). They are removed here, and only when Triton reported zero scratch memory of both
  kinds and the PTX body never names them; otherwise compilation fails loudly.
- A newer Triton emits a newer PTX ISA than an older driver accepts (the R580 driver, CUDA 13.0,
  takes ISA 9.0 at most; Triton 3.9 writes 9.4). The ISA is capped at the one the target driver
  supports (`ptx_isa_for_cuda`), by recompiling with Triton's `ptx_version` option.
Where Triton ships `ptxas`, the final PTX is assembled once more as a check.

Triton compiles for a CUDA target without a GPU: `CudaTarget(arch=90, cuda=(13, 0))`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

# The launch ABI: parameter name -> Triton signature type, in launch order.
PLUGIN_ABI = {"qfv": "*fp32", "lb": "*fp32", "past": "*fp32", "start": "*i1", "H": "i32", "S": "i32",
              "o": "*fp32", "present": "*fp32"}
MIN_TRITON = (3, 3)  # ASTSource(constexprs=...) and the scratch-size metadata

# CUDA release -> the newest PTX ISA version it accepts (x10), from the release notes of NVIDIA's
# "Parallel Thread Execution ISA" guide. A driver newer than the last row accepts that row's ISA
# too (PTX is forward compatible), so lookups take the newest row at or below the version.
PTX_ISA_BY_CUDA = {
    (11, 0): 70, (11, 1): 71, (11, 2): 72, (11, 3): 73, (11, 4): 74, (11, 5): 75, (11, 6): 76,
    (11, 7): 77, (11, 8): 78,
    (12, 0): 80, (12, 1): 81, (12, 2): 82, (12, 3): 83, (12, 4): 84, (12, 5): 85, (12, 6): 85,
    (12, 8): 87, (12, 9): 88,
    (13, 0): 90, (13, 1): 91, (13, 2): 92,
}


class KernelABIError(RuntimeError):
    """The compiled kernel does not have the launch ABI (or ISA) its runtime expects."""


def ptx_isa_for_cuda(major: int, minor: int) -> int:
    """Newest PTX ISA (e.g. 90 for ISA 9.0) that a CUDA `major.minor` driver accepts."""
    known = [v for k, v in PTX_ISA_BY_CUDA.items() if k <= (major, minor)]
    if not known:
        raise KernelABIError(f"CUDA {major}.{minor} is older than the oldest supported (11.0)")
    return max(known)


def cuda_driver_version() -> tuple[int, int] | None:
    """(major, minor) of the installed CUDA driver, or None where there is none.
    cuda-python's cuDriverGetVersion (either import path), else libcuda through ctypes."""
    version = None
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        try:
            from cuda import cuda as cu
        except ImportError:
            cu = None
    if cu is not None:
        try:
            err, value = cu.cuDriverGetVersion()
            version = int(value) if int(err) == 0 else None
        except RuntimeError:  # cuda-python without libcuda: "Failed to dlopen libcuda.so.1"
            version = None
    if version is None:
        import ctypes
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            return None
        value = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(value)) != 0:
            return None
        version = value.value
    return version // 1000, (version % 1000) // 10


@dataclass(frozen=True)
class CudaTarget:
    """What the PTX will run on: compute capability (`arch`, e.g. 90) and CUDA driver version."""

    arch: int
    cuda: tuple[int, int]

    @property
    def ptx_isa(self) -> int:
        return ptx_isa_for_cuda(*self.cuda)

    @classmethod
    def current(cls, device: int = 0) -> "CudaTarget":
        """The GPU and driver of this machine (where a TensorRT plan is built, it also runs)."""
        import torch
        driver = cuda_driver_version()
        if driver is None or not torch.cuda.is_available():
            raise KernelABIError("no CUDA GPU and driver here: pass an explicit CudaTarget(arch=..., cuda=...)")
        major, minor = torch.cuda.get_device_capability(device)
        return cls(10 * major + minor, driver)


@dataclass(frozen=True)
class PTXParam:
    name: str
    decl: str  # PTX type qualifiers, e.g. ".u64 .ptr .global .align 1" or ".u32"

    @property
    def nbytes(self) -> int:
        return int(re.search(r"\.[usbf](\d+)", self.decl).group(1)) // 8

    @property
    def is_pointer(self) -> bool:
        return self.nbytes == 8 and (".ptr" in self.decl or ".u64" in self.decl)


@dataclass(frozen=True)
class CompiledStepKernel:
    """PTX of the plugin kernel and how to launch it: grid (`value_blocks`, rows · H, 1), block
    (`threads`, 1, 1), `shared` bytes of dynamic shared memory, arguments as `params`."""

    name: str
    ptx: str
    threads: int
    shared: int
    value_blocks: int
    params: tuple[PTXParam, ...]
    ptx_isa: int
    triton: str
    hidden_removed: int
    ptxas_checked: bool
    triton_ptx: str  # Triton's PTX as it first came out (hidden parameters, default ISA): diagnostics

    def grid(self, rows: int, heads: int) -> tuple[int, int, int]:
        return self.value_blocks, rows * heads, 1


def plugin_kernel_constants(head_k_dim: int, head_v_dim: int, row_start: str, has_lower_bound: bool,
                            scale: float) -> tuple[dict, int]:
    """Constants of `lasad_step_plugin_kernel` for one LasadStep node, and its num_warps. The
    tile is the engine's small-batch tile (the row count is not known when a plan is built)."""
    from .mask import row_start_log_decay
    from .step import step_tiles
    value = row_start_log_decay(row_start)
    BK, BV, warps = step_tiles(head_k_dim, head_v_dim, 0)
    constants = {"K": int(head_k_dim), "V": int(head_v_dim), "BK": BK, "BV": BV,
                 "HAS_OVERRIDE": value is not None, "OVERRIDE": 0.0 if value is None else value,
                 "SCALE": float(scale), "HAS_LB": bool(has_lower_bound)}
    return constants, warps


def version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "10.9.0.34" or "3.6.0+git"."""
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def _triton():
    import triton
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise KernelABIError("compiling the step kernel to PTX needs Triton's compiler, but TRITON_INTERPRET "
                             "is set (the interpreter has no PTX)")
    if version_tuple(triton.__version__) < MIN_TRITON:
        raise KernelABIError(f"compiling the step kernel to PTX needs Triton >= {'.'.join(map(str, MIN_TRITON))}, "
                             f"found {triton.__version__}")
    return triton


def ptx_version(ptx: str) -> int:
    """The `.version` directive of a PTX module, x10 (e.g. 90 for 9.0)."""
    m = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", ptx, flags=re.MULTILINE)
    if m is None:
        raise KernelABIError("the PTX has no .version directive")
    return 10 * int(m.group(1)) + int(m.group(2))


def _entry(ptx: str, name: str) -> tuple[re.Match, list[PTXParam]]:
    m = re.search(rf"\.entry\s+{re.escape(name)}\s*\(([^)]*)\)", ptx)
    if m is None:
        raise KernelABIError(f"the PTX has no .entry {name}")
    params = []
    for decl in (d.strip() for d in m.group(1).split(",")):
        if decl:
            parts = decl.split()
            if parts[0] != ".param":
                raise KernelABIError(f"unexpected PTX parameter declaration {decl!r}")
            params.append(PTXParam(parts[-1], " ".join(parts[1:-1])))
    return m, params


def entry_params(ptx: str, name: str) -> list[PTXParam]:
    """The parameters of `.entry name` in PTX, in order."""
    return _entry(ptx, name)[1]


def _strip_hidden(ptx: str, name: str, n_abi: int, metadata) -> tuple[str, int]:
    m, params = _entry(ptx, name)
    if len(params) < n_abi:
        raise KernelABIError(f"{name} takes {len(params)} parameters, fewer than the {n_abi} of its ABI")
    hidden = params[n_abi:]
    if not hidden:
        return ptx, 0
    scratch = {k: int(getattr(metadata, k, 0) or 0) for k in ("global_scratch_size", "profile_scratch_size")}
    if any(scratch.values()):
        raise KernelABIError(f"{name} needs Triton's scratch memory ({scratch}): its hidden parameters "
                             "cannot be dropped, so TensorRT's launch cannot run it")
    body = ptx[:m.start()] + ptx[m.end():]
    for p in hidden:
        if not p.is_pointer:
            raise KernelABIError(f"{name}: unexpected trailing parameter {p.name} ({p.decl})")
        if re.search(rf"\b{re.escape(p.name)}\b", body):
            raise KernelABIError(f"{name}: the PTX uses Triton's hidden parameter {p.name}; it cannot be dropped")
    signature = ",\n".join(f"\t.param {p.decl} {p.name}" for p in params[:n_abi])
    return ptx[:m.start(1)] + "\n" + signature + "\n" + ptx[m.end(1):], len(hidden)


def _ptxas(arch: int) -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except Exception:  # older Triton: its knob, else a CUDA toolkit on PATH
        try:
            from triton import knobs
            return knobs.nvidia.ptxas.path
        except Exception:
            return shutil.which("ptxas")


def check_with_ptxas(ptx: str, arch: int) -> bool:
    """Assemble `ptx` for `arch` with ptxas (Triton's own, where it ships one); raise on errors.
    Returns False when no ptxas is available."""
    exe = _ptxas(arch)
    if exe is None or not os.path.exists(exe):
        return False
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, flags=re.MULTILINE)
    gpu = target.group(1) if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise KernelABIError(f"ptxas rejects the plugin kernel: {' '.join(r.stderr.split())[:300]}")
    return True


def compile_step_kernel(constants: dict, num_warps: int, target: CudaTarget, dtype: str = "fp32") -> CompiledStepKernel:
    """Compile `lasad_step_plugin_kernel` with `constants` (see `plugin_kernel_constants`) to
    PTX for `target`, with exactly the `PLUGIN_ABI` parameters and a PTX ISA the target's driver
    accepts; `dtype` (fp32 | fp16 | bf16) is the activations' (qfv in, o out; the state is fp32).
    Raises KernelABIError when that cannot be had."""
    triton = _triton()
    from triton.backends.compiler import GPUTarget

    from .step import lasad_step_plugin_kernel as fn
    declared = tuple(n for n, p in zip(fn.arg_names, fn.params) if not p.is_constexpr)
    if declared != tuple(PLUGIN_ABI):
        raise KernelABIError(f"lasad_step_plugin_kernel takes {declared}, the ABI is {tuple(PLUGIN_ABI)}")
    abi = {**PLUGIN_ABI, "qfv": f"*{dtype}", "o": f"*{dtype}"}
    src = triton.compiler.ASTSource(fn=fn, signature={**abi, **{k: "constexpr" for k in constants}},
                                    constexprs=dict(constants))
    gpu = GPUTarget("cuda", target.arch, 32)
    options = {"num_warps": int(num_warps)}
    compiled = triton.compile(src, target=gpu, options=options)
    first = compiled.asm["ptx"]
    if ptx_version(first) > target.ptx_isa:  # Triton's toolchain is newer than the driver
        compiled = triton.compile(src, target=gpu, options={**options, "ptx_version": target.ptx_isa})
    meta = compiled.metadata
    ptx, removed = _strip_hidden(compiled.asm["ptx"], meta.name, len(PLUGIN_ABI), meta)
    isa = ptx_version(ptx)
    if isa > target.ptx_isa:
        raise KernelABIError(f"the plugin kernel is PTX ISA {isa / 10:.1f}; a CUDA {target.cuda[0]}.{target.cuda[1]} "
                             f"driver accepts {target.ptx_isa / 10:.1f} at most")
    params = tuple(entry_params(ptx, meta.name))
    kinds = [p.nbytes for p in params]
    expected = [4 if t == "i32" else 8 for t in PLUGIN_ABI.values()]
    if kinds != expected:
        raise KernelABIError(f"{meta.name} parameter sizes {kinds} differ from the ABI's {expected}")
    checked = check_with_ptxas(ptx, target.arch)
    V, BV = constants["V"], constants["BV"]
    return CompiledStepKernel(name=meta.name, ptx=ptx, threads=meta.num_warps * 32, shared=int(meta.shared),
                              value_blocks=-(-V // BV), params=params, ptx_isa=isa, triton=triton.__version__,
                              hidden_removed=removed, ptxas_checked=checked, triton_ptx=first)
