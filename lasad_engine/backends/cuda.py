"""`cuda`: the step through the Triton kernels (fused linear layers, the LASAD step kernel); the
engine captures it with the sampler as one CUDA graph."""

from __future__ import annotations

from .base import ModelBackend, require_cuda


class CudaBackend(ModelBackend):
    name = "cuda"
    kernels = "triton"
    capturable = True

    def __init__(self, model, device):
        require_cuda(self.name, device)
        super().__init__(model, device)
