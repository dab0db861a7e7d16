"""LASADGen: LlamaGen's class-conditional GPT with the LASAD mixer (docs/model.md).

Two ways to run the same weights:
- `LasadGen.forward(tokens, labels)`: parallel over the sequence (training, teacher forcing),
  through the chunked form of the op;
- `LasadGen.step(ids, pos, state)`: one position for a batch of sequences, updating a
  preallocated `LasadState` in place (decode), through the step form of the op.

The model owns its fusion (as gpt-fast's attention owns `wqkv`): W_q, W_f and W_i are one
matrix `attention.qfv`, W_1 and W_3 one matrix `feed_forward.w13`. Both forms read the same
parameters through the same gates (`fused_gates`) and norms; the step runs each GEMM with its
neighbours as one op (`ops.linear.fused_linear`), which a backend maps onto one kernel. Older
checkpoints with the separate matrices load through a `load_state_dict` pre-hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import LasadConfig
from .ops.lasad import (chunk_lasad, fused_gates, lasad_fused_step_, layer_lower_bounds,
                        naive_recurrent_lasad)
from .ops.embed import embed_step
from .ops.linear import fused_linear
from .ops.norms import rms_norm, swiglu

# How the parallel forward runs the op: fla's chunk_gla (CUDA), the pure-torch chunked form, or
# the reference loop. The decode step's backends are "torch" and "triton" (ops.norms).
FORWARD_BACKENDS = ("fla", "torch", "naive")
STEP_BACKENDS = ("torch", "triton")


# The fused matrices and the separate ones older checkpoints hold, stacked in this order (dim 0).
FUSED_FROM = {"qfv": ("q_proj", "f_proj", "i_proj"), "w13": ("w1", "w3")}


def _merge_old_keys(state_dict: dict, prefix: str, fused: str) -> None:
    """Stack `prefix + part + ".weight"` of each old part into `prefix + fused + ".weight"`."""
    keys = [f"{prefix}{p}.weight" for p in FUSED_FROM[fused]]
    if all(k in state_dict for k in keys):
        state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(k) for k in keys])


def upgrade_state_dict(state_dict: dict) -> dict:
    """A copy of a state dict with older layouts converted (what the modules' load hooks do, for
    readers that check keys and shapes before building anything)."""
    out = dict(state_dict)
    for fused, parts in FUSED_FROM.items():
        tail = f"{parts[0]}.weight"
        for key in [k for k in out if k.endswith(tail)]:
            _merge_old_keys(out, key[: -len(tail)], fused)
    return out


def _merge_hook(fused: str):
    def hook(state_dict, prefix, *args):
        _merge_old_keys(state_dict, prefix, fused)
    return hook


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """Gates and norms compute in fp32 (fp64 when the whole model is fp64, for references)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm: computed in fp32, weight only. With `groups` > 1 each of the `groups`
    equal slices of the last dim is normalised on its own (the per-head output norm)."""

    def __init__(self, dim: int, eps: float = 1e-5, groups: int = 1):
        super().__init__()
        self.eps, self.groups = eps, groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.groups, backend="torch")


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x), with W_1 and W_3 stacked as `w13` `[2F, d]`."""

    def __init__(self, cfg: LasadConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)
        self._register_load_state_dict_pre_hook(_merge_hook("w13"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(swiglu(self.w13(x), backend="torch")))


class LasadAttention(nn.Module):
    """The LASAD mixer: HGRN2 gates + spatial-aware decay (docs/model.md).

    Parameters: qfv `[2·H·K + H·V, d]` (W_q, W_f, W_i stacked); o_proj `[d, H·V]`; g_norm `[H·V]`.
    """

    def __init__(self, cfg: LasadConfig):
        super().__init__()
        self.cfg = cfg
        H, K, V, d = cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.dim
        self.qfv = nn.Linear(d, 2 * H * K + H * V, bias=False)
        self.o_proj = nn.Linear(H * V, d, bias=False)
        self.g_norm = RMSNorm(H * V, cfg.norm_eps, groups=H if cfg.output_norm == "group" else 1)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self._register_load_state_dict_pre_hook(_merge_hook("qfv"))

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor | None, width: int,
                backend: str | None = None) -> torch.Tensor:
        """Parallel form. x `[B, T, d]` (position 0 = class token) -> `[B, T, d]`."""
        cfg = self.cfg
        q, k, v, g = fused_gates(self.qfv(x), lower_bound, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim)
        mode, width = cfg.row_rule(width)
        kw = dict(width=width, row_start=mode)
        if backend == "naive":
            o, _ = naive_recurrent_lasad(q.to(v.dtype), k.to(v.dtype), v, g, **kw)
        else:
            o, _ = chunk_lasad(q.to(v.dtype), k.to(v.dtype), v, g, backend=backend, **kw)
        o = self.g_norm(o.flatten(-2))
        return self.resid_dropout(self.o_proj(o.to(x.dtype)))  # x.dtype: o_proj's weight may be int8


