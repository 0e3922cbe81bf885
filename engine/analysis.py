"""Pure torch maths for rank analysis: batched cheap SVD of low-rank updates, effective rank, rank choice,
truncation."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

CRITERIA = ("energy", "sv_ratio", "sv_cumulative", "sv_fro")


@dataclass(frozen=True)
class Spectrum:
    """Thin SVD of one layer's update dW = U diag(S) V^T (U: d x r, S: r, V: k x r), S descending."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def cheap_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of dW = up @ down without forming d x k: QR of both factors, SVD of the r x r core (METHODS.md).

    up: (..., d, r), down: (..., r, k) -> U (..., d, r), S (..., r), V (..., k, r). Cost O((d + k) r^2).
    """
    up, down = up.float(), down.float()
    qb, rb = torch.linalg.qr(up)  # (..., d, r), (..., r, r)
    qa, ra = torch.linalg.qr(down.transpose(-1, -2))  # (..., k, r), (..., r, r)
    uc, s, vch = torch.linalg.svd(rb @ ra.transpose(-1, -2), full_matrices=False)  # core r x r
    return qb @ uc, s, qa @ vch.transpose(-1, -2)


def gram_svd(up: torch.Tensor, down: torch.Tensor, eig_device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cheap_svd without QR, for r <= min(d, k): Gram matrices, one Cholesky and one r x r eigh per layer, in fp64.

    down down^T = L L^T (Cholesky, a tiny jitter for rank-deficient A), so dW = (up L) Q with Q = L^-1 down having
    orthonormal rows; eigh((up L)^T (up L)) = W diag(S^2) W^T gives S, V = Q^T W and U = up L W / S. Batched
    QR and batched r x r SVD loop over the matrices on CUDA (one solver call each); Gram products and Cholesky
    are truly batched, and the eigh can run where it is cheapest (`eig_device`, e.g. the CPU for r > 32).
    fp64 keeps the squared condition number harmless: S is accurate to ~1e-8 of the largest value. Columns of
    U and V for zero singular values are zero (they carry no energy).
    """
    dev = up.device
    up64, down64 = up.double(), down.double()
    ga = down64 @ down64.transpose(-1, -2)  # (..., r, r)
    gb = up64.transpose(-1, -2) @ up64
    r = ga.shape[-1]
    eye = torch.eye(r, dtype=ga.dtype, device=dev)
    trace = ga.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    jitter = 1e-13 * trace + torch.finfo(torch.float64).tiny
    L, _ = torch.linalg.cholesky_ex(ga + jitter * eye)
    m = L.transpose(-1, -2) @ gb @ L  # (up L)^T (up L), symmetric PSD
    m = (m + m.transpose(-1, -2)) / 2
    target = dev if eig_device is None else torch.device(eig_device)
    s2, W = torch.linalg.eigh(m.to(target))
    s2, W = s2.flip(-1).to(dev), W.flip(-1).to(dev)  # descending
    S = s2.clamp_min(0).sqrt()
    keep = S > S[..., :1] * 1e-7
    inv_s = torch.where(keep, 1 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
    V = down64.transpose(-1, -2) @ torch.linalg.solve_triangular(L.transpose(-1, -2), W, upper=True)
    U = (up64 @ (L @ W)) * inv_s[..., None, :]
    V = V * keep[..., None, :]
    S = torch.where(keep, S, torch.zeros_like(S))
    return U.float(), S.float(), V.float()


def eig_device_for(rank: int, device: torch.device) -> torch.device:
    """Where gram_svd's r x r eigh is cheapest: CUDA batches it for r <= 32 (syevj) but loops above that."""
    return torch.device("cpu") if device.type == "cuda" and rank > 32 else device


def grouped_spectra(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], route: str = "auto"
                    ) -> list[tuple[list[str], Spectrum]]:
    """Cheap SVD of many layers at once: layers whose (d, r, k) agree go through one batched call.

    Returns (names, Spectrum of stacked tensors: U (n, d, r'), S (n, r'), V (n, k, r')) per group.
    route: "qr" (cheap_svd), "gram" (gram_svd where r <= min(d, k), every real adapter; QR otherwise) or "auto":
    gram on CUDA, where batched QR and SVD loop over the matrices, QR elsewhere (fp64 products cost more on a CPU).
    """
    out = []
    for names, ups, downs, gram in _stacked_groups(factors, route):
        if gram:
            out.append((names, Spectrum(*gram_svd(ups, downs, eig_device_for(ups.shape[-1], ups.device)))))
        else:
            out.append((names, Spectrum(*cheap_svd(ups, downs))))
    return out


