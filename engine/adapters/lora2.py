"""LoRA² (Shenaj, Errica, Carta 2026): each layer learns its rank through an exponential importance over rank index.

Implemented from the formulas in METHODS.md (adaptive-width framework of Errica et al.). Buffers keep the
maximum rank R_max and a mask marks the first D slots, so a changing rank never changes a tensor shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from engine.adapters import triton_ops
from engine.adapters.base import AdapterConfig, AdapterLayer, AdapterSet, StackLeaves, _versions, opt
from engine.adapters.registry import Method, register


@dataclass
class LoRA2Config(AdapterConfig):
    method = "lora2"
    max_rank: int = opt(64, "R_max: the largest rank a layer may grow to (buffer size).", min=1)
    q: float = opt(0.9, "Quantile of the importance distribution that sets the rank D.", min=0.5, max=0.999)
    lambda_r: float = opt(1e-4, "Weight of the rank regulariser sum |nu - nu_t| (pulls ranks towards `rank`).",
                          min=0.0)
    lambda_e: float = opt(1e-4, "Weight of the cross-attention entropy term (0 turns it off).", min=0.0)
    normalise: bool = opt(False, "Renormalise the importance weights over the kept ranks (adaptive-width code).")
    init_c: float = opt(1.0, "c of the rescaled Kaiming init A ~ N(0, c / (k * sum Lambda^2)).", min=0.0)
    rho_lr: float = opt(1e-2, "Learning rate of the per-layer rank parameters rho (their own optimizer group).",
                        min=0.0)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.max_rank, int) or self.max_rank < self.rank:
            raise ValueError(f"max_rank must be an integer >= rank ({self.rank}), got {self.max_rank!r}")
        if not 0 < self.q < 1:
            raise ValueError(f"q must be in (0, 1), got {self.q!r}")
        for name in ("lambda_r", "lambda_e", "init_c", "rho_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


# --- pure maths ---------------------------------------------------------------------------------------------
def importance(nu: torch.Tensor, size: int) -> torch.Tensor:
    """f(j; nu) = exp(-nu j) (1 - exp(-nu)) for j = 0..size-1 (a discretised exponential; sums to 1 over j >= 0)."""
    j = torch.arange(size, device=nu.device, dtype=nu.dtype)
    return torch.exp(-nu * j) * (-torch.expm1(-nu))


def slot_weights(nus: torch.Tensor, masks: torch.Tensor, max_rank: int, normalise: bool) -> torch.Tensor:
    """Importance weights of n layers' R_max slots, (n, R): f(j; nu_i) on each layer's active slots (masks (n, R)),
    zero elsewhere, renormalised over the active ones if asked (LoRA2Layer.lambdas of a whole set at once)."""
    lam = importance(nus[:, None], max_rank) * masks
    return lam / lam.sum(1, keepdim=True) if normalise else lam


def rank_from_nu(nu: torch.Tensor, q: float, max_rank: int) -> torch.Tensor:
    """D = clamp(ceil(-ln(1 - q) / nu), 1, R_max) (the q-quantile of the importance distribution)."""
    return torch.clamp(torch.ceil(-math.log1p(-q) / nu - 1e-4), 1, max_rank).long()


def nu_for_rank(rank: float, q: float) -> float:
    """nu_t = -ln(1 - q) / r_t: the rate whose quantile is the target rank."""
    return -math.log1p(-q) / rank


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


# --- the layer ---------------------------------------------------------------------------------------------
class LoRA2Layer(AdapterLayer):
    def __init__(self, base: nn.Module, config: LoRA2Config, generator: torch.Generator | None = None):
        super().__init__(base, config, generator)
        R, r0 = config.max_rank, config.rank
        self.q = config.q
        self.nu_target = nu_for_rank(r0, config.q)
        self.lora_A = nn.Parameter(torch.zeros(R, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, R))
        self.rho = nn.Parameter(torch.tensor(inverse_softplus(self.nu_target)))
        self.register_buffer("active", torch.arange(R) < r0)
        self._rank_cache: tuple = (None, r0)  # ((active's version, storage), D): native_rank without a sync
        self._lam: tuple | None = None  # (weights, rho version, rank version) set by LoRA2Set at each model forward
        std = self.init_std()
        self.lora_A.data[:r0] = torch.randn(r0, self.in_features, generator=generator) * std

    @property
    def nu(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def lambdas(self) -> torch.Tensor:
        """Importance weights of the R_max slots, zero outside the active rank D (renormalised if asked)."""
        lam = importance(self.nu, self.config.max_rank) * self.active
        if self.config.normalise:
            lam = lam / lam.sum()
        return lam

    def init_std(self) -> float:
        """Rescaled Kaiming: std^2 = c / (k * sum_j Lambda_j^2) over the active slots."""
        with torch.no_grad():
            lam2 = float(self.lambdas().float().pow(2).sum())
        return math.sqrt(self.config.init_c / (self.in_features * max(lam2, 1e-12)))

    def down_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B

    def vector(self) -> torch.Tensor:
        return self.lambdas()

    def forward_vector(self) -> torch.Tensor:
        """Inside a model forward the set has computed every layer's weights in one batched op (see LoRA2Set)."""
        # kept after the forward so that a gradient-checkpointing recompute sees the very same tensor;
        # a change of rho or of the rank since then makes it stale
        # (inside torch.compile the set has just made them for this forward: reading the version counters there
        # would make them guards, and a recompile every step)
        if self._lam is not None and (torch.compiler.is_compiling()
                                      or self._lam[1:] == (self.rho._version, self.active._version)):
            return self._lam[0]
        return self.lambdas()

    def fold_key(self) -> tuple:
        return (*super().fold_key(), self.active._version)

    def native_rank(self) -> int:
        """D, the number of active slots: kept on the host and re-read (a device sync) only if the mask changed."""
        key = (self.active._version, self.active.data_ptr())
        if self._rank_cache[0] != key:
            self._rank_cache = (key, int(self.active.sum()))
        return self._rank_cache[1]

    def continuous_rank(self) -> float:
        return float(-math.log1p(-self.q) / self.nu)

    @torch.no_grad()
    def set_rank(self, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the active rank to D: new A rows follow the init rule, new B columns are zero (output unchanged);
        dropped slices are zeroed. Returns the (grown, shrunk) slot masks."""
        old = self.active.clone()
        resize_layers([self], [new_rank])
        return self.active & ~old, old & ~self.active


# resize_layers works on chunks of layers whose stacked fp32 factors fit in this. It runs before the forward, when
# the step's activations are freed, so its temporaries are not at the step's peak: 64 MB chunks cost SDXL r64
# ~1.4 ms a step for 0.06 GiB less peak (H200); 1 GB leaves SDXL unchunked and bounds a huge model's temporaries
RESIZE_CHUNK_BYTES = 1 << 30


@torch.no_grad()
def resize_layers(layers: list[LoRA2Layer], ranks: list[int] | torch.Tensor,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
    """Set the active rank of same-shape layers in a few batched ops, with no host sync: new A rows drawn with the
    init rule (from the new mask), B columns of new slots zero (output unchanged), dropped slots zeroed, and the
    optimizer moments of every slot that appeared or disappeared zeroed. All writes are in place. `ranks`: host
    ints, or a device tensor (n,) that is never read on the host (layers whose D did not move are left as they
    are by the masks)."""
    first = layers[0]
    dev, R = first.active.device, first.config.max_rank
    moments = _slot_moments(optimizer, layers) if triton_ops.usable(first.lora_A) else None
    if moments is not None:  # CUDA: one kernel rewrites only the moved slots of the whole group
        _resize_in_kernel(layers, ranks, moments)
        return
    step = max(1, RESIZE_CHUNK_BYTES // (R * (first.in_features + first.out_features) * 4))
    if len(layers) > step:  # bounded temporaries: the trainer resizes every layer each step, outside its graphs
        for i in range(0, len(layers), step):
            resize_layers(layers[i:i + step], ranks[i:i + step], optimizer)
        return
    new, old = _set_masks(layers, ranks)
    grown, keep = new & ~old, ~(new ^ old)
    std = _init_stds(layers, new)
    a = torch.stack([layer.lora_A for layer in layers])  # (n, R, k)
    fresh = torch.randn(a.shape, device=dev) * std[:, None, None]
    a = torch.where(grown[:, :, None], fresh.to(a.dtype), a * keep[:, :, None])
    b = torch.stack([layer.lora_B for layer in layers]) * keep[:, None, :]
    torch._foreach_copy_([layer.lora_A for layer in layers] + [layer.lora_B for layer in layers],
                         list(a.unbind(0)) + list(b.unbind(0)))
    copied = [layer._shadow is not None for layer in layers]  # A's compute copies the next forward reads
    if any(copied):
        torch._foreach_copy_([layer._shadow[1] for layer, c in zip(layers, copied, strict=True) if c],
                             [row for row, c in zip(a.unbind(0), copied, strict=True) if c])
    _note_resized(layers, ranks, copied)
    if optimizer is not None:
        _reset_slots(optimizer, [layer.lora_A for layer in layers], keep[:, :, None])
        _reset_slots(optimizer, [layer.lora_B for layer in layers], keep[:, None, :])


def _set_masks(layers: list[LoRA2Layer], ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """Write every layer's active mask for its new rank; returns the new and old masks (n, R)."""
    first = layers[0]
    new = torch.arange(first.config.max_rank, device=first.active.device) < \
        torch.as_tensor(ranks, device=first.active.device)[:, None]
    old = torch.stack([layer.active for layer in layers])
    # one foreach copy per dtype: a list that mixes bool and float takes the slow path (a memcpy per tensor)
    torch._foreach_copy_([layer.active.view(torch.uint8) for layer in layers], list(new.view(torch.uint8).unbind(0)))
    return new, old


def _note_resized(layers: list[LoRA2Layer], ranks, copied: list[bool]) -> None:
    """Host bookkeeping after a resize: each layer's cached rank (when the ranks are host ints) and, for each
    compute copy of A the resize rewrote with A (`copied`), a key that marks it current."""
    R = layers[0].config.max_rank
    for i, layer in enumerate(layers):
        if not torch.is_tensor(ranks):
            layer._rank_cache = ((layer.active._version, layer.active.data_ptr()), int(min(max(ranks[i], 0), R)))
        if copied[i]:
            key, down_c, up_c = layer._shadow
            layer._shadow = ((key[0], *_versions(layer.lora_A, None)), down_c, up_c)


def _init_stds(layers: list[LoRA2Layer], new: torch.Tensor, nus: torch.Tensor | None = None,
               fan_in: torch.Tensor | int | None = None) -> torch.Tensor:
    """The init rule's std of each layer's new A rows, from its importance weights over the new mask (n, R).
    nus: the layers' softplus(rho) if already at hand; fan_in: their in_features (a tensor (n,) for layers of
    several shapes), by default the first layer's."""
    c = layers[0].config
    if nus is None:
        nus = F.softplus(torch.stack([layer.rho for layer in layers]))
    lam = slot_weights(nus, new, c.max_rank, c.normalise)
    k = layers[0].in_features if fan_in is None else fan_in
    return (c.init_c / (k * lam.float().pow(2).sum(1).clamp_min(1e-12))).sqrt()  # (n,)


def _slot_moments(optimizer: torch.optim.Optimizer | None, layers: list[LoRA2Layer]) -> tuple | None:
    """The optimizer moments the resize kernel zeroes, per state key: ([A's of every layer], ...), ([B's], ...)
    (empty for a factor whose moments do not all exist yet, as before the first optimizer step); None when the
    kernel cannot take this group: factors or moments not fp32, contiguous and on the factor's device, or
    compute copies of A in another dtype than one shared bf16 or fp16."""
    a = [layer.lora_A for layer in layers]
    b = [layer.lora_B for layer in layers]
    if any(p.dtype != torch.float32 or not p.is_contiguous() for p in a + b):
        return None
    copies = {(sh[1].dtype, sh[1].device, sh[1].is_contiguous()) for sh in (layer._shadow for layer in layers)
              if sh is not None}
    if len(copies) > 1 or any(c[0] not in (torch.bfloat16, torch.float16) or c[1] != a[0].device or not c[2]
                              for c in copies):
        return None
    out = []
    for part in (a, b):
        states = [optimizer.state.get(p) for p in part] if optimizer is not None else []
        if not states or not all(states):
            out.append([])
            continue
        lists = []
        for key, v in states[0].items():
            if not (torch.is_tensor(v) and v.shape == part[0].shape):
                continue  # the step count and other scalars
            ms = [st.get(key) for st in states]
            if any(m is None or m.dtype != torch.float32 or not m.is_contiguous() or m.shape != p.shape
                   or m.device != p.device for m, p in zip(ms, part, strict=True)):
                return None
            lists.append(ms)
        out.append(lists)
    return tuple(out)


def _resize_in_kernel(layers: list[LoRA2Layer], ranks, moments: tuple, plan: tuple | None = None) -> None:
    """resize_layers' CUDA form: masks by one foreach copy, then triton_ops.resize_slots rewrites the slots that
    moved (no stacked copies of the factors or moments; nothing read on the host). plan: (old D, new D, std,
    seed) of these layers, masks already written (LoRA2Set.before_step, all groups at once)."""
    if plan is None:
        new, old = _set_masks(layers, ranks)
        old_d, new_d, std, seed = old.sum(1), new.sum(1), _init_stds(layers, new), None
    else:
        old_d, new_d, std, seed = plan
    # a compute copy is rewritten with its slots only if it was current: one made before A last changed stays
    # stale (its key no longer matches) and is re-cast where it is next used
    fresh = [layer._shadow is not None and layer._shadow[0][1:] == _versions(layer.lora_A, None) for layer in layers]
    shadows = [layer._shadow[1] if ok else None for layer, ok in zip(layers, fresh, strict=True)]
    a = [layer.lora_A for layer in layers]
    b = [layer.lora_B for layer in layers]
    triton_ops.resize_slots(old_d, new_d, std, a, b, shadows, *moments, seed=seed)
    try:  # changed behind autograd's back
        torch.autograd.graph.increment_version(a + b)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in a + b:
            torch.autograd.graph.increment_version(t)
    _note_resized(layers, ranks, fresh)


def _reset_slots(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], keep: torch.Tensor) -> None:
    """Zero the optimizer moments outside `keep` ((n, R, 1) rows of A or (n, 1, R) columns of B), in place."""
    states = [optimizer.state.get(p) for p in params]
    if not all(states):  # before the first optimizer step there is nothing to reset
        return
    for key, value in states[0].items():
        if torch.is_tensor(value) and value.shape == params[0].shape:
            moments = [st[key] for st in states]
            torch._foreach_copy_(moments, list((torch.stack(moments) * keep).unbind(0)))


