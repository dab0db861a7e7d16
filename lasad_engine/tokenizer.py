"""Image tokenizer: a VQ autoencoder compatible with LlamaGen's ``VQ-16`` checkpoints.

The network mirrors FoundationVision/LlamaGen ``tokenizer/tokenizer_image/vq_model.py``
module for module, so a LlamaGen checkpoint (``vq_ds16_c2i.pt``, a dict ``{"model": state_dict}``)
loads with ``strict=True`` and decodes to the same numbers: every operation on the decode path
(normalised codebook lookup, 1x1 post-quant conv, ResNet/attention blocks, nearest upsampling,
GroupNorm(eps=1e-6), ``x * sigmoid(x)``) is performed in the same order as in LlamaGen.

Public API
----------
``VQConfig``      hyper-parameters (JSON round-trippable through ``to_dict`` / ``from_dict``).
``VQ_PRESETS``    ``"vq-16"`` (LlamaGen's VQ-16), ``"vq-tiny"`` (tests), ``"vq-f4-demo"`` (f=4).
``VQModel``       ``encode(images) -> codes``, ``decode_code(codes) -> images``, ``forward`` for training.
``load_tokenizer`` / ``save_tokenizer``  checkpoint I/O (LlamaGen ``.pt``, lasad ``.pt``, ``.safetensors``).

Images are float tensors ``[B, 3, H, W]`` in ``[-1, 1]``; ``H`` and ``W`` must be multiples of
``config.downsample_factor``. Codes are int64 ``[B, H/f, W/f]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import atomic_path, clean_state_dict, key_diff, loads_strict, nonfinite_tensor, one_line, torch_load_reason

__all__ = ["VQConfig", "VQModel", "VQ_PRESETS", "load_tokenizer", "save_tokenizer"]

# LlamaGen keeps a sliding window of the most recent code indices in a float buffer of this
# length (``quantize.codebook_used``); it is part of the state dict, so its size is fixed.
_USAGE_WINDOW = 65536

_FORMAT_NAME = "lasad-vq"
_FORMAT_VERSION = 1




# Upper limits of a VQConfig's fields, far above LlamaGen's VQ-16 (codebook 16384 x 8, 5 levels,
# base width 128, multipliers up to 4, z 256, 2-3 blocks per level).
VQ_LIMITS = {"codebook_size": 1 << 20, "codebook_embed_dim": 4096, "z_channels": 65536, "base_ch": 4096,
             "num_res_blocks_enc": 64, "num_res_blocks_dec": 64, "levels": 8, "ch_mult": 64}


@dataclass(frozen=True)
class VQConfig:
    """Hyper-parameters of the VQ tokenizer. Defaults reproduce LlamaGen's ``VQ-16``.

    ``num_res_blocks_dec`` is the number of ResNet blocks actually built per decoder level.
    LlamaGen's ``Decoder`` is constructed with ``num_res_blocks=2`` and builds ``2 + 1 = 3``
    blocks per level, so the default here is 3 (the encoder builds ``num_res_blocks_enc = 2``).

    The dataclass is frozen so that the shared ``VQ_PRESETS`` entries cannot be mutated;
    use ``dataclasses.replace(cfg, field=value)`` to derive a variant.
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    base_ch: int = 128
    dropout_p: float = 0.0
    num_res_blocks_enc: int = 2
    num_res_blocks_dec: int = 3

    def __post_init__(self) -> None:
        # A config read from a file is untrusted: types and ranges (VQ_LIMITS) are checked before
        # a model is built.
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= VQ_LIMITS["levels"] or not all(
                    isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= VQ_LIMITS["ch_mult"] for m in value):
                raise ValueError(f"VQConfig: {name}={value!r} must be 1..{VQ_LIMITS['levels']} integers in "
                                 f"1..{VQ_LIMITS['ch_mult']}")
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "base_ch",
                     "num_res_blocks_enc", "num_res_blocks_dec"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= VQ_LIMITS[name]:
                raise ValueError(f"VQConfig: {name}={value!r} must be an integer in 1..{VQ_LIMITS[name]}")
        for name in ("codebook_l2_norm", "codebook_show_usage"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VQConfig: {name}={getattr(self, name)!r} must be true or false")
        for name in ("commit_loss_beta", "entropy_loss_ratio", "dropout_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"VQConfig: {name}={value!r} must be a finite number >= 0")
        # Normalise sequences to tuples (lists arrive from JSON) without breaking frozenness.
        object.__setattr__(self, "encoder_ch_mult", tuple(int(m) for m in self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(int(m) for m in self.decoder_ch_mult))
        if not self.encoder_ch_mult or not self.decoder_ch_mult:
            raise ValueError("VQConfig: encoder_ch_mult and decoder_ch_mult must be non-empty")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                "VQConfig: encoder_ch_mult and decoder_ch_mult must have the same length "
                f"(got {self.encoder_ch_mult} and {self.decoder_ch_mult}); the decoder must undo "
                "the encoder's downsampling"
            )
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "base_ch",
                     "num_res_blocks_enc", "num_res_blocks_dec"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VQConfig: {name} must be >= 1 (got {getattr(self, name)})")
        if any(m < 1 for m in self.encoder_ch_mult + self.decoder_ch_mult):
            raise ValueError("VQConfig: channel multipliers must be >= 1")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict:
        """A JSON-compatible dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["encoder_ch_mult"] = list(self.encoder_ch_mult)
        out["decoder_ch_mult"] = list(self.decoder_ch_mult)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VQConfig":
        """Inverse of ``to_dict``. Unknown keys raise ``ValueError``; missing keys take defaults."""
        if not isinstance(d, Mapping):
            raise ValueError(f"VQConfig.from_dict: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"VQConfig.from_dict: unknown field(s): {', '.join(map(str, unknown))}")
        return cls(**dict(d))


VQ_PRESETS = {
    # LlamaGen VQ-16: 16x downsampling, 16384 x 8 cosine codebook, ~72M parameters.
    "vq-16": VQConfig(),
    # Very small model for unit tests (f=2).
    "vq-tiny": VQConfig(
        codebook_size=64,
        codebook_embed_dim=8,
        encoder_ch_mult=(1, 2),
        decoder_ch_mult=(1, 2),
        z_channels=32,
        base_ch=32,
        num_res_blocks_enc=1,
        num_res_blocks_dec=2,
    ),
    # Small f=4 model for demos (64x64 images -> 16x16 codes).
    "vq-f4-demo": VQConfig(
        codebook_size=4096,
        codebook_embed_dim=8,
        encoder_ch_mult=(1, 2, 2),
        decoder_ch_mult=(1, 2, 2),
        z_channels=64,
        base_ch=64,
    ),
}




def _swish(x: torch.Tensor) -> torch.Tensor:
    # Written as x * sigmoid(x) rather than F.silu so results match LlamaGen bit for bit.
    return x * torch.sigmoid(x)


def _group_norm(channels: int) -> nn.GroupNorm:
    # LlamaGen always uses 32 groups; min() only matters for widths below 32 (tiny presets).
    return nn.GroupNorm(num_groups=min(32, channels), num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a (1x1) skip."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = _group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hn = self.norm(x)
        q, k, v = self.q(hn), self.k(hn), self.v(hn)
        b, c, hh, ww = q.shape
        n = hh * ww
        # Same op sequence as LlamaGen (bmm, scale, softmax, bmm) to keep numerics identical.
        scores = torch.bmm(q.reshape(b, c, n).permute(0, 2, 1), k.reshape(b, c, n))  # [b, n_q, n_k]
        scores = scores * (int(c) ** (-0.5))
        attn = F.softmax(scores, dim=2)
        out = torch.bmm(v.reshape(b, c, n), attn.permute(0, 2, 1))  # [b, c, n_q]
        return x + self.proj_out(out.reshape(b, c, hh, ww))


class Downsample(nn.Module):
    """Zero-pad right/bottom by one pixel, then a 3x3 stride-2 convolution (halves H and W)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_blocks(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([
        ResnetBlock(channels, channels, dropout=dropout),
        AttnBlock(channels),
        ResnetBlock(channels, channels, dropout=dropout),
    ])


def _run_level(stage: nn.Module, h: torch.Tensor, num_res_blocks: int) -> torch.Tensor:
    """One encoder/decoder level: its res blocks, each followed by attention where it has any."""
    for i in range(num_res_blocks):
        h = stage.res[i](h)
        if len(stage.attn) > 0:
            h = stage.attn[i](h)
    return h


class Encoder(nn.Module):
    """Pixels -> latent (``z_channels``) at 1/f resolution. Attention only at the last level."""

    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, z_channels: int = 256):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        widths_in = (1,) + tuple(ch_mult)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            last = level == self.num_resolutions - 1
            stage = nn.Module()
            stage.res = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_in = ch * widths_in[level]
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks):
                stage.res.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if last:
                    stage.attn.append(AttnBlock(block_in))
            if not last:
                stage.downsample = Downsample(block_in)
            self.conv_blocks.append(stage)

        self.mid = _mid_blocks(block_in, dropout)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.conv_blocks):
            h = _run_level(stage, h, self.num_res_blocks)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> pixels. ``conv_blocks[0]`` is the lowest resolution (the only one with attention).

    ``num_res_blocks`` here is the number of blocks actually built per level (LlamaGen passes 2
    and adds one internally; pass 3 to get its layout).
    """

    def __init__(self, z_channels: int = 256, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 3, dropout: float = 0.0, out_channels: int = 3):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks

        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_blocks(block_in, dropout)

        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            stage = nn.Module()
            stage.res = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks):
                stage.res.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if level == self.num_resolutions - 1:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
            self.conv_blocks.append(stage)

        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The final conv weight (LlamaGen's GAN loss uses it for adaptive weighting)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for idx, stage in enumerate(self.conv_blocks):
            h = _run_level(stage, h, self.num_res_blocks)
            if idx != self.num_resolutions - 1:
                h = stage.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))




class VQLosses(NamedTuple):
    """Quantizer outputs in LlamaGen's order ``(vq_loss, commit_loss, entropy_loss, codebook_usage)``.

    ``vq_loss``       codebook loss ``mean((z_q - sg[z])^2)`` (moves the codebook).
    ``commit_loss``   ``beta * mean((sg[z_q] - z)^2)`` (moves the encoder).
    ``entropy_loss``  ``entropy_loss_ratio * (sample entropy - batch entropy)``; 0 when the ratio is 0
                      or in eval mode.
    ``codebook_usage``fraction of codes seen in the last 65536 training lookups (0.0 in eval mode or
                      when ``codebook_show_usage`` is off), a Python float.
    """

    vq_loss: torch.Tensor
    commit_loss: torch.Tensor
    entropy_loss: torch.Tensor
    codebook_usage: float


def _entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    # LlamaGen's "softmax" entropy regulariser: mean per-sample entropy minus entropy of the mean.
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer; with ``l2_norm`` the lookup is by cosine similarity."""

    def __init__(self, n_e: int, e_dim: int, beta: float, entropy_loss_ratio: float,
                 l2_norm: bool, show_usage: bool):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.l2_norm = l2_norm
        self.show_usage = show_usage

        self.embedding = nn.Embedding(n_e, e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(_USAGE_WINDOW))

    def codebook(self) -> torch.Tensor:
        """The effective codebook ``[n_e, e_dim]`` (row-normalised when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor):
        """``z``: ``[B, e_dim, h, w]``. Returns ``(z_q, VQLosses, indices[B*h*w])``.

        ``z_q`` is channel-first and carries straight-through gradients to ``z``.
        """
        z = z.permute(0, 2, 3, 1).contiguous()  # b h w c
        z_flat = z.view(-1, self.e_dim)
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
            z_flat = F.normalize(z_flat, p=2, dim=-1)
        embedding = self.codebook()

        # Squared distance ||z||^2 + ||e||^2 - 2 z.e, evaluated the way LlamaGen does it.
        d = (torch.sum(z_flat ** 2, dim=1, keepdim=True) + torch.sum(embedding ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", z_flat, embedding.t()))
        indices = torch.argmin(d, dim=1)
        z_q = embedding[indices].view(z.shape)

        usage = 0.0
        if self.show_usage and self.training:
            with torch.no_grad():
                recent = indices.detach()[-_USAGE_WINDOW:].to(self.codebook_used.dtype)
                n = recent.shape[0]
                if n < _USAGE_WINDOW:
                    self.codebook_used[:-n] = self.codebook_used[n:].clone()
                self.codebook_used[-n:] = recent
                usage = len(torch.unique(self.codebook_used)) / self.n_e

        vq_loss = torch.mean((z_q - z.detach()) ** 2)
        commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
        if self.training and self.entropy_loss_ratio > 0:
            entropy_loss = self.entropy_loss_ratio * _entropy_loss(-d)
        else:
            entropy_loss = torch.zeros((), device=z.device, dtype=z.dtype)

        # Straight-through estimator (same expression as LlamaGen, including its rounding).
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2)
        return z_q, VQLosses(vq_loss, commit_loss, entropy_loss, usage), indices

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]] = None,
                           channel_first: bool = True) -> torch.Tensor:
        """Look up code vectors, as LlamaGen does.

        Without ``shape`` the result is ``indices.shape + (e_dim,)``. With ``shape`` it is
        reshaped to ``shape``: ``(b, c, h, w)`` when ``channel_first`` (the default), otherwise
        ``(b, h, w, c)``.
        """
        z_q = self.codebook()[indices]
        if shape is not None:
            if channel_first:
                z_q = z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
            else:
                z_q = z_q.view(*shape)
        return z_q




class VQModel(nn.Module):
    """LlamaGen-compatible VQ autoencoder.

    ``config`` may be a ``VQConfig``, a preset name from ``VQ_PRESETS`` or ``None`` (``"vq-16"``).
    """

    def __init__(self, config: Union[VQConfig, str, None] = None):
        super().__init__()
        if config is None:
            config = VQ_PRESETS["vq-16"]
        elif isinstance(config, str):
            if config not in VQ_PRESETS:
                raise ValueError(f"unknown VQ preset {config!r}; known: {', '.join(sorted(VQ_PRESETS))}")
            config = VQ_PRESETS[config]
        elif not isinstance(config, VQConfig):
            raise TypeError(f"VQModel: config must be a VQConfig or preset name, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(ch=config.base_ch, ch_mult=config.encoder_ch_mult,
                               num_res_blocks=config.num_res_blocks_enc, dropout=config.dropout_p,
                               z_channels=config.z_channels)
        self.decoder = Decoder(z_channels=config.z_channels, ch=config.base_ch, ch_mult=config.decoder_ch_mult,
                               num_res_blocks=config.num_res_blocks_dec, dropout=config.dropout_p)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim,
                                        config.commit_loss_beta, config.entropy_loss_ratio,
                                        config.codebook_l2_norm, config.codebook_show_usage)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        f = self.config.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"image size {images.shape[2]}x{images.shape[3]} is not a multiple of the "
                f"tokenizer's downsample factor {f}"
            )

    def _encode_quant(self, images: torch.Tensor):
        self._check_images(images)
        h = self.quant_conv(self.encoder(images))
        return self.quantize(h)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> int64 codes ``[B, H/f, W/f]``."""
        _, _, indices = self._encode_quant(images)
        f = self.config.downsample_factor
        return indices.view(images.shape[0], images.shape[2] // f, images.shape[3] // f)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantised latent ``[B, e_dim, h, w]`` -> images ``[B, 3, h*f, w*f]`` (unclamped)."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, codes: torch.Tensor, shape: Optional[Sequence[int]] = None,
                    channel_first: bool = True) -> torch.Tensor:
        """Codes -> images ``[B, 3, H, W]``.

        ``codes`` is ``[B, h, w]``; or, LlamaGen style, any integer tensor with ``B*h*w`` elements
        plus ``shape = (B, e_dim, h, w)`` (or ``(B, h, w, e_dim)`` with ``channel_first=False``).
        The output is the decoder's raw output, nominally in ``[-1, 1]`` but NOT clamped (LlamaGen
        does not clamp either); clamp before converting to pixels.
        """
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise TypeError(f"decode_code: codes must be an integer tensor, got {codes.dtype}")
        if shape is None:
            if codes.dim() != 3:
                raise ValueError(
                    f"decode_code: codes must be [B, h, w] when no shape is given, got {tuple(codes.shape)}"
                )
            b, h, w = codes.shape
            shape = (b, self.config.codebook_embed_dim, h, w)
            channel_first = True
        quant = self.quantize.get_codebook_entry(codes.long(), shape, channel_first)
        if not channel_first:
            quant = quant.permute(0, 3, 1, 2).contiguous()
        return self.decode(quant)

    def decode_bytes(self, n: int, h: int, w: int) -> int:
        """Peak bytes that ``decode_code`` allocates beyond the weights for int64 codes
        ``[n, h, w]`` under ``torch.no_grad`` on the model's device: the largest set of tensors
        alive at once.

        Counted op by op through the decoder's code. Resident throughout: the codebook rows
        ``[n, e, h, w]`` and the post-quant-conv output. At the code grid each attention block
        holds two score matrices ``[n, h·w, h·w]`` (the scaled scores and their softmax) beside
        eight activations ``[n, C, h·w]`` (input, norm, q, k, v, output, projection, sum). A
        ResNet block holds its input and, at most, four tensors of its output's size (conv, norm,
        sigmoid, product) or two of each (its first conv); an upsampling its input, the x2
        nearest copy and the conv's output. Every conv also holds one copy of its output and of
        its weight while it runs (oneDNN's reorders on the CPU), and a level's input stays alive
        until the level ends (the caller's reference). On CUDA, cuDNN's convolution workspace
        comes on top: measured on an H200 at just under one activation of the full-resolution
        level (tests/test_faults.py, 2026-12-02), counted as two. tests/test_faults.py compares
        this count with the allocations torch.profiler records, and on a GPU with torch.cuda's peak.
        """
        cfg = self.config
        size = self.decoder.conv_out.weight.element_size()
        levels, ch = len(cfg.decoder_ch_mult), cfg.base_ch
        H, W = h, w
        act = lambda channels: n * channels * H * W  # noqa: E731 - elements of one activation
        c = ch * cfg.decoder_ch_mult[-1]
        base = act(cfg.codebook_embed_dim) + act(cfg.z_channels)  # quant, post_quant_conv(quant)
        peaks = [2 * cfg.codebook_size * cfg.codebook_embed_dim,  # the normalised codebook
                 act(cfg.codebook_embed_dim) * 2 + act(cfg.z_channels), 2 * act(c)]  # conv_in (+ its copy)

        def res(ci, co):
            return max(4 * act(ci), 2 * act(ci) + 2 * act(co), act(ci) + 4 * act(co))

        def attn(c):
            return 8 * act(c) + 2 * n * (H * W) ** 2

        peaks += [res(c, c), attn(c)]
        for idx in range(levels):
            co, level_in = ch * cfg.decoder_ch_mult[levels - 1 - idx], act(c)
            for i in range(cfg.num_res_blocks_dec):
                peaks.append((level_in if i else 0) + res(c, co))
                c = co
                if idx == 0:
                    peaks.append(level_in + attn(c))
            if idx != levels - 1:
                peaks.append(13 * act(c))  # input, nearest x2 (4x), conv (4x) and its copy (4x)
                H, W = 2 * H, 2 * W
        peaks.append(4 * act(c) + 2 * act(3))  # norm_out, sigmoid, product; conv_out (+ copy)
        weights = max(m.weight.numel() for m in self.decoder.modules() if isinstance(m, nn.Conv2d))
        on_cuda = self.decoder.conv_out.weight.is_cuda
        workspace = 2 * act(c) if on_cuda else 0  # cuDNN's, at the full resolution
        return 8 * n * h * w + size * (base + max(peaks) + weights + workspace)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, VQLosses]:
        """Training pass: ``(reconstruction, VQLosses)``; gradients reach the encoder through the
        straight-through estimator. Add ``vq_loss + commit_loss + entropy_loss`` to your
        reconstruction loss (LlamaGen also adds perceptual and GAN terms)."""
        quant, losses, _ = self._encode_quant(images)
        return self.decode(quant), losses




