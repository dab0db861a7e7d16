"""`LasadConfig`: the one description of a LASADGen network, with named presets.

The presets follow LlamaGen's GPT-B/L/XL/XXL shapes (docs/model.md, "Sizes") with the softmax attention replaced
by the LASAD mixer, whose four projections (q, f, i, o) have the same 4·d² parameters as LlamaGen's
wqkv + wo, so parameter counts match LlamaGen's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import math

from .ops.lasad.mask import ROW_START_MODES
from .params import MAX_GRID_SIDE

OUTPUT_NORMS = ("rms", "group")

# Upper limits of a config's integer fields, checked before a model is built, so a crafted file
# cannot ask for terabytes. Each is far above every preset (lasad-XXL: 48 layers, width 1536,
# SwiGLU 4096, vocabulary 16384, 1000 classes) and below what would overflow an index.
LIMITS = {
    "vocab_size": 1 << 20, "num_classes": 1 << 20, "n_layer": 1024, "dim": 65536, "n_head": 4096,
    "head_k_dim": 4096, "head_v_dim": 4096, "ffn_dim": 1 << 20,
    "grid_height": MAX_GRID_SIDE, "grid_width": MAX_GRID_SIDE,
}
MAX_CLASS_NAME = 1024  # characters per class name


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


@dataclass
class LasadConfig:
    """Shape and behaviour of one LASADGen model.

    Derived fields (`ffn_dim` when None, `head_v_dim` when None) are filled in `__post_init__`.
    Every field is JSON-compatible, so `to_dict` / `from_dict` round-trip exactly.
    """

    vocab_size: int = 16384          # VQ codebook size
    num_classes: int = 1000          # the class table has num_classes + 1 rows (last = null class)
    n_layer: int = 12
    dim: int = 768
    n_head: int = 12
    head_k_dim: int = 64             # d_k
    head_v_dim: int | None = None    # d_v; None -> dim // n_head
    ffn_dim: int | None = None       # SwiGLU hidden; None -> round_up(8·dim/3, 256)
    grid_height: int = 16            # trained token grid (h × w tokens per image)
    grid_width: int = 16
    row_start: str = "unit"          # spatial-aware decay at row starts: none | unit | reset
    output_norm: str = "rms"         # mixer output norm: full-width RMSNorm or per-head ("group")
    use_lower_bound: bool = True     # HGRN2's layer-wise lower bound on the forget gate
    decay: bool = True               # False: plain linear attention (log-decay 0 everywhere; ablation)
    norm_eps: float = 1e-5
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1       # label -> null class with this probability in training
    initializer_range: float = 0.02
    class_names: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Every field checked for type and range (`LIMITS`) before anything uses it: a config
        read from a file is untrusted."""
        for name in ("vocab_size", "num_classes", "n_layer", "dim", "n_head", "head_k_dim"):
            _check_int(name, getattr(self, name))
        if self.head_v_dim is None:
            if self.dim % self.n_head:
                raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
            self.head_v_dim = self.dim // self.n_head
        if self.ffn_dim is None:
            self.ffn_dim = _round_up(int(2 * 4 * self.dim / 3), 256)
        for name in ("head_v_dim", "ffn_dim", "grid_height", "grid_width"):
            _check_int(name, getattr(self, name))
        for name, choices in (("row_start", ROW_START_MODES), ("output_norm", OUTPUT_NORMS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
        for name in ("use_lower_bound", "decay"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        for name, low, high in (("norm_eps", 0.0, 1.0), ("token_dropout", 0.0, 1.0), ("resid_dropout", 0.0, 1.0),
                                ("ffn_dropout", 0.0, 1.0), ("class_dropout", 0.0, 1.0),
                                ("initializer_range", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high or (name == "norm_eps" and value == 0):
                raise ValueError(f"{name}={value!r} must be a number in {'(' if name == 'norm_eps' else '['}{low:g}, {high:g}]")
            setattr(self, name, float(value))
        if self.class_names is not None:
            names = self.class_names
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise ValueError("class_names must be a list of strings")
            if len(names) != self.num_classes:
                raise ValueError(f"class_names has {len(names)} entries, expected num_classes={self.num_classes}")
            longest = max(names, key=len, default="")
            if len(longest) > MAX_CLASS_NAME:
                raise ValueError(f"class name of {len(longest)} characters: at most {MAX_CLASS_NAME}")
            self.class_names = list(names)

    @property
    def null_class(self) -> int:
        """Row of the class table used as the unconditional ("null") class for CFG."""
        return self.num_classes

    def row_rule(self, width):
        """(row-start mode, grid width) the LASAD op applies: the one place the no-decay ablation
        is expressed. Without decay every position after the class token is a "unit" row start
        (width 1: log-decay 0 everywhere, nothing forgotten; the input gate is unchanged). The
        class position's decay never matters: the state before it is zero."""
        return (self.row_start, width) if self.decay else ("unit", 1)

    @property
    def seq_len(self) -> int:
        """Image tokens per sample at the trained grid (N = h·w)."""
        return self.grid_height * self.grid_width

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        """Recurrent state per sequence: [n_layer, n_head, d_k, d_v] (fp32)."""
        return (self.n_layer, self.n_head, self.head_k_dim, self.head_v_dim)

    def state_nbytes(self, batch: int = 1) -> int:
        """Bytes of fp32 recurrent state for `batch` sequences, whatever the image size."""
        n = 4 * batch
        for s in self.state_shape:
            n *= s
        return n

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "LasadConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config is a JSON object of LasadConfig fields, not a {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LasadConfig fields: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "LasadConfig":
        return cls.from_dict(json.loads(s))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LasadConfig":
        """A named preset (case-insensitive), with any field overridden.

        >>> LasadConfig.from_preset("lasad-B", row_start="none").n_layer
        12
        """
        key = name.lower()
        if key not in LASAD_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(LASAD_PRESET_NAMES)}")
        return cls(**{**LASAD_PRESETS[key], **overrides})


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMITS[name]:
        raise ValueError(f"{name}={value!r} must be an integer in 1..{LIMITS[name]}")


# Parameter counts with vocab 16384 and 1000 classes (1001 class rows), untied head.
LASAD_PRESETS: dict[str, dict] = {
    "lasad-b": dict(n_layer=12, dim=768, n_head=12),     # 110.9M (LlamaGen GPT-B: 111M)
    "lasad-l": dict(n_layer=24, dim=1024, n_head=16),    # 343.0M (GPT-L: 343M)
    "lasad-xl": dict(n_layer=36, dim=1280, n_head=20),   # 774.8M (GPT-XL: 775M)
    "lasad-xxl": dict(n_layer=48, dim=1536, n_head=24),  # 1.41B (GPT-XXL: 1.4B)
    # Small shapes of our own. "lasad-s" is the size class of the bundled demo model
    # (1,906 emoji classes, 4096-entry codebook, 16×16 grid): 14.6M parameters.
    "lasad-s": dict(n_layer=6, dim=384, n_head=6, vocab_size=4096, num_classes=1906),
    # For tests: every code path, seconds on a CPU. 5×7 grid: non-square, odd width.
    "lasad-tiny": dict(n_layer=2, dim=64, n_head=2, head_k_dim=24, vocab_size=97, num_classes=10,
                       grid_height=5, grid_width=7),
}
LASAD_PRESET_NAMES = ("lasad-B", "lasad-L", "lasad-XL", "lasad-XXL", "lasad-S", "lasad-tiny")