def _scale(linear: nn.Module) -> torch.Tensor | None:
    """The per-channel scale of a weight-only quantised matrix (quant.QuantLinear), else None:
    what `fused_linear` takes beside the weight."""
    return getattr(linear, "weight_scale", None)


def _in_place_step(mode: str, backend: str | None, slots: torch.Tensor | None = None):
    """The LASAD op of the decode step on a preallocated state: updated in place (the rows, or
    their `slots` of a state pool), returned."""
    def op(qfv, lower_bound, state, start):
        return lasad_fused_step_(qfv, lower_bound, state, start, mode, backend=backend, slots=slots), state
    return op


class LasadBlock(nn.Module):
    def __init__(self, cfg: LasadConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = LasadAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, lower_bound, width, backend=None):
        h = x + self.attention(self.attention_norm(x), lower_bound, width, backend)
        return h + self.feed_forward(self.ffn_norm(h))

    def step(self, x: torch.Tensor, lower_bound: torch.Tensor | None, state: torch.Tensor,
             start: torch.Tensor, lasad_op, backend: str | None = None):
        """One position of this block, each GEMM with its neighbours as one op.

        Args:
            x: residual stream `[R, d]`.
            lower_bound: this layer's HGRN2 bound `[H·K]` fp32, or None.
            state: this layer's state `[R, H, K, V]` fp32 (or whatever `lasad_op` takes).
            start: bool `[R]` (or `[1]`), where the row's position starts an image row.
            lasad_op: `(qfv, lower_bound, state, start) -> (o [R, H, V], new state)`.
            backend: "torch" | "triton" for the norms and linear layers.
        Returns:
            (x `[R, d]`, the new state).
        """
        a, f, eps = self.attention, self.feed_forward, self.attention_norm.eps
        # the kernels update the residual stream in place (x is the step's own buffer); the
        # traced and reference forms keep it functional
        inplace = backend == "triton"
        qfv = fused_linear(x, a.qfv.weight, weight_scale=_scale(a.qfv), norm_weight=self.attention_norm.weight,
                           eps=eps, backend=backend)
        o, state = lasad_op(qfv, lower_bound, state, start)
        h = fused_linear(o.flatten(-2), a.o_proj.weight, weight_scale=_scale(a.o_proj), norm_weight=a.g_norm.weight,
                         eps=a.g_norm.eps,
                         norm_groups=a.g_norm.groups, residual=x, out=x if inplace else None, backend=backend)
        u = fused_linear(h, f.w13.weight, weight_scale=_scale(f.w13), norm_weight=self.ffn_norm.weight, eps=eps,
                         swiglu=True, backend=backend)
        return fused_linear(u, f.w2.weight, weight_scale=_scale(f.w2), residual=h, out=h if inplace else None,
                            backend=backend), state


class ClassEmbedder(nn.Module):
    """LlamaGen's LabelEmbedder: `num_classes + 1` rows, the last one the null class."""

    def __init__(self, cfg: LasadConfig):
        super().__init__()
        self.num_classes, self.dropout = cfg.num_classes, cfg.class_dropout
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


