"""Base-model loading: folders, single files, families, pickles refused, offline hub ids as clear errors."""
from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_pipeline
from safetensors.torch import save_file

from engine.models import (
    ModelLoadError,
    family_of_file,
    load_pipeline,
    model_family,
    native_resolution,
    resolve_spec,
    size_multiple,
)


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "weights.pt", "x.pth"])
def test_pickles_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match="pickle"):
        resolve_spec(str(tmp_path / name))


def test_missing_paths_and_bad_specs(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_spec(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="base model"):
        resolve_spec("")
    with pytest.raises(ModelLoadError, match="model_index"):
        resolve_spec(str(tmp_path))


def test_offline_hub_id_names_the_model_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("nobody-here/not-a-real-model-123")
    text = str(info.value)
    assert "nobody-here/not-a-real-model-123" in text and "bundled" in text and "download" in text


def test_single_file_family(tmp_path):
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "sd.safetensors"))
    save_file({"model.diffusion_model.x": torch.zeros(1), "conditioner.embedders.1.model.y": torch.zeros(1)},
              str(tmp_path / "xl.safetensors"))
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert family_of_file(tmp_path / "sd.safetensors") == "sd"
    assert family_of_file(tmp_path / "xl.safetensors") == "sdxl"
    with pytest.raises(ModelLoadError, match="original single-file layout"):
        family_of_file(tmp_path / "other.safetensors")
    assert resolve_spec(str(tmp_path / "xl.safetensors")).family == "sdxl"


@pytest.mark.parametrize("sdxl", [False, True])
def test_loads_diffusers_folders(tmp_path, sdxl):
    folder = save_tiny_pipeline(tmp_path / "m", sdxl=sdxl)
    spec = resolve_spec(str(folder))
    assert spec.kind == "folder" and spec.family == ("sdxl" if sdxl else "sd")
    pipe = load_pipeline(str(folder), "cpu", torch.float32)
    assert model_family(pipe) == spec.family
    assert native_resolution(pipe) == 32 and size_multiple(pipe) == 4


def test_bundled_model_loads_or_says_how_to_build_it():
    try:
        spec = resolve_spec("bundled")
    except ModelLoadError as e:
        assert "bundled mini model" in str(e)
        return
    pipe = load_pipeline("bundled")
    assert spec.family == "sd" and model_family(pipe) == "sd"
