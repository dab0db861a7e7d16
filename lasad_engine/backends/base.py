"""The interface every decode backend implements (docs/design.md, "The step contract")."""

from __future__ import annotations

from ..params import EngineError


class Backend:
    """Runs the model part of one decode step.

    `decode(ids, pos, state)` reads the ids `[R]`, the position `[1]` and the per-layer state of
    `state` (a `LasadState` or a view of its first R rows), updates the state in place and
    returns `state.logits` `[R, vocab]` fp32. It must not allocate or sync with the host when
    `capturable` is true: the engine then captures it, with the sampler, in one CUDA graph.
    """

    name = "?"
    capturable = False

    def __init__(self, model, device):
        self.model, self.device = model, device

    def decode(self, ids, pos, state):
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds (sessions, bindings); the model stays."""


class ModelBackend(Backend):
    """A backend that runs `model.step` with one of its kernel sets ("torch" | "triton")."""

    kernels = "torch"

    def decode(self, ids, pos, state):
        return self.model.step(ids, pos, state, backend=self.kernels)


def require_cuda(name: str, device) -> None:
    if device.type != "cuda":
        raise EngineError(f"backend {name!r} needs a CUDA device, got device={device}; use backend 'torch' on a CPU")
