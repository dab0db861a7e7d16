"""Weight-only quantisation of the decode GEMMs: int8 (or fp8 e4m3) weights with one fp32 scale
per output channel, dequantised inside the GEMM (ops/linear.py: `quantized_gemm` is the one
definition, the Triton kernel computes it with the weights streamed as 1 byte an element).

At batch 1 every decode step streams all the weights once, so their bytes set the step's floor;
int8 halves them. What is quantised: the matrices the model owns as decode GEMMs
(`attention.qfv`, `attention.o_proj`, `feed_forward.w13`, `feed_forward.w2` of every layer, and
the head `output` unless `head=False`). Embeddings, norms and the lower bounds stay as they are.

Scales are symmetric, per output channel: s = amax(|W[n, :]|) / Q (Q = 127 for int8, 448 for
e4m3), computed in fp32 from the weights as they were stored (before any cast to bf16), and
W_q = round(W / s) (int8: round half to even, clamped to ±127; fp8: the cast's round to
nearest). A row of zeros gets s = 1 and W_q = 0.

In a model, a quantised matrix is a `QuantLinear`: `weight` int8 / e4m3 `[N, K]` (a parameter
without gradient, so the parameter count stays the model's) and the buffer `weight_scale` fp32
`[N]`; `model.to(dtype)` casts neither (the activations follow the dtype, the weights keep their
format). In a checkpoint (either form) the same two entries per matrix, `<name>.weight` and
`<name>.weight_scale`: about half the bytes of an fp16/bf16 file.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .ops.linear import QUANT_DTYPES, fused_linear
from .params import WEIGHT_CHOICES, EngineError  # noqa: F401 (WEIGHT_CHOICES: re-exported)

# the formats a user names (the `weights=` option), their storage dtype and largest magnitude
FORMATS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}
QUANTIZE_HEAD = True  # the head too (lasad-B: 13 % of its bytes; benchmarks/int8_bench.py measures both)
FP8_CAPABILITY = (8, 9)  # e4m3 loads and conversions in Triton: Ada (sm_89), Hopper (sm_90) and later
# the quantised matrices of each block, and the head
LAYER_TARGETS = ("attention.qfv", "attention.o_proj", "feed_forward.w13", "feed_forward.w2")
HEAD = "output"
SCALE_SUFFIX = ".weight_scale"


def format_of(dtype: torch.dtype) -> str | None:
    """"int8" / "fp8" for a quantised weight's dtype, None for a float one."""
    return next((name for name, d in FORMATS.items() if d == dtype), None)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise EngineError(f"weights={fmt!r} is not a quantised format; use one of {', '.join(FORMATS)}")
    return fmt


