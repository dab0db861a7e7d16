"""Sampling for the decode step: classifier-free guidance, temperature, top-k, top-p, and an
exponential race over noise drawn in advance.

Everything in :func:`sample` stays on the device. It never calls ``.item()``, never uses
``nonzero`` or boolean-mask indexing, and never branches in Python on a tensor value. Every
intermediate tensor's shape depends only on the input shapes and on Python scalars
(``cfg``, ``temperature``, ``top_k``, ``top_p``). These scalars are fixed for a whole generation,
so the Python branches on them are decided once, when a CUDA graph is captured or an ONNX graph
is traced. The step can therefore be captured in a CUDA graph, traced by ``torch.export`` and
exported to ONNX.

All randomness comes from the ``noise`` argument, drawn in advance by :func:`draw_noise`. For
the same noise, every backend chooses the same tokens, up to floating-point rounding differences
in softmax and cumsum. Ties are broken by value, never by sort order, so an unstable sort on one
backend and a stable sort on another give the same kept set.

Sampling method (exponential race, a form of the Gumbel-max trick): if ``E_i ~ Exp(1)`` are
independent, then ``argmax_i p_i / E_i`` is distributed as ``Categorical(p)``, because
``E_i / p_i ~ Exp(p_i)`` and the smallest of independent exponentials is index ``i`` with
probability ``p_i / sum(p)``. A token removed by top-k or top-p has ``p_i == 0``, so its score is
exactly ``0``, and it can never beat a kept token, whose score is strictly positive.
"""

from __future__ import annotations

import torch

from .ops.select import MIN_TEMPERATURE, NOISE_FLOOR, pick_backend, sample_triton

__all__ = ["draw_noise", "sample", "cfg_duplicate"]


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
    ids = _sample_torch(logits, noise, cfg=cfg, cfg_scale=cfg_scale, temperature=temperature,
                        top_k=top_k, top_p=top_p, cfg_active=cfg_active, out=out)
    if tokens is not None:
        tokens.index_copy_(1, pos, ids[:, None])
    return ids


def _sample_torch(logits, noise, *, cfg, cfg_scale, temperature, top_k, top_p, cfg_active, out):
    """The body of `sample` for one step's noise ``[B, V]``: the definition of the sampler."""
    logits = logits.float()
    vocab = logits.shape[-1]

    if cfg:
        cond, uncond = logits.chunk(2, dim=0)  # [B, V] each
        guided = uncond + cfg_scale * (cond - uncond)  # [B, V]
        if cfg_active is not None:
            guided = torch.where(cfg_active.to(torch.bool), guided, cond)
    else:
        guided = logits  # [B, V]

    if temperature == 0:
        ids = guided.argmax(dim=-1)  # [B]
        return _write_out(ids, out, cfg)

    x = guided / max(float(temperature), MIN_TEMPERATURE)  # [B, V]

    k = min(int(top_k), vocab)
    if 0 < k < vocab:
        kth = torch.topk(x, k, dim=-1, largest=True, sorted=True).values[:, -1:]  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th value survive

    if top_p < 1.0:
        probs = torch.softmax(x, dim=-1)  # [B, V]
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values  # [B, V]
        # Exclusive cumsum (mass strictly before each position), shifted so it is exactly 0 at
        # position 0 and non-decreasing.
        mass_before = torch.nn.functional.pad(
            torch.cumsum(sorted_probs, dim=-1)[:, :-1], (1, 0), value=0.0
        )  # [B, V]
        # Position j is in the prefix iff the mass before it has not yet reached p. The clamp
        # keeps the top token even when p == 0.
        in_prefix = mass_before < top_p  # [B, V]
        n_keep = in_prefix.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, 1] int64
        threshold = sorted_probs.gather(-1, n_keep - 1)  # [B, 1], smallest kept probability
        x = x.masked_fill(probs < threshold, float("-inf"))

    probs = torch.softmax(x, dim=-1)  # [B, V], exactly 0 for masked tokens
    scores = probs / noise.clamp(min=NOISE_FLOOR)  # [B, V]
    ids = scores.argmax(dim=-1)  # [B]
    return _write_out(ids, out, cfg)


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
