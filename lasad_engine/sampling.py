"""Sampling for the decode step: classifier-free guidance, temperature, top-k, top-p, and an
exponential race over noise drawn in advance.

Everything in :func:`sample` stays on the device. It never calls ``.item()``, never uses
``nonzero`` or boolean-mask indexing, and never branches in Python on a tensor value. Every
intermediate tensor's shape depends only on the input shapes and on Python scalars
(``cfg``, ``temperature``, ``top_k``, ``top_p``). These scalars are fixed for a whole generation,
so the Python branches on them are decided once, when a CUDA graph is captured or an ONNX graph
is traced. The step can therefore be captured in a CUDA graph, traced by ``torch.export`` and
exported to ONNX.

All randomness comes from the noise: the ``noise`` argument of :func:`sample` (drawn in advance,
e.g. by :func:`draw_noise`), or, in the engine, counter-based noise (:func:`philox_noise`): a
pure function of the image's seed, its position and the vocabulary index (Philox4x32-10, the
generator of cuRAND, JAX and Triton's ``tl.rand``), so an image's noise never depends on which
other images share its step, and nothing is drawn or stored per step. For the same noise, every
backend chooses the same tokens, up to floating-point rounding differences in softmax and cumsum.
Ties are broken by value, never by sort order, so an unstable sort on one backend and a stable
sort on another give the same kept set.

:func:`sample_images` is the definition for a batch whose images each have their own settings
(the serving engine's step: guidance scale and interval, temperature, top-k, top-p and seed per
image, rows anywhere in the logits); :func:`sample` is the same computation with one setting for
the whole batch (what an exported sampler graph traces).

Sampling method (exponential race, a form of the Gumbel-max trick): if ``E_i ~ Exp(1)`` are
independent, then ``argmax_i p_i / E_i`` is distributed as ``Categorical(p)``, because
``E_i / p_i ~ Exp(p_i)`` and the smallest of independent exponentials is index ``i`` with
probability ``p_i / sum(p)``. A token removed by top-k or top-p has ``p_i == 0``, so its score is
exactly ``0``, and it can never beat a kept token, whose score is strictly positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops.select import MIN_TEMPERATURE, NOISE_FLOOR, pick_backend, sample_images_triton, sample_triton

__all__ = ["draw_noise", "philox_noise", "sample", "sample_images", "SamplerTable", "cfg_duplicate"]

# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): the
# multipliers and the Weyl key increments of the reference implementation (Random123).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
# 24 random bits per draw: u = (bits + 1) · 2^-24 lies in (0, 1] and is exact in fp32, so the
# Exp(1) draw -log(u) is finite and at most 24·ln 2 ≈ 16.6.
UNIFORM_BITS = 24


def draw_noise(
    generator: torch.Generator | None,
    num_steps: int,
    batch: int,
    vocab: int,
    *,
    device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw the Exp(1) noise for a whole generation up front.

    Args:
        generator: where the randomness comes from. Draws happen on this generator's device.
            ``None`` means torch's default CPU generator (seeded by ``torch.manual_seed``).
            Because a CPU generator always draws on the CPU, the same seed gives the same noise
            whatever the target device.
        num_steps: number of decode steps ``S``.
        batch: number of images ``B``. This is the count before CFG batch doubling: the two CFG
            halves share one noise row.
        vocab: vocabulary / codebook size ``V``.
        device: target device of the result. Ignored when ``out`` is given; if both are given,
            they must agree. ``None`` (without ``out``) means the generator's device.
        out: optional float32 ``[S, B, V]`` buffer to fill in place. When it is on the
            generator's device, it is filled directly and nothing is allocated. Otherwise
            (for example a CPU generator and a CUDA ``out``), one staging tensor of the same shape
            is drawn on the generator's device and copied into ``out``.

    Returns:
        float32 ``[S, B, V]`` tensor of independent Exp(1) samples. This is ``out`` itself when
        ``out`` was given. Step ``t`` uses ``noise[t]`` (shape ``[B, V]``) as the ``noise``
        argument of :func:`sample`.
    """
    shape = (int(num_steps), int(batch), int(vocab))
    gen_device = generator.device if generator is not None else torch.device("cpu")

    if out is not None:
        if tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
        if out.dtype != torch.float32:
            raise ValueError(f"out must be float32, got {out.dtype}")
        if device is not None and torch.device(device) != out.device:
            # Compare device types (and indices when given); 'cuda' vs 'cuda:0' counts as equal.
            d = torch.device(device)
            if d.type != out.device.type or (d.index is not None and d.index != out.device.index):
                raise ValueError(f"out is on {out.device}, but device={d} was requested")
        target = out
    else:
        target_device = torch.device(device) if device is not None else gen_device
        target = torch.empty(shape, dtype=torch.float32, device=target_device)

    if _same_device(target.device, gen_device):
        target.exponential_(1.0, generator=generator)
    else:
        staging = torch.empty(shape, dtype=torch.float32, device=gen_device)
        staging.exponential_(1.0, generator=generator)
        target.copy_(staging)
    return target


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device()
    ib = b.index if b.index is not None else torch.cuda.current_device()
    return ia == ib


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a · m for uint32 values `a` held in int64 and a uint32
    constant m, without overflowing int64 (a is split into 16-bit halves)."""
    p_lo = (a & 0xFFFF) * m          # < 2^48
    p_hi = (a >> 16) * m             # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(counter: tuple, key: tuple, rounds: int = PHILOX_ROUNDS) -> tuple:
    """Philox4x32 on int64 tensors holding uint32 values: counter (c0, c1, c2, c3), key (k0, k1),
    all broadcastable; returns the four output words (int64, uint32 values). Triton's
    ``tl.randint4x`` computes the same words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def philox_noise(seeds: torch.Tensor, pos: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise of one step for each image: a pure function of (seed, position, index).

    Word i of Philox4x32-10 with key (seed mod 2^32, seed div 2^32) and counter
    (v div 4, position, 0, 0) gives index v = 4·(v div 4) + i; its top 24 bits b give
    u = (b + 1)·2^-24 and the draw -log(u).

    Args:
        seeds: int64 `[B]` image seeds in 0 .. 2^63 - 1.
        pos: int64 `[B]` each image's sequence position (< 2^32).
        vocab: V.
    Returns:
        fp32 `[B, V]`.
    """
    j = torch.arange(-(-vocab // 4), dtype=torch.int64, device=seeds.device)[None, :]   # [1, J]
    zero = torch.zeros_like(j)
    key = (seeds[:, None] & _MASK32, (seeds[:, None] >> 32) & _MASK32)               # [B, 1] each
    words = philox4x32((j, pos[:, None] & _MASK32, zero, zero), key)                  # 4 x [B, J]
    bits = torch.stack(torch.broadcast_tensors(*words), -1).flatten(1)[:, :vocab]     # [B, V]
    u = ((bits >> (32 - UNIFORM_BITS)) + 1).float() * 2.0 ** -UNIFORM_BITS
    return -torch.log(u)


def cfg_duplicate(ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Feed the same next ids to both CFG halves.

    Args:
        ids: int64 ``[B]`` next ids.
        out: optional int64 buffer of ``2B`` elements (``[2B]`` or ``[2B, 1]``, viewable as
            ``[2B]``), filled in place: ``out[:B] = ids`` (conditional half) and
            ``out[B:] = ids`` (unconditional half).

    Returns:
        int64 ``[2B]``. This is ``torch.cat([ids, ids])``, or ``out`` when it is given.
    """
    if out is None:
        return torch.cat([ids, ids])
    flat = out.view(-1)
    b = ids.shape[0]
    if flat.shape[0] != 2 * b:
        raise ValueError(f"out has {flat.shape[0]} elements, expected 2*B = {2 * b}")
    flat[:b].copy_(ids)
    flat[b:].copy_(ids)
    return out


def sample(
    logits: torch.Tensor,
    noise: torch.Tensor,
    *,
    cfg: bool,
    cfg_scale: float | torch.Tensor = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_active: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Choose the next token of every image in the batch, without a host sync.

    Args:
        logits: float32 ``[R, V]`` raw logits of this step. If ``cfg`` is set, ``R = 2B``:
            rows ``[:B]`` are conditional (class labels) and rows ``[B:]`` unconditional (the
            null class). Otherwise ``R = B``. Other float dtypes are upcast to float32.
        noise: float32 ``[B, V]`` Exp(1) draws for this step (``draw_noise(...)[t]``), or a
            whole block ``[S, B, V]`` of which row ``pos % S`` is this step's (needs ``pos``).
        cfg: Python bool, whether the batch is CFG-doubled.
        cfg_scale: guidance scale ``s``, a Python float or a 0-d tensor on ``logits.device``.
            The guided logits are ``u + s * (c - u)``, computed on the RAW logits, before the
            temperature. Ignored if ``cfg`` is False.
        temperature: Python float ``T >= 0``. Logits are divided by ``max(T, 1e-5)``.
            ``T == 0`` means greedy decoding: the result is exactly ``argmax`` of the (guided)
            logits. ``top_k``, ``top_p`` and ``noise`` are then ignored (``noise`` must still
            have the right shape).
        top_k: Python int. ``0`` turns it off. Keeps every token whose (tempered) logit is
            ``>=`` the k-th largest. **Ties at the k-th value are all kept**, so more than
            ``k`` tokens can survive. ``top_k >= V`` is the same as off.
        top_p: Python float in ``[0, 1]``. ``1.0`` turns it off. It is applied after top-k, on
            the probabilities renormalised over the tokens top-k kept. Keeps the smallest prefix
            of the descending-sorted probabilities whose mass reaches ``top_p``. The most
            likely token is always kept, so ``top_p -> 0`` is greedy. Implemented as a
            probability threshold (the smallest kept sorted probability), so tokens tied with
            the last kept one are also kept, whatever order the sort put them in.
        cfg_active: optional 0-d bool (or float, nonzero = true) tensor on ``logits.device``.
            When it is false, guidance is off for this step and the conditional logits ``c`` are
            used unchanged. This is LlamaGen's ``cfg_interval``. It is applied with a device-side
            ``torch.where``, so there is no sync. Ignored if ``cfg`` is False.
        out: optional int64 buffer that receives the ids in place: ``R`` elements (``[R]`` or
            ``[R, 1]``). With ``cfg``, both ``out[:B]`` and ``out[B:]`` get the ids, so the next
            step's input-id buffer (both CFG halves) is filled directly.
        pos: optional int64 ``[1]`` device tensor, the decode position: selects the noise row of
            a noise block, and the column of ``tokens`` that receives the ids.
        tokens: optional int64 ``[B, N]`` token buffer; ``tokens[:, pos]`` receives the ids.
        backend: ``"torch"`` (this function's body: the definition, traceable for ONNX export),
            ``"triton"`` (``lasad_engine.ops.select``: the same kept set and, for the same noise,
            the same ids, in one launch without a sort), or ``None``: triton for CUDA tensors
            when triton is installed and nothing is tracing, torch otherwise.

    Returns:
        int64 ``[B]`` next ids. When ``out`` is given, this is a view of its first ``B`` elements.

    The pipeline: guidance (or ``c``) -> ``/ max(T, 1e-5)`` -> top-k mask (``-inf``) -> top-p
    mask (``-inf``) -> softmax -> ``argmax(probs / max(noise, tiny))``. Ties in the final argmax
    go to the lowest index.
    """
    if isinstance(temperature, torch.Tensor) or isinstance(top_k, torch.Tensor) or isinstance(
        top_p, torch.Tensor
    ):
        raise TypeError("temperature, top_k and top_p must be Python scalars (fixed per generation)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")

    if (noise.dim() == 3 or tokens is not None) and pos is None:
        raise ValueError("a noise block [S, B, V] and tokens need pos (int64 [1] device tensor)")
    if pick_backend(backend, logits) == "triton":
        return sample_triton(logits, noise, cfg=cfg, cfg_scale=cfg_scale, temperature=temperature,
                             top_k=top_k, top_p=top_p, cfg_active=cfg_active, out=out, pos=pos,
                             tokens=tokens)
    if noise.dim() == 3:
        noise = noise.index_select(0, torch.remainder(pos, noise.shape[0]))[0]  # [B, V]
    logits = logits.float()
    if cfg:
        cond, uncond = logits.chunk(2, dim=0)  # [B, V] each
        active = None if cfg_active is None else cfg_active.to(torch.bool).reshape(1, 1)
        guided = _guide(cond, uncond, cfg_scale, active)
    else:
        guided = logits  # [B, V]
    B, V = guided.shape
    if temperature == 0:
        ids = guided.argmax(dim=-1)  # [B]
    else:
        k = min(int(top_k), V)
        k = k if 0 < k < V else 0
        full = lambda value, dtype: torch.full((B, 1), value, dtype=dtype, device=guided.device)  # noqa: E731
        ids = _race(guided, noise, full(float(temperature), torch.float32), full(k, torch.int64),
                    full(float(top_p), torch.float32), k_max=k, use_p=top_p < 1.0)
    ids = torch.where(guided.isnan().any(-1), -1, ids)  # NaN logits: token -1 (as sample_images)
    ids = _write_out(ids, out, cfg)
    if tokens is not None:
        tokens.index_copy_(1, pos, ids[:, None])
    return ids


def _guide(cond, uncond, scale, active):
    """Guided logits: u + s·(c − u) on the raw logits where `active` (broadcastable bool; None:
    everywhere), the conditional logits c elsewhere."""
    guided = uncond + scale * (cond - uncond)
    return guided if active is None else torch.where(active, guided, cond)


def _race(guided, noise, temperature, top_k, top_p, *, k_max: int, use_p: bool):
    """The definition of a sampled token, row by row (each row's result depends on that row alone).

    Args:
        guided: fp32 `[B, V]` guided logits.
        noise: fp32 `[B, V]` Exp(1) draws.
        temperature: fp32 `[B, 1]`; rows at 0 are greedy (the argmax of `guided`).
        top_k: int64 `[B, 1]`, 0 = off (also any k >= V).
        top_p: fp32 `[B, 1]`, 1 = off.
        k_max: a Python int >= every row's k in 1 .. V-1 (0: top-k is off in every row).
        use_p: a Python bool, False when every row's top_p is 1 (skips the nucleus).
    Returns:
        int64 `[B]`.
    """
    V = guided.shape[-1]
    x = guided / temperature.clamp(min=MIN_TEMPERATURE)  # [B, V]
    if k_max > 0:
        k = top_k.clamp(0, V)
        on = (k > 0) & (k < V)  # [B, 1]
        kth = torch.topk(x, k_max, dim=-1, largest=True, sorted=True).values.gather(
            -1, (k - 1).clamp(0, k_max - 1))  # [B, 1]: each row's k-th largest
        x = torch.where(on & (x < kth), float("-inf"), x)  # ties with the k-th value survive
    if use_p:
        probs = torch.softmax(x, dim=-1)  # [B, V]
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values  # [B, V]
        # Exclusive cumsum (mass strictly before each position), shifted so it is exactly 0 at
        # position 0 and non-decreasing.
        mass_before = torch.nn.functional.pad(torch.cumsum(sorted_probs, dim=-1)[:, :-1], (1, 0), value=0.0)
        # Position j is in the prefix iff the mass before it has not yet reached p. The clamp
        # keeps the top token even when p == 0.
        in_prefix = mass_before < top_p  # [B, V]
        n_keep = in_prefix.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, 1] int64
        threshold = sorted_probs.gather(-1, n_keep - 1)  # [B, 1], smallest kept probability
        x = torch.where((top_p < 1.0) & (probs < threshold), float("-inf"), x)
    probs = torch.softmax(x, dim=-1)  # [B, V], exactly 0 for masked tokens
    scores = probs / noise.clamp(min=NOISE_FLOOR)  # [B, V]
    return torch.where(temperature[:, 0] == 0, guided.argmax(dim=-1), scores.argmax(dim=-1))


@dataclass
class SamplerTable:
    """Per-image settings of one step (device tensors, `[B]` each; slices of the engine's fixed
    buffers, so a captured step reads whatever was written into them last).

    cond_row, uncond_row: int64, the image's rows of the logits (uncond_row -1: no guidance;
        cond_row -1: a padding entry, which writes nothing)
    cfg_scale: fp32; cfg_interval: int64 (guidance while the position p <= interval; -1 always)
    temperature: fp32 (0: greedy); top_k: int64 (0: off); top_p: fp32 (1: off)
    seed: int64, the image's noise seed (philox_noise)
    tok_off: int64, where the image's token at position p goes: tokens.view(-1)[tok_off + p]
    k_max, use_p: what the torch definition needs as Python values (`_race`): the largest top-k
        in use (0: none), and whether any image uses top-p
    """

    cond_row: torch.Tensor
    uncond_row: torch.Tensor
    cfg_scale: torch.Tensor
    cfg_interval: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor
    tok_off: torch.Tensor
    k_max: int = 0
    use_p: bool = False

    @property
    def images(self) -> int:
        return self.cond_row.shape[0]


def sample_images(logits: torch.Tensor, table: SamplerTable, pos: torch.Tensor, *, ids: torch.Tensor,
                  tokens: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                  backend: str | None = None) -> None:
    """One step's tokens for images that each have their own settings and rows.

    Image b reads its conditional row `logits[cond_row[b]]` (and `logits[uncond_row[b]]` for
    guidance) at its position p = pos[cond_row[b]], draws its noise from (seed[b], p) — or reads
    `noise[b]` when `noise` is given — and writes its token into `ids` at both its rows (the next
    step's input) and into `tokens.view(-1)[tok_off[b] + p]`. Every image's token depends on its
    own rows, settings and seed only, never on the other images of the batch. An image whose
    guided logits hold a NaN gets the token -1 (the engine fails its request alone; the next step's
    embedding clamps the id).

    Args:
        logits: fp32 `[R, V]` raw logits of the step.
        table: the images' SamplerTable (padding entries only for the Triton form).
        pos: int64 `[R]`, each row's position.
        ids: int64 `[R]`, written in place at the images' rows.
        tokens: int64 token buffer (any shape, contiguous), or None.
        noise: fp32 `[B, V]` instead of the seeded noise (tests), or None.
        backend: "torch" (this body, the definition) | "triton" (ops.select, one launch) | None.
    """
    if pick_backend(backend, logits) == "triton":
        sample_images_triton(logits, table, pos, ids=ids, tokens=tokens, noise=noise)
        return
    logits = logits.float()
    cond, uncond = table.cond_row, table.uncond_row  # no padding entries here (the engine sizes B)
    p = pos.index_select(0, cond)  # [B]
    has_u = uncond >= 0
    active = has_u & ((table.cfg_interval < 0) | (p <= table.cfg_interval))
    guided = _guide(logits.index_select(0, cond), logits.index_select(0, uncond.clamp(min=0)),
                    table.cfg_scale[:, None], active[:, None])
    if noise is None:
        noise = philox_noise(table.seed, p, logits.shape[-1])
    col = lambda t: t[:, None]  # noqa: E731
    tok = _race(guided, noise, col(table.temperature), col(table.top_k), col(table.top_p),
                k_max=table.k_max, use_p=table.use_p)
    tok = torch.where(guided.isnan().any(-1), -1, tok)  # NaN logits: token -1, the image's failure
    ids.index_copy_(0, cond, tok)
    ids.index_copy_(0, torch.where(has_u, uncond, cond), tok)  # no host sync: capturable
    if tokens is not None:
        tokens.view(-1).index_copy_(0, table.tok_off + p, tok)


def _write_out(ids: torch.Tensor, out: torch.Tensor | None, cfg: bool) -> torch.Tensor:
    """Write int64 ``[B]`` ids into ``out`` (``[B]`` without CFG, ``[2B]`` with it) if given."""
    if out is None:
        return ids
    b = ids.shape[0]
    flat = out.view(-1)
    if cfg:
        cfg_duplicate(ids, flat)
    else:
        if flat.shape[0] != b:
            raise ValueError(f"out has {flat.shape[0]} elements, expected B = {b}")
        flat.copy_(ids)
    return flat[:b]
