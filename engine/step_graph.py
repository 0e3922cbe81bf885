"""CUDA-graph replay of the training step: each step's thousands of kernel launches become two graph replays.

A training step is split in two captured pieces:
- forward+backward of one micro-batch, one graph per input shape (aspect-ratio buckets give a few shapes);
  gradients accumulate in place into .grad tensors that live outside the graphs;
- the update (clip, optimizer step, compute-dtype copies of the factors, zeroed gradients), one graph.

Each piece runs eagerly for its first `warmup` calls (real training work, which also creates the optimizer
state and picks kernels), is captured on the next call and replayed from then on. Capture records kernels
without running them, so the captured call is replayed once at once: no step is skipped or repeated. The
forward+backward graphs share one memory pool (they never run at the same time and keep their outputs alive).

Everything the host decides between steps (noise, timesteps, learning rate, LoRA²'s ranks, AC-LoRA restarts)
stays outside the graphs and reaches them through tensors changed in place: the captured kernels read the
same addresses at every replay.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Inputs = dict[str, torch.Tensor]
Outputs = tuple[torch.Tensor, dict[str, torch.Tensor]]


def graphs_unsupported(device: torch.device, processes: int, mixed_precision: str) -> str:
    """Why CUDA graphs cannot run this training ('' when they can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA GPU (training runs on {device.type})"
    if processes > 1:
        return f"CUDA graphs run on one GPU only ({processes} processes here); each process runs eagerly"
    if mixed_precision == "fp16":
        return "CUDA graphs do not support fp16 mixed precision (its loss scaler syncs with the host); use bf16"
    return ""


def shape_key(inputs: Inputs) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))


def tensor_lrs(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Learning rates as device tensors, so that a captured optimizer step reads the current value."""
    for group in optimizer.param_groups:
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def set_lr(group: dict, value: float) -> None:
    """Set a param group's learning rate: in place when it is a tensor (a captured step reads it there)."""
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


class CaptureError(RuntimeError):
    """Capturing a graph failed (an op that cannot be captured, or a host sync): the caller falls back to eager."""


class GraphedStep:
    """Runs `forward_backward(inputs) -> (loss, terms)` and `update()` eagerly, then captured and replayed.

    Contract for the callables: all tensors they read or write across calls (parameters, gradients, optimizer
    state, masks, compute-dtype copies) keep their storage; inputs come only through the `inputs` dict.
    """

    def __init__(self, forward_backward: Callable[[Inputs], Outputs], update: Callable[[], None],
                 params: list[torch.Tensor], warmup: int = 2):
        self.forward_backward, self.update_fn, self.params, self.warmup = forward_backward, update, params, warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Inputs, Outputs]] = {}
        self._seen: dict[tuple, int] = {}
        self._update_graph: torch.cuda.CUDAGraph | None = None
        self._updates = 0
        self._pool: Any = None
        self._stream = torch.cuda.Stream()

    def _eager(self, fn: Callable, *args):
        """Warm-up calls run on a side stream, as capture does (the autograd engine and cuBLAS set up per stream)."""
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            out = fn(*args)
        torch.cuda.current_stream().wait_stream(self._stream)
        return out

    def micro(self, inputs: Inputs) -> Outputs:
        """Forward+backward of one micro-batch; returns the loss and terms as fresh tensors (safe to keep)."""
        key = shape_key(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            seen = self._seen.get(key, 0)
            if seen < self.warmup:
                self._seen[key] = seen + 1
                return self._eager(self.forward_backward, inputs)
            entry = self._capture(key, inputs)
        graph, static, (loss, terms) = entry
        for name, value in inputs.items():
            static[name].copy_(value, non_blocking=True)
        graph.replay()
        return loss.clone(), {k: v.clone() for k, v in terms.items()}

    def _capture(self, key: tuple, inputs: Inputs):
        for p in self.params:  # backward must add into gradients that outlive the graph, not allocate them
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        static = {name: value.clone() for name, value in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        out = self._record(graph, self.forward_backward, static, pool=self._pool)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[key] = (graph, static, out)
        return self._graphs[key]

    def update(self) -> None:
        """The optimizer update: eager for the first `warmup` calls, then one captured graph."""
        if self._update_graph is None:
            if self._updates < self.warmup:
                self._updates += 1
                self._eager(self.update_fn)
                return
            graph = torch.cuda.CUDAGraph()
            self._record(graph, self.update_fn)
            self._update_graph = graph
        self._update_graph.replay()

    def _record(self, graph: torch.cuda.CUDAGraph, fn: Callable, *args, pool=None):
        """Capture fn(*args) into graph on the warm-up's stream. Autograd remembers the stream where a parameter's
        gradient accumulator was made (the adapters keep some alive across steps, e.g. the folded B's graph), and
        a backward that ends by waiting on a stream outside the capture fails. thread_local: the studio's other
        threads may use CUDA meanwhile."""
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=self._stream, capture_error_mode="thread_local"):
                return fn(*args)
        except Exception as e:
            raise CaptureError(f"{type(e).__name__}: {str(e)[:300]}") from e