def _shape_groups(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[tuple, list[str]]:
    """Layer names grouped by (up shape, down shape, device): the layers one batched call can take."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, (up, down) in factors.items():
        groups[(tuple(up.shape), tuple(down.shape), up.device)].append(name)
    return groups


def _stacked_groups(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], route: str):
    """(names, stacked ups, stacked downs, whether the gram route applies) per shape group."""
    if route not in ("auto", "qr", "gram"):
        raise ValueError(f"route must be auto, qr or gram, got {route!r}")
    for (ushape, dshape, device), names in _shape_groups(factors).items():
        d, r, k = ushape[0], ushape[1], dshape[1]
        gram = (route == "gram" or (route == "auto" and device.type == "cuda")) and r <= min(d, k)
        yield (names, torch.stack([factors[n][0].detach() for n in names]),
               torch.stack([factors[n][1].detach() for n in names]), gram)


def grams(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down down^T, up^T up) in fp64, (..., r, r) each: all that the singular values of up @ down depend on."""
    up64, down64 = up.double(), down.double()
    return down64 @ down64.transpose(-1, -2), up64.transpose(-1, -2) @ up64


def singular_values_from_grams(ga: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
    """S (..., r), descending, of up @ down from grams(up, down): ga = L L^T (Cholesky, a tiny jitter for a
    rank-deficient down), S^2 = eigenvalues of L^T gb L. Values below 1e-7 of the largest are set to zero."""
    bad = ~(torch.isfinite(ga).all(-1).all(-1) & torch.isfinite(gb).all(-1).all(-1))  # a diverged layer: rank 0
    if bool(bad.any()):
        ga, gb = (torch.where(bad[..., None, None], torch.zeros_like(g), g) for g in (ga, gb))
    eye = torch.eye(ga.shape[-1], dtype=ga.dtype, device=ga.device)
    jitter = 1e-13 * ga.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] + torch.finfo(torch.float64).tiny
    L, _ = torch.linalg.cholesky_ex(ga + jitter * eye)
    m = L.transpose(-1, -2) @ gb @ L
    S = torch.linalg.eigvalsh((m + m.transpose(-1, -2)) / 2).flip(-1).clamp_min(0).sqrt()
    return torch.where(S > S[..., :1] * 1e-7, S, torch.zeros_like(S)).float()


def gram_singular_values(up: torch.Tensor, down: torch.Tensor, eig_device: torch.device | str | None = None
                         ) -> torch.Tensor:
    """gram_svd's S alone (descending): fp64 Gram products, then Cholesky and eigenvalues (on `eig_device`)."""
    ga, gb = grams(up, down)
    if eig_device is not None:
        ga, gb = ga.to(eig_device), gb.to(eig_device)
    return singular_values_from_grams(ga, gb).to(up.device)


def grouped_grams(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], chunk_bytes: int = 64 << 20
                  ) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(names, ga (n, r, r), gb (n, r, r)) per shape group, on the factors' device, with no host sync. Stacked
    and cast to fp64 a chunk of layers at a time (at most `chunk_bytes` of fp64 factors), so that a rank log
    during training adds little to the peak memory."""
    out = []
    for (ushape, dshape, _), names in _shape_groups(factors).items():
        step = max(1, chunk_bytes // (8 * (ushape[0] * ushape[1] + dshape[0] * dshape[1])))
        parts = [grams(torch.stack([factors[n][0].detach() for n in names[i:i + step]]),
                       torch.stack([factors[n][1].detach() for n in names[i:i + step]]))
                 for i in range(0, len(names), step)]
        out.append((names, torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])))
    return out


@dataclass
class RankProbe:
    """A rank log's inputs (AdapterSet.rank_probe): per shape group the layers' Gram matrices, and the native ranks
    as host ints or as a tensor in `order`. Made on the device without a host sync; `tensors()` can be copied
    to the host asynchronously and put back with `with_tensors`; `finish` reads them."""

    order: list[str]
    groups: list[tuple[list[str], torch.Tensor, torch.Tensor]]
    native: dict[str, int] | torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        out = [t for _, ga, gb in self.groups for t in (ga, gb)]
        return out + ([self.native] if torch.is_tensor(self.native) else [])

    def with_tensors(self, tensors: list[torch.Tensor]) -> RankProbe:
        it = iter(tensors)
        groups = [(names, next(it), next(it)) for names, _, _ in self.groups]
        return RankProbe(self.order, groups, next(it) if torch.is_tensor(self.native) else self.native)

    def finish(self, tau: float) -> tuple[dict[str, int], dict[str, int]]:
        """(effective r_tau, native rank) per layer, in `order`."""
        eff: dict[str, int] = {}
        for names, ga, gb in self.groups:
            eff.update(zip(names, map(int, energy_rank(singular_values_from_grams(ga, gb), tau).tolist()),
                           strict=True))
        native = self.native
        if torch.is_tensor(native):
            native = dict(zip(self.order, map(int, native.tolist()), strict=True))
        return {n: eff[n] for n in self.order}, {n: int(native[n]) for n in self.order}


def grouped_singular_values(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], route: str = "auto"
                            ) -> list[tuple[list[str], torch.Tensor]]:
    """grouped_spectra's S alone ((names, S (n, r')) per shape group): what rank curves need, at a fraction of
    the cost (no U or V; on the QR route only the R factors and singular values of the r x r core)."""
    out = []
    for names, ups, downs, gram in _stacked_groups(factors, route):
        ups, downs = ups.float(), downs.float()
        if gram:
            out.append((names, gram_singular_values(ups, downs, eig_device_for(ups.shape[-1], ups.device))))
        else:
            rb = torch.linalg.qr(ups, mode="r")[1]
            ra = torch.linalg.qr(downs.transpose(-1, -2), mode="r")[1]
            out.append((names, torch.linalg.svdvals(rb @ ra.transpose(-1, -2))))
    return out


def batched_spectra(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], route: str = "auto"
                    ) -> dict[str, Spectrum]:
    """grouped_spectra split into one Spectrum per layer (views into the group tensors)."""
    return {n: Spectrum(sp.U[i], sp.S[i], sp.V[i])
            for names, sp in grouped_spectra(factors, route=route) for i, n in enumerate(names)}


def energy_rank(S: torch.Tensor, tau: float) -> torch.Tensor:
    """r_tau = min{j : sum_{i<=j} s_i^2 >= tau * sum s_i^2} over the last dim (0 for an all-zero spectrum)."""
    check_tau(tau)
    e = S.float().pow(2)
    total = e.sum(-1, keepdim=True)
    frac = e.cumsum(-1) / total.clamp_min(torch.finfo(torch.float32).tiny)
    # tolerance so that tau = 1 keeps every non-zero component despite rounding
    k = (frac < tau - 1e-6).sum(-1) + 1
    k = torch.minimum(k, (S > 0).sum(-1))
    return torch.where(total.squeeze(-1) > 0, k, torch.zeros_like(k))


def check_tau(tau: float) -> None:
    """Reject tau outside (0, 1] with a message that names the value."""
    if not isinstance(tau, (int, float)) or not (0.0 < float(tau) <= 1.0):
        raise ValueError(f"tau must be in (0, 1] (the fraction of each layer's energy kept), got {tau!r}")


def keep_count(S: torch.Tensor, criterion: str = "energy", value: float = 0.9, kohya_compat: bool = False) -> int:
    """How many components of one descending spectrum S a pruning criterion keeps (at least 1).

    energy: cumulative s^2 fraction >= value (tau). sv_ratio: s_i > s_0 / value. sv_cumulative: cumulative s
    fraction >= value. sv_fro: cumulative s^2 fraction >= value^2. kohya_compat reproduces sd-scripts'
    resize_lora, which keeps one component more than the minimum (and clamps its index to len(S) - 1 first).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    S = S.detach().float().cpu()
    n = S.numel()
    if n == 0 or float(S[0]) <= 0:
        return 1
    if criterion == "energy":
        k = int(energy_rank(S, value))
    elif criterion == "sv_ratio":
        if value < 1:
            raise ValueError(f"sv_ratio needs a ratio >= 1 (largest / smallest kept), got {value!r}")
        k = int((S > S[0] / value).sum())
    else:
        if not 0 < value <= 1:
            raise ValueError(f"{criterion} needs a fraction in (0, 1], got {value!r}")
        w = S if criterion == "sv_cumulative" else S.pow(2)
        target = value if criterion == "sv_cumulative" else value**2
        frac = w.cumsum(0) / w.sum()
        k = int((frac < target - 1e-7).sum()) + 1
    if kohya_compat:
        # sd-scripts: index = count (+0 for ratio, searchsorted+1 for the cumulative rules), clamped to
        # [1, len - 1], then new_rank = index + 1.
        return max(1, min(k, n - 1)) + 1
    return max(1, min(k, n))


