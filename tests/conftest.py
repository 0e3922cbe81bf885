"""Shared pytest fixtures and the gpu marker's skip rule."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_kernel_records(monkeypatch):
    """Each test starts with no kernel checks, retired sizes or fallback notices recorded (module-level state in
    engine/adapters/triton_ops.py that a process keeps for good), and leaves none behind."""
    from engine.adapters import triton_ops

    for name in ("_CHECKED", "ERRORS", "_TRIES"):
        monkeypatch.setattr(triton_ops, name, {})
    monkeypatch.setattr(triton_ops, "_FUSED_FAILED", set())
    monkeypatch.setattr(triton_ops, "_NOTICES", [])
    monkeypatch.setattr(triton_ops, "_ACTIVE", [])
