"""The LasadStep TensorRT plugin (Quick Deployable Plugin, ahead-of-time Triton kernel)."""
