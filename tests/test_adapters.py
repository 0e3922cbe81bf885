"""Every method on a tiny diffusers UNet: base output at init, merge == unmerge, state round trip, trainable set."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from engine.adapters import AdapterLayer, inject, make_config, method_names
from engine.adapters.registry import Method, register

EXTRA = {"lora2": {"max_rank": 8}}


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)


def inputs(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500])[:batch],
            torch.randn(batch, 7, 32, generator=g))


def cfg(method, **kw):
    return make_config(method, **{"rank": 4, **EXTRA.get(method, {}), **kw})


def perturb(adapters, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("targets", ["attn", "attn+ff+conv"])
def test_output_equals_base_at_init(method, targets):
    unet = tiny_unet()
    x, t, c = inputs()
    with torch.no_grad():
        y0 = unet(x, t, c).sample
    adapters = inject(unet, cfg(method, targets=targets))
    assert any(layer.is_conv for layer in adapters.layers.values()) == (targets == "attn+ff+conv")
    with torch.no_grad():
        y1 = unet(x, t, c).sample
    assert torch.allclose(y0, y1, atol=1e-5), (y0 - y1).abs().max()


@pytest.mark.parametrize("method", method_names())
def test_merged_equals_unmerged_and_remove_restores(method):
    unet = tiny_unet()
    x, t, c = inputs()
    base_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters = inject(unet, cfg(method, targets="attn+ff+conv"))
    perturb(adapters)
    with torch.no_grad():
        y_unmerged = unet(x, t, c).sample
        adapters.merge()
        y_merged = unet(x, t, c).sample
        adapters.unmerge()
        y_again = unet(x, t, c).sample
    assert (y_unmerged - y_merged).abs().max() < 1e-5
    assert (y_unmerged - y_again).abs().max() < 1e-5
    for layer in adapters.layers.values():
        assert torch.allclose(layer.delta_weight(), layer.factors()[0] @ layer.factors()[1])
    model = adapters.remove()
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.allclose(v, base_weights[k], atol=1e-6), k


@pytest.mark.parametrize("method", method_names())
def test_state_dict_round_trip_and_trainable_set(method):
    unet = tiny_unet()
    x, t, c = inputs()
    adapters = inject(unet, cfg(method))
    perturb(adapters)
    with torch.no_grad():
        y = unet(x, t, c).sample
    sd = adapters.state_dict()
    extra = adapters.extra_state()
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(any(tag in n for tag in ("lora_", "tri_", ".rho")) for n in trainable)
    assert {id(p) for p in adapters.parameters()} == {id(p) for p in unet.parameters() if p.requires_grad}
    adapters.remove()

    other = inject(unet, cfg(method, seed=123))
    other.load_state_dict(sd)
    other.load_extra_state(extra)
    with torch.no_grad():
        y2 = unet(x, t, c).sample
    assert torch.equal(y, y2)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({k: v for k, v in list(sd.items())[1:]})


@pytest.mark.parametrize("method", method_names())
def test_adapter_gets_gradients_and_base_does_not(method):
    unet = tiny_unet()
    x, t, c = inputs()
    adapters = inject(unet, cfg(method))
    perturb(adapters)
    unet(x, t, c).sample.pow(2).mean().backward()
    assert all(p.grad is None for n, p in unet.named_parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())


def test_bf16_base_with_fp32_adapter_without_autocast():
    unet = tiny_unet().to(torch.bfloat16)
    x, t, c = inputs()
    adapters = inject(unet, cfg("lora"))
    assert adapters.parameters()[0].dtype == torch.float32
    out = unet(x.bfloat16(), t, c.bfloat16()).sample
    assert out.dtype == torch.bfloat16


def test_bad_configs_name_the_value():
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        make_config("lora", rank=0)
    with pytest.raises(ValueError, match="got -3"):
        make_config("ac_lora", rank=-3)
    with pytest.raises(ValueError, match="unknown adapter method 'dora'"):
        make_config("dora")
    with pytest.raises(ValueError, match="unknown lora setting"):
        make_config("lora", ranks=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        make_config("ac_lora", mode="svd")
    with pytest.raises(ValueError, match="sigma_init='zero' is invalid"):
        make_config("tri_lora", sigma_init="zero")
    with pytest.raises(ValueError, match="max_rank must be an integer >= rank"):
        make_config("lora2", rank=16, max_rank=8)
    with pytest.raises(ValueError, match="alpha"):
        make_config("lora", alpha=-1.0)


def test_inject_errors():
    unet = tiny_unet()
    inject(unet, cfg("lora"))
    with pytest.raises(ValueError, match="already carries adapters"):
        inject(unet, cfg("lora"))
    with pytest.raises(ValueError, match="no layer of the model matches"):
        inject(tiny_unet(), make_config("lora", targets="not_a_layer"))


def test_registry_rejects_duplicates():
    from engine.adapters.lora import METHOD

    with pytest.raises(ValueError, match="registered twice"):
        register(Method("lora", "LoRA", METHOD.config_cls, METHOD.layer_cls, METHOD.set_cls, ""))


def test_config_help_metadata_for_forms():
    help_ = make_config("ac_lora").field_help()
    assert "restart" in help_["restart_every_epochs"]["help"].lower()
    assert help_["mode"]["choices"] == ("product", "paper")
    assert make_config("lora", rank=8).to_dict()["method"] == "lora"


@pytest.mark.parametrize("method", method_names())
def test_gradient_checkpointing_gives_the_same_gradients(method):
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        adapters = inject(unet, cfg(method, lambda_e=1e-2) if method == "lora2" else cfg(method))
        perturb(adapters)
        x, t, c = inputs()
        for _ in range(2):  # twice: nothing from the first step may leak into the second
            for p in adapters.parameters():
                p.grad = None
            adapters.before_step(0)
            loss = unet(x, t, c).sample.pow(2).mean()
            extra, _ = adapters.extra_loss()
            (loss if extra is None else loss + extra).backward()
        grads.append([p.grad.clone() for p in adapters.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method, extra", [("lora", {}), ("ac_lora", {}), ("tri_lora", {}),
                                           ("lora2", {"max_rank": 8}), ("lora2", {"max_rank": 8, "normalise": True})])
def test_set_factors_equal_each_layers_own_in_ops_that_do_not_grow_with_the_layers(method, extra):
    """AdapterSet.factors() (one stack and one multiply per shape group, LoRA²'s vectors in one batched op) gives
    every layer's own factors() bit for bit (LoRA², ranks moved apart: within rounding, since its batched weights
    take the CPU's vectorised exp), in a number of ops that is the same for 8 and for 32 same-shape layers (the
    trainer's rank log starts here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"detach", "view", "expand", "unbind", "select", "transpose", "alias", "_unsafe_view", "t"}

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.n += func.overloadpacket.__name__ not in free
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (8, 32):
        model = nn.Sequential(*[nn.Linear(12, 10) for _ in range(n)])
        ad = inject(model, make_config(method, rank=4, targets=",".join(map(str, range(n))), **extra))
        g = torch.Generator().manual_seed(n)
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 0 else 0.0))
        if method == "lora2":
            for i, layer in enumerate(ad.layers.values()):
                layer.set_rank(1 + i % 8)
        got = ad.factors()
        assert list(got) == list(ad.layers)
        for name, layer in ad.layers.items():
            up, down = (t.float() for t in layer.factors())
            if method == "lora2":  # the CPU's vectorised exp and softplus against their scalar forms (0-d nu),
                assert torch.allclose(got[name][0], up, rtol=1e-6, atol=1e-9), name  # a row sum: within an ulp
            else:
                assert torch.equal(got[name][0], up), name
            assert torch.equal(got[name][1], down), name
        Ops.n = 0
        with Ops():
            ad.factors()
        counts.append(Ops.n)
    assert counts[0] == counts[1] > 0, counts