@dataclass
class LasadState:
    """Everything a decode step mutates, allocated once per (rows, device).

    ssm: `[n_layer, B, H, K, V]` fp32 recurrent state (one allocation: one zero_ resets it). A
        step runs its rows on rows `[:R]`, or, given `slots`, on any B state rows of the pool.
    pos: int64 `[1]` (every row at one position) or `[B]` (each row's own), the sequence
        position (a device tensor, never a Python int in a graph).
    width: int64 `[1]` or `[B]`, the grid width in tokens (row-start rule); any width, no
        reallocation.
    logits: fp32 `[B, vocab]` output of the last step.
    """

    ssm: torch.Tensor
    pos: torch.Tensor
    width: torch.Tensor
    logits: torch.Tensor

    @property
    def batch(self) -> int:
        return self.ssm.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ssm, self.pos, self.width, self.logits))

    @property
    def state_bytes(self) -> int:
        """Bytes of recurrent state (what grows with rows, never with tokens)."""
        return self.ssm.numel() * self.ssm.element_size()

    def rows(self, n: int) -> "LasadState":
        """A view of the first `n` rows (same storage: no allocation, fixed addresses)."""
        per_row = lambda t: t if t.numel() == 1 else t[:n]  # noqa: E731
        return LasadState(self.ssm[:, :n], per_row(self.pos), per_row(self.width), self.logits[:n])

    def zero_rows(self, slots: torch.Tensor) -> None:
        """Zero the state of the given state rows (an image joining its slots)."""
        self.ssm.index_fill_(1, slots, 0.0)

    def save_rows(self, n: int) -> torch.Tensor:
        """A copy of the first `n` rows' state (to undo the warm-up runs of a graph capture)."""
        return self.ssm[:, :n].clone()

    def load_rows(self, saved: torch.Tensor) -> None:
        self.ssm[:, :saved.shape[1]].copy_(saved)

    def reset(self, width: int | None = None) -> "LasadState":
        """Zero the state and position in place (and set a new grid width)."""
        self.ssm.zero_()
        self.pos.zero_()
        if width is not None:
            self.width.fill_(width)
        return self


def _forward_backend(backend, op, chunk_backend):
    """`backend` of the parallel forward, with the older keywords still accepted (warned)."""
    if op is not None or chunk_backend is not None:
        import warnings
        warnings.warn("LasadGen.forward(op=, chunk_backend=) is deprecated: pass backend='naive'|'torch'|'fla'",
                      DeprecationWarning, stacklevel=3)
        old = "naive" if op == "naive" else chunk_backend
        if backend is not None and old is not None and old != backend:
            raise ValueError(f"backend={backend!r} conflicts with op={op!r}, chunk_backend={chunk_backend!r}")
        backend = backend or old
    if backend not in (None, *FORWARD_BACKENDS):
        raise ValueError(f"backend={backend!r} is not one of {', '.join(FORWARD_BACKENDS)}")
    return backend


