"""Grids across adapters: same seeds, merged weights equal the in-memory adapter, weights restored exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_pipeline
from PIL import Image

from engine.adapters import inject, make_config
from engine.export import export_lora
from engine.generate import generate_grid, merged_lora, sample_images


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def lora_file(pipe, tmp_path_factory):
    adapters = inject(pipe.unet, make_config("tri_lora", rank=4, targets="attn+ff"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp("lora") / "a.safetensors"
    export_lora(adapters, path, "kohya", dtype=torch.float32)
    ours = sample_images(pipe, ["red circle"], 5, 3, 32)[0]
    adapters.remove()
    return path, np.asarray(ours, dtype=float)


def test_grid_columns_rows_and_png(pipe, lora_file, tmp_path):
    path, _ = lora_file
    res = generate_grid(pipe, {"tri": path}, ["red circle", "blue star"], [5, 6], steps=3,
                        out=tmp_path / "grid.png")
    assert res.labels == ["base", "tri"] and all(len(v) == 4 for v in res.images.values())
    assert Image.open(res.path).size[0] > 2 * 32
    again = sample_images(pipe, ["red circle"], 5, 3, 32)[0]
    assert np.array_equal(np.asarray(res.images["base"][0]), np.asarray(again))  # same seed, same base image


def test_merged_file_matches_in_memory_adapter_and_restores(pipe, lora_file):
    path, ours = lora_file
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    res = generate_grid(pipe, {"tri": path}, ["red circle"], [5], steps=3, include_base=False)
    merged = np.asarray(res.images["tri"][0], dtype=float)
    assert np.abs(merged - ours).max() <= 2  # 8-bit images; merged vs unmerged float rounding only
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_strength_zero_is_the_base(pipe, lora_file):
    path, _ = lora_file
    res = generate_grid(pipe, {"tri": path}, ["red circle"], [5], steps=3, strength=0.0)
    assert np.array_equal(np.asarray(res.images["base"][0]), np.asarray(res.images["tri"][0]))
    with merged_lora(pipe.unet, path, 1.0) as m:
        assert m.factors and not m.skipped


@pytest.mark.parametrize("kw, match", [({"prompts": []}, "prompts"), ({"seeds": ["a"]}, "seeds"),
                                       ({"strength": 9.0}, "strength")])
def test_bad_inputs(pipe, kw, match):
    args = {"prompts": ["x"], "seeds": [0], **kw}
    with pytest.raises(ValueError, match=match):
        generate_grid(pipe, {}, args.pop("prompts"), args.pop("seeds"), **args)


def test_missing_adapter(pipe, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        generate_grid(pipe, {"x": tmp_path / "nope.safetensors"}, ["a"], [0])
