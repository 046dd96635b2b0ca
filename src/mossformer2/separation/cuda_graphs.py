"""CUDA graph replay of a separation model's forward for the fixed input shapes of chunked inference.

At batch 1 the full network launches a few thousand small kernels per call, so on a fast GPU the host's launch
time, not the arithmetic, bounds the latency. A CUDA graph records those launches once per input shape and
replays them with one call. Chunked separation uses few shapes (full chunks, the last batch, short files), so
each shape is captured on first use and kept, up to ``max_graphs`` (least recently used dropped first).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any

import torch


class CudaGraphModel:
    """Callable twin of ``model`` (``[B, T] -> [B, S, T]``) replaying one captured CUDA graph per input shape.

    Runs the model eagerly where graphs do not apply: on CPU tensors, with ``lengths`` (padded batches of unequal
    inputs, whose masks differ per call), with gradients enabled, or if capture fails (e.g. a model that
    synchronises with the host in its forward; warned once). ``dtype`` (bfloat16 / float16) captures under
    autocast; autocast's weight-cast cache must be off during capture (the casts are then part of the graph).

    Each graph keeps its own memory pool of the activations of one forward at its shape; outputs are copied out of
    the graph's static buffer, so results of earlier calls stay valid.
    """

    def __init__(self, model: Any, dtype: torch.dtype | None = None, max_graphs: int = 4, warmup: int = 2) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model = model
        self.dtype = None if dtype in (None, torch.float32) else dtype
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: OrderedDict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = (
            OrderedDict())
        self._capture_failed = False

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def captured_shapes(self) -> list[tuple[int, ...]]:
        return [key[0] for key in self._graphs]

    def _autocast(self, device: torch.device, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype, cache_enabled=cache_enabled)

    def _eager(self, wave: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        with self._autocast(wave.device):
            return self.model(wave) if lengths is None else self.model(wave, lengths)

    def __call__(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled():  # autograd needs the eager graph
            return self._eager(wave, lengths)
        with torch.inference_mode():  # static buffers are inference tensors: update them in the same mode
            if wave.device.type != "cuda" or lengths is not None or self._capture_failed:
                return self._eager(wave, lengths)
            return self._replay(wave)

    def _replay(self, wave: torch.Tensor) -> torch.Tensor:
        check = getattr(self.model, "check_input", None)
        if check is not None:
            check(wave)  # the captured forward skips it (its finiteness test waits for the device)
        key = (tuple(wave.shape), wave.dtype, wave.device)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(wave)
            except RuntimeError as err:  # e.g. host synchronisation inside the model's forward
                self._capture_failed = True
                warnings.warn(f"CUDA graph capture failed ({err}); running the model eagerly", stacklevel=2)
                return self._eager(wave, None)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(wave)
        graph.replay()
        return static_out.clone()

    def _capture(self, wave: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        forward = getattr(self.model, "forward_unchecked", self.model)
        static_in = wave.clone()
        # Warm-up on a side stream (cuDNN / cuBLAS pick their algorithms and workspaces outside the capture).
        stream = torch.cuda.Stream(wave.device)
        stream.wait_stream(torch.cuda.current_stream(wave.device))
        with torch.cuda.stream(stream), self._autocast(wave.device, cache_enabled=False):
            for _ in range(self.warmup):
                forward(static_in)
        torch.cuda.current_stream(wave.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast(wave.device, cache_enabled=False):
            static_out = forward(static_in)
        return graph, static_in, static_out
