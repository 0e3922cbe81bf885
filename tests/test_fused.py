"""The fused low-rank op equals the separate-ops path: outputs and every gradient, in float64 and bf16."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.adapters import inject, make_config

EXTRA = {"lora2": {"max_rank": 5}}


def _run(model, adapters, x, fused: bool):
    for layer in adapters.layers.values():
        layer.fused = fused
    for p in adapters.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.float().sin().sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in adapters.parameters()]


@pytest.mark.parametrize("forward", ["chain", "merged"])
@pytest.mark.parametrize("method", ["lora", "ac_lora", "tri_lora", "lora2"])
def test_fused_matches_unfused_float64(method, forward, monkeypatch):
    from engine.adapters import fused as fused_module

    monkeypatch.setattr(fused_module, "FORWARD", forward)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).double()
    ad = inject(model, make_config(method, rank=3, targets="0", alpha=6.0, **EXTRA.get(method, {})),
                adapter_dtype=torch.float64)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    fused, plain = _run(model, ad, x, True), _run(model, ad, x, False)
    assert torch.allclose(fused[0], plain[0], atol=1e-12)
    assert torch.allclose(fused[1], plain[1], atol=1e-12)
    for a, b in zip(fused[2], plain[2]):
        assert torch.allclose(a, b, atol=1e-11)


@pytest.mark.parametrize("method", ["lora", "tri_lora", "lora2"])
def test_fused_bf16_base_fp32_adapter_close_to_reference(method):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 48))
    ref = nn.Sequential(nn.Linear(64, 48)).double()
    ref.load_state_dict(model.state_dict())
    model = model.to(torch.bfloat16)
    extra = {"max_rank": 10} if method == "lora2" else {}
    ad = inject(model, make_config(method, rank=8, targets="0", alpha=4.0, **extra))
    ad_ref = inject(ref, make_config(method, rank=8, targets="0", alpha=4.0, **extra), adapter_dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(ad.parameters(), ad_ref.parameters()):
            p.copy_(torch.randn_like(p) * 0.2)
            q.copy_(p.double())
    x = torch.randn(3, 64)
    y, gx, grads = _run(model, ad, x.bfloat16(), True)
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    y_ref, gx_ref, grads_ref = _run(ref, ad_ref, x.double(), False)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    assert rel(y, y_ref) < 1e-2 and rel(gx, gx_ref) < 2e-2
    for a, b in zip(grads, grads_ref):
        assert rel(a, b) < 2e-2


def _accumulated(model, adapters, xs, in_place: bool, zeros: bool):
    """Gradients after one backward per input in xs, starting from None or (zeros) from zero tensors."""
    adapters.set_grads_in_place(in_place)
    for p in adapters.parameters():
        p.grad = torch.zeros_like(p) if zeros else None
    for x in xs:
        model(x).float().sin().sum().backward()
    adapters.set_grads_in_place(False)
    return [p.grad.clone() for p in adapters.parameters()]


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("method", ["lora", "ac_lora", "tri_lora", "lora2"])
def test_gradients_added_in_place_equal_returned_gradients(method, zeros):
    """grads_in_place: the backward adds A's and B's gradients into .grad itself (first use allocates them); over
    two backwards (gradient accumulation) every gradient equals autograd's, in float64 and with s != 1."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 9)).double()
    ad = inject(model, make_config(method, rank=3, targets="0,1", alpha=6.0, **EXTRA.get(method, {})),
                adapter_dtype=torch.float64)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    xs = [torch.randn(2, 4, 12, dtype=torch.float64) for _ in range(2)]
    ref = _accumulated(model, ad, xs, False, zeros)
    got = _accumulated(model, ad, xs, True, zeros)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    # every leaf took the in-place way: the fused op's factors, the B and TriLoRA's sigma that FoldVectors folds,
    # LoRA²'s rho through StackLeaves; autograd delivers no gradient for them
    leaves = list(ad.parameters())
    ad.set_grads_in_place(True)
    assert all(g is None for g in torch.autograd.grad(model(xs[0]).sum(), leaves, allow_unused=True))
    ad.set_grads_in_place(False)
    assert all(g is not None for g in torch.autograd.grad(model(xs[0]).sum(), leaves, allow_unused=True))


