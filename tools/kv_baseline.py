"""The baseline lasad is measured against: LlamaGen's GPT (softmax attention, 2-D RoPE, SwiGLU)
at the same preset shape, decoding with a static KV cache, SDPA and the same CUDA-graphed step
and sampler as lasad (it plugs into `LasadEngine` like a LasadGen: `allocate_state` and `step`).

Shapes follow LlamaGen's `autoregressive/models/gpt.py`: per layer `attention.wqkv` [3d, d],
`attention.wo` [d, d], the same norms and SwiGLU as LASADGen (imported from lasad_engine), so
the parameter count equals the LASADGen preset's (the mixer's 4·d² ↔ wqkv + wo). The KV cache is
bf16 [layers, rows, heads, N + 1, head_dim] for k and for v, allocated once per grid. 2-D RoPE as
LlamaGen: the first half of each head rotated by the token's row, the second by its column; the
class position gets a zero table (LlamaGen multiplies the class token's q and k by zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lasad_engine.config import LasadConfig
from lasad_engine.model import ClassEmbedder, FeedForward, LasadGen, RMSNorm


def rope_2d_table(h: int, w: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """cos/sin `[h·w + 1, head_dim // 2, 2]` fp32 for positions 0 (class: zeros) … h·w."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    t = torch.arange(h * w)
    angles = torch.cat([(t // w)[:, None] * freqs, (t % w)[:, None] * freqs], dim=1)  # [N, hd/2]
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).float()
    return torch.cat([torch.zeros(1, head_dim // 2, 2), table])


def apply_rope(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """x `[R, H, hd]`, cs `[hd/2, 2]` (or `[R, 1, hd/2, 2]`: a position per row) -> x rotated
    pairwise (even, odd channels)."""
    xf = x.float().unflatten(-1, (-1, 2))
    c, s = cs[..., 0], cs[..., 1]
    out = torch.stack([xf[..., 0] * c - xf[..., 1] * s, xf[..., 0] * s + xf[..., 1] * c], dim=-1)
    return out.flatten(-2).type_as(x)


@dataclass
class KVState:
    """Static KV cache + the engine's bookkeeping (same fields the engine uses on LasadState)."""

    k: torch.Tensor       # [L, R, H, S, hd]
    v: torch.Tensor
    rope: torch.Tensor    # [S, hd/2, 2]
    pos: torch.Tensor
    width: torch.Tensor
    logits: torch.Tensor

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def state_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.rope, self.pos, self.width, self.logits))

    def rows(self, n: int) -> "KVState":
        return KVState(self.k[:, :n], self.v[:, :n], self.rope, self.pos, self.width, self.logits[:n])

    def reset(self, width: int | None = None) -> "KVState":
        # Positions beyond `pos` are masked, and everything written is finite: no zeroing needed.
        self.pos.zero_()
        if width is not None and width != int(self.width):
            raise ValueError(f"this KV cache was laid out for width {int(self.width)}, not {width}")
        return self

    def zero_rows(self, slots: torch.Tensor) -> None:
        """Nothing to clear when a sequence joins rows: positions beyond its own are masked."""

    def save_rows(self, n: int):
        """Nothing to keep across a capture's warm-up runs: they write each row's cache at its
        next position (and the one after), which the row writes again before it reads it."""
        return None

    def load_rows(self, saved) -> None:
        pass


class KVAttention(nn.Module):
    def __init__(self, cfg: LasadConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def step(self, x, k_cache, v_cache, pos, cs, mask):
        """x `[R, d]`; caches `[R, H, S, hd]` (row r written at pos[r]); pos `[R]`; cs
        `[R, 1, hd/2, 2]`; mask `[R, S]` bool (≤ the row's position)."""
        q, k, v = self.wqkv(x).unflatten(-1, (3, self.n_head, self.head_dim)).unbind(1)
        q, k = apply_rope(q, cs), apply_rope(k, cs)
        r = torch.arange(x.shape[0], device=x.device)
        k_cache[r, :, pos] = k
        v_cache[r, :, pos] = v
        o = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask[:, None, None, :])
        return self.wo(o.flatten(1))


class KVBlock(nn.Module):
    def __init__(self, cfg: LasadConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = KVAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)


class KVCacheGPT(nn.Module):
    """LlamaGen's c2i GPT for decoding: `allocate_state` / `step` as LasadGen's. Its cache rows
    are not indexed by slots (the engine runs row r on cache row r), as a paged KV pool would be
    a different baseline."""

    supports_slots = False

    def __init__(self, config: LasadConfig):
        super().__init__()
        self.config = cfg = config
        self.cls_embedding = ClassEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(KVBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.initializer_range)

    embed_step = LasadGen.embed_step

    def allocate_state(self, batch: int, device=None, width: int | None = None) -> KVState:
        cfg = self.config
        device = self.output.weight.device if device is None else torch.device(device)
        S, hd = cfg.seq_len + 1, cfg.dim // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, S, hd)
        dtype = self.output.weight.dtype
        return KVState(
            k=torch.zeros(shape, dtype=dtype, device=device), v=torch.zeros(shape, dtype=dtype, device=device),
            rope=rope_2d_table(cfg.grid_height, cfg.grid_width, hd).to(device),
            pos=torch.zeros(1, dtype=torch.int64, device=device),
            width=torch.full((1,), cfg.grid_width, dtype=torch.int64, device=device),
            logits=torch.zeros(batch, cfg.vocab_size, device=device))

    @torch.no_grad()
    def step(self, ids, pos, state: KVState, backend=None, *, width=None, slots=None, logits=None) -> torch.Tensor:
        """One cached decode step for rows `[R]` at their own positions `pos` `[R]` (or `[1]`)
        (`backend` and `width` are accepted for the engine's interface: SDPA and cuBLAS run
        whatever they are, and the 2-D RoPE table is the trained grid's)."""
        if slots is not None:
            raise ValueError("the KV-cache baseline runs row r on cache row r (no slots)")
        R = ids.shape[0]
        pos = pos.expand(R) if pos.numel() == 1 else pos
        x = self.embed_step(ids, pos)
        cs = state.rope.index_select(0, pos)[:, None]  # [R, 1, hd/2, 2]
        mask = torch.arange(state.k.shape[3], device=pos.device)[None, :] <= pos[:, None]
        for i, layer in enumerate(self.layers):
            h = x + layer.attention.step(layer.attention_norm(x), state.k[i, :R], state.v[i, :R], pos, cs, mask)
            x = h + layer.feed_forward(layer.ffn_norm(h))
        return (state.logits[:R] if logits is None else logits).copy_(self.output(self.norm(x)))

    @torch.no_grad()
    def forward_reference(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Parallel causal forward (teacher forcing), for testing the cached step."""
        cfg = self.config
        x = torch.cat([self.cls_embedding(labels)[:, None], self.tok_embeddings(tokens[:, :-1])], 1)
        T = x.shape[1]
        rope = rope_2d_table(cfg.grid_height, cfg.grid_width, cfg.dim // cfg.n_head).to(x.device)[:T]
        for layer in self.layers:
            a = layer.attention
            q, k, v = a.wqkv(layer.attention_norm(x)).unflatten(-1, (3, a.n_head, a.head_dim)).unbind(2)
            q, k = _rope_seq(q, rope), _rope_seq(k, rope)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            h = x + a.wo(o.transpose(1, 2).flatten(2))
            x = h + layer.feed_forward(layer.ffn_norm(h))
        return self.output(self.norm(x)).float()


def _rope_seq(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x `[B, T, H, hd]` with a table `[T, hd/2, 2]`."""
    return torch.stack([apply_rope(x[:, t], rope[t]) for t in range(x.shape[1])], 1)