# --- cross-attention entropy -------------------------------------------------------------------------------
def attention_entropy(q: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of each text token's attention map over the N image positions.

    q: (B, h, N, hd) image queries, ks: (B, h, T, hd) text keys already multiplied by the attention scale. The
    scores are formed as ks q^T, (B, h, T, N), so the softmax over image positions runs along the contiguous last
    dimension (fast kernels, no transpose). A text-side attention mask adds one constant per token and so does not
    change these maps. GroupEntropy computes the same for many layers at once.
    """
    logp = (ks @ q.transpose(-1, -2)).log_softmax(-1, dtype=_softmax_dtype(q))
    return -(logp.exp() * logp).sum(-1).mean()


def token_entropy(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """attention_entropy over log N, in [0, 1] (the scale goes on the small key side)."""
    return attention_entropy(q, k * scale) / math.log(max(q.shape[-2], 2))


def _scores(qs: tuple[torch.Tensor, ...], ks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """k q^T of L same-shape layers (each q (B, h, N, hd), k (B, h, T, hd), unscaled) -> (L * B * h, T, N) in q's
    dtype: one GEMM per layer and batch item into one buffer. The processor's q and k are head views of (B, S, h *
    hd) projections, which a batched GEMM reads in place: stacking them first copied ~0.4 GB a step on SDXL."""
    b, h, n, _ = qs[0].shape
    out = qs[0].new_empty(len(qs), b, h, ks[0].shape[2], n)
    for i, (q, k) in enumerate(zip(qs, ks, strict=True)):
        for j in range(b):
            torch.bmm(k[j], q[j].transpose(1, 2), out=out[i, j])
    return out.view(-1, *out.shape[-2:])


def _scores_grads(dz: torch.Tensor, qs: tuple[torch.Tensor, ...], ks: tuple[torch.Tensor, ...], w: torch.Tensor):
    """Gradients of the _scores layout for w_l dz (dz (L * B * h, T, N), w (L,)): dq = w_l dz^T k and dk = w_l dz q
    per layer, written in the (B, S, h * hd) layout of the projections they flow back into (no copies on the way),
    returned as q- and k-shaped views. w multiplies the products, not dz: w dz (~1e-12 at LoRA²'s lambda_e) would
    flush to zero in fp16."""
    b, h, n, hd = qs[0].shape
    t = ks[0].shape[2]
    dz = dz.view(len(qs), b, h, t, n)
    dq = qs[0].new_empty(len(qs), b, n, h, hd)
    dk = ks[0].new_empty(len(ks), b, t, h, hd)
    for i, (q, k) in enumerate(zip(qs, ks, strict=True)):
        for j in range(b):
            torch.bmm(dz[i, j].transpose(1, 2), k[j], out=dq[i, j].transpose(0, 1))
            torch.bmm(dz[i, j], q[j], out=dk[i, j].transpose(0, 1))
    w = w.view(-1, 1, 1, 1, 1)
    return dq.mul_(w).transpose(2, 3).unbind(0), dk.mul_(w).transpose(2, 3).unbind(0)


def _log_maps(qs, ks, scale: float) -> torch.Tensor:
    """log softmax over image positions of scale * _scores (L * B * h, T, N), in at least fp32."""
    return torch.log_softmax(_scores(qs, ks) * scale, -1, dtype=_softmax_dtype(qs[0]))


def _softmax_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)  # bf16 maps in fp32, float64 (the tests) stays float64


def _fused(fn, qs, ks, *args, check=None, rtol: float = 0.0, what: str = ""):
    """fn(qs, ks, *args), a fused entropy kernel, or None where it raised outside a graph capture (these sizes
    could not compile or get their resources on this GPU: triton_ops.fused_failed warns and retires them), where
    its first result at these shapes is not within rtol of the torch maths (check(out) -> one triton_ops.rel_error
    per layer, see _entropy_reference; what names the kernel in the warning), or inside a capture before any
    check (triton_ops.trusted: the score-buffer path goes into the graph instead)."""
    key = None
    if check is not None:
        key = ("entropy", what, qs[0].device, qs[0].dtype, qs[0].shape, ks[0].shape, qs[0].stride(),
               ks[0].stride(), len(qs))
        if not triton_ops.to_check(key) and not triton_ops.trusted(key):
            return None
    try:
        out = fn(qs, ks, *args)
    except torch.OutOfMemoryError:
        raise  # not these sizes' fault (and the score-buffer path needs more memory, not less)
    except Exception as e:  # noqa: BLE001 - a compile, resource or launch failure: the score-buffer path instead
        if triton_ops.capturing():
            raise  # the trainer falls back to eager steps, which come back here
        triton_ops.fused_failed(qs[0], ks[0], e)
        return None
    if key is not None and triton_ops.to_check(key):
        wrong = triton_ops.verdict(key, what, check(out), rtol)
        if wrong:
            triton_ops.fused_failed(qs[0], ks[0], ValueError(wrong))
            return None
    return out


CHECK_MAP_BYTES = 16 << 20  # fp32 score maps per chunk of heads in _entropy_reference (transient, first use only)


def _entropy_reference(q: torch.Tensor, k: torch.Tensor, scale: float, w: torch.Tensor | None = None):
    """One layer's row entropies of softmax(scale k q^T) over image positions from fp32 copies of q (B, h, N, hd)
    and k (B, h, T, hd) -> (H (B * h, T), and with w the gradients w g^T k and w g q, g = p (log p + H), shaped as
    q and k): the plain torch maths the fused kernels are checked against at their first use, a few heads at a
    time (maps of at most CHECK_MAP_BYTES each: the forward's check runs while the step's activations are held)."""
    b, h, n, hd = q.shape
    t = k.shape[2]
    qf, kf = q.reshape(b * h, n, hd), k.reshape(b * h, t, hd)
    step = max(1, CHECK_MAP_BYTES // (t * n * 4))
    ents, dqs, dks = [], [], []
    for i in range(0, b * h, step):
        qc, kc = qf[i:i + step].float(), kf[i:i + step].float()
        logp = torch.log_softmax(torch.bmm(kc, qc.transpose(1, 2)) * scale, -1)
        p = logp.exp()
        ent = -(p * logp).sum(-1)
        ents.append(ent)
        if w is not None:
            g = p.mul_(logp.add_(ent[..., None]))
            dqs.append(torch.bmm(g.transpose(1, 2), kc) * w)
            dks.append(torch.bmm(g, qc) * w)
    ent = torch.cat(ents)
    if w is None:
        return ent, None, None
    return ent, torch.cat(dqs).view(b, h, n, hd), torch.cat(dks).view(b, h, t, hd)


def _forward_errors(qs, ks, scale: float):
    """check for _fused(triton_ops.attn_entropy): each layer's H against _entropy_reference."""
    def errors(out):
        rows = out[0].view(len(qs), -1, out[0].shape[-1])
        return [triton_ops.rel_error(rows[i], _entropy_reference(q, k, scale)[0])
                for i, (q, k) in enumerate(zip(qs, ks, strict=True))]
    return errors


def _backward_errors(qs, ks, w: torch.Tensor, scale: float):
    """check for _fused(triton_ops.attn_entropy_backward): each layer's dq and dk against _entropy_reference."""
    def errors(out):
        found = []
        for i, (q, k) in enumerate(zip(qs, ks, strict=True)):
            _, dq, dk = _entropy_reference(q, k, scale, w[i])
            found += [triton_ops.rel_error(out[0][i].transpose(1, 2), dq),
                      triton_ops.rel_error(out[1][i].transpose(1, 2), dk)]
        return found
    return errors


class GroupEntropy(torch.autograd.Function):
    """attention_entropy of L same-shape layers at once: apply(scale, L, q_1..q_L, k_1..k_L) with each q (B, h, N,
    hd) and k (B, h, T, hd) unscaled, as the attention processor has them -> (L,) nats.

    The scores of the group go into one buffer (a GEMM per layer reading q and k in place), then one softmax and
    reduction for all of them instead of ~20 small kernels per layer forward and backward. Keeps only the layers'
    own q and k (which SDPA keeps anyway: no copy is held) and the row entropies; the backward recomputes the
    scores: with H = -sum p log p over a row, dH/dz = -p (log p + H), and writes dq and dk in the projections'
    layout. Eager autograd keeps two fp32 (B, h, T, N) maps per layer (~0.9 GB on SDXL). Autocast is off inside:
    the scores are formed in q's dtype. On CUDA, with 16-bit q and k (the trainer's), Triton kernels form the scores
    tile by tile in registers and keep only one value per row (triton_ops.attn_entropy, and the backward from q, k,
    lse and H): no score buffer and no GEMM per layer. Other CUDA inputs go through the buffer and Triton row
    kernels (one pass over the scores each); elsewhere the torch form of the same maths runs.
    """

    @staticmethod
    def forward(ctx, scale, n, *qk):
        qs, ks = qk[:n], qk[n:]
        same_strides = all(q.stride() == qs[0].stride() for q in qs) and all(k.stride() == ks[0].stride() for k in ks)
        ctx.fused = same_strides and triton_ops.fused_entropy_ok(qs[0], ks[0])  # a launch reads all with q_1's strides
        with torch.autocast(qs[0].device.type, enabled=False):
            out = (_fused(triton_ops.attn_entropy, qs, ks, scale, check=_forward_errors(qs, ks, scale), rtol=1e-3,
                           what="the forward")
                   if ctx.fused else None)  # no score map at all
            ctx.fused = out is not None
            if out is not None:
                ent, lse = out  # (L * M, T) each
            elif triton_ops.usable(qs[0]):  # one pass over the scores, nothing in fp32 but one value per row
                ent, lse = triton_ops.row_entropy(_scores(qs, ks), scale)  # (L * M, T) each
            else:
                logp = _log_maps(qs, ks, scale)  # (L * M, T, N)
                ent, lse = logp.exp().mul_(logp).sum(-1).neg_(), None  # in place: one map besides logp
        ctx.save_for_backward(*qk, ent, lse)
        ctx.scale, ctx.n = scale, n
        return ent.view(n, -1).mean(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        *qk, ent, lse = ctx.saved_tensors
        n = ctx.n
        qs, ks = qk[:n], qk[n:]
        with torch.autocast(g.device.type, enabled=False):
            rows = ent.numel() // n  # each layer's value is the mean over its rows; z = scale k q^T
            if lse is not None:  # Triton kernels
                w = g.float() * (-ctx.scale / rows)
                if ctx.fused and not triton_ops.fused_retired(qs[0], ks[0]):  # dz formed tile by tile, used at
                    out = _fused(triton_ops.attn_entropy_backward, qs, ks, lse, ent, w, ctx.scale,  # once
                                 check=_backward_errors(qs, ks, w, ctx.scale), rtol=2e-2,
                                 what="the backward")
                    if out is not None:
                        return None, None, *(d.transpose(1, 2) for d in out[0]), *(d.transpose(1, 2) for d in out[1])
                z = _scores(qs, ks)  # the kernel turns the recomputed scores into p (log p + H) in place, one pass
                if ctx.fused:  # the fused backward failed: lse and H of these (rounded) scores, so p sums to 1
                    ent, lse = triton_ops.row_entropy(z, ctx.scale)
                dz = triton_ops.row_entropy_backward_(z, lse, ent, torch.ones_like(w), ctx.scale)
            else:
                logp = _log_maps(qs, ks, ctx.scale)
                w = g.to(logp.dtype) * (-ctx.scale / rows)
                dz = logp.exp().mul_(logp.add_(ent[..., None]))
                del logp
                dz = dz.to(qs[0].dtype)  # (L * M, T, N)
            dq, dk = _scores_grads(dz, qs, ks, w)
        return None, None, *dq, *dk


ENTROPY_CHUNK_BYTES = 64 << 20  # layers per GroupEntropy call: their fp32 maps (transient, fwd and bwd) fit in this


def batched_token_entropies(pending: list[tuple[torch.Tensor, torch.Tensor, float]]) -> list[torch.Tensor]:
    """token_entropy of every (q, k, scale) the attention processors recorded, one GroupEntropy per group of equal
    shapes and strides (where the scores go through a buffer, in chunks whose maps fit ENTROPY_CHUNK_BYTES: an
    unchunked SDXL group held ~1 GB of transient maps at the step's memory peak; the fused kernels form no map and
    take the whole group); one value per entry (order of the groups, not of the entries: only their mean is used)."""
    groups: dict[tuple, list] = {}
    for q, k, scale in pending:
        key = (q.shape, k.shape, q.stride(), k.stride(), q.dtype, k.dtype, q.device, scale)
        groups.setdefault(key, []).append((q, k))
    out = []
    for (qshape, kshape, *_, scale), items in groups.items():
        b, h, n, _ = qshape
        per_layer = b * h * kshape[-2] * n * 4  # one fp32 (B, h, T, N) map
        fused = triton_ops.fused_entropy_ok(*items[0])  # forms no map: the whole group at once
        step = len(items) if fused else max(1, ENTROPY_CHUNK_BYTES // per_layer)
        for i in range(0, len(items), step):
            chunk = items[i:i + step]
            ent = GroupEntropy.apply(scale, len(chunk), *[a for a, _ in chunk], *[c for _, c in chunk])
            out.extend((ent / math.log(max(n, 2))).unbind(0))
    return out


class EntropyAttnProcessor:
    """Cross-attention through SDPA (as diffusers computes it); while training, also records token_entropy.

    It records (q, k, scale) and the set computes all layers' entropies after the forward in one batched op per
    shape group (batched_token_entropies). With options["recompute"] (set while the model uses gradient
    checkpointing) each layer's entropy is computed here, since holding q and k for a batched pass would keep what
    checkpointing frees: through the fused kernels where they take q and k (they keep no map; the checkpointed
    block recomputes q and k), else in the torch form under its own checkpoint, so that its (B, h, T, N) maps are
    recomputed in the backward rather than kept. The entropy leaves the checkpointed block through the store. Under
    torch.compile it is computed inline too, in the torch form (fused there).
    """

    def __init__(self, store: list, options: dict | None = None):
        self.store = store
        self.options = options if options is not None else {"recompute": False}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        h = attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))  # (B, h, N, hd)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], b).view(b, h, -1, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        if torch.is_grad_enabled():  # training only: nothing is kept while sampling
            compiling = torch.compiler.is_compiling()
            if self.options["recompute"] and not compiling and triton_ops.fused_entropy_ok(q, k):
                self.store.append(fused_layer_entropy(q, k, attn.scale))  # keeps no map: nothing to recompute
            elif self.options["recompute"]:
                self.store.append(torch.utils.checkpoint.checkpoint(token_entropy, q, k, attn.scale,
                                                                    use_reentrant=False))
            elif compiling or not self.options.get("batched", True):
                self.store.append(token_entropy(q, k, attn.scale))
            else:
                self.store.append((q, k, attn.scale))
        out = out.transpose(1, 2).reshape(b, n, -1).to(q.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def fused_layer_entropy(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """token_entropy of one layer through the fused kernels (triton_ops.fused_entropy_ok): no score map, not even
    transiently, and nothing kept but q, k and one value per row (a checkpointed block recomputes q and k)."""
    return GroupEntropy.apply(scale, 1, q, k)[0] / math.log(max(q.shape[-2], 2))


def _plain_cross_attention(module: nn.Module) -> bool:
    return (getattr(module, "is_cross_attention", False) and getattr(module, "group_norm", None) is None
            and getattr(module, "spatial_norm", None) is None and not getattr(module, "residual_connection", False)
            and getattr(module, "rescale_output_factor", 1.0) == 1.0 and hasattr(module, "set_processor"))


# --- the model-level hooks ---------------------------------------------------------------------------------
class LoRA2Set(AdapterSet):
    method = "lora2"
    folds_vectors = True
    ranks_move = True

    def __init__(self, model, config: LoRA2Config, layers):
        super().__init__(model, config, layers)
        self._entropies: list = []
        self._entropy_options = {"recompute": False, "batched": True}  # batched False: per layer (an ablation)
        self._saved_processors: dict[str, object] = {}
        self._nu_targets: torch.Tensor | None = None
        self._nus: tuple | None = None  # (softplus of every rho, grad mode) from the last model forward
        self._device_ranks: torch.Tensor | None = None
        self._groups: tuple | None = None
        self._fan_in: torch.Tensor | None = None  # every layer's in_features on the device (the batched resize)
        if config.lambda_e > 0:
            for name, module in model.named_modules():
                if _plain_cross_attention(module):
                    self._saved_processors[name] = module.processor
                    module.set_processor(EntropyAttnProcessor(self._entropies, self._entropy_options))

    def prepare_vectors(self) -> None:
        """Every layer's importance weights in a few batched ops instead of several small ops per layer."""
        self._entropy_options["recompute"] = bool(getattr(self.model, "is_gradient_checkpointing", False))
        layers = list(self.layers.values())
        if not layers:
            return
        nus = F.softplus(StackLeaves.apply(layers[0].grads_in_place, *[layer.rho for layer in layers]))  # (L,)
        self._nus = (nus, torch.is_grad_enabled())  # the rank regulariser reuses it: one gradient path into rho
        lam = slot_weights(nus, torch.stack([layer.active for layer in layers]), self.config.max_rank,
                           self.config.normalise)
        for layer, row in zip(layers, lam.unbind(0), strict=True):
            layer._lam = (row, layer.rho._version, layer.active._version)

    @torch.no_grad()
    def vectors(self, layers: list[LoRA2Layer]) -> list[torch.Tensor]:
        """Every layer's lambdas() in one batched op (the same values)."""
        if not layers or len({layer.rho.device for layer in layers}) > 1:
            return super().vectors(layers)
        return list(slot_weights(F.softplus(torch.stack([layer.rho for layer in layers])),
                                 torch.stack([layer.active for layer in layers]), self.config.max_rank,
                                 self.config.normalise).unbind(0))

    def _layer_params(self, layer: LoRA2Layer) -> list[nn.Parameter]:
        return [layer.lora_A, layer.lora_B]

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        main = [p for layer in self.layers.values() for p in self._layer_params(layer)]
        rhos = [layer.rho for layer in self.layers.values()]
        return [{"params": main, "lr": lr, "weight_decay": weight_decay},
                {"params": rhos, "lr": self.config.rho_lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def before_step(self, step: int, optimizer: torch.optim.Optimizer | None = None, sync: bool = True) -> dict | None:
        """Recompute D for every layer and resize the layers whose D moved.

        sync (tests, lone use): one host read of all D, only the moved layers touched, returns {"ranks": moved}.
        sync=False (the trainer): no host read at all; every layer goes through the masked resize (a no-op where
        D did not move) and device_ranks() holds the D of this step, which the trainer reads when it logs.
        """
        self.reset_step()  # drop entries a gradient-checkpointing recompute appended during the last backward
        layers = list(self.layers.values())
        if not layers:
            return None
        nus = F.softplus(torch.stack([layer.rho.detach() for layer in layers]))
        ranks = rank_from_nu(nus, self.config.q, self.config.max_rank)
        self._device_ranks = ranks
        groups = self._shape_groups(ranks.device)
        if not sync:
            if not self._resize_all_in_kernel(layers, groups, nus, ranks, optimizer):
                for _, idx, group in groups:
                    resize_layers(group, ranks[idx], optimizer)
            return None
        held = torch.stack([layer.active for layer in layers]).sum(1)
        new, old = torch.stack([ranks, held]).tolist()  # the one host sync
        for positions, _, group in groups:  # batched per shape: a few kernels per moved group, not per layer
            moved = [(layer, new[i]) for i, layer in zip(positions, group, strict=True) if new[i] != old[i]]
            if moved:
                resize_layers([layer for layer, _ in moved], [d for _, d in moved], optimizer)
        changed = {name: d for name, d, o in zip(self.layers, new, old, strict=True) if d != o}
        return {"ranks": changed} if changed else None

    def _resize_all_in_kernel(self, layers: list[LoRA2Layer], groups: list, nus: torch.Tensor, ranks: torch.Tensor,
                              optimizer: torch.optim.Optimizer | None) -> bool:
        """The sync-free resize of every layer: masks, init stds and old and new D computed once for all layers,
        then one resize kernel per shape group (~40 small kernels a step on SDXL instead of ~25 per group). False,
        with nothing done, where some group cannot take the kernel (resize_layers then goes group by group)."""
        if not triton_ops.usable(layers[0].lora_A):
            return False
        moments = [_slot_moments(optimizer, group) for _, _, group in groups]
        if any(m is None for m in moments):
            return False
        dev = ranks.device
        if self._fan_in is None or self._fan_in.device != dev:
            self._fan_in = torch.tensor([layer.in_features for layer in layers], device=dev)
        new, old = _set_masks(layers, ranks)
        std = _init_stds(layers, new, nus, self._fan_in)
        plan = torch.stack([old.sum(1).float(), new.sum(1).float(), std])  # (3, L): one gather per group
        seeds = torch.randint(0, 2 ** 62, (len(groups),), device=dev)
        for g, ((_, idx, group), mom) in enumerate(zip(groups, moments, strict=True)):
            old_d, new_d, std_g = plan[:, idx].unbind(0)  # D as exact small floats: the kernel reads them as ints
            _resize_in_kernel(group, new_d, mom, (old_d, new_d, std_g, seeds[g:g + 1]))
        return True

    def _shape_groups(self, device: torch.device) -> list[tuple[list[int], torch.Tensor, list[LoRA2Layer]]]:
        """Layers grouped by (R, k, d): their positions (host list and device index tensor, made once per device)."""
        if self._groups is None or self._groups[0] != device:
            groups: dict[tuple, list[int]] = {}
            layers = list(self.layers.values())
            for i, layer in enumerate(layers):
                groups.setdefault((*layer.lora_A.shape, layer.out_features), []).append(i)
            self._groups = (device, [(ix, torch.tensor(ix, device=device), [layers[i] for i in ix])
                                     for ix in groups.values()])
        return self._groups[1]

    @torch.no_grad()
    def device_native_ranks(self) -> torch.Tensor | None:
        """D of every layer: its active slots (each layer's own cache is stale after a sync-free update)."""
        if not self.layers:
            return None
        return torch.stack([layer.active for layer in self.layers.values()]).sum(1)

    def device_ranks(self) -> torch.Tensor | None:
        """D of every layer (in layer order) as set by the last before_step, on the device (not read here)."""
        return self._device_ranks

    def optimizer_slots(self) -> dict[torch.Tensor, tuple[torch.Tensor, int]]:
        """A's rows and B's columns beyond D are zero with zero moments (the resize keeps them so)."""
        out = {}
        for layer in self.layers.values():
            out[layer.lora_A] = (layer.active, 0)
            out[layer.lora_B] = (layer.active, 1)
        return out

    def reset_step(self) -> None:
        self._entropies.clear()

    def extra_loss(self) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """lambda_r * sum |nu - nu_t| + lambda_e * mean cross-attention entropy (values detached for logging)."""
        c = self.config
        layers = list(self.layers.values())
        terms: dict[str, torch.Tensor] = {}
        total = None
        if c.lambda_r > 0 and layers:
            nus = self._nus[0] if self._nus is not None and self._nus[1] else \
                F.softplus(torch.stack([layer.rho for layer in layers]))
            self._nus = None
            if self._nu_targets is None or self._nu_targets.device != nus.device:  # made once: no copy per step
                self._nu_targets = torch.tensor([layer.nu_target for layer in layers], device=nus.device,
                                                dtype=nus.dtype)
            reg = (nus - self._nu_targets).abs().sum()
            terms["rank_reg"] = reg.detach()
            total = c.lambda_r * reg
        if self._entropies:
            done = [e for e in self._entropies if torch.is_tensor(e)]
            ent = torch.stack(done + batched_token_entropies([e for e in self._entropies if not torch.is_tensor(e)]))
            ent = ent.mean()
            self._entropies.clear()
            terms["entropy"] = ent.detach()
            total = c.lambda_e * ent if total is None else total + c.lambda_e * ent
        return total, terms

    def on_remove(self) -> None:
        super().on_remove()
        for name, proc in self._saved_processors.items():
            self.model.get_submodule(name).set_processor(proc)
        self._saved_processors.clear()

    def after_load(self) -> None:
        """The active mask is a buffer and was loaded with the tensors; nothing else is derived."""

    def continuous_ranks(self) -> dict[str, float]:
        return {n: layer.continuous_rank() for n, layer in self.layers.items()}


METHOD = register(Method("lora2", "LoRA²", LoRA2Config, LoRA2Layer, LoRA2Set,
                         "Per-layer learned rank: an exponential importance over rank indices whose quantile sets "
                         "each layer's rank, with a rank regulariser and a cross-attention entropy term."))
