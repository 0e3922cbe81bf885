"""The synthetic faithfulness tests of METHODS.md: shared maths, AC-LoRA, TriLoRA, LoRA², pruning criteria."""
from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from torch import nn

from engine import analysis
from engine.adapters import inject, make_config
from engine.adapters.ac_lora import keep_components, keep_counts, keep_threshold
from engine.adapters.lora2 import importance, inverse_softplus, nu_for_rank, rank_from_nu


def spectrum_factors(S: torch.Tensor, d: int = 40, k: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, S.numel(), generator=g))
    V, _ = torch.linalg.qr(torch.randn(k, S.numel(), generator=g))
    return U * S, V.T.contiguous()


def linear_model(d=24, k=20, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, d))


# --- shared maths -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 8, 30), (16, 32, 12), (5, 4, 64)])
def test_cheap_svd_matches_dense_svd(shape):
    d, r, k = shape
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(d, r, generator=g), torch.randn(r, k, generator=g)
    U, S, V = analysis.cheap_svd(up, down)
    dense = torch.linalg.svdvals(up @ down)
    assert torch.allclose(S, dense[: S.numel()], atol=1e-5 * float(dense[0]))
    assert torch.allclose((U * S) @ V.T, up @ down, atol=1e-4)
    assert torch.allclose(U.T @ U, torch.eye(S.numel()), atol=1e-5)


def test_batched_spectra_equal_one_by_one():
    g = torch.Generator().manual_seed(2)
    factors = {f"l{i}": (torch.randn(16, 4, generator=g), torch.randn(4, 12, generator=g)) for i in range(5)}
    factors["odd"] = (torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g))
    batched = analysis.batched_spectra(factors)
    for name, (up, down) in factors.items():
        _, S, _ = analysis.cheap_svd(up, down)
        assert torch.allclose(batched[name].S, S, atol=1e-5)


@pytest.mark.parametrize("zero_slots", [False, True])
def test_gram_svd_matches_qr_route(zero_slots):
    """The GPU route (Gram + Cholesky + eigh in fp64) gives the same spectrum, factors and orthonormal columns."""
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(6, 48, 12, generator=g), torch.randn(6, 12, 40, generator=g)
    if zero_slots:  # LoRA²'s inactive slots, AC-LoRA's zeroed columns: rank-deficient factors
        up[:, :, 7:] = 0
        down[:, 7:] = 0
    U, S, V = analysis.gram_svd(up, down)
    U0, S0, V0 = analysis.cheap_svd(up, down)
    assert torch.allclose(S, S0, atol=1e-5 * float(S0.max()))
    assert torch.allclose((U * S[:, None]) @ V.transpose(-1, -2), up @ down, atol=1e-4)
    live = int((S0[0] > 1e-4 * S0[0, 0]).sum())
    assert live == (7 if zero_slots else 12)
    eye = torch.eye(live).expand(6, live, live)
    assert torch.allclose(U[..., :live].transpose(-1, -2) @ U[..., :live], eye, atol=1e-5)
    assert torch.allclose(V[..., :live].transpose(-1, -2) @ V[..., :live], eye, atol=1e-5)


def test_gram_svd_resolves_small_singular_values():
    S_true = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1, 1e-3, 1e-5])
    up, down = spectrum_factors(S_true)
    _, S, _ = analysis.gram_svd(up, down)
    assert torch.allclose(S, S_true, rtol=1e-3, atol=1e-7)


def test_batched_spectra_routes_agree():
    g = torch.Generator().manual_seed(4)
    factors = {f"l{i}": (torch.randn(16, 4, generator=g), torch.randn(4, 12, generator=g)) for i in range(5)}
    factors["wide"] = (torch.randn(8, 12, generator=g), torch.randn(12, 6, generator=g))  # r > min(d, k): QR
    qr, gram = analysis.batched_spectra(factors, route="qr"), analysis.batched_spectra(factors, route="gram")
    for name in factors:
        assert gram[name].S.shape == qr[name].S.shape
        assert torch.allclose(gram[name].S, qr[name].S, atol=1e-5)
    with pytest.raises(ValueError, match="route"):
        analysis.batched_spectra(factors, route="fast")


def test_eckart_young_dropped_energy_equals_relative_error():
    S = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    up, down = spectrum_factors(S)
    sp = analysis.batched_spectra({"x": (up, down)})["x"]
    dW = up @ down
    for k in range(1, 6):
        u, dn = analysis.truncate(sp, k)
        rel = float((dW - u @ dn).pow(2).sum() / dW.pow(2).sum())
        assert rel == pytest.approx(1 - analysis.kept_energy(sp, k), abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "ac_lora", "tri_lora", "lora2"])
def test_export_round_trip_equals_delta_weight(method):
    model = linear_model()
    ad = inject(model, make_config(method, rank=6, targets="0", **({"max_rank": 10} if method == "lora2" else {})))
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    factors, ranks, kept = ad.to_lora()
    layer = ad.layers["0"]
    up, down = factors["0"]
    assert torch.allclose(up @ down, layer.delta_weight(), atol=1e-5)
    assert kept == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_definition():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert int(analysis.energy_rank(S, 9 / 14)) == 1
    assert int(analysis.energy_rank(S, 9 / 14 + 1e-3)) == 2
    assert int(analysis.energy_rank(S, 0.99)) == 3
    assert int(analysis.energy_rank(S, 1.0)) == 3
    assert int(analysis.energy_rank(torch.zeros(4), 0.9)) == 0


# --- AC-LoRA ------------------------------------------------------------------------------------------------
def test_ac_lora_threshold():
    assert keep_threshold(0.1, 0, 100) == pytest.approx(0.9)
    assert keep_threshold(0.1, 99, 100) == pytest.approx(0.99)
    assert keep_threshold(1.5, 10, 100) == 0.0  # L >= 1 would go negative: clamped
    assert keep_threshold(0.0, 5, 100) == 0.999
    with pytest.raises(ValueError, match="finite"):
        keep_threshold(float("nan"), 0, 10)


def test_ac_lora_keeps_signal_rank():
    g = torch.Generator().manual_seed(0)
    S = torch.cat([torch.tensor([10.0, 8.0, 6.0]), torch.rand(29, generator=g) * 0.01])
    assert keep_components(S, 0.99, "energy") == 3


def test_ac_lora_flat_tail_energy_vs_paper():
    S = torch.tensor([10.0, 10.0, 10.0] + [0.01] * 61)
    assert keep_components(S, 0.99, "energy") == 3
    assert keep_components(S, 0.99, "paper") == 33


@pytest.mark.parametrize("criterion", ["energy", "paper"])
def test_batched_keep_counts_equal_one_by_one(criterion):
    g = torch.Generator().manual_seed(5)
    S = (torch.rand(40, 16, generator=g) ** 4).sort(-1, descending=True).values
    S[3] = 0  # an all-zero update keeps 1
    S[7, 2:] = 0
    for p in (0.5, 0.9, 0.99, 0.999):
        batched = keep_counts(S, p, criterion).tolist()
        assert batched == [keep_components(row, p, criterion) for row in S]


@pytest.mark.parametrize("route", ["qr", "gram"])
def test_ac_lora_product_restart_leaves_exact_rank_k(route, monkeypatch):
    monkeypatch.setattr(analysis, "grouped_spectra", functools.partial(analysis.grouped_spectra, route=route))
    model = linear_model()
    ad = inject(model, make_config("ac_lora", rank=8, targets="0"))
    layer = ad.layers["0"]
    with torch.no_grad():  # a rank-3 signal plus small noise in the product
        layer.lora_B.copy_(torch.linalg.qr(torch.randn(24, 8))[0] * torch.tensor([3.0, 2.0, 1.5] + [0.003] * 5))
        layer.lora_A.copy_(torch.linalg.qr(torch.randn(20, 8))[0].T)
    opt = torch.optim.AdamW(ad.parameters(), lr=1e-3)
    model(torch.randn(4, 20)).sum().backward()
    opt.step()
    before = layer.delta_weight().detach().clone()
    moments = dict(opt.state[layer.lora_A])
    info = ad.restart(mean_loss=0.1, epoch=0, total_epochs=100, optimizer=opt)
    assert info["ranks"]["0"] == 3 and layer.native_rank() == 3
    after = layer.delta_weight()
    assert int(torch.linalg.matrix_rank(after, atol=1e-5)) == 3
    sp = analysis.batched_spectra({"w": (before, torch.eye(20))})["w"]
    best3 = analysis.truncate(sp, 3)
    assert torch.allclose(after, best3[0] @ best3[1], atol=1e-4)
    state = opt.state[layer.lora_A]  # moments reset in place (a captured optimizer step reads these tensors)
    assert all(state[k] is v and not v.any() for k, v in moments.items()) and set(state) == set(moments)
    assert layer.lora_A[3:].abs().sum() > 0 and layer.lora_B[:, 3:].abs().sum() == 0  # fresh slots


def test_ac_lora_paper_mode_takes_max_of_counts():
    model = linear_model()
    ad = inject(model, make_config("ac_lora", rank=8, targets="0", mode="paper"))
    layer = ad.layers["0"]
    with torch.no_grad():
        QA = torch.linalg.qr(torch.randn(20, 8))[0].T
        QB = torch.linalg.qr(torch.randn(24, 8))[0]
        layer.lora_A.copy_(torch.diag(torch.tensor([5.0, 4.0] + [1e-4] * 6)) @ QA)  # A: 2 components
        layer.lora_B.copy_(QB @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0] + [1e-4] * 4)))  # B: 4 components
    k_a = keep_components(torch.linalg.svdvals(layer.lora_A), 0.99)
    k_b = keep_components(torch.linalg.svdvals(layer.lora_B), 0.99)
    assert (k_a, k_b) == (2, 4)
    info = ad.restart(mean_loss=0.1, epoch=99, total_epochs=100)
    assert info["ranks"]["0"] == max(k_a, k_b) == 4


def test_ac_lora_schedule():
    ad = inject(linear_model(), make_config("ac_lora", rank=4, targets="0", restart_every_epochs=10))
    due = [e for e in range(100) if ad.restart_due(e, 100, 0, 1000, epoch_end=True)]
    assert due == list(range(9, 99, 10))
    ad = inject(linear_model(), make_config("ac_lora", rank=4, targets="0", restart_every_steps=25))
    assert [s for s in range(100) if ad.restart_due(0, 1, s, 100, epoch_end=False)] == [24, 49, 74]


# --- TriLoRA ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_init", ["one", "w0"])
def test_trilora_init_and_first_gradient(sigma_init):
    model = linear_model()
    x = torch.randn(8, 20)
    y0 = model(x).detach()
    ad = inject(model, make_config("tri_lora", rank=6, targets="0", sigma_init=sigma_init))
    layer = ad.layers["0"]
    assert torch.equal(model(x).detach(), y0)
    model(x).pow(2).sum().backward()
    assert layer.tri_Vt.grad.abs().sum() > 0
    assert layer.tri_U.grad.abs().sum() == 0 and layer.tri_sigma.grad.abs().sum() == 0
    if sigma_init == "w0":
        sigma = layer.tri_sigma.detach()
        assert float(sigma[0]) == pytest.approx(1.0) and bool((sigma[:-1] >= sigma[1:]).all())


# --- LoRA² --------------------------------------------------------------------------------------------------
def test_lora2_importance_sums_to_one_and_quantile_rank():
    for nu in (0.01, 0.1, 0.5, 2.0):
        assert float(importance(torch.tensor(nu, dtype=torch.float64), 20000).sum()) == pytest.approx(1.0, abs=1e-6)
    for r in range(4, 257):
        assert int(rank_from_nu(torch.tensor(nu_for_rank(r, 0.9)), 0.9, 512)) == r


def test_lora2_growing_rank_leaves_output_unchanged():
    model = linear_model()
    ad = inject(model, make_config("lora2", rank=4, max_rank=16, targets="0"))
    layer = ad.layers["0"]
    with torch.no_grad():
        layer.lora_B[:, :4] = torch.randn(24, 4)
    x = torch.randn(8, 20)
    y = model(x).detach()
    grown, _ = layer.set_rank(9)
    assert int(grown.sum()) == 5 and layer.native_rank() == 9
    assert layer.lora_A[4:9].abs().sum() > 0  # new rows initialised
    assert torch.allclose(model(x).detach(), y, atol=1e-6)


def _toy_rank_run(lambda_r: float, steps: int = 300) -> int:
    torch.manual_seed(0)
    k = d = 32
    r = 4
    model = nn.Sequential(nn.Linear(k, d, bias=False))
    target = (torch.randn(d, 2 * r) @ torch.randn(2 * r, k)) / 8  # true rank 2r
    ad = inject(model, make_config("lora2", rank=r, max_rank=32, targets="0", lambda_r=lambda_r, lambda_e=0.0,
                                   rho_lr=0.05))
    opt = torch.optim.Adam(ad.param_groups(1e-2))
    for step in range(steps):
        ad.before_step(step, opt)
        x = torch.randn(64, k)
        loss = (model(x) - model[0].base(x) - x @ target.T).pow(2).mean()
        extra, _ = ad.extra_loss()
        loss = loss + extra if extra is not None else loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ad.layers["0"].native_rank()