def test_gradients_in_place_bf16_compute_fp32_masters():
    """bf16 activations, fp32 masters: the in-place gradients equal autograd's (CPU path: product then add)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16)
    ad = inject(model, make_config("lora", rank=8, targets="0"))
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    xs = [torch.randn(3, 64, dtype=torch.bfloat16) for _ in range(2)]
    ref, got = _accumulated(model, ad, xs, False, True), _accumulated(model, ad, xs, True, True)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "tri_lora"])
def test_compute_copies_follow_the_masters(method):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 16)).to(torch.bfloat16)
    ad = inject(model, make_config(method, rank=4, targets="0"))
    layer = ad.layers["0"]
    opt = torch.optim.AdamW(ad.parameters(), lr=0.1)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    for refresh in (True, False):
        model(x).float().sum().backward()
        opt.step()
        opt.zero_grad()
        if refresh:
            ad.refresh_shadows()
            key = layer._shadow[0]
            down, up = layer.down_up()
            assert key[1] == down._version  # a forward will not re-cast
            assert key[2] == (up._version if method == "lora" else -1)
        model(x)
        _, down_c, up_c = layer._shadow
        down, up = layer.down_up()
        assert torch.equal(down_c, down.detach().bfloat16())
        if method == "lora":
            assert torch.equal(up_c, up.detach().bfloat16())
        else:  # B diag(sigma) is formed in each forward; only A is kept cast
            assert up_c is None


@pytest.mark.parametrize("method", ["tri_lora", "lora2"])
def test_batched_fold_is_used_and_follows_every_optimizer_step(method):
    """The set folds s B diag(v) for all layers before each model forward; the layers use it, never a stale one."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 8)).double()
    ad = inject(model, make_config(method, rank=3, targets="0,1,2", alpha=6.0, **EXTRA.get(method, {})),
                adapter_dtype=torch.float64)
    opt = torch.optim.SGD(ad.parameters(), lr=0.5)
    x = torch.randn(4, 12, dtype=torch.float64)
    for _ in range(3):
        fused, plain = _run(model, ad, x, True), _run(model, ad, x, False)
        layer = ad.layers["1"]
        assert layer._folded is not None and layer._folded[3] == layer.fold_key()  # made by the set's hook
        assert torch.allclose(fused[0], plain[0], atol=1e-12)
        for a, b in zip(fused[2], plain[2], strict=True):
            assert torch.allclose(a, b, atol=1e-11)
        opt.step()  # moves B and v in place: the stored fold is now stale
        assert layer._folded[3] != layer.fold_key()
    ad.remove()
    assert not model._forward_pre_hooks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "ac_lora", "tri_lora", "lora2"])
