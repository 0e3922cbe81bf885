"""Compile helpers: blocks found, compile fallback to eager gives the same result as never compiling."""
from __future__ import annotations

import torch
from test_adapters import inputs, tiny_unet

from engine import speed
from engine.adapters import inject, make_config


def test_fallback_to_eager_when_compile_fails():
    unet = tiny_unet()
    inject(unet, make_config("lora", rank=4))
    x, t, c = inputs()
    with torch.no_grad():
        ref = unet(x, t, c).sample
    state = speed.compile_blocks(unet)
    assert state.enabled and len(speed.unet_blocks(unet)) == 5
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated inductor failure")
        with torch.no_grad():
            return unet(x, t, c).sample

    out, state = speed.first_step_with_fallback(step, unet, state)
    assert not state.enabled and "simulated inductor failure" in state.reason
    assert all(b._compiled_call_impl is None for b in speed.unet_blocks(unet))
    assert torch.equal(out, ref)