def test_lora2_rank_grows_without_regulariser_and_stays_with_it():
    assert _toy_rank_run(0.0) >= 7  # from 4 towards the true rank 8
    assert _toy_rank_run(1.0) <= 5


def test_lora2_entropy_term_is_recorded_on_cross_attention():
    from test_adapters import inputs, tiny_unet

    unet = tiny_unet()
    x, t, c = inputs()
    with torch.no_grad():
        y0 = unet(x, t, c).sample
    ad = inject(unet, make_config("lora2", rank=4, max_rank=8, lambda_e=1e-2))
    y = unet(x, t, c).sample
    assert torch.allclose(y, y0, atol=1e-5)
    extra, terms = ad.extra_loss()
    assert 0 < float(terms["entropy"]) <= 1.0 and "rank_reg" in terms
    extra.backward()
    ad.remove()
    assert all(type(m.processor).__name__ != "EntropyAttnProcessor" for m in unet.modules() if hasattr(m, "processor"))


def test_lora2_token_entropy_equals_the_definition():
    from engine.adapters.lora2 import token_entropy

    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    p = torch.softmax((q @ k.transpose(-1, -2)) * 0.35, dim=2)  # (B, h, N, T): each token's map over positions
    ref = float((-(p * p.log()).sum(2)).mean() / math.log(50))
    assert float(token_entropy(q, k, 0.35)) == pytest.approx(ref, rel=1e-5)
    flat = token_entropy(torch.zeros(1, 1, 50, 8), k[:1, :1], 0.35)  # uniform maps: entropy 1
    assert float(flat) == pytest.approx(1.0, abs=1e-6)


# --- pruning criteria ---------------------------------------------------------------------------------------
S_KNOWN = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05])


@pytest.mark.parametrize("criterion,value,expected", [
    ("energy", 0.9, 2),  # 100+25 = 125 of 130.39 = 0.959 >= 0.9; 100/130.39 = 0.767
    ("energy", 0.99, 4),
    ("sv_ratio", 4.0, 2),  # s > 2.5
    ("sv_ratio", 25.0, 5),  # s > 0.4
    ("sv_cumulative", 0.9, 4),  # cumulative s: 10, 15, 17, 18 of 18.9 -> 0.952 >= 0.9 at 4
    ("sv_fro", 0.95, 2),  # s^2 fraction >= 0.9025: 0.959 at 2
])
def test_pruning_criteria_on_known_spectrum(criterion, value, expected):
    assert analysis.keep_count(S_KNOWN, criterion, value) == expected


def _kohya_reference(S: torch.Tensor, criterion: str, value: float) -> int:
    """sd-scripts' resize_lora rule, restated from its documented behaviour for the parity test."""
    n = len(S)
    if criterion == "sv_ratio":
        index = int((S > S[0] / value).sum())
    else:
        w = S if criterion == "sv_cumulative" else S.pow(2)
        target = value if criterion == "sv_cumulative" else value**2
        index = int(torch.searchsorted(w.cumsum(0) / w.sum(), torch.tensor(target))) + 1
    index = max(1, min(index, n - 1))
    return index + 1


@pytest.mark.parametrize("criterion,value", [("sv_ratio", 4.0), ("sv_ratio", 25.0), ("sv_cumulative", 0.9),
                                             ("sv_fro", 0.95), ("sv_fro", 0.5), ("sv_cumulative", 0.99)])
def test_kohya_compat_parity(criterion, value):
    ours = analysis.keep_count(S_KNOWN, criterion, value, kohya_compat=True)
    assert ours == _kohya_reference(S_KNOWN, criterion, value)
    native = analysis.keep_count(S_KNOWN, criterion, value)
    assert ours == min(native, len(S_KNOWN) - 1) + 1  # one component more than the minimum


def test_choose_ranks_cap_and_floor():
    spectra = {"a": analysis.Spectrum(None, S_KNOWN, None), "z": analysis.Spectrum(None, torch.zeros(8), None)}
    assert analysis.choose_ranks(spectra, tau=0.99) == {"a": 4, "z": 1}
    assert analysis.choose_ranks(spectra, tau=0.99, cap=3) == {"a": 3, "z": 1}
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="tau must be in"):
            analysis.choose_ranks(spectra, tau=bad)
    with pytest.raises(ValueError, match="rank cap must be a positive integer"):
        analysis.choose_ranks(spectra, tau=0.9, cap=0)
    assert math.isclose(analysis.kept_energy(analysis.Spectrum(None, S_KNOWN, None), 8), 1.0)


def _lora2_entropy_step(checkpointing=False, batched=True, check=None):
    """One LoRA² step with the entropy term on a tiny UNet (perturbed adapter, one backward through the loss and
    the terms, as the trainer runs it); check(adapters) runs after the forward. -> (entropy, adapter gradients)."""
    from test_adapters import inputs, tiny_unet

    unet = tiny_unet()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    ad = inject(unet, make_config("lora2", rank=4, max_rank=8, lambda_e=1.0, seed=1))
    ad._entropy_options["batched"] = batched
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.05)
    x, t, c = inputs()
    ad.reset_step()
    loss = unet(x, t, c).sample.pow(2).mean()
    if check is not None:
        check(ad)
    extra, terms = ad.extra_loss()
    (loss + extra).backward()
    return float(terms["entropy"]), [p.grad.clone() for p in ad.parameters() if p.grad is not None]


def test_lora2_entropy_under_checkpointing_keeps_no_maps_and_same_gradients():
    """With gradient checkpointing the entropy is recomputed in the backward: same loss and gradients,
    and the (B, h, T, N) maps are not among the tensors kept for the backward."""
    from engine.adapters.lora2 import token_entropy

    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 64, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 4, 7, 8, generator=g, requires_grad=True)

    def saved_bytes(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, total[0]
    plain, plain_bytes = saved_bytes(lambda: token_entropy(q, k, 0.35))
    recomputed, ckpt_bytes = saved_bytes(lambda: torch.utils.checkpoint.checkpoint(
        token_entropy, q, k, 0.35, use_reentrant=False))
    maps = 2 * 4 * 7 * 64 * 4  # one fp32 (B, h, T, N) map
    inputs_only = (q.numel() + k.numel()) * 4
    assert plain_bytes >= 2 * maps and ckpt_bytes <= inputs_only
    assert torch.allclose(plain, recomputed)

    grads = []
    for checkpointing in (False, True):
        def check(ad, checkpointing=checkpointing):
            assert ad._entropy_options["recompute"] is checkpointing
        grads.append(_lora2_entropy_step(checkpointing=checkpointing, check=check))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert len(grads[0][1]) == len(grads[1][1]) > 0
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_resetting_moments_in_place_equals_dropping_the_state():
    from engine.adapters.base import reset_moments

    torch.manual_seed(0)
    p1 = nn.Parameter(torch.randn(6, 5))
    p2 = nn.Parameter(p1.detach().clone())
    o1, o2 = torch.optim.AdamW([p1], lr=1e-2), torch.optim.AdamW([p2], lr=1e-2)
    for _ in range(3):
        g = torch.randn(6, 5)
        for p, o in ((p1, o1), (p2, o2)):
            p.grad = g.clone()
            o.step()
    reset_moments(o1, [p1])
    o2.state.pop(p2)
    for _ in range(2):
        g = torch.randn(6, 5)
        for p, o in ((p1, o1), (p2, o2)):
            p.grad = g.clone()
            o.step()
    assert torch.equal(p1, p2) and float(o1.state[p1]["step"]) == 2


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_lora2_batched_resize_zeroes_exactly_the_moved_slots(chunk_bytes, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr("engine.adapters.lora2.RESIZE_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)  # layer 0 sits at its target rank: an unlucky draw could move its D by one
    model = nn.Sequential(nn.Linear(20, 24), nn.Linear(24, 24), nn.Linear(24, 24))
    ad = inject(model, make_config("lora2", rank=4, max_rank=12, targets="0,1,2", lambda_e=0.0))
    opt = torch.optim.AdamW(ad.param_groups(1e-2))
    x = torch.randn(8, 20)
    for _ in range(2):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    grow, shrink, same = ad.layers["1"], ad.layers["2"], ad.layers["0"]
    with torch.no_grad():
        grow.rho.fill_(inverse_softplus(nu_for_rank(7, 0.9)))
        shrink.rho.fill_(inverse_softplus(nu_for_rank(2, 0.9)))
    moments = {n: {k: v.clone() for k, v in opt.state[layer.lora_A].items()} for n, layer in ad.layers.items()}
    b_moments = {n: opt.state[layer.lora_B]["exp_avg"].clone() for n, layer in ad.layers.items()}
    y = model(x).detach()
    y_shrunk_part = shrink.lora_B[:, 2:4] @ shrink.lora_A[2:4]  # what dropping slots 2,3 of layer 2 removes
    change = ad.before_step(2, opt)
    assert change == {"ranks": {"1": 7, "2": 2}}
    assert grow.native_rank() == 7 and shrink.native_rank() == 2 and same.native_rank() == 4
    assert grow.active.tolist() == [True] * 7 + [False] * 5
    assert grow.lora_A[4:7].abs().sum() > 0 and grow.lora_B[:, 4:7].abs().sum() == 0
    assert shrink.lora_A[2:].abs().sum() == 0 and shrink.lora_B[:, 2:].abs().sum() == 0
    a_grow = opt.state[grow.lora_A]["exp_avg"]
    assert a_grow[4:7].abs().sum() == 0 and torch.equal(a_grow[:4], moments["1"]["exp_avg"][:4])
    assert opt.state[shrink.lora_B]["exp_avg"][:, 2:].abs().sum() == 0
    assert torch.equal(opt.state[shrink.lora_B]["exp_avg"][:, :2], b_moments["2"][:, :2])
    assert torch.equal(opt.state[same.lora_A]["exp_avg"], moments["0"]["exp_avg"])
    assert float(y_shrunk_part.abs().sum()) > 0  # so that the shrink really removed something
    assert torch.allclose(model[0](x), same.base(x) + x @ same.delta_weight().T, atol=1e-5)
    assert torch.isfinite(model(x)).all() and model(x).shape == y.shape


def test_lora2_rank_change_refreshes_the_compute_copies_it_touched():
    model = nn.Sequential(nn.Linear(20, 24), nn.Linear(24, 24)).to(torch.bfloat16)
    ad = inject(model, make_config("lora2", rank=4, max_rank=12, targets="0,1", lambda_e=0.0))
    x = torch.randn(8, 20, dtype=torch.bfloat16)
    model(x).float().pow(2).mean().backward()  # makes the bf16 copies of A
    grow = ad.layers["1"]
    with torch.no_grad():
        grow.rho.fill_(inverse_softplus(nu_for_rank(7, 0.9)))
    assert ad.before_step(1) == {"ranks": {"1": 7}}
    assert grow.lora_A[4:7].abs().sum() > 0
    for layer in ad.layers.values():
        key, down_c, _ = layer._shadow
        assert torch.equal(down_c, layer.lora_A.detach().to(torch.bfloat16))
        assert layer.compute_copies(layer.lora_A, None, torch.bfloat16)[0] is down_c  # seen as fresh: no re-cast


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_lora2_sync_free_rank_update_moves_the_same_slots(chunk_bytes, monkeypatch):
    """...also when resize_layers splits a shape group into chunks (here one layer each) to bound its memory."""
    if chunk_bytes is not None:
        monkeypatch.setattr("engine.adapters.lora2.RESIZE_CHUNK_BYTES", chunk_bytes)

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 24), nn.Linear(24, 24), nn.Linear(24, 24))
        ad = inject(model, make_config("lora2", rank=4, max_rank=12, targets="0,1,2", lambda_e=0.0))
        opt = torch.optim.AdamW(ad.param_groups(1e-2))
        model(torch.randn(8, 20)).pow(2).mean().backward()
        opt.step()
        return ad, opt

    (a, oa), (b, ob) = build(), build()
    for target in ((7, 2, 4), (3, 9, 4), (3, 9, 12)):
        for ad in (a, b):
            with torch.no_grad():
                for layer, r in zip(ad.layers.values(), target):
                    layer.rho.fill_(inverse_softplus(nu_for_rank(r, 0.9)))
        before = {n: layer.lora_A.detach().clone() for n, layer in b.layers.items()}
        moved = a.before_step(0, oa)["ranks"]
        assert b.before_step(0, ob, sync=False) is None
        assert b.device_ranks().tolist() == list(target) == list(b.native_ranks().values())
        for name, la in a.layers.items():
            lb = b.layers[name]
            assert torch.equal(la.active, lb.active) and la.native_rank() == lb.native_rank() == int(la.active.sum())
            assert torch.equal(la.lora_B, lb.lora_B)
            for p, q in ((la.lora_A, lb.lora_A), (la.lora_B, lb.lora_B)):
                assert torch.equal(oa.state[p]["exp_avg"] != 0, ob.state[q]["exp_avg"] != 0)
            if name not in moved:  # the masked update leaves a layer whose D did not move bit-identical
                assert torch.equal(lb.lora_A, before[name]), name


def test_tri_lora_batched_native_ranks_equal_each_layers_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 24), nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 16))
    ad = inject(model, make_config("tri_lora", rank=6, targets="0,1,2,3"))
    assert set(ad.native_ranks().values()) == {0}  # V^T starts at zero: no update yet
    with torch.no_grad():
        for i, layer in enumerate(ad.layers.values()):
            layer.tri_Vt.normal_()
            layer.tri_sigma[: i + 1] *= 1e-4  # i + 1 tiny components in layer i
    batched = ad.native_ranks()
    assert batched == {n: layer.native_rank() for n, layer in ad.layers.items()}
    assert list(batched.values()) == [5, 4, 3, 2]


