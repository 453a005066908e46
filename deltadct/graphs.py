"""Replay pure CUDA tensor functions as CUDA graphs, one graph per input signature.

The fused Delta-DCT path issues about a hundred small torch ops and kernel launches per matrix. At
Llama sizes the host issuing them, not the GPU running them, sets the speed: the GPU idles between
launches. A function that never waits for the host and whose output shapes follow from its input
shapes can be captured once per signature and then replayed with a single launch. Inputs are copied
into the graph's static buffers and outputs cloned out of them, so callers see ordinary tensors and
a later replay cannot overwrite a result already handed out.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Union

import torch

Outputs = Union[torch.Tensor, dict[str, torch.Tensor], tuple]


def clone_outputs(outputs: Outputs) -> Outputs:
    """Fresh copies of a tensor, or of the tensors in a dict or tuple (None entries stay None)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    if isinstance(outputs, dict):
        return {k: v.clone() for k, v in outputs.items()}
    return tuple(None if v is None else v.clone() for v in outputs)


def _signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs)


class GraphCache:
    """Captured graphs of functions of CUDA tensors, least recently used dropped past ``max_graphs``.

    ``run(key, fn, *inputs)`` captures ``fn`` on the first call for ``key`` and the inputs'
    shapes, strides, dtypes and devices, and replays it on every later call. ``key`` must name
    everything ``fn`` closes over, since ``fn`` itself is only called at capture time. ``finish``
    turns the graph's static outputs into fresh tensors after each replay (default: copies); it
    must never return the static tensors themselves. Each graph keeps its static inputs, outputs
    and intermediates on the GPU, hence the bound.
    """

    def __init__(self, max_graphs: int = 8):
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Outputs]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, fn: Callable[..., Outputs], *inputs: torch.Tensor,
            finish: Callable[[Outputs], Any] = clone_outputs) -> Any:
        signature = (key, _signature(inputs))
        entry = self._graphs.get(signature)
        if entry is None:
            entry = self._capture(fn, inputs)
            self._graphs[signature] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(signature)
        graph, static_inputs, static_outputs = entry
        for static, value in zip(static_inputs, inputs, strict=True):
            static.copy_(value)
        graph.replay()
        return finish(static_outputs)

    @staticmethod
    def _capture(fn, inputs):
        static_inputs = [t.clone() for t in inputs]
        # one eager run on a side stream first, as capture requires: kernel compilation, lazy
        # initialisation and the allocator's first requests stay out of the graph
        side = torch.cuda.Stream(device=static_inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the streaming pipeline's reader and writer threads keep allocating page-locked
        # buffers and copying meanwhile; in the default global mode any such call invalidates the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_outputs = fn(*static_inputs)
        return graph, static_inputs, static_outputs