def test_cuda_bf16_fused_path_close_to_fp64_reference(method):
    """On CUDA the low-rank gradients accumulate straight into fp32 (mm with out_dtype): check them numerically."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(256, 192), nn.Linear(192, 128))
    ref = nn.Sequential(nn.Linear(256, 192), nn.Linear(192, 128)).double()
    ref.load_state_dict(model.state_dict())
    model = model.to("cuda", torch.bfloat16)
    extra = {"max_rank": 24} if method == "lora2" else {}
    cfg = dict(rank=16, targets="0,1", alpha=8.0, **extra)
    ad = inject(model, make_config(method, **cfg))
    ad_ref = inject(ref, make_config(method, **cfg), adapter_dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(ad.parameters(), ad_ref.parameters(), strict=True):
            p.copy_(torch.randn_like(p) * 0.1)
            q.copy_(p.double().cpu())
    x = torch.randn(2, 64, 256)
    y, gx, grads = _run(model, ad, x.to("cuda", torch.bfloat16), True)
    y_ref, gx_ref, grads_ref = _run(ref, ad_ref, x.double(), False)
    rel = lambda a, b: float((a.double().cpu() - b).norm() / b.norm())  # noqa: E731
    assert rel(y, y_ref) < 1e-2 and rel(gx, gx_ref) < 2e-2
    assert all(g.dtype == torch.float32 for g in grads)
    for a, b in zip(grads, grads_ref, strict=True):
        assert rel(a, b) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "tri_lora", "lora2"])
def test_cuda_gradients_in_place_equal_returned(method):
    """On CUDA the in-place gradient is one addmm with out_dtype fp32 writing into .grad (C = D): equal to autograd's
    returned gradient added by AccumulateGrad, from None and from existing gradients."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(256, 192), nn.Linear(192, 128)).to("cuda", torch.bfloat16)
    extra = {"max_rank": 24} if method == "lora2" else {}
    ad = inject(model, make_config(method, rank=16, targets="0,1", alpha=8.0, **extra))
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    xs = [torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    for zeros in (False, True):
        ref, got = _accumulated(model, ad, xs, False, zeros), _accumulated(model, ad, xs, True, zeros)
        for a, b in zip(got, ref, strict=True):
            assert a.dtype == torch.float32
            assert float((a - b).norm() / b.norm().clamp_min(1e-30)) < 1e-5


@pytest.mark.parametrize("method", ["lora", "tri_lora", "lora2"])
def test_gradients_in_place_with_checkpointing_and_a_second_use(method):
    """A UNet with gradient checkpointing (the op's backward runs on the recomputed forward) and a loss term that
    uses the factors again (autograd adds that part): the in-place gradients equal autograd's."""
    from test_adapters import inputs, tiny_unet

    grads = []
    for in_place in (False, True):
        unet = tiny_unet()
        unet.enable_gradient_checkpointing()
        unet.train()
        extra = {"max_rank": 6, "lambda_e": 1.0} if method == "lora2" else {}
        ad = inject(unet, make_config(method, rank=4, seed=3, **extra))
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
        ad.set_grads_in_place(in_place)
        x, t, c = inputs()
        for _ in range(2):  # two accumulated backwards
            ad.reset_step()
            loss = unet(x, t, c).sample.pow(2).mean()
            more, _ = ad.extra_loss()
            loss = loss + sum(layer.down_up()[0].pow(2).sum() for layer in ad.layers.values()) * 1e-3
            (loss if more is None else loss + more).backward()
        grads.append([p.grad.clone() for p in ad.parameters()])
    for a, b in zip(grads[1], grads[0], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_fold_vectors_equals_plain_autograd_and_keeps_no_copies():
    """FoldVectors (s B_i diag(v_i) of a shape group in the compute dtype) gives plain autograd's values and B, v
    gradients in float64; for the backward it keeps the B_i and v_i themselves, no stacked copy or fp32 product;
    in bf16 it delivers bf16 and fp32 gradients."""
    from engine.adapters.base import FoldVectors, fold_vector

    g = torch.Generator().manual_seed(6)
    ups = [torch.randn(7, 3, dtype=torch.float64, generator=g).requires_grad_() for _ in range(4)]
    vecs = [torch.randn(3, dtype=torch.float64, generator=g).requires_grad_() for _ in range(4)]
    w = torch.randn(4, 7, 3, dtype=torch.float64, generator=g)
    ref = fold_vector(torch.stack(ups), torch.stack(vecs)[:, None, :], 0.5)
    (ref * w).sum().backward()
    want = [t.grad.clone() for t in ups + vecs]
    for t in ups + vecs:
        t.grad = None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = FoldVectors.apply(0.5, torch.float64, 4, False, *ups, *vecs)
    assert {t.data_ptr() for t in saved} == {t.data_ptr() for t in ups + vecs}
    assert torch.allclose(got, ref, rtol=1e-12)
    (got * w).sum().backward()
    for t, wt in zip(ups + vecs, want, strict=True):
        assert torch.allclose(t.grad, wt, rtol=1e-10, atol=1e-12)

    ups32 = [u.detach().float().requires_grad_() for u in ups]
    vecs32 = [v.detach().float().requires_grad_() for v in vecs]
    low = FoldVectors.apply(0.5, torch.bfloat16, 4, False, *ups32, *vecs32)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.double(), ref, rtol=1e-2, atol=1e-2)
    (low.float() * w.float()).sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in ups32 + vecs32)
    for t, wt in zip(ups32 + vecs32, want, strict=True):
        assert float((t.grad.double() - wt).norm() / wt.norm()) < 1e-2