def _processor_views(b, n, t, h, hd, device="cpu", dtype=torch.float32, seed=0):
    """q and k as the attention processor passes them: transposed views of (B, N, h * hd) projections."""
    g = torch.Generator(device).manual_seed(seed)
    q = (torch.randn(b, n, h * hd, generator=g, device=device) * 2).to(dtype).requires_grad_()
    k = (torch.randn(b, t, h * hd, generator=g, device=device) * 2).to(dtype).requires_grad_()
    return q, k, q.view(b, n, h, hd).transpose(1, 2), k.view(b, t, h, hd).transpose(1, 2)


def test_lora2_group_entropy_equals_per_layer_entropy_and_keeps_no_maps(monkeypatch):
    """batched_token_entropies (one GroupEntropy per shape group, hand-written backward) gives every layer's
    token_entropy and the same gradients for q and k, in float64, over mixed shapes, whole or in chunks; it keeps
    only the layers' own q and k and the row entropies for the backward, no copies and no (B, h, T, N) maps."""
    from engine.adapters import lora2
    from engine.adapters.lora2 import GroupEntropy, batched_token_entropies, token_entropy

    shapes = [(2, 48, 7, 3, 8), (2, 48, 7, 3, 8), (1, 30, 5, 2, 4), (2, 48, 7, 3, 8), (1, 30, 5, 2, 4)]
    views = [_processor_views(*sh, dtype=torch.float64, seed=i) for i, sh in enumerate(shapes)]
    scale = 0.3
    ref = [token_entropy(qv, kv, scale) for _, _, qv, kv in views]
    torch.autograd.backward(ref, [torch.full_like(r, float(i + 1)) for i, r in enumerate(ref)])
    ref_grads = [(q.grad.clone(), k.grad.clone()) for q, k, _, _ in views]
    for q, k, _, _ in views:
        q.grad = k.grad = None
    order = [0, 1, 3, 2, 4]  # groups in first-seen order: layers 0, 1, 3 then 2, 4
    for chunk_bytes in (None, 2 * 3 * 7 * 48 * 4 * 2):  # whole groups, then two layers of the first group a call
        if chunk_bytes:
            monkeypatch.setattr(lora2, "ENTROPY_CHUNK_BYTES", chunk_bytes)
        got = batched_token_entropies([(qv, kv, scale) for _, _, qv, kv in views])
        for pos, i in enumerate(order):
            assert float(got[pos]) == pytest.approx(float(ref[i]), rel=1e-12)
        torch.autograd.backward(got, [torch.full_like(got[pos], float(i + 1)) for pos, i in enumerate(order)])
        for (q, k, _, _), (gq, gk) in zip(views, ref_grads, strict=True):
            assert torch.allclose(q.grad, gq, rtol=1e-9, atol=1e-12)
            assert torch.allclose(k.grad, gk, rtol=1e-9, atol=1e-12)
            q.grad = k.grad = None

    # kept for the backward: the layers' own q and k (no stacked copy) and the row entropies, no map
    _, _, qv1, kv1 = _processor_views(3, 64, 7, 4, 8, dtype=torch.float64, seed=7)
    _, _, qv2, kv2 = _processor_views(3, 64, 7, 4, 8, dtype=torch.float64, seed=8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        GroupEntropy.apply(scale, 2, qv1, qv2, kv1, kv2)
    inputs = {t.data_ptr() for t in (qv1, qv2, kv1, kv2)}
    own = [t for t in saved if t.data_ptr() in inputs]
    assert len(own) == 4 and sum(t.numel() for t in saved if t.data_ptr() not in inputs) <= 2 * 3 * 4 * 7


def test_lora2_batched_entropy_term_equals_the_per_layer_one():
    """On a model: the set's batched entropy term equals the per-layer one, loss terms and every gradient."""
    out = []
    for batched in (True, False):
        def check(ad, batched=batched):
            assert any(isinstance(e, tuple) for e in ad._entropies) is batched
        out.append(_lora2_entropy_step(batched=batched, check=check))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6) and 0 < out[0][0] <= 1
    assert len(out[0][1]) == len(out[1][1]) > 0
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_group_entropy_equals_the_eager_one():
    """GroupEntropy on SDXL- and SD1.5-sized maps in bf16 (Triton row kernels) is as close to the float64 value and
    gradients as the eager per-layer bf16 form is (both round scores to bf16; neither is the reference)."""
    from engine.adapters.lora2 import batched_token_entropies, token_entropy

    def run(views, batched):
        for q, k, _, _ in views:
            q.grad = k.grad = None
        if batched:
            out = torch.stack(batched_token_entropies([(qv, kv, scale) for _, _, qv, kv in views])).sum()
        else:
            out = torch.stack([token_entropy(qv, kv, scale) for _, _, qv, kv in views]).sum()
        out.backward()
        return float(out), [(q.grad.double(), k.grad.double()) for q, k, _, _ in views]

    for shape in [(1, 4096, 77, 10, 64), (1, 1024, 77, 20, 64), (4, 1024, 77, 8, 40)]:
        b, n, t, h, hd = shape
        views = [_processor_views(*shape, device="cuda", dtype=torch.bfloat16, seed=i) for i in range(3)]
        exact = []  # the very same (bf16-valued) inputs in float64
        for q, k, _, _ in views:
            q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
            exact.append((q64, k64, q64.view(b, n, h, hd).transpose(1, 2), k64.view(b, t, h, hd).transpose(1, 2)))
        scale = hd ** -0.5
        ref, ref_grads = run(exact, False)
        errors = {}
        for batched in (False, True):
            val, grads = run(views, batched)
            assert val == pytest.approx(ref, rel=2e-3), (shape, batched)
            errors[batched] = max(float((g - r).norm() / r.norm())
                                  for pair, ref_pair in zip(grads, ref_grads, strict=True)
                                  for g, r in zip(pair, ref_pair, strict=True))
        assert errors[True] < 1.5 * errors[False] + 5e-3, (shape, errors)


@pytest.mark.parametrize("route", ["qr", "gram"])
def test_singular_values_alone_equal_the_full_spectra(route):
    """The rank curves' values-only path gives the full cheap SVD's S (both routes), rank-deficient layers too."""
    from engine.analysis import grouped_singular_values, grouped_spectra

    g = torch.Generator().manual_seed(11)
    factors = {f"l{i}": (torch.randn(40, 8, generator=g), torch.randn(8, 24, generator=g)) for i in range(3)}
    factors["wide"] = (torch.randn(16, 6, generator=g), torch.randn(6, 12, generator=g))
    up, down = torch.randn(40, 8, generator=g), torch.randn(8, 24, generator=g)
    down[5:] = 0  # rank 5 of 8 (LoRA²'s inactive slots, a grown AC-LoRA buffer)
    factors["deficient"] = (up, down)
    full = {n: sp.S[i] for names, sp in grouped_spectra(factors, route=route) for i, n in enumerate(names)}
    alone = {n: S[i] for names, S in grouped_singular_values(factors, route=route) for i, n in enumerate(names)}
    assert alone.keys() == full.keys()
    for n in full:
        ref = torch.linalg.svdvals(factors[n][0] @ factors[n][1])[:full[n].numel()]
        assert torch.allclose(alone[n], ref, rtol=1e-4, atol=1e-4 * float(ref[0])), n
        assert torch.allclose(alone[n], full[n], rtol=1e-4, atol=1e-4 * float(ref[0])), n
    S = alone["deficient"]
    assert int((S > 1e-4 * S[0]).sum()) == 5  # the gram route leaves ~1e-6 of the largest from its jitter


@pytest.mark.parametrize("method", ["lora", "ac_lora", "tri_lora", "lora2"])
def test_rank_probe_gives_the_rank_log_of_the_synchronous_path(method):
    """The trainer's asynchronous rank log (rank_probe: Gram matrices and native ranks on the device, finished on the
    host later) gives effective_ranks and native_ranks, also from host copies of its tensors and in chunks."""
    from engine import analysis

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 24), nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 16))
    extra = {"max_rank": 12, "lambda_e": 0.0} if method == "lora2" else {}
    ad = inject(model, make_config(method, rank=6, targets="0,1,2,3", **extra))
    with torch.no_grad():
        for i, layer in enumerate(ad.layers.values()):
            down, up = layer.down_up()
            up.normal_()
            down.normal_()
            decay = (0.2, 0.5, 0.8, 1.0)[i]  # the layers' spectra fall off at different rates
            down *= torch.tensor([decay ** j for j in range(down.shape[0])])[:, None]
            if method == "lora2":
                layer.rho.fill_(inverse_softplus(nu_for_rank(3 + i, 0.9)))
    if method == "lora2":
        ad.before_step(0)  # masks follow the rates: ranks 3..6
    expected = (ad.effective_ranks(0.9), ad.native_ranks())
    probe = ad.rank_probe()
    assert probe.finish(0.9) == expected
    assert probe.with_tensors([t.clone() for t in probe.tensors()]).finish(0.9) == expected
    assert len(set(expected[0].values())) > 1  # the layers differ: the check can tell them apart
    chunked = analysis.grouped_grams(ad.factors(), chunk_bytes=1)  # one layer per chunk
    for (n1, a1, b1), (n2, a2, b2) in zip(probe.groups, chunked, strict=True):
        assert n1 == n2 and torch.allclose(a1, a2) and torch.allclose(b1, b2)


def test_rank_probe_gives_a_diverged_layer_rank_zero():
    from engine import analysis

    g = torch.Generator().manual_seed(1)
    factors = {"ok": (torch.randn(12, 4, generator=g), torch.randn(4, 10, generator=g)),
               "nan": (torch.full((12, 4), float("nan")), torch.randn(4, 10, generator=g))}
    probe = analysis.RankProbe(["ok", "nan"], analysis.grouped_grams(factors), {"ok": 4, "nan": 4})
    effective, native = probe.finish(0.9)
    assert effective["nan"] == 0 and 1 <= effective["ok"] <= 4 and native == {"ok": 4, "nan": 4}


# --- the Triton kernels (engine/adapters/triton_ops.py) against the torch form --------------------------------
def _kernel_params():
    """'cuda' (gpu marker), and 'interpreter': Triton's CPU interpreter, where Triton is installed and the run
    sets TRITON_INTERPRET=1 (not in CI, which has no Triton: a local check of the kernels' logic)."""
    import os

    from engine.adapters import triton_ops
    interp = triton_ops.triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
    return [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                not torch.cuda.is_available() or triton_ops.triton is None, reason="needs CUDA and Triton")]),
            pytest.param("cpu", marks=pytest.mark.skipif(not interp, reason="needs TRITON_INTERPRET=1 and Triton"))]