def _unreadable(path, exc: BaseException) -> ValueError:
    return ValueError(f"{path}: not a readable tokenizer checkpoint ({torch_load_reason(exc)})")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _looks_like_safetensors(path) -> bool:
    if str(path).endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < 100 * 1024 * 1024


def _read_safetensors(path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            state_dict = {k: fh.get_tensor(k) for k in fh.keys()}
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise _unreadable(path, exc) from None
    config = None
    if "config" in metadata:
        try:
            config = loads_strict(metadata["config"])
        except ValueError as exc:  # not JSON, NaN, or nested too deeply
            raise _unreadable(path, exc) from None
    fmt = metadata.get("format")
    if fmt == _FORMAT_NAME and metadata.get("format_version", str(_FORMAT_VERSION)) != str(_FORMAT_VERSION):
        raise ValueError(
            f"{path}: lasad-vq format_version {metadata.get('format_version')} is not supported "
            f"(this build reads version {_FORMAT_VERSION})"
        )
    return state_dict, config


def _read_torch(path):
    try:
        # LlamaGen training checkpoints also pickle the argparse Namespace under "args".
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
            try:
                # mmap avoids reading the whole file up front; tensors are copied into the model.
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # legacy (non-zip) torch.save files cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:
        raise _unreadable(path, exc) from None

    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: not a readable tokenizer checkpoint (top level is {type(obj).__name__}, not a dict)")

    if obj.get("format") == _FORMAT_NAME:
        version = obj.get("format_version")
        if version != _FORMAT_VERSION:
            raise ValueError(
                f"{path}: lasad-vq format_version {version!r} is not supported "
                f"(this build reads version {_FORMAT_VERSION})"
            )
        state_dict = obj.get("model")
        config = obj.get("config")
    else:
        state_dict = None
        for key in ("model", "ema", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                state_dict = obj[key]
                break
        if state_dict is None and _is_state_dict(obj):
            state_dict = obj
        config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None

    if not _is_state_dict(state_dict):
        raise ValueError(
            f"{path}: not a readable tokenizer checkpoint (no state dict of tensors under "
            f"'model', 'ema' or 'state_dict'; top-level keys: {', '.join(map(str, list(obj)[:8]))})"
        )
    return dict(state_dict), config


def load_tokenizer(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                   config: Optional[VQConfig] = None) -> VQModel:
    """Load a tokenizer checkpoint strictly and return the model in eval mode on ``device``.

    Accepted layouts:
      * LlamaGen: ``{"model": state_dict, ...}`` (or ``"ema"`` / ``"state_dict"``, or a bare state dict);
        the config is the ``"config"`` entry if the file has one, else ``VQConfig()`` (VQ-16);
      * lasad: ``{"format": "lasad-vq", "format_version": 1, "config": {...}, "model": state_dict}``;
      * ``.safetensors`` with ``"config"`` (JSON) in its metadata.
    An explicit ``config`` overrides whatever the file says. Leading ``module.`` / ``_orig_mod.`` key
    prefixes are stripped. Any key or shape mismatch raises a one-line ``ValueError``.
    """
    path_str = os.fspath(path)
    if _looks_like_safetensors(path_str):
        state_dict, file_config = _read_safetensors(path_str)
    else:
        state_dict, file_config = _read_torch(path_str)

    if config is None:
        if file_config is not None:
            try:
                config = VQConfig.from_dict(file_config)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path_str}: bad tokenizer config ({one_line(exc)})") from None
        else:
            config = VQConfig()

    state_dict = clean_state_dict(state_dict)
    # Build on the meta device (no random init), then allocate on the target device and copy.
    with torch.device("meta"):
        model = VQModel(config)
    expected = model.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    mismatched = [
        f"{k} {list(state_dict[k].shape)} vs {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [key_diff(missing, unexpected)] if missing or unexpected else []
        if mismatched:
            more = f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
            parts.append(f"shape mismatches (file vs model): {', '.join(mismatched[:3])}{more}")
        raise ValueError(f"{path_str}: checkpoint does not match the tokenizer config ({'; '.join(parts)})")

    bad = nonfinite_tensor(state_dict)
    if bad is not None:
        raise ValueError(f"{path_str}: tokenizer weight {bad} holds NaN or infinite values; the file is damaged")
    model = model.to_empty(device=device)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def save_tokenizer(path: Union[str, os.PathLike], model: VQModel) -> None:
    """Write ``model`` atomically (temp file in the same directory, then ``os.replace``).

    A path ending in ``.safetensors`` gets a safetensors file with ``format``, ``format_version``
    and ``config`` (JSON) metadata; anything else gets a ``torch.save`` dict in the lasad-vq layout.
    """
    if not isinstance(model, VQModel):
        raise TypeError(f"save_tokenizer: expected a VQModel, got {type(model).__name__}")
    path_str = os.fspath(path)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()

    with atomic_path(path_str) as tmp:
        if path_str.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state_dict, tmp, metadata={
                "format": _FORMAT_NAME,
                "format_version": str(_FORMAT_VERSION),
                "config": json.dumps(config, sort_keys=True),
            })
        else:
            torch.save({
                "format": _FORMAT_NAME,
                "format_version": _FORMAT_VERSION,
                "config": config,
                "model": state_dict,
            }, tmp)