def test_out_dtype_probe_only_reads_inside_compile(monkeypatch):
    """Traced by torch.compile (step mode compile traces the fused op's backward), the out_dtype probe only reads
    its table: fullgraph compiles (a write would break the graph at every layer) and nothing is recorded; the
    eager call records the answer."""
    from engine.adapters import fused

    monkeypatch.setattr(fused, "_OUT_DTYPE", {})
    f = torch.compile(lambda x: x * 2 if fused.out_dtype_ok(x.device) else x - 1, fullgraph=True)
    assert torch.equal(f(torch.ones(2)), torch.zeros(2))  # unknown inside compile: the plain path
    assert fused._OUT_DTYPE == {}
    fused.out_dtype_ok(torch.device("cpu"))
    assert (torch.device("cpu"), torch.bfloat16) in fused._OUT_DTYPE


@pytest.mark.parametrize("dtype, fold_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                               (torch.float32, torch.float32)])
def test_fold_dtype_per_compute_dtype(dtype, fold_dtype):
    """The fold the fused op differentiates is in the compute dtype (bf16, fp32), except under fp16, where it stays
    fp32 so that its gradient cannot overflow under a loss scale; the compute copy is always in the compute dtype."""
    model = nn.Sequential(nn.Linear(16, 12)).to(dtype)
    ad = inject(model, make_config("tri_lora", rank=4, targets="0"))
    model(torch.randn(3, 16, dtype=dtype)).float().sum().backward()
    layer = next(iter(ad.layers.values()))
    assert layer._folded[0].dtype == fold_dtype and layer._folded[1].dtype == dtype
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ad.parameters())


class _Attn(nn.Module):
    """q, k, v and out projections with the names the stacking picks (to_k with a bias, to exercise it)."""

    def __init__(self, dim=24, ctx=20):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=True)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, c):
        q, k, v = self.to_q(x), self.to_k(c), self.to_v(c)
        w = torch.softmax(q.float() @ k.float().transpose(-1, -2), -1).to(x.dtype)
        return self.to_out[0](w @ v + q)


def _stacked_run(model, ad, x, c, stacked: bool | None = None):
    if stacked is not None:
        ad.set_stacked_down(stacked)
    for p in ad.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, c)
    y.float().sin().sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in ad.parameters()]