@pytest.fixture
def kernel_device(request, monkeypatch):
    from engine.adapters import triton_ops
    if request.param == "cpu":  # the interpreter runs the kernels on CPU tensors
        monkeypatch.setattr(triton_ops, "usable", lambda t: triton_ops.ENABLED and t.dtype != torch.float64)
    return request.param


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_kernel_row_entropy_equals_the_torch_form(kernel_device):
    """One-pass entropy, log-sum-exp and in-place gradient rows (scaled scores) equal float64 torch, for
    rows shorter and longer than one block (4096), in fp32 and bf16 inputs."""
    from engine.adapters import triton_ops

    g = torch.Generator().manual_seed(3)
    for n, dtype in ((77, torch.float32), (1024, torch.bfloat16), (5000, torch.float32), (4096, torch.bfloat16)):
        z = (torch.randn(4, 3, n, generator=g) * 4).to(dtype).to(kernel_device)
        h, lse = triton_ops.row_entropy(z, 0.7)
        logp = (z.double() * 0.7).log_softmax(-1)
        href = -(logp.exp() * logp).sum(-1)
        assert h.dtype == lse.dtype == torch.float32 and h.shape == (4, 3)
        assert float((h.double() - href).abs().max()) < 1e-4 * math.log(n), (n, dtype)
        assert float((lse.double() - (z.double() * 0.7).logsumexp(-1)).abs().max()) < 1e-4, (n, dtype)
        w = torch.randn(2, generator=g).to(kernel_device)
        dz = triton_ops.row_entropy_backward_(z.clone(), lse, h, w, 0.7)
        ref = (logp.exp() * (logp + href[..., None])).view(2, -1, n) * w.double().view(2, 1, 1)
        err = (dz.double().view(2, -1, n) - ref).norm() / ref.norm()
        assert float(err) < (1e-5 if dtype == torch.float32 else 1e-2), (n, dtype)


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_kernel_group_entropy_equals_the_torch_form(kernel_device, monkeypatch):
    """GroupEntropy with the row kernels gives the torch form's values and q, k gradients (same bf16 scores)."""
    from engine.adapters import triton_ops
    from engine.adapters.lora2 import batched_token_entropies

    shapes = [(2, 300, 77, 4, 16)] * 3 + [(1, 130, 77, 2, 16)]
    monkeypatch.setattr(triton_ops, "FUSED_ENTROPY", False)  # the score buffer and row kernels (the fused test below)
    out = []
    for enabled in (True, False):
        monkeypatch.setattr(triton_ops, "ENABLED", enabled)
        views = [_processor_views(*sh, device=kernel_device, dtype=torch.bfloat16, seed=i)
                 for i, sh in enumerate(shapes)]
        ent = batched_token_entropies([(qv, kv, 0.25) for _, _, qv, kv in views])
        torch.autograd.backward(ent, [torch.full_like(e, i + 1.0) for i, e in enumerate(ent)])
        out.append((torch.stack(ent).float(), [(q.grad.float(), k.grad.float()) for q, k, _, _ in views]))
    (e1, g1), (e0, g0) = out
    assert torch.allclose(e1, e0, rtol=1e-4, atol=1e-5)
    for pair1, pair0 in zip(g1, g0, strict=True):
        for a, b in zip(pair1, pair0, strict=True):
            assert float((a - b).norm() / b.norm()) < 1e-2


def test_slot_adamw_without_its_kernel_is_torch_adamw():
    """Where the kernel cannot run (here: the CPU without Triton's interpreter) SlotAdamW is torch's AdamW, bit
    for bit, and the two load each other's state."""
    from engine.optim import SlotAdamW

    def run(cls, state=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8))
        ad = inject(model, make_config("lora2", rank=2, max_rank=6, targets="0,1", lambda_e=0.0))
        groups = ad.param_groups(1e-2, weight_decay=0.05)
        opt = cls(groups, slots=ad.optimizer_slots()) if cls is SlotAdamW else cls(groups)
        if state is not None:
            opt.load_state_dict(state)
        for step in range(2):
            ad.before_step(step, opt, sync=True)
            (model(torch.randn(3, 16, generator=torch.Generator().manual_seed(step))).pow(2).mean()
             + ad.extra_loss()[0]).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in ad.parameters()], opt.state_dict()

    (ref, ref_state), (got, got_state) = run(torch.optim.AdamW), run(SlotAdamW)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    (ref2, _), (got2, _) = run(torch.optim.AdamW, got_state), run(SlotAdamW, ref_state)
    assert all(torch.equal(a, b) for a, b in zip(ref2, got2, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(ref, ref2, strict=True))  # the loaded moments were used


def _clipped_runs(device, slot_cls, steps=3, max_norm=0.005, before_step=None, fused=None, clips=None):
    """(reference, candidate): a tiny LoRA² model trained `steps` steps with torch.nn.utils.clip_grad_norm_ and
    torch's AdamW, and the same with SlotAdamW.clip_grad_norm_ and SlotAdamW; clips: how many clips before each
    step (default one); -> their adapters, optimizers and the total norms each clip returned."""
    from engine.optim import SlotAdamW

    out = []
    for cls in (torch.optim.AdamW, slot_cls):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(96, 96) for _ in range(3)], nn.Linear(96, 64)).to(device)
        ad = inject(model, make_config("lora2", rank=8, max_rank=24, targets="0,1,2,3", lambda_e=0.0))
        groups = ad.param_groups(1e-2, weight_decay=0.05)
        kw = fused or {}
        opt = cls(groups, slots=ad.optimizer_slots(), **kw) if issubclass(cls, SlotAdamW) else cls(groups, **kw)
        norms = []
        for step in range(steps):
            ad.before_step(step, opt, sync=True)
            x = torch.randn(5, 96, generator=torch.Generator().manual_seed(step)).to(device)
            (model(x).pow(2).mean() + ad.extra_loss()[0]).backward()
            for _ in range(1 if clips is None else clips[step]):
                if isinstance(opt, SlotAdamW):
                    norms.append(opt.clip_grad_norm_(max_norm))
                else:
                    norms.append(torch.nn.utils.clip_grad_norm_(list(ad.parameters()), max_norm))
            if isinstance(opt, SlotAdamW) and before_step is not None:
                before_step(opt)
            opt.step()
            for p in ad.parameters():  # not zero_grad(): step() alone must not leave a coefficient behind
                p.grad = None
        out.append((ad, opt, torch.stack(norms).cpu()))
    return out


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_slot_adamw_clip_in_any_rhythm_equals_torch_clip(kernel_device):
    """Steps without a clip after clipped ones take no stale coefficient; two clips before one step multiply twice
    (the second norm over the once-clipped gradients), as torch's would; a closure's fresh gradients are not
    clipped; a gradient changed between clip and step is refused, not silently mis-scaled."""
    from engine.optim import SlotAdamW

    fused = {"fused": True, "capturable": True} if kernel_device == "cuda" else {}
    (a, _, na), (b, _, nb) = _clipped_runs(kernel_device, SlotAdamW, steps=4, fused=fused, clips=(1, 0, 2, 0))
    assert len(na) == len(nb) == 3 and torch.allclose(na, nb, rtol=1e-5) and bool((na[:2] > 0.005).all())
    assert float(na[2]) == pytest.approx(0.005, rel=1e-3)  # the second clip of step 2 sees clipped gradients
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-4), float((p - q).abs().max())

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16)).to(kernel_device)
    ad = inject(model, make_config("lora2", rank=4, max_rank=8, targets="0,1", lambda_e=0.0))
    opt = SlotAdamW(ad.param_groups(1e-2), slots=ad.optimizer_slots(), **fused)
    ad.before_step(0, opt, sync=True)
    x = torch.randn(4, 32, device=kernel_device)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    closure()
    opt.clip_grad_norm_(1e-6)
    fresh = [p.grad.clone() for p in ad.parameters()]  # what the closure will make again (same x, same params)
    seen = []
    real = opt._masked_group
    opt._masked_group = lambda gi, group, ps: seen.append(opt._grad_scale) or real(gi, group, ps)
    opt.step(closure)
    assert all(s is None for s in seen)  # no coefficient on the closure's gradients
    assert all(torch.equal(p.grad, f) for p, f in zip(ad.parameters(), fresh, strict=True))
    closure()
    opt.clip_grad_norm_(1e-6)
    if opt._clip is not None:  # the kernel takes the factors (interpreter, GPU): their multiply is pending
        model(x).pow(2).mean().backward()  # a backward between clip and step
        with pytest.raises(RuntimeError, match="changed between clip_grad_norm_"):
            opt.step()


@pytest.mark.parametrize("max_norm", [0.005, 1e9])  # clipping every step, and never
def test_slot_adamw_clip_without_its_kernel_is_torch_clip(max_norm):
    """Where the kernel cannot run, SlotAdamW.clip_grad_norm_ then step() is torch's clip_grad_norm_ then AdamW: the
    same norms (returned; summed in another order, so within rounding) and the same factors (bit for bit where
    nothing is clipped)."""
    from engine.optim import SlotAdamW

    (a, _, na), (b, _, nb) = _clipped_runs("cpu", SlotAdamW, max_norm=max_norm)
    assert torch.allclose(na, nb, rtol=1e-6, atol=0) and (bool((na > max_norm).all()) is (max_norm < 1))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q) if max_norm > 1 else torch.allclose(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_slot_adamw_clip_inside_its_kernel_equals_torch_clip(kernel_device, late, monkeypatch):
    """SlotAdamW's clip leaves the multiply of LoRA²'s factors' gradients to the kernel (which gets the
    coefficient) and gives torch's clip + AdamW: same norms, factors within the kernel test's tolerance. `late`:
    the kernel is turned off between clip and step, and the gradients it was to multiply are multiplied then."""
    from engine.adapters import triton_ops
    from engine.optim import SlotAdamW

    scales = []
    real = triton_ops.adamw_slots
    monkeypatch.setattr(triton_ops, "adamw_slots",
                        lambda *a, grad_scale=None: scales.append(grad_scale) or real(*a, grad_scale=grad_scale))

    def off(opt):
        opt.masked_step = False

    fused = {"fused": True, "capturable": True} if kernel_device == "cuda" else {}
    (a, _, na), (b, _, nb) = _clipped_runs(kernel_device, SlotAdamW, before_step=off if late else None,
                                           fused=fused)
    assert torch.allclose(na, nb, rtol=1e-6) and bool((na > 0.005).all())  # every step clipped
    assert (not scales) if late else (len(scales) == 3 * 3 and all(torch.is_tensor(x) for x in scales))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-4), float((p - q).abs().max())


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_slot_adamw_equals_torch_adamw(kernel_device, monkeypatch):
    """SlotAdamW updating only LoRA²'s active slots (Triton) gives torch's AdamW step: same factors, moments and
    step counts over 3 steps (weight decay, a tensor lr on the first group, ranks that differ by layer, a
    resize between steps), idle slots still exactly zero; rho (no slots) takes torch's own AdamW."""
    from engine.adapters import triton_ops
    from engine.optim import SlotAdamW

    fused = {"fused": True, "capturable": True} if kernel_device == "cuda" else {}
    launches = []
    real = triton_ops.adamw_slots
    monkeypatch.setattr(triton_ops, "adamw_slots", lambda *a, **kw: (launches.append((tuple(a[0][0].shape), a[6])),
                                                                      real(*a, **kw))[1])

    def build(cls):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(96, 96) for _ in range(3)], nn.Linear(96, 64)).to(kernel_device)
        ad = inject(model, make_config("lora2", rank=8, max_rank=24, targets="0,1,2,3", lambda_e=0.0))
        groups = ad.param_groups(1e-2, weight_decay=2.0)  # a decay large enough to show in the tolerance below
        groups[0]["lr"] = torch.tensor(1e-2, device=kernel_device)
        opt = cls(groups, slots=ad.optimizer_slots(), **fused) if cls is SlotAdamW else cls(groups, **fused)
        return model, ad, opt

    runs = [build(torch.optim.AdamW), build(SlotAdamW)]
    for step, target in enumerate(((20, 8, 3, 12), (20, 8, 3, 12), (6, 16, 3, 1))):
        for model, ad, opt in runs:
            with torch.no_grad():
                for layer, r in zip(ad.layers.values(), target, strict=True):
                    layer.rho.fill_(inverse_softplus(nu_for_rank(r, 0.9)))
            torch.manual_seed(step)
            ad.before_step(step, opt, sync=True)
            x = torch.randn(5, 96, generator=torch.Generator().manual_seed(step)).to(kernel_device)
            loss, extra = model(x).pow(2).mean(), ad.extra_loss()[0]
            (loss if extra is None else loss + extra).backward()
            opt.step()
            opt.zero_grad()
        (_, a, oa), (_, b, ob) = runs
        for name, la in a.layers.items():
            lb = b.layers[name]
            d = int(lb.active.sum())
            assert torch.equal(la.active, lb.active) and d == target[list(a.layers).index(name)]
            for p, q, axis in ((la.lora_A, lb.lora_A, 0), (la.lora_B, lb.lora_B, 1)):
                # two kernels' fp32 rounding, amplified by Adam's normalisation over the steps: within 1% of one
                # step's size (lr = 1e-2; measured: 1.3e-5 on an H200, 1.1e-6 in Triton's CPU interpreter). A
                # missing bias correction, decay (>= 2e-2 |p| a step) or slot would be off by far more.
                assert torch.allclose(p, q, rtol=0, atol=1e-4), (name, step, float((p - q).abs().max()))
                assert not q.detach().narrow(axis, d, q.shape[axis] - d).any()  # idle slots: exactly zero
                for key in ("exp_avg", "exp_avg_sq"):
                    a_m, b_m = oa.state[p][key], ob.state[q][key]
                    assert torch.allclose(a_m, b_m, rtol=1e-2, atol=1e-10), (name, key, float((a_m - b_m).abs().max()))
                assert float(oa.state[p]["step"]) == float(ob.state[q]["step"]) == step + 1
            assert torch.allclose(la.rho, lb.rho, rtol=1e-6)
    # every A (one shape) and B (two shapes) went through the kernel, each step
    assert launches == [((24, 96), 0), ((96, 24), 1), ((64, 24), 1)] * 3


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
@pytest.mark.parametrize("dims", [(512, 512, 512, 512), (512, 512, 256, 512)], ids=["one shape", "three shapes"])
def test_kernel_resize_equals_the_torch_form(kernel_device, dims, monkeypatch):
    """LoRA²'s resize kernel leaves the masks, B, every optimizer moment and the untouched rows of A exactly as
    the torch form does; the grown rows of A follow the init rule of their own layer (std within 10% over 64 x
    fan-in draws) and the bf16 compute copies equal A; the sync-free path (device ranks; all groups' masks and
    stds at once) and the host path agree."""
    from engine.adapters import triton_ops

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(dims[i], dims[i + 1]) for i in range(3)]).to(kernel_device)
        ad = inject(model, make_config("lora2", rank=8, max_rank=96, targets="0,1,2", lambda_e=0.0))
        opt = torch.optim.AdamW(ad.param_groups(1e-2, weight_decay=0.01))
        with torch.autocast(kernel_device, dtype=torch.bfloat16):
            model(torch.randn(4, 512, device=kernel_device)).float().pow(2).mean().backward()
        opt.step()
        ad.refresh_shadows()
        return ad, opt

    from engine.adapters.lora2 import LoRA2Set

    batched = []  # what the sync-free resize of all groups at once answered (False: it went group by group)
    real = LoRA2Set._resize_all_in_kernel
    monkeypatch.setattr(LoRA2Set, "_resize_all_in_kernel", lambda *a: batched.append(real(*a)) or batched[-1])
    (a, oa), (b, ob) = build(), build()
    assert all(layer._shadow is not None for layer in b.layers.values())
    for target, sync in (((72, 8, 80), False), ((40, 8, 5), True), ((40, 9, 1), False)):
        for ad in (a, b):
            with torch.no_grad():
                for layer, r in zip(ad.layers.values(), target):
                    layer.rho.fill_(inverse_softplus(nu_for_rank(r, 0.9)))
        old = {n: (layer.lora_A.detach().clone(), int(layer.active.sum())) for n, layer in b.layers.items()}
        monkeypatch.setattr(triton_ops, "ENABLED", False)
        a.before_step(0, oa, sync=sync)
        monkeypatch.setattr(triton_ops, "ENABLED", True)
        batched.clear()
        b.before_step(0, ob, sync=sync)
        assert batched == ([] if sync else [True])
        assert [int(layer.active.sum()) for layer in b.layers.values()] == list(target)
        for name, la in a.layers.items():
            lb = b.layers[name]
            assert torch.equal(la.active, lb.active)
            assert torch.equal(la.lora_B, lb.lora_B)
            for p, q in ((la.lora_A, lb.lora_A), (la.lora_B, lb.lora_B)):
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(oa.state[p][key], ob.state[q][key]), (name, key)
            d_old, d_new = old[name][1], int(lb.active.sum())
            grown = slice(d_old, d_new)
            keep = torch.ones(lb.lora_A.shape[0], dtype=torch.bool)
            keep[grown] = False
            diff = (lb.lora_A != la.lora_A).any(1).nonzero().flatten().tolist()
            assert diff == list(range(d_old, d_new)), (name, target, diff)
            if d_new - d_old >= 64:  # enough draws for a std check
                std = float(_init_std_of(lb).detach())
                assert float(lb.lora_A[grown].std()) == pytest.approx(std, rel=0.1)
            if d_new > d_old:
                assert bool((lb.lora_A[grown] != 0).all())
            if kernel_device == "cuda":
                assert torch.equal(lb._shadow[1], lb.lora_A.detach().to(torch.bfloat16)), name
            else:  # the interpreter's bf16 cast truncates where the GPU rounds to nearest: within one bf16 step
                assert torch.allclose(lb._shadow[1].float(), lb.lora_A.detach(), rtol=2 ** -7, atol=0), name
            with torch.no_grad():  # the next round starts both from the same draws
                la.lora_A.copy_(lb.lora_A)
        a.refresh_shadows()
    # A changed after its compute copy was made (no refresh): the kernel must not mark that copy current
    with torch.autocast(kernel_device, dtype=torch.bfloat16):
        b.model(torch.randn(4, 512, device=kernel_device)).float().pow(2).mean().backward()
    ob.step()
    with torch.no_grad():
        for layer, r in zip(b.layers.values(), (41, 9, 1)):
            layer.rho.fill_(inverse_softplus(nu_for_rank(r, 0.9)))
    b.before_step(0, ob, sync=False)
    for layer in b.layers.values():
        assert torch.equal(layer.compute_copies(layer.lora_A, None, torch.bfloat16)[0],
                           layer.lora_A.detach().to(torch.bfloat16))


