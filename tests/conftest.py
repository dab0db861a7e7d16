"""Shared test set-up.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before
any kernel is defined, so it is set here, before the tests import lasad_engine.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


# flash-linear-attention: the chunked op on CUDA. Checked by spec only (importing it needs a GPU).
import importlib.util

HAS_FLA = importlib.util.find_spec("fla") is not None
needs_fla = pytest.mark.skipif(not HAS_FLA, reason="needs flash-linear-attention "
                                                   "(pip install -e '.[gpu]' in lasad's folder): "
                                                   "the chunked op on CUDA runs fla's chunk_gla")

try:
    import tensorrt  # noqa: F401
    HAS_TENSORRT = HAS_CUDA
except ImportError:
    HAS_TENSORRT = False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    skip_trt = pytest.mark.skip(reason="needs NVIDIA TensorRT >= 10.9 and a GPU it supports (not installable "
                                       "here: see docs/tensorrt.md)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not HAS_TENSORRT:
            item.add_marker(skip_trt)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (NaN anywhere gives inf: NaN never passes)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = rel_err(x, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised head and unit norms would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name == "lower_bounds":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model
