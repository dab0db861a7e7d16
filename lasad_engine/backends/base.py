"""The interface every decode backend implements (docs/design.md, "The step contract")."""

from __future__ import annotations

from ..params import EngineError


class Backend:
    """Runs the model part of one decode step.

    `decode(rows, state)` runs the step's R rows: `rows.ids` `[R]`, `rows.pos` `[R]` (each row's
    position), `rows.width` `[R]` (each row's grid width) and `rows.slots` `[R]` (the state rows
    of `state.ssm` they run on; None: row r is state row r, what a backend that is not `indexed`
    always gets), updates their state in place and writes the logits into `rows.logits`
    `[R, vocab]` fp32. It must not allocate or sync with the host when `capturable` is true: the
    engine then captures it, with the sampler, in one CUDA graph.

    A backend that keeps the state in more than one buffer (onnxruntime alternates between
    `state.ssm` and a buffer of its own, so that no step copies it) says where the latest state
    is with `current(state)`: the engine zeroes a joining image's slots there. `cuda_graph` is the engine's `use_cuda_graph`, for
    a backend that captures graphs of its own instead of being `capturable`.
    """

    name = "?"
    capturable = False
    indexed = False  # runs rows on any state slots (rows.slots); else row r on state row r
    cuda_graph = True

    def __init__(self, model, device):
        self.model, self.device = model, device

    def decode(self, rows, state):
        raise NotImplementedError

    def current(self, state):
        """The LasadState whose `ssm` holds the state after the last decode (default: `state`)."""
        return state

    def close(self) -> None:
        """Free what the backend holds (sessions, bindings); the model stays."""


class ModelBackend(Backend):
    """A backend that runs `model.step` with one of its kernel sets ("torch" | "triton")."""

    kernels = "torch"
    indexed = True

    def decode(self, rows, state):
        return self.model.step(rows.ids, rows.pos, state, backend=self.kernels, width=rows.width, slots=rows.slots,
                               logits=rows.logits)


def require_cuda(name: str, device) -> None:
    if device.type != "cuda":
        raise EngineError(f"backend {name!r} needs a CUDA device, got device={device}; use backend 'torch' on a CPU")