def test_resize_kernel_takes_only_groups_it_can_write():
    """_slot_moments (the kernel's gate): fp32 factors with one bf16/fp16 compute-copy dtype; A's and B's moments
    decided separately (a factor without state yet gets none); fp64 copies or non-fp32 moments: the torch form."""
    from engine.adapters.lora2 import _slot_moments

    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    ad = inject(model, make_config("lora2", rank=2, max_rank=4, targets="0,1", lambda_e=0.0))
    layers = list(ad.layers.values())
    opt = torch.optim.AdamW([layer.lora_A for layer in layers], lr=1e-2)
    for layer in layers:
        layer.lora_A.grad = torch.ones_like(layer.lora_A)
    opt.step()
    am, bm = _slot_moments(opt, layers)
    assert [len(x) for x in am] == [2, 2] and bm == []  # exp_avg, exp_avg_sq of A; B has no state
    assert _slot_moments(None, layers) == ([], [])
    for dtype, takes in ((torch.bfloat16, True), (torch.float16, True), (torch.float64, False)):
        for layer in layers:
            layer._shadow = (None, layer.lora_A.detach().to(dtype), None)
        assert (_slot_moments(opt, layers) is not None) == takes, dtype
    layers[0]._shadow = (None, layers[0].lora_A.detach().to(torch.float16), None)  # mixed bf16 / fp16
    layers[1]._shadow = (None, layers[1].lora_A.detach().to(torch.bfloat16), None)
    assert _slot_moments(opt, layers) is None
    layers[0]._shadow = layers[1]._shadow = None
    opt.state[layers[1].lora_A]["exp_avg"] = opt.state[layers[1].lora_A]["exp_avg"].double()
    assert _slot_moments(opt, layers) is None


def _stacked_views(b, n, t, h, hd, device, seed, extra=8, k_layout="stacked", dtype=torch.bfloat16):
    """q and k as a stacked projection leaves them: head views of the first h * hd columns of (B, S, h * hd + extra)
    outputs (the rest is the low-rank h), bf16. k's outputs are 8 columns wider than q's (other strides);
    k_layout "heads": k is a contiguous (B, h, T, hd) tensor instead (yet other strides, heads outermost)."""
    g = torch.Generator(device).manual_seed(seed)
    qf = (torch.randn(b, n, h * hd + extra, generator=g, device=device) * 2).to(dtype).requires_grad_()
    if k_layout == "heads":
        kf = (torch.randn(b, h, t, hd, generator=g, device=device) * 2).to(dtype).requires_grad_()
        kv = kf
    else:
        kf = (torch.randn(b, t, h * hd + extra + 8, generator=g, device=device) * 2).to(dtype)
        kf.requires_grad_()
        kv = kf[..., :h * hd].unflatten(-1, (h, hd)).transpose(1, 2)
    return qf, kf, qf[..., :h * hd].unflatten(-1, (h, hd)).transpose(1, 2), kv


