"""The decode step with fused launches, for the `cuda` backend.

Same math as `LasadGen.step`, in fewer kernels per layer:
    add+RMSNorm (1) · W_q|W_f|W_i in one GEMM (1) · gates + LASAD step (1) · output norm (1) ·
    W_o (1) · add+RMSNorm (1) · W_1|W_3 in one GEMM (1) · SwiGLU gate (1) · W_2 (1)
The concatenated weights are made once; the model's own parameters are then re-pointed at
slices of them, so the weights are not held twice. Every fused op has a torch twin (`kernel=
"torch"`) and the tests hold both against `LasadGen.step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import LasadGen, LasadState
from .ops.lasad import lasad_fused_step_, row_start_mask
from .ops.norms import rms_norm, swiglu


def _concat_into_views(linears: list[torch.nn.Linear]) -> torch.Tensor:
    """One [sum(out), in] weight; each Linear's weight becomes a view of its rows."""
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[start:start + n]
        start += n
    return fused


class FusedDecoder:
    """`decoder(ids, pos, state)` == `model.step(ids, pos, state)` in about 9 launches a layer."""

    def __init__(self, model: LasadGen, kernel: str = "triton"):
        self.model, self.kernel, cfg = model, kernel, model.config
        self.layers = []
        lbs = model._lower_bounds()
        with torch.no_grad():
            for layer, lb in zip(model.layers, lbs):
                a, f = layer.attention, layer.feed_forward
                self.layers.append(dict(
                    qfv=_concat_into_views([a.q_proj, a.f_proj, a.i_proj]),
                    lb=None if lb is None else lb.detach().float().contiguous(),
                    g_norm=a.g_norm, o=a.o_proj.weight, ffn_norm=layer.ffn_norm.weight,
                    w13=_concat_into_views([f.w1, f.w3]), w2=f.w2.weight,
                ))
        self.norms = [layer.attention_norm.weight for layer in model.layers] + [model.norm.weight]
        self.eps, self.decay, self.mode = cfg.norm_eps, cfg.decay, cfg.mixer_row_start

    def run(self, ids, pos, width, states, step):
        """The step, with the LASAD op supplied by the caller:
        `step(qfv, lower_bound, state_i, start) -> (o [B, H, V], new state_i)`.
        Returns (logits `[B, vocab]` in the weights' dtype, the new per-layer states)."""
        k = self.kernel
        start = row_start_mask(pos, width)
        if not self.decay:  # no decay = the unit override at every position
            start = torch.ones_like(start)
        x = self.model.embed_step(ids, pos)
        n = rms_norm(x, self.norms[0], self.eps, backend=k)
        new_states = []
        for i, p in enumerate(self.layers):
            o, s = step(F.linear(n, p["qfv"]), p["lb"], states[i], start)
            new_states.append(s)
            o = rms_norm(o.flatten(-2), p["g_norm"].weight, self.eps, p["g_norm"].groups, backend=k)
            n, h = rms_norm(F.linear(o, p["o"]), p["ffn_norm"], self.eps, residual=x, backend=k)
            f = F.linear(swiglu(F.linear(n, p["w13"]), backend=k), p["w2"])
            n, x = rms_norm(f, self.norms[i + 1], self.eps, residual=h, backend=k)
        return F.linear(n, self.model.output.weight), new_states

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, state: LasadState, kernel=None) -> torch.Tensor:
        def in_place(qfv, lb, s, start):
            return lasad_fused_step_(qfv, lb, s, start, self.mode, backend=self.kernel), s
        logits, _ = self.run(ids, pos, state.width, state.ssm, in_place)
        return state.logits.copy_(logits)
