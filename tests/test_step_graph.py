"""The CUDA-graph step's host-side helpers (the capture itself runs in the gpu-marked trainer tests)."""
from __future__ import annotations

import torch

from engine import step_graph
from engine.train import _optimizer_state


def test_graphs_say_why_they_cannot_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert "need a CUDA GPU" in step_graph.graphs_unsupported(cpu, 1, "bf16")
    assert "one GPU only (2 processes" in step_graph.graphs_unsupported(cuda, 2, "bf16")
    assert "fp16" in step_graph.graphs_unsupported(cuda, 1, "fp16")
    assert step_graph.graphs_unsupported(cuda, 1, "bf16") == step_graph.graphs_unsupported(cuda, 1, "no") == ""


def test_tensor_learning_rates_change_in_place_and_save_as_numbers():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.1}], lr=0.1, fused=True)
    step_graph.tensor_lrs(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and abs(float(lr) - 0.1) < 1e-7
    step_graph.set_lr(opt.param_groups[0], 0.5)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.5  # same tensor: a captured step reads it
    p.grad = torch.ones(4)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((4,), 1 - 0.5 - 0.5 * 0.01), atol=1e-4)  # step of lr, decay
    saved = _optimizer_state(opt)
    assert saved["param_groups"][0]["lr"] == 0.5 and torch.is_tensor(opt.param_groups[0]["lr"])
    plain = {"lr": 0.3}
    step_graph.set_lr(plain, 0.2)
    assert plain["lr"] == 0.2


def test_shape_key_tells_buckets_apart():
    a = {"noisy": torch.zeros(1, 4, 8, 8), "t": torch.zeros(1, dtype=torch.long)}
    b = {"noisy": torch.zeros(1, 4, 8, 12), "t": torch.zeros(1, dtype=torch.long)}
    assert step_graph.shape_key(a) != step_graph.shape_key(b)
    assert step_graph.shape_key(a) == step_graph.shape_key({k: v.clone() for k, v in reversed(a.items())})