def _exact_entropies(views, scale, weights):
    """float64 token_entropy (in nats, not normalised) of each view pair, and the gradients of sum_l w_l H_l for
    their q and k."""
    out, grads = [], []
    for (_, _, qv, kv), w in zip(views, weights, strict=True):
        q64, k64 = qv.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
        logp = ((k64 * scale) @ q64.transpose(-1, -2)).log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1).mean()
        (ent * w).backward()
        out.append(float(ent.detach()))
        grads.append((q64.grad, k64.grad))
    return out, grads


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_kernel_fused_entropy_equals_float64(kernel_device, monkeypatch):
    """attn_entropy and its backward (scores formed tile by tile, never stored) give the float64 entropies, log-sum-
    exps and q, k gradients of the same bf16 inputs: one span per program and many (partial results combined),
    heads of 16, 40 (padded to 64), 64 and 80 channels, 20 and 77 tokens, strided views as stacked projections
    give, and more layers than one launch takes. (The interpreter runs programs one after another: a store
    without its mask, a race between programs on a GPU, shows only in the gpu-marked run.)"""
    from engine.adapters import triton_ops

    cases = [((2, 300, 77, 2, 16), 0, 3), ((1, 130, 77, 3, 40), 8, 3), ((1, 1000, 20, 1, 64), 16, 3),
             ((1, 200, 77, 2, 80), 8, 2),  # heads over 64 channels: tiles of 32 positions
             ((2, 100, 77, 3, 40), "heads", 2),  # k contiguous (B, h, T, hd): its strides unlike q's in every axis
             ((2, 130, 77, 2, 16), 1, 2),  # odd row widths: strides passed as they are (VEC 1)
             ((1, 150, 77, 1, 16), 0, triton_ops.ENTROPY_LAYERS + 2)]  # two launches
    for (b, n, t, h, hd), extra, layers in cases:
        views = [_stacked_views(b, n, t, h, hd, kernel_device, seed=i, extra=8 if extra == "heads" else extra,
                                k_layout="heads" if extra == "heads" else "stacked") for i in range(layers)]
        qs, ks = [v[2] for v in views], [v[3] for v in views]
        assert triton_ops.fused_entropy_ok(qs[0], ks[0])
        assert triton_ops._entropy_plan(qs, ks)[3]["VEC"] == (1 if extra == 1 else 8)
        scale = hd ** -0.5
        z = [(k.double() * scale) @ q.double().transpose(-1, -2) for q, k in zip(qs, ks, strict=True)]
        lse_ref = torch.cat([x.logsumexp(-1).reshape(-1, t) for x in z])
        c = [(-1.0) ** i * (i + 1) for i in range(layers)]
        ref, ref_grads = _exact_entropies(views, scale, c)
        results = []
        for sms in (1, 10_000):  # one span per program, then as many as there are tiles
            monkeypatch.setitem(triton_ops._SMS, qs[0].device, sms)
            split = triton_ops._entropy_plan(qs, ks)[0]
            ent, lse = triton_ops.attn_entropy(qs, ks, scale)
            assert ent.shape == lse.shape == (layers * b * h, t) and ent.dtype == torch.float32
            assert float((lse.double() - lse_ref).abs().max()) < 1e-4, (n, split)
            per_layer = ent.view(layers, -1).mean(1)
            for got, want in zip(per_layer.tolist(), ref, strict=True):
                assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (n, split)
            w = torch.tensor(c, device=kernel_device) * (-scale / (b * h * t))
            dq, dk = triton_ops.attn_entropy_backward(qs, ks, lse, ent, w, scale)
            assert len(dq) == len(dk) == layers and all(g.dtype == torch.bfloat16 for g in dq + dk)
            assert all(g.shape == (b, n, h, hd) for g in dq) and all(g.shape == (b, t, h, hd) for g in dk)
            for i, (gq, gk) in enumerate(ref_grads):
                for got, want in ((dq[i].transpose(1, 2), gq), (dk[i].transpose(1, 2), gk)):
                    assert float((got.double() - want).norm() / want.norm()) < 1.5e-2, (n, split, i)
            results.append((split, ent, torch.stack(dk).float()))
        (s1, e1, dk1), (s2, e2, dk2) = results
        assert s1 == 1 < s2  # both paths ran
        assert torch.allclose(e1, e2, rtol=1e-5, atol=1e-5) and torch.allclose(dk1, dk2, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_kernel_fused_group_entropy_is_used_and_as_exact_as_the_row_kernels(kernel_device, monkeypatch):
    """GroupEntropy on bf16 q and k takes the fused kernels (no score buffer is formed) and is at least as close to
    the float64 values and gradients as the score-buffer path with the row kernels."""
    from engine.adapters import lora2, triton_ops
    from engine.adapters.lora2 import batched_token_entropies

    shapes = [(2, 300, 77, 4, 16)] * 3 + [(1, 130, 77, 2, 16)]
    views = [_stacked_views(*sh, kernel_device, seed=i) for i, sh in enumerate(shapes)]
    scale = 0.25
    ref, ref_grads = _exact_entropies(views, scale, [1.0, 2.0, 3.0, 4.0])
    order = [0, 1, 2, 3]  # groups in first-seen order
    scores_calls = []
    real_scores = lora2._scores
    monkeypatch.setattr(lora2, "_scores", lambda *a: scores_calls.append(1) or real_scores(*a))
    errors = {}
    for fused in (True, False):
        monkeypatch.setattr(triton_ops, "FUSED_ENTROPY", fused)
        for qf, kf, _, _ in views:
            qf.grad = kf.grad = None
        scores_calls.clear()
        ent = batched_token_entropies([(qv, kv, scale) for _, _, qv, kv in views])
        torch.autograd.backward(ent, [torch.full_like(e, i + 1.0) for i, e in enumerate(ent)])
        assert bool(scores_calls) is not fused  # fused: no score map in the forward or the backward
        for pos, i in enumerate(order):
            assert float(ent[pos]) * math.log(shapes[i][1]) == pytest.approx(ref[i], rel=(1e-5 if fused else 2e-3))
        errors[fused] = 0.0
        for (qf, kf, _, _), (gq, gk), sh in zip(views, ref_grads, shapes, strict=True):
            b, n, t, h, hd = sh
            got_q = qf.grad[..., :h * hd].unflatten(-1, (h, hd)).transpose(1, 2).double() * math.log(n)
            got_k = kf.grad[..., :h * hd].unflatten(-1, (h, hd)).transpose(1, 2).double() * math.log(n)
            assert float(qf.grad[..., h * hd:].abs().max()) == 0  # nothing flows into the stacked h columns
            for got, want in ((got_q, gq), (got_k, gk)):
                errors[fused] = max(errors[fused], float((got - want).norm() / want.norm()))
    print("relative gradient errors (fused, row kernels):", errors[True], errors[False])
    assert errors[True] < 1.5e-2 and errors[True] <= 1.5 * errors[False] + 2e-3, errors


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_kernel_lora2_step_with_fused_entropy_equals_the_torch_form(kernel_device, checkpointing, monkeypatch):
    """A LoRA² step on the tiny UNet in bf16 with stacked q/k/v, as the trainer runs it: with the kernels the
    entropy goes through attn_entropy (one launch per shape group; with gradient checkpointing one per layer, run
    again in the backward), and the entropy term and every adapter gradient match the torch form's (which rounds
    the scores to bf16: close, not equal)."""
    from test_adapters import inputs, tiny_unet

    from engine.adapters import triton_ops

    x, t, c = inputs()
    calls = []
    real = triton_ops.attn_entropy
    monkeypatch.setattr(triton_ops, "attn_entropy", lambda *a: calls.append(len(a[0])) or real(*a))
    out = []
    for enabled in (True, False):
        monkeypatch.setattr(triton_ops, "ENABLED", enabled)
        unet = tiny_unet().to(device=kernel_device, dtype=torch.bfloat16)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        ad = inject(unet, make_config("lora2", rank=4, max_rank=8, lambda_e=1.0, seed=1))
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)
        ad.set_stacked_down(True)
        ad.reset_step()
        with torch.autocast(kernel_device, dtype=torch.bfloat16):
            loss = unet(*(v.to(kernel_device) for v in (x.bfloat16(), t, c.bfloat16()))).sample.float().pow(2).mean()
            extra, terms = ad.extra_loss()
        (loss + extra).backward()
        out.append((float(terms["entropy"]), [p.grad.float().clone() for p in ad.parameters() if p.grad is not None]))
    cross = sum(1 for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False))
    assert not triton_ops._FUSED_FAILED  # no fallback hid a failing kernel
    if checkpointing:  # one layer a call, run again by the backward where a checkpointed block holds it
        assert set(calls) == {1} and 2 * cross >= len(calls) > cross > 0
    else:
        assert sum(calls) == cross > 0 and len(calls) < cross  # every cross-attention layer, batched by shape
    (e1, g1), (e0, g0) = out
    assert e1 == pytest.approx(e0, rel=2e-3) and 0 < e1 <= 1
    assert len(g1) == len(g0) > 0
    flat1, flat0 = torch.cat([a.flatten() for a in g1]), torch.cat([b.flatten() for b in g0])
    assert float((flat1 - flat0).norm()) <= 2e-2 * float(flat0.norm())  # 0.0055 in Triton's interpreter
    for a, b in zip(g1, g0, strict=True):  # per tensor: up to 0.04 there (a small gradient, bf16 scores in one)
        assert float((a - b).norm()) <= 0.1 * float(b.norm()) + 1e-6


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_kernel_entropy_gradients_survive_fp16(kernel_device, monkeypatch):
    """In fp16 with small weights on the entropy (LoRA²'s lambda_e is 1e-4), where nearly every element of the
    scores' gradient w dz is below fp16's smallest value, every path (fused kernels, score buffer with row kernels,
    torch form) still gives q and k gradients within 2% of float64's: the per-layer weight multiplies the GEMMs'
    results, not dz. (Applying it to dz first, as before, gave 12% in the row kernels' path.)"""
    from engine.adapters import triton_ops
    from engine.adapters.lora2 import GroupEntropy

    shape = (1, 300, 77, 2, 16)
    c = [1e-3, 3e-3]
    views = [_stacked_views(*shape, kernel_device, seed=i, dtype=torch.float16) for i in range(2)]
    _, ref_grads = _exact_entropies(views, 0.25, c)
    q64, k64 = views[0][2].detach().double(), views[0][3].detach().double()
    logp = ((k64 * 0.25) @ q64.transpose(-1, -2)).log_softmax(-1)
    dz = c[0] * 0.25 / (2 * 77) * logp.exp() * (logp - (logp.exp() * logp).sum(-1, keepdim=True))
    assert float((dz.abs() < 2.0 ** -24).double().mean()) > 0.9  # nearly all of w dz is below fp16's smallest value
    for path in ("fused", "rows", "torch"):
        monkeypatch.setattr(triton_ops, "FUSED_ENTROPY", path == "fused")
        monkeypatch.setattr(triton_ops, "ENABLED", path != "torch")
        for qf, kf, _, _ in views:
            qf.grad = kf.grad = None
        ent = GroupEntropy.apply(0.25, 2, views[0][2], views[1][2], views[0][3], views[1][3])
        (ent * torch.tensor(c, device=ent.device)).sum().backward()
        for (qf, kf, _, _), (gq, gk) in zip(views, ref_grads, strict=True):
            got_q = qf.grad[..., :32].unflatten(-1, (2, 16)).transpose(1, 2).double()
            got_k = kf.grad[..., :32].unflatten(-1, (2, 16)).transpose(1, 2).double()
            for got, want in ((got_q, gq), (got_k, gk)):
                assert float((got - want).norm() / want.norm()) < 0.05, path


def _two_layer_entropies(shape, device):
    """batched_token_entropies of two stacked-view layers of this shape and their backward -> (the entropies,
    the q and k buffers' gradients)."""
    from engine.adapters.lora2 import batched_token_entropies

    views = [_stacked_views(*shape, device, seed=i) for i in range(2)]
    ent = batched_token_entropies([(qv, kv, 0.3) for _, _, qv, kv in views])
    torch.autograd.backward(ent, [torch.ones_like(e) for e in ent])
    return torch.stack(ent).detach(), [t.grad.clone() for v in views for t in v[:2]]


@pytest.mark.parametrize("stage", ["forward", "backward"])
@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_kernel_fused_entropy_failure_falls_back_to_the_row_kernels(kernel_device, stage, monkeypatch):
    """Where a fused entropy kernel raises at some sizes (cannot compile, too little shared memory on this GPU),
    GroupEntropy warns once and computes the same values and gradients through the score buffer and row kernels,
    and those sizes skip the fused kernels from then on; other sizes keep them."""
    from engine.adapters import lora2, triton_ops

    shape = (1, 200, 77, 2, 16)
    run = functools.partial(_two_layer_entropies, shape, kernel_device)

    monkeypatch.setattr(triton_ops, "FUSED_ENTROPY", False)
    ref_ent, ref_grads = run()  # the row kernels
    monkeypatch.setattr(triton_ops, "FUSED_ENTROPY", True)
    name = "attn_entropy" if stage == "forward" else "attn_entropy_backward"
    real, calls = getattr(triton_ops, name), []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(triton_ops, name, broken)
    scores = []
    real_scores = lora2._scores
    monkeypatch.setattr(lora2, "_scores", lambda *a: scores.append(1) or real_scores(*a))
    with pytest.warns(RuntimeWarning, match="fused entropy kernels failed for heads of 16 channels and 77 tokens"):
        got_ent, got_grads = run()
    assert calls == [1] and scores  # tried once, then the buffer path
    if stage == "forward":
        assert torch.equal(got_ent, ref_ent)
    else:  # the fused forward's values (fp32 scores); the backward recomputes lse and H with the row kernels
        assert torch.allclose(got_ent, ref_ent, rtol=2e-3, atol=1e-5) and not torch.equal(got_ent, ref_ent)
    for a, b in zip(got_grads, ref_grads, strict=True):
        assert torch.equal(a, b)
    q = _stacked_views(*shape, kernel_device, seed=0)[2]
    k = _stacked_views(*shape, kernel_device, seed=0)[3]
    assert not triton_ops.fused_entropy_ok(q, k)  # retired for these sizes
    q2 = _stacked_views(1, 200, 20, 2, 16, kernel_device, seed=0)[2:]
    assert triton_ops.fused_entropy_ok(*q2)  # other sizes keep the fused kernels
    # inside a CUDA graph capture a kernel not yet checked at these shapes is not launched (nothing verified what
    # the graph would replay): the buffer path goes in, nothing is retired
    monkeypatch.setattr(triton_ops, "_FUSED_FAILED", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    calls.clear()
    assert all(torch.equal(a, b) for a, b in zip(run()[1], ref_grads, strict=True))
    assert calls == [] and not triton_ops._FUSED_FAILED
    # one that was (checks off here) and fails there propagates: the trainer then steps eagerly
    monkeypatch.setattr(triton_ops, "CHECK_FIRST_USE", False)
    with pytest.raises(RuntimeError, match="out of resource"):
        run()
    assert calls == [1] and not triton_ops._FUSED_FAILED
    monkeypatch.setattr(triton_ops, name, real)


def _init_std_of(layer):
    from engine.adapters.lora2 import _init_stds
    return _init_stds([layer], layer.active[None])[0]


def test_pointer_tables_a_graph_capture_makes_or_uses_are_never_dropped(monkeypatch):
    """A CUDA graph replays a captured table copy from its pinned source and reads the device table: tables made or
    used while capturing are kept (with their source) when the cache of eager tables is cleared. A table made
    inside a capture is never handed out again, to eager steps or to a later capture: its device copy exists only
    once that graph has replayed (a failed capture never does)."""
    from engine.adapters import triton_ops

    cpu = torch.device("cpu")
    monkeypatch.setattr(triton_ops, "_TABLES", {})
    monkeypatch.setattr(triton_ops, "_KEPT", [])
    monkeypatch.setattr(triton_ops, "capturing", lambda: False)
    eager = triton_ops._table([1], cpu)
    assert triton_ops._table([1], cpu) is eager and not triton_ops._KEPT  # made once
    monkeypatch.setattr(triton_ops, "capturing", lambda: True)
    captured = triton_ops._table([11, 12], cpu)
    assert captured.tolist() == [11, 12] and any(e[0] is captured for e in triton_ops._KEPT)
    assert triton_ops._table([1], cpu) is eager and any(e[0] is eager for e in triton_ops._KEPT)  # used: kept
    assert triton_ops._table([11, 12], cpu) is not captured  # a later capture makes its own
    monkeypatch.setattr(triton_ops, "capturing", lambda: False)
    again = triton_ops._table([11, 12], cpu)
    assert again is not captured and triton_ops._table([11, 12], cpu) is again  # eager steps make their own
    for i in range(300):  # past the cache's bound: the eager tables are dropped, the kept ones stay referenced
        triton_ops._table([100 + i], cpu)
    assert len(triton_ops._TABLES) < 300 and (cpu, (1,)) not in triton_ops._TABLES
    assert any(e[0] is eager for e in triton_ops._KEPT) and any(e[0] is captured for e in triton_ops._KEPT)


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_kernel_fold_equals_the_torch_form(kernel_device, out_dtype, monkeypatch):
    """FoldVectors through the fold kernels gives the torch form's s B diag(v) and gradients, for a group with more
    rows than one program takes and a rank that is not a power of two: B's gradient added into the .grad already
    there (the same tensors, in place), written into new tensors of their own where none is, or returned to
    autograd; v's gradient (column sums, in another order) close."""
    from engine.adapters import triton_ops
    from engine.adapters.base import FoldVectors

    monkeypatch.setattr(triton_ops, "CHECK_FIRST_USE", False)  # only the calls below (the check has its tests)
    gen = torch.Generator().manual_seed(11)
    n, d, r = 5, 300, 24  # 128 rows a program: 3 programs a layer, the last one part full
    ups0 = [torch.randn(d, r, generator=gen) for _ in range(n)]
    vecs0 = [torch.rand(r, generator=gen) for _ in range(n)]
    w = torch.randn(n, d, r, generator=gen).to(kernel_device)
    calls = []
    for name in ("fold_vectors", "fold_vectors_backward"):
        real = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, functools.partial(lambda f, nm, *a, **k: calls.append(nm) or f(*a, **k),
                                                                real, name))
    got = {}
    for enabled in (True, False):
        monkeypatch.setattr(triton_ops, "FOLD_KERNELS", enabled)
        for mode in ("in place, grads there", "in place, no grads", "autograd"):
            ups = [u.to(kernel_device).requires_grad_() for u in ups0]
            vecs = [v.to(kernel_device).requires_grad_() for v in vecs0]
            held = []
            if mode == "in place, grads there":
                for t in ups + vecs:
                    t.grad = torch.full_like(t, 0.5)
                held = [t.grad for t in ups]
            out = FoldVectors.apply(0.7, out_dtype, n, mode != "autograd", *ups, *vecs)
            assert out.dtype == out_dtype and out.shape == (n, d, r)
            (out.float() * w).sum().backward()
            assert all(a is b for a, b in zip(held, [t.grad for t in ups], strict=False))  # in place
            if mode == "in place, no grads":  # a tensor of its own each, as autograd gives
                assert len({t.grad.untyped_storage().data_ptr() for t in ups}) == n
            got[enabled, mode] = (out.detach().float(), torch.stack([t.grad for t in ups]),
                                  torch.stack([t.grad for t in vecs]))
    assert calls.count("fold_vectors") == 3 and calls.count("fold_vectors_backward") == 3
    for mode in ("in place, grads there", "in place, no grads", "autograd"):
        (o1, gu1, gv1), (o0, gu0, gv0) = got[True, mode], got[False, mode]
        if out_dtype == torch.float32 or kernel_device == "cuda":
            assert torch.equal(o1, o0), mode  # the same two fp32 products (and rounding) as the torch form
        else:  # the interpreter's bf16 cast truncates where the GPU rounds to nearest: within one bf16 step
            assert float(((o1 - o0).abs() / o0.abs().clamp_min(1e-30)).max()) <= 2 ** -7, mode
        assert torch.allclose(gu1, gu0, rtol=1e-6, atol=1e-7), mode  # a fused multiply-add may round once less
        assert torch.allclose(gv1, gv0, rtol=1e-5, atol=1e-5), mode