def check_device(fmt: str | None, device) -> None:
    """fp8 weights run where Triton converts e4m3 in registers (compute capability ≥ 8.9): one
    EngineError line elsewhere. int8 and float weights run anywhere."""
    if fmt != "fp8":
        return
    device = torch.device(device)
    if device.type != "cuda":
        raise EngineError(f"weights='fp8' needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                          f"this device is {device}: use weights='int8' (or 'float')")
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_CAPABILITY:
        raise EngineError(f"weights='fp8' needs compute capability 8.9 or newer (Ada, Hopper); {device} has "
                          f"{cap[0]}.{cap[1]}: use weights='int8' (or 'float')")


def quantize_weight(weight: torch.Tensor, fmt: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q int8 / e4m3 `[N, K]`, scale fp32 `[N]`) of a float weight `[N, K]`, symmetric per
    output channel (module docstring), on the weight's device."""
    check_format(fmt)
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight takes a [N, K] matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX[fmt]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    r = w / scale[:, None]
    if fmt == "int8":
        q = r.round().clamp_(-127, 127).to(torch.int8)
    else:
        q = r.clamp_(-QMAX[fmt], QMAX[fmt]).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_q · s per row, in fp32 (one rounding), then `dtype`."""
    return (q.float() * scale.float()[:, None]).to(dtype)


class QuantLinear(nn.Module):
    """A bias-free linear layer with weight-only quantised weights: `weight` int8 / e4m3
    `[out, in]` (no gradient), `weight_scale` fp32 `[out]`. forward = ops.linear's torch
    definition (`fused_linear(..., weight_scale=)`), in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "int8"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FORMATS[check_format(fmt)]),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str = "int8") -> "QuantLinear":
        out_features, in_features = linear.weight.shape
        with torch.device(linear.weight.device):
            m = cls(in_features, out_features, fmt)
        if linear.weight.device.type != "meta":
            q, s = quantize_weight(linear.weight, fmt)
            m.weight.data, m.weight_scale = q, s
        return m

    @property
    def fmt(self) -> str:
        return format_of(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_linear(x, self.weight, weight_scale=self.weight_scale, backend="torch")

    def dequantized(self, dtype: torch.dtype) -> nn.Linear:
        """An nn.Linear holding W_q · s in `dtype`."""
        with torch.device(self.weight.device):
            lin = nn.Linear(self.in_features, self.out_features, bias=False, dtype=dtype)
        if self.weight.device.type != "meta":
            lin.weight.data = dequantize_weight(self.weight, self.weight_scale, dtype)
        return lin

    def _apply(self, fn, recurse=True):
        # Moves (device) apply; casts (model.to(bf16), .half()) do not: the weight keeps its
        # format and the scales stay fp32 (bf16 scales would add an error of their own). Both
        # go through `fn` as integer bits, which no floating-point cast touches.
        w, s = self.weight, self.weight_scale
        self.weight = nn.Parameter(fn(w.data.view(torch.int8)).view(w.dtype), requires_grad=False)
        self.weight_scale = fn(s.view(torch.int32)).view(torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.fmt}"


def target_names(model: nn.Module, head: bool = QUANTIZE_HEAD) -> list[str]:
    """Module names of the matrices `quantize_` quantises: every block's four, then the head."""
    names = [f"layers.{i}.{t}" for i in range(len(model.layers)) for t in LAYER_TARGETS]
    return names + ([HEAD] if head else [])


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_(model: nn.Module, fmt: str = "int8", *, head: bool = QUANTIZE_HEAD) -> nn.Module:
    """Quantise a LasadGen's decode matrices in place (module docstring); returns the model. A
    matrix already quantised stays as it is if it is in `fmt`; in the other format, EngineError."""
    check_format(fmt)
    for name in target_names(model, head):
        m = model.get_submodule(name)
        if isinstance(m, QuantLinear):
            if m.fmt != fmt:
                raise EngineError(f"{name} holds {m.fmt} weights already; refusing to quantise them again to {fmt} "
                                  f"(load the float checkpoint with weights={fmt!r})")
            continue
        _set(model, name, QuantLinear.from_linear(m, fmt))
    return model


def dequantize_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every QuantLinear of `model` by an nn.Linear holding W_q · s in `dtype` (default:
    the dtype of the model's norms, i.e. of its activations); returns the model."""
    dtype = dtype or activation_dtype(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            _set(model, name, m.dequantized(dtype))
    return model


def weights_format(model: nn.Module) -> str:
    """"int8" / "fp8" when the model's decode matrices are quantised, else "float"."""
    fmts = {m.fmt for m in model.modules() if isinstance(m, QuantLinear)}
    if len(fmts) > 1:
        raise EngineError(f"the model mixes weight formats {sorted(fmts)}")
    return fmts.pop() if fmts else "float"


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its norms' (quantised matrices keep their own dtype)."""
    return model.norm.weight.dtype


# State dicts (checkpoints): the same quantisation before a model exists.

def quantized_modules(state: dict) -> dict[str, str]:
    """{module name: "int8" | "fp8"} of the quantised matrices a state dict holds (a `.weight`
    in a quantised dtype beside a `.weight_scale`)."""
    out = {}
    for key, t in state.items():
        if key.endswith(SCALE_SUFFIX):
            name = key[: -len(SCALE_SUFFIX)]
            w = state.get(name + ".weight")
            out[name] = format_of(w.dtype) if isinstance(w, torch.Tensor) else None
    return out


def quantize_state(state: dict, fmt: str, n_layer: int, *, head: bool = QUANTIZE_HEAD) -> dict:
    """A copy of a float state dict with the decode matrices quantised (`quantize_weight`)."""
    check_format(fmt)
    names = [f"layers.{i}.{t}" for i in range(n_layer) for t in LAYER_TARGETS] + ([HEAD] if head else [])
    out = dict(state)
    for name in names:
        w = out.get(name + ".weight")
        if w is None or name + SCALE_SUFFIX in out:
            continue
        out[name + ".weight"], out[name + SCALE_SUFFIX] = quantize_weight(w, fmt)
    return out


def dequantize_state(state: dict) -> dict:
    """A copy of a state dict with every quantised matrix as fp32 W_q · s (its scale dropped)."""
    out = dict(state)
    for name in quantized_modules(state):
        q, s = out.pop(name + ".weight"), out.pop(name + SCALE_SUFFIX)
        out[name + ".weight"] = dequantize_weight(q, s)
    return out


def make_quant_modules_(model: nn.Module, formats: dict[str, str]) -> None:
    """Swap the named nn.Linear modules of `model` for empty QuantLinear of the given formats
    (a model on the meta device about to receive a quantised state dict)."""
    for name, fmt in formats.items():
        m = model.get_submodule(name)
        if not isinstance(m, QuantLinear):
            _set(model, name, QuantLinear.from_linear(m, fmt))


def is_quant_dtype(dtype: torch.dtype) -> bool:
    return dtype in QUANT_DTYPES