def choose_ranks(
    spectra: Mapping[str, Spectrum],
    tau: float | None = None,
    rank: int | None = None,
    cap: int | None = None,
    criterion: str = "energy",
    value: float | None = None,
    kohya_compat: bool = False,
) -> dict[str, int]:
    """Per-layer rank: a fixed `rank`, or the criterion (energy `tau` by default), floored at 1, capped at `cap`."""
    if rank is not None:
        check_rank(rank)
    if cap is not None:
        check_rank(cap, what="rank cap")
    if rank is None and tau is None and value is None:
        raise ValueError("choose_ranks needs a fixed rank, a tau, or a criterion value")
    if tau is not None:
        check_tau(tau)
    out = {}
    for name, sp in spectra.items():
        if rank is not None:
            k = rank
        else:
            v = tau if criterion == "energy" and value is None else value
            k = keep_count(sp.S, criterion, v, kohya_compat)
        k = min(k, sp.S.numel())
        if cap is not None:
            k = min(k, cap)
        out[name] = max(1, k)
    return out


def check_rank(rank, what: str = "rank") -> None:
    """Reject a rank that is not a positive integer, naming the value."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{what} must be a positive integer, got {rank!r}")


def truncate(sp: Spectrum, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain LoRA factors of the best rank-k approximation: up = U_k S_k (d x k), down = V_k^T (k x d_in)."""
    k = max(1, min(int(k), sp.S.numel()))
    return sp.U[:, :k] * sp.S[:k], sp.V[:, :k].T.contiguous()