@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_kernel_trainer_runs_equal_the_torch_form(kernel_device, precision, tmp_path, monkeypatch):
    """The real trainer (engine.train.train, 4 steps on the tiny pipeline, gradients in place, q/k/v stacked; on
    CUDA under CUDA graphs with SlotAdamW) with every Triton kernel gives the torch form's losses: TriLoRA (fold)
    and LoRA² (fold, resize, entropy; ranks that move, a strong entropy term). In fp32 only the random rows a rank
    that grows draws differ (the kernel's generator); in bf16 the torch form also rounds the entropy's scores."""
    from helpers import make_image_folder, save_tiny_pipeline

    from engine.adapters import triton_ops
    from engine.runs import RunFolder
    from engine.train import TrainConfig, train

    model = str(save_tiny_pipeline(tmp_path / "tiny-sd"))
    data = str(make_image_folder(tmp_path / "ds", n=4))
    calls = []
    for name in ("fold_vectors_backward", "resize_slots", "attn_entropy", "row_entropy"):
        real = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, functools.partial(
            lambda f, nm, *a, **k: calls.append(nm) or f(*a, **k), real, name))
    for method, settings in (("tri_lora", {}), ("lora2", {"max_rank": 8, "lambda_e": 1.0, "rho_lr": 0.3})):
        losses, ranks = [], []
        for enabled in (True, False):
            monkeypatch.setattr(triton_ops, "ENABLED", enabled)
            calls.clear()
            cfg = TrainConfig(dataset=data, base_model=model, rank=4, steps=4, lr=1e-3, rank_every=2, seed=3,
                              method=method, method_settings=settings, mixed_precision=precision,
                              output_dir=str(tmp_path / f"{method}-{enabled}"))
            run = RunFolder(train(cfg).run_dir)
            losses.append([m["loss"] for m in run.metrics()])
            ranks.append([r["native"] for r in run.ranks() if r["type"] == "ranks"])
            used = set(calls)
            if enabled:
                want = {"fold_vectors_backward"} | ({"resize_slots", "attn_entropy" if precision == "bf16"
                                                     else "row_entropy"} if method == "lora2" else set())
                assert want <= used, (method, used)
            else:
                assert not used
        assert len(losses[0]) == len(losses[1]) == 4
        tol = 3e-3 if precision == "bf16" and method == "lora2" else 1e-4
        assert losses[0] == pytest.approx(losses[1], rel=tol), method
        assert ranks[0] == ranks[1], method  # every rank move the same (LoRA²: some layers grow to 5)
    assert any(d > 4 for d in ranks[0][-1].values())
    checked = {key[0] for key in triton_ops._CHECKED}  # each new launch shape met its torch form once, and passed
    assert {"fold", "fold_backward"} | ({"entropy"} if precision == "bf16" else set()) <= checked, checked
    assert all(triton_ops._CHECKED.values()), triton_ops._CHECKED


@pytest.mark.parametrize("mode", ["in place, grads there", "in place, no grads", "autograd"])
def test_a_fold_kernel_with_wrong_values_is_caught_at_its_first_use(mode, monkeypatch):
    """A fold kernel that computes wrong values on some GPU (faked on the CPU: the torch form with v 1.5x) is
    compared with the torch form the first time it runs at a launch shape: one warning each for the forward and
    the backward, the torch form's values and gradients (B's written into .grad where the kernel had put its
    own), and the torch form at that shape from then on (the kernel not called again). A right kernel passes its
    check once, with no warning, and is used from then on."""
    import warnings

    from engine.adapters import triton_ops
    from engine.adapters.base import FoldVectors

    gen = torch.Generator().manual_seed(5)
    n, d, r = 3, 20, 6
    ups0 = [torch.randn(d, r, generator=gen) for _ in range(n)]
    vecs0 = [torch.rand(r, generator=gen) for _ in range(n)]
    w = torch.randn(n, d, r, generator=gen)
    calls, kernel = [], {"on": False, "factor": 1.0}

    def fake_fwd(ups, vecs, scale, dtype):
        calls.append("forward")
        return (torch.stack(ups) * (vecs * scale * kernel["factor"])[:, None, :]).to(dtype)

    def fake_bwd(g, ups, vecs, scale, need_up, need_vec, into=None, accumulate=True):
        calls.append("backward")
        g = g.float()
        gup = g * (vecs * scale * kernel["factor"])[:, None, :]
        gvec = (g * torch.stack(ups)).sum(1) * scale * kernel["factor"] if need_vec else None
        if into is not None:
            for x, y in zip(into, gup.unbind(0), strict=True):
                x.add_(y) if accumulate else x.copy_(y)
            gup = None
        return gup, gvec

    monkeypatch.setattr(triton_ops, "fold_ok", lambda ups, vecs: kernel["on"])
    monkeypatch.setattr(triton_ops, "fold_vectors", fake_fwd)
    monkeypatch.setattr(triton_ops, "fold_vectors_backward", fake_bwd)

    def run():
        ups = [u.clone().requires_grad_() for u in ups0]
        vecs = [v.clone().requires_grad_() for v in vecs0]
        if mode == "in place, grads there":
            for t in ups + vecs:
                t.grad = torch.full_like(t, 0.5)
        out = FoldVectors.apply(0.7, torch.bfloat16, n, mode != "autograd", *ups, *vecs)
        (out.float() * w).sum().backward()
        return out.detach(), torch.stack([t.grad for t in ups]), torch.stack([t.grad for t in vecs])

    want = run()  # the torch form
    assert not calls
    for factor in (1.5, 1.0):
        monkeypatch.setattr(triton_ops, "_CHECKED", {})
        kernel.update(on=True, factor=factor)
        for attempt in range(2):
            calls.clear()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                got = run()
            messages = [str(x.message) for x in seen if issubclass(x.category, RuntimeWarning)]
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b), (factor, attempt)
            if factor == 1.5 and attempt == 0:  # each checked on random factors of the shape, then not used
                assert calls == ["forward", "backward"]
                assert len(messages) == 2 and "forward" in messages[0] and "backward" in messages[1]
                assert all("against the torch form" in m and "0.5" in m for m in messages), messages
            elif factor == 1.5:
                assert calls == [] and not messages  # that shape keeps the torch form
            elif attempt == 0:  # the check's launch, then the real one
                assert calls == ["forward", "forward", "backward", "backward"] and not messages
            else:
                assert calls == ["forward", "backward"] and not messages
        assert all(ok == (factor == 1.0) for ok in triton_ops._CHECKED.values()) and len(triton_ops._CHECKED) == 2
    assert len(triton_ops.active_fallbacks()) == 2  # the wrong kernel's forward and backward, kept for later runs


@pytest.mark.parametrize("wrong", ["one row of one layer", "one layer 5% off", "the added part doubled"])
def test_a_fold_kernel_wrong_in_one_place_is_caught(wrong, monkeypatch):
    """The fold check runs the kernel on a few random layers of the launch shape (not on the group's own factors,
    which may be zero at init) and compares layer by layer, B's gradient added into a .grad by its increment: an
    error confined to one row of one layer, one layer 5% off, or in the added part (the real .grad here holds 50
    everywhere) is caught, and the real launch then takes the torch form."""
    from engine.adapters import triton_ops
    from engine.adapters.base import FoldVectors

    def fwd(ups, vecs, scale, dtype):
        out = torch.stack(ups) * (vecs * scale)[:, None, :]
        if wrong == "one row of one layer":
            out[1, 3] = 0
        elif wrong == "one layer 5% off":
            out[2] *= 1.05
        return out.to(dtype)

    def bwd(g, ups, vecs, scale, need_up, need_vec, into=None, accumulate=True):
        gup = g.float() * (vecs * scale)[:, None, :] * (2 if wrong == "the added part doubled" else 1)
        gvec = (g.float() * torch.stack(ups)).sum(1) * scale if need_vec else None
        for x, y in zip(into or [], gup.unbind(0), strict=False):
            x.add_(y) if accumulate else x.copy_(y)
        return (None if into is not None else gup), gvec

    monkeypatch.setattr(triton_ops, "fold_ok", lambda ups, vecs: True)
    monkeypatch.setattr(triton_ops, "fold_vectors", fwd)
    monkeypatch.setattr(triton_ops, "fold_vectors_backward", bwd)
    n, d, r = 40, 64, 8
    ups = [torch.randn(d, r).requires_grad_() for _ in range(n)]
    vecs = [torch.rand(r).requires_grad_() for _ in range(n)]
    for t in ups:
        t.grad = torch.full_like(t, 50.0)  # a large .grad already there
    with pytest.warns(RuntimeWarning, match="fold kernel's (forward|backward)"):
        out = FoldVectors.apply(0.5, torch.float32, n, True, *ups, *vecs)
        out.sum().backward()
    what = "backward" if wrong == "the added part doubled" else "forward"
    assert [k[0] for k, ok in triton_ops._CHECKED.items() if not ok] == ["fold" if what == "forward"
                                                                         else "fold_backward"]


def test_a_fold_kernel_that_cannot_run_at_some_sizes_leaves_them_to_torch(monkeypatch):
    """A fold kernel that raises at its check (cannot compile or get its resources at these sizes on some GPU)
    warns once and leaves that shape to the torch form (same values); other shapes keep the kernel."""
    from engine.adapters import triton_ops
    from engine.adapters.base import FoldVectors

    calls = []

    def fwd(ups, vecs, scale, dtype):
        calls.append(ups[0].shape)
        if ups[0].shape[0] == 30:
            raise RuntimeError("out of resource: shared memory")
        return (torch.stack(ups) * (vecs * scale)[:, None, :]).to(dtype)

    monkeypatch.setattr(triton_ops, "fold_ok", lambda ups, vecs: True)
    monkeypatch.setattr(triton_ops, "fold_vectors", fwd)
    for i, rows in enumerate((30, 30, 20)):
        ups = [torch.randn(rows, 4) for _ in range(2)]
        vecs = [torch.rand(4) for _ in range(2)]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = FoldVectors.apply(0.5, torch.float32, 2, False, *ups, *vecs)
        assert torch.equal(out, (torch.stack(ups) * (torch.stack(vecs) * 0.5)[:, None, :]))
        msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == (1 if i == 0 else 0), msgs  # the first at 30 rows only
        assert all("could not run (RuntimeError: out of resource: shared memory)" in m for m in msgs)
    assert calls == [torch.Size([30, 4]), torch.Size([20, 4]), torch.Size([20, 4])]  # 30 rows: tried once


