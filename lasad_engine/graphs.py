"""Capture any decode step once as a CUDA graph and replay it (mamba's `capture_graph`, sglang's
`CudaGraphRunner`): the engine wraps whichever backend it runs, if the backend is capturable."""

from __future__ import annotations

from typing import Callable, Hashable

import torch


class CudaGraphRunner:
    """One graph per key (what the step function bakes in: rows, grid, sampling switches); all
    graphs share one memory pool and one side stream.

    `run(key, fn, reset)`: the first call with a key warms `fn` up on the side stream (Triton
    compiles, cuBLAS picks kernels), calls `reset` (warm-up mutated the buffers), captures `fn`,
    then replays; later calls only replay. `fn` must read and write fixed buffers only.
    """

    def __init__(self, device: torch.device, warmup: int = 2):
        self.device, self.warmup = device, warmup
        # One side stream for every warm-up and capture: cuBLAS keeps a workspace per stream it
        # has seen, so a fresh stream per capture would grow memory with every new grid.
        self.stream = torch.cuda.Stream(device)
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def prepare(self, key: Hashable, fn: Callable[[], None], reset: Callable[[], None]) -> None:
        if key in self.graphs:
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for _ in range(self.warmup):
                reset()
                fn()
        main.wait_stream(self.stream)
        reset()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the capture fails only on this thread's unsafe calls. With "global" (torch's
        # default) another thread's allocation, sync or VQ decode during a capture (a bucket captured
        # while other requests are served) would invalidate it and fail the decode loop.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            fn()
        self.graphs[key] = graph

    def replay(self, key: Hashable) -> None:
        self.graphs[key].replay()

    def close(self) -> None:
        self.graphs.clear()
        self.pool = None
