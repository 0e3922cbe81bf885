"""Files we export load in unmodified diffusers (`pipe.load_lora_weights`) and give the in-memory adapter's image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipes import generate, tiny_sd_pipeline, tiny_sdxl_pipeline

from engine.adapters import inject, make_config, method_names
from engine.export import export_lora, load_lora_file

# lambda_e = 0: the entropy processor computes attention explicitly, which would differ from SDPA by rounding
SETTINGS = {"lora2": {"max_rank": 8, "rank": 4, "lambda_e": 0.0}, "ac_lora": {}, "lora": {}, "tri_lora": {}}


def randomise(adapters, seed: int = 1, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            if p.dim() > 0:
                boost = 2 if adapters.method == "lora2" else 1
                p.copy_(torch.randn(p.shape, generator=g) * scale / max(p.shape[-1], 1) ** 0.5 * boost)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request):
    return tiny_sd_pipeline() if request.param == "sd1" else tiny_sdxl_pipeline()


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exported_file_gives_same_image(pipe, method, fmt, tmp_path):
    base_image = generate(pipe)
    cfg = make_config(method, **{"rank": 4, "targets": "attn+ff", **SETTINGS[method]})
    adapters = inject(pipe.unet, cfg)
    randomise(adapters)
    ours = generate(pipe)
    path = tmp_path / f"{method}.safetensors"
    res = export_lora(adapters, path, fmt, dtype=torch.float32)
    adapters.remove()
    assert np.abs(generate(pipe) - base_image).max() < 1e-6  # removal restores the base model
    pipe.load_lora_weights(str(path))
    try:
        theirs = generate(pipe)
    finally:
        pipe.unload_lora_weights()
    assert np.abs(ours - base_image).max() > 0.005, "the random adapter should visibly change the image"
    assert np.abs(ours - theirs).max() < 5e-4  # images in [0, 1]
    assert set(res.ranks.values()) == {4}


def test_pruned_file_loads_with_chosen_ranks(pipe, tmp_path):
    cfg = make_config("lora", rank=8, targets="attn")
    adapters = inject(pipe.unet, cfg)
    # give every layer a spectrum that decays at its own rate so tau = 0.9 picks different ranks
    with torch.no_grad():
        for i, layer in enumerate(adapters.layers.values()):
            decay = torch.exp(-torch.arange(8.0) * (0.2 + 0.15 * (i % 5)))
            q1, _ = torch.linalg.qr(torch.randn(layer.out_features, 8))
            q2, _ = torch.linalg.qr(torch.randn(layer.in_features, 8))
            layer.lora_B.copy_(q1 * decay * 0.5)
            layer.lora_A.copy_(q2.T)
    spectra_ranks = adapters.effective_ranks(0.9)
    ours_full = generate(pipe)
    path = tmp_path / "pruned.safetensors"
    res = export_lora(adapters, path, "kohya", tau=0.9, dtype=torch.float32)
    factors, _, _ = adapters.to_lora(tau=0.9)
    adapters.remove()
    assert res.ranks == spectra_ranks
    assert len(set(res.ranks.values())) > 1
    assert 0.9 <= res.kept_energy < 1.0
    loaded = load_lora_file(path, module_names=[n for n, _ in pipe.unet.named_modules()], unet_config=pipe.unet.config)
    assert loaded.ranks == res.ranks
    pipe.load_lora_weights(str(path))
    try:
        theirs = generate(pipe)
        # per-layer ranks as loaded by PEFT inside diffusers
        peft_ranks = {}
        for name, module in pipe.unet.named_modules():
            if hasattr(module, "lora_A") and "default_0" in getattr(module, "lora_A", {}):
                peft_ranks[name] = module.lora_A["default_0"].weight.shape[0]
    finally:
        pipe.unload_lora_weights()
    assert peft_ranks == res.ranks
    # the truncated adapter applied in memory gives the same image as the loaded file
    adapters = inject(pipe.unet, make_config("lora", rank=8, targets="attn"))
    with torch.no_grad():
        for name, layer in adapters.layers.items():
            up, down = factors[name]
            r = down.shape[0]
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            layer.lora_A[:r] = down
            layer.lora_B[:, :r] = up
    ours_pruned = generate(pipe)
    adapters.remove()
    assert np.abs(ours_pruned - theirs).max() < 2e-4
    assert np.abs(ours_full - ours_pruned).max() > 0  # pruning changed something
