"""LASADGen: LlamaGen's class-conditional GPT with the LASAD mixer (SPEC §1–§3).

Two ways to run the same weights:
- `LasadGen.forward(tokens, labels)`: parallel over the sequence (training, teacher forcing),
  through the chunked form of the op;
- `LasadGen.step(ids, pos, state)`: one position for a batch of sequences, updating a
  preallocated `LasadState` in place (decode), through the step form of the op.
Both go through the same projections, gates and norms (`LasadAttention._project` / `_readout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LasadConfig
from .ops.norms import rms_norm, silu_mul
from .ops.lasad import (chunk_lasad, gates, lasad_step_, layer_lower_bounds, naive_recurrent_lasad,
                        row_start_mask)

FORWARD_OPS = ("chunk", "naive")


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
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, cfg: LasadConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(silu_mul(self.w1(x), self.w3(x))))


class LasadAttention(nn.Module):
    """The LASAD mixer: HGRN2 gates + spatial-aware decay (SPEC §3).

    Parameters: q_proj, f_proj `[H·K, d]`; i_proj `[H·V, d]`; o_proj `[d, H·V]`; g_norm `[H·V]`.
    """

    def __init__(self, cfg: LasadConfig):
        super().__init__()
        self.cfg = cfg
        H, K, V, d = cfg.n_head, cfg.head_k_dim, cfg.head_v_dim, cfg.dim
        self.q_proj = nn.Linear(d, H * K, bias=False)
        self.f_proj = nn.Linear(d, H * K, bias=False)
        self.i_proj = nn.Linear(d, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, d, bias=False)
        self.g_norm = RMSNorm(H * V, cfg.norm_eps, groups=H if cfg.output_norm == "group" else 1)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def _project(self, x: torch.Tensor, lower_bound: torch.Tensor | None):
        """x `[..., d]` -> q, k, g `[..., H, K]` (k, g fp32) and v `[..., H, V]`."""
        H = self.cfg.n_head
        q = F.silu(self.q_proj(x)).unflatten(-1, (H, -1))
        f = self.f_proj(x)
        # k comes from the unmasked gate: the row-start override changes the decay only
        g, k = (t.unflatten(-1, (H, -1)) for t in gates(f.to(_at_least_fp32(f.dtype)), lower_bound))
        if not self.cfg.decay:  # ablation: nothing is ever forgotten (k keeps its gate)
            g = torch.zeros_like(g)
        v = self.i_proj(x).unflatten(-1, (H, -1))
        return q, k, v, g

    def _readout(self, o: torch.Tensor) -> torch.Tensor:
        """o `[..., H, V]` -> `[..., d]`."""
        o = self.g_norm(o.flatten(-2))
        return self.resid_dropout(self.o_proj(o.to(self.o_proj.weight.dtype)))

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor | None, width: int,
                op: str = "chunk", chunk_backend: str | None = None) -> torch.Tensor:
        """Parallel form. x `[B, T, d]` (position 0 = class token) -> `[B, T, d]`."""
        q, k, v, g = self._project(x, lower_bound)
        kw = dict(width=width, row_start=self.cfg.mixer_row_start)
        if op == "chunk":
            o, _ = chunk_lasad(q.to(v.dtype), k.to(v.dtype), v, g, backend=chunk_backend, **kw)
        else:
            o, _ = naive_recurrent_lasad(q.to(v.dtype), k.to(v.dtype), v, g, **kw)
        return self._readout(o)

    def step(self, x: torch.Tensor, lower_bound: torch.Tensor | None, state: torch.Tensor,
             start: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """Recurrent form. x `[B, d]`, state `[B, H, K, V]` fp32 (in place), start: row-start flag,
        kernel: the step op's backend ("torch" | "triton"; None picks by device)."""
        q, k, v, g = self._project(x, lower_bound)
        o = lasad_step_(q, k, v, g, state, start, self.cfg.mixer_row_start, backend=kernel)
        return self._readout(o)