def kept_energy(sp: Spectrum, k: int) -> float:
    """Fraction of ||dW||_F^2 kept by the top-k components (1.0 for a zero update)."""
    e = sp.S.float().pow(2)
    total = float(e.sum())
    return 1.0 if total == 0 else float(e[:k].sum()) / total


def truncate_all(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    tau: float | None = None,
    rank: int | None = None,
    cap: int | None = None,
    criterion: str = "energy",
    value: float | None = None,
    kohya_compat: bool = False,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, int], float]:
    """Truncate every layer to a plain per-layer-rank LoRA; returns factors, ranks and the kept energy fraction."""
    spectra = batched_spectra(factors)
    ranks = choose_ranks(spectra, tau=tau, rank=rank, cap=cap, criterion=criterion, value=value,
                         kohya_compat=kohya_compat)
    out = {name: truncate(sp, ranks[name]) for name, sp in spectra.items()}
    total = sum(float(sp.S.float().pow(2).sum()) for sp in spectra.values())
    kept = sum(float(sp.S[: ranks[n]].float().pow(2).sum()) for n, sp in spectra.items())
    return out, ranks, (1.0 if total == 0 else kept / total)


def lora_param_count(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int]) -> int:
    """Parameters of a plain LoRA with per-layer ranks: sum r (d + k) (+1 alpha scalar per layer)."""
    return sum(ranks[n] * (d + k) + 1 for n, (d, k) in shapes.items())