def test_kernel_check_figures(monkeypatch):
    """rel_error is ||got - want|| / ||want|| (inf for a NaN in got; NaN, saying nothing, for one in want or for
    two zeros); verdict records the worst figure of a launch key against its tolerance and says what went wrong,
    ignores NaN figures, and checks a key whose figures all say nothing again, CHECK_TRIES times at most."""
    from engine.adapters import triton_ops

    want = torch.tensor([3.0, 4.0])
    assert float(triton_ops.rel_error(torch.tensor([3.0, 4.5]), want)) == pytest.approx(0.1)
    assert float(triton_ops.rel_error(want.clone(), want)) == 0.0
    assert math.isnan(triton_ops.rel_error(torch.zeros(2), torch.zeros(2)))  # says nothing (factors at init)
    assert float(triton_ops.rel_error(torch.tensor([float("nan"), 4.0]), want)) == math.inf
    assert float(triton_ops.rel_error(torch.tensor([1.0, 0.0]), torch.zeros(2))) == math.inf
    assert math.isnan(triton_ops.rel_error(want, torch.tensor([float("inf"), 4.0])))  # no verdict on bad inputs
    tiny = torch.tensor([3e-30, 4e-30])  # squares below fp32's smallest normal: still measured, not 0 / 0
    assert float(triton_ops.rel_error(tiny * 1.1, tiny)) == pytest.approx(0.1, rel=1e-4)
    checked = triton_ops._CHECKED  # empty at the start of each test (conftest)
    assert triton_ops.to_check(("a",))
    assert triton_ops.verdict(("a",), "k", [torch.tensor(0.01), torch.tensor(0.02)], 0.05) is None
    wrong = triton_ops.verdict(("b",), "k", [torch.tensor(0.01), torch.tensor(math.inf)], 0.05)
    assert wrong == "k: relative error inf against the torch form (tolerance 0.05)"
    assert checked == {("a",): True, ("b",): False}
    # NaN figures are ignored: the others decide (inf: wrong) ...
    assert triton_ops.verdict(("c",), "k", [torch.tensor(math.inf), torch.tensor(math.nan)], 0.05)
    assert checked[("c",)] is False
    # ... and where all say nothing, the key is checked again at its next launches, then trusted
    for _ in range(triton_ops.CHECK_TRIES - 1):
        assert triton_ops.verdict(("d",), "k", [torch.tensor(math.nan)], 0.05) is None
        assert ("d",) not in checked and triton_ops.to_check(("d",))
    assert triton_ops.verdict(("d",), "k", [torch.tensor(math.nan)], 0.05) is None
    assert checked[("d",)] is True and not triton_ops.to_check(("d",))
    # trusted: a passed or unverified key, or an unchecked one outside a capture; not a failed one, nor an
    # unchecked one inside a capture (nothing verified what the graph would replay)
    assert triton_ops.trusted(("a",)) and triton_ops.trusted(("d",)) and not triton_ops.trusted(("b",))
    assert triton_ops.trusted(("new",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not triton_ops.trusted(("new",)) and triton_ops.trusted(("a",)) and not triton_ops.to_check(("new",))
    monkeypatch.setattr(triton_ops, "CHECK_FIRST_USE", False)
    assert triton_ops.trusted(("new",))
    assert not triton_ops.to_check(("a",)) and not triton_ops.failed(("a",)) and triton_ops.failed(("b",))


@pytest.mark.parametrize("budget", [1 << 30, 3 * 77 * 50 * 4])
def test_entropy_check_reference_is_the_entropy_and_its_gradient(budget, monkeypatch):
    """_entropy_reference, which the fused kernels are checked against: H of softmax(scale k q^T) per (batch,
    head, token) and w times its gradients for q and k, as float64 autograd gives them (w = -c scale for the loss
    c sum H), whole or a few heads at a time (CHECK_MAP_BYTES: here 3 heads a chunk, the last one short)."""
    from engine.adapters import lora2

    monkeypatch.setattr(lora2, "CHECK_MAP_BYTES", budget)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 5, 50, 8, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(2, 5, 7, 8, generator=g, dtype=torch.float64).requires_grad_()
    scale, c = 0.4, 0.3
    logp = torch.log_softmax(k @ q.transpose(-1, -2) * scale, -1)
    ent = -(logp.exp() * logp).sum(-1)  # (2, 5, 7)
    (c * ent.sum()).backward()
    got, dq, dk = lora2._entropy_reference(q.detach().bfloat16(), k.detach().bfloat16(), scale,
                                           torch.tensor(-c * scale))
    bq, bk = q.detach().bfloat16().double(), k.detach().bfloat16().double()  # the same rounded inputs
    logp = torch.log_softmax(bk @ bq.transpose(-1, -2) * scale, -1)
    assert torch.allclose(got.double(), -(logp.exp() * logp).sum(-1).reshape(10, 7), atol=1e-5)
    assert float((dq.double() - q.grad).norm() / q.grad.norm()) < 2e-2  # bf16 inputs against float64 ones
    assert float((dk.double() - k.grad).norm() / k.grad.norm()) < 2e-2
    assert dq.shape == q.shape and dk.shape == k.shape


@pytest.mark.parametrize("stage", ["forward", "backward"])
@pytest.mark.parametrize("kernel_device", _kernel_params(), indirect=True)
def test_kernel_fused_entropy_with_wrong_values_is_caught_at_its_first_use(kernel_device, stage, monkeypatch):
    """A fused entropy kernel whose values are off at some shapes (here the real kernel's H 1% high, or its q
    gradients 10% high) fails its first-use check against the torch maths: one warning, the score buffer and row
    kernels' values and gradients, and those sizes retired; the real kernels pass their checks."""
    from engine.adapters import triton_ops

    shape = (1, 200, 77, 2, 16)
    run = functools.partial(_two_layer_entropies, shape, kernel_device)

    monkeypatch.setattr(triton_ops, "FUSED_ENTROPY", False)
    ref_ent, ref_grads = run()  # the row kernels
    monkeypatch.setattr(triton_ops, "FUSED_ENTROPY", True)
    run()
    assert len(triton_ops._CHECKED) == 2 and all(triton_ops._CHECKED.values())  # the real kernels pass
    assert not triton_ops._FUSED_FAILED
    monkeypatch.setattr(triton_ops, "_CHECKED", {})
    name = "attn_entropy" if stage == "forward" else "attn_entropy_backward"
    real = getattr(triton_ops, name)

    def off(*args):
        out = real(*args)
        if stage == "forward":
            return out[0] * 1.01, out[1]
        return [d * 1.1 for d in out[0]], out[1]

    monkeypatch.setattr(triton_ops, name, off)
    with pytest.warns(RuntimeWarning, match=f"the {stage}: relative error"):
        got_ent, got_grads = run()
    if stage == "forward":
        assert torch.equal(got_ent, ref_ent)
    else:  # the fused forward's values (fp32 scores); the backward recomputes lse and H with the row kernels
        assert torch.allclose(got_ent, ref_ent, rtol=2e-3, atol=1e-5)
    for a, b in zip(got_grads, ref_grads, strict=True):
        assert torch.equal(a, b)
    q, k = _stacked_views(*shape, kernel_device, seed=0)[2:]
    assert not triton_ops.fused_entropy_ok(q, k)  # retired for these sizes
    assert False in triton_ops._CHECKED.values()


def test_fold_kernels_take_only_what_they_can(monkeypatch):
    """fold_ok refuses what the fold kernel cannot read (kernels forced usable on the CPU): a non-contiguous, non-fp32
    or not 16-byte aligned factor, mixed shapes, a rank over 1024, fp64 vectors; and FOLD_KERNELS = False (the
    ablation)."""
    from engine.adapters import triton_ops

    monkeypatch.setattr(triton_ops, "usable", lambda t: True)
    ups, vecs = [torch.zeros(8, 4)] * 2, [torch.zeros(4)] * 2
    assert triton_ops.fold_ok(ups, vecs)
    assert not triton_ops.fold_ok([torch.zeros(4, 8).t()] * 2, vecs)
    assert not triton_ops.fold_ok([u.bfloat16() for u in ups], vecs)
    assert not triton_ops.fold_ok([ups[0], torch.zeros(9, 4)], vecs)
    assert not triton_ops.fold_ok([ups[0], torch.zeros(33)[1:].view(8, 4)], vecs)  # 4 bytes off a 16-byte line
    assert not triton_ops.fold_ok([torch.zeros(2, 1025)], [torch.zeros(1025)])
    assert not triton_ops.fold_ok(ups, [v.double() for v in vecs])
    monkeypatch.setattr(triton_ops, "FOLD_KERNELS", False)
    assert not triton_ops.fold_ok(ups, vecs)


def test_triton_failure_falls_back_to_the_torch_form(monkeypatch):
    """A device where Triton's first kernel fails to compile or launch (no C compiler, say) gets one warning and
    the torch form from then on; inside a CUDA graph capture nothing is compiled or cached."""
    from engine.adapters import triton_ops

    calls = []

    def broken(z, scale=1.0):
        calls.append(z.device)
        raise RuntimeError("Failed to find C compiler")

    class FakeCuda:  # what usable() reads of a CUDA tensor
        is_cuda, dtype, device = True, torch.bfloat16, torch.device("cpu")

    monkeypatch.setattr(triton_ops, "triton", object())
    monkeypatch.setattr(triton_ops, "row_entropy", broken)
    monkeypatch.setattr(triton_ops, "_WORKS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert triton_ops.usable(FakeCuda()) is False and calls == [] and triton_ops._WORKS == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.warns(RuntimeWarning, match="C compiler"):
        assert triton_ops.usable(FakeCuda()) is False
    assert triton_ops.usable(FakeCuda()) is False and len(calls) == 1  # checked once per device
    monkeypatch.setattr(triton_ops, "_WORKS", {})  # a device where every kernel compiles: checked once, then used
    monkeypatch.setattr(triton_ops, "row_entropy", lambda z, scale=1.0: calls.append("fwd") or (z[:, 0], z[:, 0]))
    monkeypatch.setattr(triton_ops, "row_entropy_backward_", lambda *a: calls.append("bwd"))
    monkeypatch.setattr(triton_ops, "resize_slots", lambda *a, seed=None: calls.append(("resize", seed is not None)))
    monkeypatch.setattr(triton_ops, "adamw_slots", lambda *a: calls.append("adamw"))
    monkeypatch.setattr(triton_ops, "fold_vectors", lambda *a: calls.append("fold"))
    monkeypatch.setattr(triton_ops, "fold_vectors_backward", lambda *a: calls.append("fold bwd"))
    assert triton_ops.usable(FakeCuda()) is True and triton_ops.usable(FakeCuda()) is True
    # each kernel once; the resize not on the run's generator (the fused entropy kernels are checked per size at
    # their first use: test_kernel_fused_entropy_failure_falls_back_to_the_row_kernels)
    assert calls[1:] == ["fwd", "bwd", ("resize", True), "adamw", "fold", "fold bwd"]


def test_trainer_update_clips_through_slot_adamw_when_it_has_slots(monkeypatch):
    """The trainer's update hands the clip to SlotAdamW (one process, LoRA²'s slots) and to accelerate otherwise;
    both give the same step."""
    from types import SimpleNamespace

    from engine import train as train_module
    from engine.optim import SlotAdamW

    calls = []
    results = []
    for route in ("slot", "accelerate"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8))
        ad = inject(model, make_config("lora2", rank=2, max_rank=6, targets="0,1", lambda_e=0.0))
        opt = SlotAdamW(ad.param_groups(1e-2), slots=ad.optimizer_slots() if route == "slot" else None)
        acc = SimpleNamespace(num_processes=1, clip_grad_norm_=lambda ps, n: calls.append("acc") or
                              torch.nn.utils.clip_grad_norm_(list(ps), n))
        real = opt.clip_grad_norm_
        monkeypatch.setattr(opt, "clip_grad_norm_", lambda n, real=real: calls.append("slot") or real(n))
        s = SimpleNamespace(acc=acc, optimizer=SimpleNamespace(optimizer=opt, step=opt.step, zero_grad=opt.zero_grad),
                            adapters=ad, graphed=None)
        ad.before_step(0, opt, sync=True)
        (model(torch.randn(3, 16, generator=torch.Generator().manual_seed(1))).pow(2).mean() * 100).backward()
        train_module._update(s, SimpleNamespace(max_grad_norm=1e-3))
        results.append([p.detach().clone() for p in ad.parameters()])
    assert calls == ["slot", "acc"]
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
