"""Optional speed-ups for training: torch.compile of the UNet's blocks with adapters in place, with a clean
fallback."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class CompileState:
    enabled: bool
    reason: str = ""
    checked: bool = False  # the first (compiling) step has run


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's down, mid and up blocks: where the adapted layers live and nearly all the time goes."""
    blocks = [*getattr(unet, "down_blocks", []), getattr(unet, "mid_block", None), *getattr(unet, "up_blocks", [])]
    return [b for b in blocks if b is not None]


def compile_blocks(unet: nn.Module, mode: str | None = None) -> CompileState:
    """torch.compile each block in place (adapters already injected). Shapes are static; LoRA²'s changing rank is
    a mask over fixed R_max buffers, so it never recompiles."""
    if not hasattr(torch, "compile") or not hasattr(nn.Module, "compile"):
        return CompileState(False, f"torch {torch.__version__} has no torch.compile")
    for block in unet_blocks(unet):
        block.compile(mode=mode, dynamic=False)
    return CompileState(True)


def uncompile(unet: nn.Module) -> None:
    """Back to eager: drop the compiled wrappers set by compile_blocks."""
    for block in unet_blocks(unet):
        block._compiled_call_impl = None


def first_step_with_fallback(step: Callable[[], T], unet: nn.Module, state: CompileState) -> tuple[T, CompileState]:
    """Run the first (compiling) step; if compilation fails, fall back to eager and run it again."""
    if not state.enabled:
        return step(), state
    try:
        return step(), state
    except Exception as e:  # dynamo/inductor raise many types; any failure here means "use eager"
        log.warning("torch.compile failed, training continues in eager mode: %s", e)
        uncompile(unet)
        torch._dynamo.reset()
        return step(), CompileState(False, f"compile failed: {type(e).__name__}: {str(e)[:200]}")
