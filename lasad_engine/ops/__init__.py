"""Operators shared by training, export and every backend."""


def stream_key(device) -> int:
    """The current CUDA stream of `device` as an integer (0 elsewhere): device-wide scratch that
    kernels count in (split-K arrivals, the sampler's row counters) is kept per stream, since
    launches on one stream run one after another and launches on two (two engines in one process)
    may not."""
    if device.type != "cuda":
        return 0
    import torch

    return torch.cuda.current_stream(device).cuda_stream