class LasadGen(nn.Module):
    """LASADGen. Parameter names follow LlamaGen's GPT (`tok_embeddings`, `cls_embedding`,
    `layers.{i}.attention_norm`, `layers.{i}.feed_forward.w1`, `norm`, `output`)."""

    def __init__(self, config: LasadConfig):
        super().__init__()
        self.config = cfg = config
        self.cls_embedding = ClassEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(LasadBlock(cfg) for _ in range(cfg.n_layer))
        if cfg.use_lower_bound:
            self.lower_bounds = nn.Parameter(torch.zeros(cfg.n_layer, cfg.n_head * cfg.head_k_dim))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LlamaGen's initialisation: normal(0, 0.02) for linear and embedding weights, ones for
        norms, zeros for the lower bounds, and a zero output head."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if self.config.use_lower_bound:
            nn.init.zeros_(self.lower_bounds)
        nn.init.zeros_(self.output.weight)

    def _lower_bounds(self) -> list[torch.Tensor | None]:
        """Per-layer bound `[H·K]` fp32, None for layer 0 and when the bound is off. In
        inference the bounds are computed once per value of the parameter, not per step."""
        if not self.config.use_lower_bound:
            return [None] * self.config.n_layer
        raw = self.lower_bounds
        key = (raw.data_ptr(), raw._version, raw.device)
        if torch.is_grad_enabled() and raw.requires_grad:
            lb = layer_lower_bounds(raw)
        elif getattr(self, "_lb_cache", (None,))[0] == key:
            return self._lb_cache[1]
        else:
            lb = layer_lower_bounds(raw.detach())
        out = [None] + [lb[i].contiguous() for i in range(1, self.config.n_layer)]
        if not (torch.is_grad_enabled() and raw.requires_grad):
            self._lb_cache = (key, out)
        return out

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, *, width: int | None = None,
                backend: str | None = None, op: str | None = None, chunk_backend: str | None = None) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            tokens: int64 `[B, T]` image tokens x_0 … x_{T-1} in raster order (T ≤ h·w, any T ≥ 1).
            labels: int64 `[B]` class ids (num_classes = the null class).
            width: grid width for the row-start rule. Default: config.grid_width.
            backend: how the LASAD op runs, one of FORWARD_BACKENDS: "fla" (fla's chunk_gla, CUDA),
                "torch" (the chunked form in torch) or "naive" (the reference loop). Default: fla
                on CUDA, else torch.
            op, chunk_backend: deprecated spellings of `backend` ("naive" / "fla" / "torch").
        Returns:
            fp32 logits `[B, T, vocab]`; logits[:, t] predict x_t from the class and x_0 … x_{t-1}.
        """
        backend = _forward_backend(backend, op, chunk_backend)
        width = self.config.grid_width if width is None else width
        x = torch.cat([self.cls_embedding(labels)[:, None], self.tok_embeddings(tokens[:, :-1])], 1)
        x = self.tok_dropout(x)
        for layer, lb in zip(self.layers, self._lower_bounds()):
            x = layer(x, lb, width, backend)
        logits = self.output(self.norm(x))
        return logits.to(_at_least_fp32(logits.dtype))

    def allocate_state(self, batch: int, device=None, width: int | None = None) -> LasadState:
        """Allocate the decode buffers for up to `batch` rows (with CFG, rows = 2 × images)."""
        cfg = self.config
        device = self.output.weight.device if device is None else torch.device(device)
        return LasadState(
            ssm=torch.zeros(cfg.n_layer, batch, cfg.n_head, cfg.head_k_dim, cfg.head_v_dim,
                            dtype=torch.float32, device=device),
            pos=torch.zeros(1, dtype=torch.int64, device=device),
            width=torch.full((1,), cfg.grid_width if width is None else width, dtype=torch.int64,
                             device=device),
            logits=torch.zeros(batch, cfg.vocab_size, dtype=torch.float32, device=device),
        )

    def embed_step(self, ids: torch.Tensor, pos: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """Input of one step `[B, d]`: the class row at p = 0, the token row after (ops.embed)."""
        return embed_step(ids, pos, 1, self.cls_embedding.embedding_table.weight, self.tok_embeddings.weight,
                          backend=backend)[0]

    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, width: torch.Tensor, states, lasad_op,
                    backend: str | None = None):
        """The decode step as a function of its inputs: what `step` runs in place and what the
        exports trace (with `lasad_op` the custom node or the functional step).

        Args:
            ids: int64 `[R]`; pos: int64 `[1]`; width: int64 `[1]` (or a Python int).
            states: per-layer states, indexable by layer (`[L, R, H, K, V]` or a list).
            lasad_op: `(qfv, lower_bound, state_i, start) -> (o [R, H, V], new state_i)`.
            backend: "torch" | "triton" for the norms and linear layers. Default: by device.
        Returns:
            (logits `[R, vocab]` in the weights' dtype, list of the new per-layer states).
        """
        x, start = embed_step(ids, pos, self.config.row_rule(width)[1], self.cls_embedding.embedding_table.weight,
                              self.tok_embeddings.weight, backend=backend)
        new_states = []
        for i, (layer, lb) in enumerate(zip(self.layers, self._lower_bounds())):
            x, s = layer.step(x, lb, states[i], start, lasad_op, backend)
            new_states.append(s)
        logits = fused_linear(x, self.output.weight, weight_scale=_scale(self.output), norm_weight=self.norm.weight,
                              eps=self.norm.eps, backend=backend)
        return logits, new_states

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor, state: LasadState,
             backend: str | None = None, *, width: torch.Tensor | None = None,
             slots: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for R rows; updates their state in place.

        Args:
            ids: int64 `[R]` class ids at p = 0, token ids x_{p-1} after.
            pos: int64 `[R]` device tensor, each row's sequence position p (or `[1]`: all rows at p).
            state: the buffers from `allocate_state` (or a view of their first rows).
            backend: "torch" (references) or "triton" (kernels). Default: triton on CUDA.
            width: int64 `[R]` (or `[1]`) grid widths. Default: `state.width`.
            slots: int64 `[R]`, the distinct state rows `state.ssm[:, slots]` the rows run on (the
                serving engine's state slots), or None: R = state.batch, row r on state row r.
            logits: fp32 `[R, vocab]` output buffer. Default: `state.logits` (R = state.batch).
        Returns:
            the logits, fp32 `[R, vocab]`: the distribution of each row's x_p.
        """
        if slots is None and ids.shape[0] != state.batch:
            raise ValueError(f"ids has {ids.shape[0]} rows but the state holds {state.batch}")
        if slots is not None and slots.shape != ids.shape:
            raise ValueError(f"slots has shape {tuple(slots.shape)}, ids {tuple(ids.shape)}")
        if backend not in (None, *STEP_BACKENDS):
            raise ValueError(f"backend={backend!r} is not one of {', '.join(STEP_BACKENDS)}")
        width = state.width if width is None else width
        mode, _ = self.config.row_rule(width)
        out, _ = self.decode_step(ids, pos, width, state.ssm, _in_place_step(mode, backend, slots), backend)
        return (state.logits if logits is None else logits).copy_(out)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
