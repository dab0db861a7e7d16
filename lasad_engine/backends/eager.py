"""`torch`: eager execution of the step through the torch definitions of every op, on any device.
The reference the other backends are proven against."""

from __future__ import annotations

from .base import ModelBackend


class TorchBackend(ModelBackend):
    name = "torch"
    kernels = "torch"
