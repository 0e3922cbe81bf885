"""LoRA files: round trips in both formats, SGM names for SDXL, metadata, pruning files, and bad input."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from test_adapters import tiny_unet

from engine.adapters import inject, make_config
from engine.export import LoraFileError, export_lora, load_lora_file, prune_file, to_sgm


@pytest.fixture()
def adapters():
    ad = inject(tiny_unet(), make_config("lora", rank=4, targets="attn+ff+conv"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ad


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip_equals_delta_weight(adapters, fmt, tmp_path):
    res = export_lora(adapters, tmp_path / "a.safetensors", fmt, dtype=torch.float32,
                      metadata={"base_model": "bundled", "training": {"steps": 3}})
    names = [n for n, _ in adapters.model.named_modules()]
    lf = load_lora_file(res.path, module_names=names, unet_config=adapters.model.config)
    assert lf.fmt == fmt and set(lf.factors) == set(adapters.layers)
    assert lf.conv == {n for n, layer in adapters.layers.items() if layer.is_conv} != set()
    for name, layer in adapters.layers.items():
        up, down = lf.factors[name]
        assert torch.allclose(up @ down, layer.delta_weight(), atol=1e-6)
    assert lf.metadata["rankstudio.method"] == "lora"
    assert json.loads(lf.metadata["rankstudio.training"]) == {"steps": 3}
    assert json.loads(lf.metadata["rankstudio.ranks"]) == res.ranks
    assert res.bytes > 0 and res.n_params > 0


def test_kohya_keys_have_only_three_tensors_per_module(adapters, tmp_path):
    from safetensors import safe_open

    res = export_lora(adapters, tmp_path / "k.safetensors", "kohya")
    with safe_open(res.path, "pt") as f:
        keys = list(f.keys())
    stems = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in keys}
    assert len(keys) == 3 * len(stems) == 3 * len(adapters.layers)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys


def test_sgm_names_match_sd_scripts_layout():
    assert to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert to_sgm("down_blocks.2.attentions.1.proj_in", 2) == "input_blocks.8.1.proj_in"
    assert to_sgm("mid_block.attentions.0.transformer_blocks.3.ff.net.2", 2) == \
        "middle_block.1.transformer_blocks.3.ff.net.2"
    assert to_sgm("up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0", 2) == \
        "output_blocks.2.1.transformer_blocks.0.attn2.to_out.0"
    assert to_sgm("up_blocks.1.resnets.1.conv_shortcut", 2) == "output_blocks.4.0.skip_connection"


def test_prune_file_keeps_tau_and_writes_metadata(tmp_path):
    ad = inject(tiny_unet(), make_config("lora", rank=8))
    with torch.no_grad():
        for layer in ad.layers.values():
            layer.lora_B.copy_(torch.linalg.qr(torch.randn(layer.out_features, 8))[0]
                               * torch.exp(-torch.arange(8.0)))
            layer.lora_A.copy_(torch.linalg.qr(torch.randn(layer.in_features, 8))[0].T)
    src = export_lora(ad, tmp_path / "full.safetensors", "kohya", dtype=torch.float32)
    lf = load_lora_file(src.path)
    res = prune_file(lf, tmp_path / "pruned.safetensors", tau=0.9, dtype=torch.float32)
    assert set(res.ranks.values()) == {2} and 0.9 <= res.kept_energy < 1
    back = load_lora_file(res.path)
    assert back.ranks == res.ranks and back.metadata["rankstudio.tau"] == "0.9"
    assert back.metadata["rankstudio.pruned_from"] == "full.safetensors"
    assert res.bytes < src.bytes


# --- bad input ----------------------------------------------------------------------------------------------
def test_pickle_checkpoints_are_refused(tmp_path):
    ckpt = tmp_path / "evil.ckpt"
    ckpt.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(LoraFileError, match="evil.ckpt: .ckpt files are pickles"):
        load_lora_file(ckpt)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(LoraFileError, match="evil.safetensors: not a readable safetensors file"):
        load_lora_file(disguised)


def test_truncated_file_is_a_clear_error(adapters, tmp_path):
    res = export_lora(adapters, tmp_path / "t.safetensors", "kohya")
    data = open(res.path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFileError, match="cut.safetensors: .*truncated"):
        load_lora_file(cut)


def test_foreign_keys_are_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoraFileError, match="model.safetensors: keys that are not LoRA weights"):
        load_lora_file(path)
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(half))
    with pytest.raises(LoraFileError, match="lacks its up weight"):
        load_lora_file(half)
    with pytest.raises(LoraFileError, match="file not found"):
        load_lora_file(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"rank": -2}, "rank must be a positive integer, got -2"),
    ({"tau": 0.0}, "tau must be in"),
    ({"tau": 1.01}, "tau must be in"),
    ({"cap": 0}, "rank cap must be a positive integer"),
])
def test_bad_export_settings_write_nothing(adapters, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_lora(adapters, tmp_path / "x.safetensors", "kohya", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_target_path_and_format(adapters, tmp_path):
    with pytest.raises(ValueError, match="written as .safetensors"):
        export_lora(adapters, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="unknown LoRA format"):
        export_lora(adapters, tmp_path / "x.safetensors", "a1111")
    assert list(tmp_path.iterdir()) == []