@pytest.mark.parametrize("method", ["lora", "ac_lora", "tri_lora", "lora2"])
def test_stacked_down_projection_equals_the_chain(method, monkeypatch):
    """A's compute copy under W in one buffer (the trainer on one GPU): two copies of a model, one stacked for the
    whole run, give the same output, input gradient and factor gradients, in bf16 compute with fp32 masters,
    over optimizer steps (the copy in the buffer follows the masters: by refresh_shadows after step 0, by the
    layer's own re-cast after step 1); the fused op really gets the buffer; W itself is untouched and gets its
    own storage back on unstack."""
    from engine.adapters import base as base_module

    seen = []
    real = base_module.lowrank_linear
    monkeypatch.setattr(base_module, "lowrank_linear", lambda *a, **k: (seen.append(a[-1] is not None), real(*a))[1])

    def build():
        torch.manual_seed(4)
        model = _Attn().to(torch.bfloat16)
        ad = inject(model, make_config(method, rank=4, targets="to_q,to_k,to_v,to_out.0", alpha=8.0,
                                       **({"max_rank": 6} if method == "lora2" else {})))
        perturb = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(torch.randn(p.shape, generator=perturb) * 0.2)
        return model, ad, torch.optim.AdamW(ad.parameters(), lr=0.05)

    (model_p, ad_p, opt_p), (model, ad, opt) = build(), build()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    assert ad.set_stacked_down(True) == 3
    layer = ad.layers["to_q"]
    assert layer._stack is not None and ad.layers["to_out.0"]._stack is None
    w = layer.base.weight  # W lives in the buffer while stacked
    assert w.data_ptr() == layer._stack[0].data_ptr() and w.untyped_storage().nbytes() > w.nbytes
    x, c = torch.randn(2, 9, 24).bfloat16(), torch.randn(2, 5, 20).bfloat16()
    for step in range(3):
        seen.clear()
        plain = _stacked_run(model_p, ad_p, x, c)
        assert seen == [False] * 4
        seen.clear()
        stacked = _stacked_run(model, ad, x, c)
        assert seen == [True, True, True, False]  # q, k, v through the buffer; to_out.0 as before
        assert torch.equal(stacked[0], plain[0]) and torch.equal(stacked[1], plain[1]), step
        for a, b in zip(stacked[2], plain[2], strict=True):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), step
        for o, a in ((opt_p, ad_p), (opt, ad)):
            o.step()  # masters move: the next stacked forward must see the new A in the buffer
            if step == 0:
                a.refresh_shadows()
    for name, p in model.named_parameters():
        if ".base." in name:
            assert torch.equal(p, weights[name]), name
    ad.set_stacked_down(False)
    assert all(layer._stack is None and layer.base.weight.untyped_storage().nbytes() == layer.base.weight.nbytes
               for layer in ad.layers.values())
    layer.stack_down()
    layer.base.weight = torch.nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
    seen.clear()
    _stacked_run(model, ad, x, c)
    assert seen[0] is False  # W moved out of the buffer (a reload, say): the layer no longer uses the stale buffer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "ac_lora", "tri_lora", "lora2"])
def test_cuda_stacked_down_projection_close_to_the_chain(method):
    """On CUDA (cuBLAS reading the column slices in place, gradients accumulated into fp32 .grad): the stacked
    q/k/v give the chain's output and gradients to bf16 rounding, SD-sized layers, bias included."""
    torch.manual_seed(8)
    model = _Attn(dim=640, ctx=768).to("cuda", torch.bfloat16)
    ad = inject(model, make_config(method, rank=16, targets="to_q,to_k,to_v,to_out.0",
                                   **({"max_rank": 32} if method == "lora2" else {})))
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ad.set_grads_in_place(True)
    x = torch.randn(2, 1024, 640, device="cuda").bfloat16()
    c = torch.randn(2, 77, 768, device="cuda").bfloat16()

    def run(stacked):
        ad.set_stacked_down(stacked)
        for p in ad.parameters():
            p.grad = None
        xg = x.detach().clone().requires_grad_(True)
        y = model(xg, c)
        y.float().sin().sum().backward()
        return y.detach(), xg.grad, [p.grad.clone() for p in ad.parameters()]

    plain, stacked = run(False), run(True)
    assert ad.layers["to_k"]._stack is not None
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))  # noqa: E731
    assert rel(stacked[0], plain[0]) < 5e-3 and rel(stacked[1], plain[1]) < 1e-2
    for a, b in zip(stacked[2], plain[2], strict=True):
        assert rel(a, b) < 1e-2


