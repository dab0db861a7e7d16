"""`cuda`: the step through the Triton kernels (fused linear layers, the LASAD step kernel); the
engine captures it with the sampler as one CUDA graph per bucket.

`step_kernel`: "ops" runs the step as one kernel per fused op (ops/linear.py, ops/lasad/step.py);
"persistent" runs steps of up to PERSISTENT_ROWS rows (1-2 images) as one persistent task
interpreter (ops/persistent.py, docs/performance.md "Issue 27") and larger ones per op.
"""

from __future__ import annotations

from ..params import EngineError
from .base import ModelBackend, require_cuda

STEP_KERNELS = ("ops", "persistent")
PERSISTENT_ROWS = 4


class CudaBackend(ModelBackend):
    name = "cuda"
    kernels = "triton"
    capturable = True

    def __init__(self, model, device):
        require_cuda(self.name, device)
        super().__init__(model, device)
        self._step_kernel = "ops"
        self.persistent = None

    @property
    def step_kernel(self) -> str:
        return self._step_kernel

    @step_kernel.setter
    def step_kernel(self, value: str) -> None:
        if value not in STEP_KERNELS:
            raise EngineError(f"step_kernel={value!r} is not one of {', '.join(STEP_KERNELS)}")
        if value == "persistent":
            from ..quant import weights_format
            fmt = weights_format(self.model)
            if fmt != "float":
                raise EngineError(f"step_kernel='persistent' runs float weights (fp32, bf16, fp16), not {fmt}; "
                                  "use step_kernel='ops' with quantised weights")
        self._step_kernel = value

    def decode(self, rows, state):
        if self._step_kernel == "persistent" and rows.ids.shape[0] <= PERSISTENT_ROWS:
            if self.persistent is None:
                from ..ops.persistent import PersistentStep
                self.persistent = PersistentStep(self.model, rows_max=PERSISTENT_ROWS)
            self.persistent.step(rows.ids, rows.pos, rows.width, state.ssm, rows.slots, rows.logits)
            return rows.logits
        return super().decode(rows, state)

    def close(self) -> None:
        self.persistent = None