class LasadBlock(nn.Module):
    def __init__(self, cfg: LasadConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = LasadAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, lower_bound, width, op="chunk", chunk_backend=None):
        h = x + self.attention(self.attention_norm(x), lower_bound, width, op, chunk_backend)
        return h + self.feed_forward(self.ffn_norm(h))

    def step(self, x, lower_bound, state, start, kernel=None):
        h = x + self.attention.step(self.attention_norm(x), lower_bound, state, start, kernel)
        return h + self.feed_forward(self.ffn_norm(h))


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
    """Everything a decode loop mutates, allocated once per (max batch, device).

    ssm: `[n_layer, B, H, K, V]` fp32 recurrent state (one allocation: one zero_ resets it).
    pos: int64 `[1]` current sequence position (a device tensor, never a Python int in a graph).
    width: int64 `[1]` grid width in tokens (row-start rule); any width, no reallocation.
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
        return LasadState(self.ssm[:, :n], self.pos, self.width, self.logits[:n])

    def reset(self, width: int | None = None) -> "LasadState":
        """Zero the state and position in place (and set a new grid width)."""
        self.ssm.zero_()
        self.pos.zero_()
        if width is not None:
            self.width.fill_(width)
        return self


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
        """Per-layer bound `[H·K]` fp32, None for layer 0 and when the bound is off."""
        if not self.config.use_lower_bound:
            return [None] * self.config.n_layer
        lb = layer_lower_bounds(self.lower_bounds)
        return [None] + [lb[i] for i in range(1, self.config.n_layer)]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, *, width: int | None = None,
                op: str = "chunk", chunk_backend: str | None = None) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            tokens: int64 `[B, T]` image tokens x_0 … x_{T-1} in raster order (T ≤ h·w, any T ≥ 1).
            labels: int64 `[B]` class ids (num_classes = the null class).
            width: grid width for the row-start rule. Default: config.grid_width.
            op: "chunk" (default) or "naive" (the reference loop).
            chunk_backend: "fla" | "torch" for the chunked op. Default: fla on CUDA, else torch.
        Returns:
            fp32 logits `[B, T, vocab]`; logits[:, t] predict x_t from the class and x_0 … x_{t-1}.
        """
        if op not in FORWARD_OPS:
            raise ValueError(f"op={op!r} is not one of {', '.join(FORWARD_OPS)}")
        width = self.config.grid_width if width is None else width
        x = torch.cat([self.cls_embedding(labels)[:, None], self.tok_embeddings(tokens[:, :-1])], 1)
        x = self.tok_dropout(x)
        for layer, lb in zip(self.layers, self._lower_bounds()):
            x = layer(x, lb, width, op, chunk_backend)
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

    def embed_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Input of one step `[B, d]`: the class row at p = 0, the token row after. Both lookups
        run and a device-side select picks one, so the position never needs a host sync."""
        cls = self.cls_embedding.embedding_table(ids.clamp(0, self.config.num_classes))
        tok = self.tok_embeddings(ids.clamp(0, self.config.vocab_size - 1))
        return torch.where(pos.reshape(1, 1) == 0, cls, tok)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor, state: LasadState,
             kernel: str | None = None) -> torch.Tensor:
        """One decode step for every row; updates `state.ssm` in place.

        Args:
            ids: int64 `[B]` class ids at p = 0, token ids x_{p-1} after (B = state.batch).
            pos: int64 `[1]` device tensor, the sequence position p of this step.
            state: the buffers from `allocate_state` (or a view of their first rows).
            kernel: backend of the step op, "torch" or "triton". Default: by device.
        Returns:
            `state.logits`, fp32 `[B, vocab]`: the distribution of x_p.
        """
        if ids.shape[0] != state.batch:
            raise ValueError(f"ids has {ids.shape[0]} rows but the state holds {state.batch}")
        start = row_start_mask(pos, state.width)
        x = self.embed_step(ids, pos)
        for i, (layer, lb) in enumerate(zip(self.layers, self._lower_bounds())):
            x = layer.step(x, lb, state.ssm[i], start, kernel)
        return state.logits.copy_(self.output(self.norm(x)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