def test_stacked_layers_merge_and_remove_like_plain_ones():
    torch.manual_seed(6)
    model = _Attn().to(torch.bfloat16)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    ad = inject(model, make_config("lora", rank=4, targets="to_q,to_k,to_v,to_out.0"))
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x, c = torch.randn(2, 9, 24).bfloat16(), torch.randn(2, 5, 20).bfloat16()
    assert ad.set_stacked_down(True) == 3
    with torch.no_grad():
        y = model(x, c)
        ad.merge()
        assert (model(x, c).float() - y.float()).abs().max() < 0.1  # bf16 merged weights: rounding only
        ad.unmerge()  # W + dW - dW in bf16: W up to rounding, as without the stack
        assert (model(x, c).float() - y.float()).abs().max() < 0.1
        assert all(layer._stack is not None for name, layer in ad.layers.items() if name != "to_out.0")
    ad.remove()
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.nbytes, name  # own storage again
        assert (p.float() - ref[name].float()).abs().max() <= 2 ** -6 * ref[name].float().abs().max(), name


def test_no_stack_where_there_is_no_copy_to_hold():
    """fp32 base and fp32 masters: A needs no compute copy, so nothing is stacked and the chain runs as before."""
    model = _Attn()
    ad = inject(model, make_config("lora", rank=4, targets="to_q,to_k,to_v,to_out.0"))
    assert ad.set_stacked_down(True) == 0


@pytest.mark.parametrize("method", ["lora", "lora2"])
def test_stacked_unet_matches_plain_through_rank_moves(method):
    """Two copies of the tiny UNet in bf16, one with q/k/v stacked (LoRA²'s entropy reading the sliced q and k):
    loss and every factor gradient equal the unstacked copy's, also after LoRA² moves ranks in both (the resize
    rewrites A's copies inside the buffer, and the stacked forward reads them without a re-cast)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_adapters import inputs, tiny_unet

    from engine.adapters.lora2 import resize_layers

    x, t, c = inputs()
    runs = []
    for stacked in (False, True):
        unet = tiny_unet().to(torch.bfloat16)
        ad = inject(unet, make_config(method, rank=4, **({"max_rank": 8} if method == "lora2" else {})))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        qkv = sum(n.endswith(("to_q", "to_k", "to_v")) for n in ad.layers)
        assert ad.set_stacked_down(stacked) == (qkv if stacked else 0) and qkv == 24  # 8 attentions x q, k, v
        runs.append((unet, ad))

    def step(unet, ad):
        for p in ad.parameters():
            p.grad = None
        ad.reset_step()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = unet(x.bfloat16(), t, c.bfloat16()).sample.float().pow(2).mean()
            extra, _ = ad.extra_loss()
        (loss if extra is None else loss + extra).backward()
        return loss.detach(), [p.grad.clone() for p in ad.parameters()]

    for move in range(3):
        ref, got = (step(*r) for r in runs)
        assert torch.equal(got[0], ref[0]), move
        for name, layer in runs[1][1].layers.items():  # the forward read A's copy from inside the buffer
            down = layer.down_up()[0]
            assert (layer._stack is not None) == name.endswith(("to_q", "to_k", "to_v")), name
            if layer._stack is not None:
                slot = layer._stack[0][layer.out_features:][:len(down)]
                assert layer._shadow[1].data_ptr() == slot.data_ptr()
                assert torch.equal(slot, down.detach().bfloat16())
        for a, b in zip(got[1], ref[1], strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), move
        if method == "lora2":  # grow half the layers, shrink the others, in both copies alike
            for _, ad in runs:
                torch.manual_seed(move)
                groups = {}
                for layer in ad.layers.values():
                    groups.setdefault((layer.lora_A.shape, layer.lora_B.shape), []).append(layer)
                for layers in groups.values():  # same-shape groups, as the set resizes them
                    resize_layers(layers, [6 if i % 2 else 2 for i in range(len(layers))] if move == 0
                                  else [3 + move] * len(layers))
    if method == "lora2":
        assert runs[1][1].layers["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]._stack is not None
