"""The adapter contract: config dataclass, the adapted-layer base class and the per-model adapter set with hooks."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engine import analysis
from engine.adapters import triton_ops
from engine.adapters.fused import lowrank_linear

TARGET_PRESETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn+ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    "attn+ff+conv": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                     "conv_shortcut"),
}


def matches_suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether a dotted module name is one of the suffixes or ends with "." + one of them."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def opt(default, help: str, **extra):
    """A dataclass field carrying help text (and choices/min/max) for the CLI and the studio forms."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class AdapterConfig:
    """Settings every method shares; each method subclasses it with its own fields."""

    method: ClassVar[str] = "base"
    rank: int = opt(16, "Adapter rank r (LoRA²: starting/target rank; AC-LoRA, TriLoRA: the maximum rank R).", min=1)
    alpha: float | None = opt(None, "Scale numerator: the update is multiplied by alpha / rank. "
                                    "Empty = rank (scale 1).")
    targets: str = opt("attn", "Layers to adapt: a preset (attn, attn+ff, attn+ff+conv) or comma-separated "
                       "module-name suffixes such as to_q,to_v.", choices=tuple(TARGET_PRESETS))
    seed: int = opt(0, "Seed of the adapter's initialisation.")

    def __post_init__(self):
        analysis.check_rank(self.rank)
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0
                                           and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a positive number or empty, got {self.alpha!r}")
        if not isinstance(self.targets, str) or not self.target_suffixes():
            raise ValueError(f"targets must be a preset ({', '.join(TARGET_PRESETS)}) or module-name suffixes, "
                             f"got {self.targets!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and f.name != "targets" and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")

    def target_suffixes(self) -> tuple[str, ...]:
        if self.targets in TARGET_PRESETS:
            return TARGET_PRESETS[self.targets]
        return tuple(s.strip() for s in self.targets.split(",") if s.strip())

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"method"}
        if unknown:
            raise ValueError(f"unknown {cls.method} setting(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def field_help(cls) -> dict[str, dict[str, Any]]:
        """Field name -> {default, help, choices, ...}: what the CLI and studio build their forms from."""
        return {f.name: {"default": f.default, "type": f.type, **f.metadata} for f in dataclasses.fields(cls)}


class AdapterLayer(nn.Module):
    """A frozen Linear (or 1x1 Conv2d) plus a trainable low-rank update; subclasses define the factors."""

    def __init__(self, base: nn.Module, config: AdapterConfig, generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.out_features, self.in_features = base.out_features, base.in_features
            self.is_conv = False
        elif isinstance(base, nn.Conv2d) and base.kernel_size == (1, 1) and base.groups == 1:
            self.out_features, self.in_features = base.out_channels, base.in_channels
            self.is_conv = True
        else:
            raise ValueError(f"cannot adapt {type(base).__name__} (only Linear and 1x1 Conv2d layers)")
        self.base = base
        self.base.requires_grad_(False)
        self.config = config
        self.scale = config.scale
        self.merged = False
        self.fused = True  # one fused autograd op per Linear (engine/adapters/fused.py); False: separate ops
        self.grads_in_place = False  # the fused op adds the factors' gradients into .grad itself (the trainer)
        self._shadow = None  # (key, A, B in the compute dtype), see compute_copies
        self._folded = None  # (s B diag(v), its compute-dtype copy, (grad mode, dtype), fold_key()): fold_vectors
        self._stack = None  # ([W; A'] buffer, its bias or None): stack_down

    # --- what every method defines -------------------------------------------------------------
    def down_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable low-rank pair (down A: r x k, up B: d x r)."""
        raise NotImplementedError

    def vector(self) -> torch.Tensor | None:
        """Per-rank vector v (r) between the pair, or None: dW = scale * B diag(v) A."""
        return None

    def chain(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return (*self.down_up(), self.vector())

    def native_rank(self) -> int:
        raise NotImplementedError

    def export_rank(self) -> int:
        """Rank of the plain LoRA this layer exports to without pruning (lossless unless the method says so)."""
        return self.native_rank()

    # --- shared ------------------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up d x r, down r x k) with every scale folded in, so that delta_weight() == up @ down."""
        down, up, vec = self.chain()
        return (up * self.scale if vec is None else up * (vec * self.scale)), down

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update's output alone, as separate ops (used for 1x1 convs and when `fused` is off)."""
        down, up, vec = self.chain()
        h = self.mid(x, down)
        h = h * self.scale if vec is None else self.channel_scale(h, vec * self.scale)
        return self.up_proj(h, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if self.fused and not self.is_conv:
            cd = torch.get_autocast_dtype(device_type) if autocast else self.base.weight.dtype
            down, up = self.down_up()
            vec = self.forward_vector()
            if vec is None:
                down_c, up_c = self.compute_copies(down, up, cd)
                return lowrank_linear(x.to(cd), self.base.weight, self.base.bias, down, up, None, self.scale,
                                      down_c, up_c, self.grads_in_place, self._stack_for(down_c))
            # TriLoRA / LoRA²: fold s diag(v) into B first (autograd on d x r) so that the fused op runs the plain
            # LoRA chain, with no extra work on the N x r activations. Inside a model forward the set has folded
            # every layer at once (AdapterSet.fold_vectors); a lone layer call folds itself.
            folded = self._folded
            if folded is not None and folded[2] == (torch.is_grad_enabled(), cd) and (
                    torch.compiler.is_compiling() or folded[3] == self.fold_key()):  # see compute_copies
                up_v, up_vc = folded[0], folded[1]
            else:
                up_v = fold_vector(up, vec, self.scale)
                up_vc = up_v.detach().to(cd)
            down_c, _ = self.compute_copies(down, None, cd)
            return lowrank_linear(x.to(cd), self.base.weight, self.base.bias, down, up_v, None, 1.0, down_c, up_vc,
                                  self.grads_in_place, self._stack_for(down_c))
        y = self.base(x)
        dtype = self.param_dtype
        if x.dtype != dtype and not autocast:
            x = x.to(dtype)
        return y + self.adapter_forward(x).to(y.dtype)

    def forward_vector(self) -> torch.Tensor | None:
        return self.vector()

    def fold_key(self) -> tuple:
        """Version counters of everything s B diag(v) depends on: a folded copy is stale once one moves."""
        return tuple(p._version for p in self.parameters(recurse=False))

    def compute_copies(self, down: torch.Tensor, up: torch.Tensor | None, cd: torch.dtype):
        """A and B (or A alone, up=None) in the compute dtype, re-cast only when the masters changed.

        AdapterSet.refresh_shadows() re-casts every layer at once after the optimizer step (one foreach copy);
        without it each layer re-casts itself in its next forward.
        """
        if down.dtype == cd and (up is None or up.dtype == cd):
            return down, up
        old = self._shadow
        same_form = old is not None and old[1].dtype == cd and (old[2] is None) == (up is None)
        if same_form and torch.compiler.is_compiling():
            # inside torch.compile (step mode compile) the copies are trusted: the trainer refreshes them after
            # every optimizer step, and reading the key (version counters, pointers) would make it a guard that
            # fails every step; the copy's own dtype is tensor metadata, guarded anyway
            return old[1], old[2]
        key = (cd, *_versions(down, up))
        if old is None or old[0] != key:
            with torch.no_grad():
                if same_form:
                    old[1].copy_(down)  # in place: a captured CUDA graph reads these very tensors
                    if up is not None:
                        old[2].copy_(up)
                    self._shadow = (key, old[1], old[2])
                else:
                    slot = self._stack_slot(down, cd)
                    down_c = down.detach().to(cd) if slot is None else slot.copy_(down)
                    self._shadow = (key, down_c, None if up is None else up.detach().to(cd))
        return self._shadow[1], self._shadow[2]

    # --- A's compute copy under the frozen weight (the trainer on one GPU) ------------------------------------
    @torch.no_grad()
    def stack_down(self) -> bool:
        """Move the frozen weight W (d x k) into a (d + R') x k buffer whose next R rows hold A's compute-dtype
        copy (R' = R rounded up to 8 rows, the rest zero): the fused op then gets x W^T and h = x A^T from one GEMM,
        one small GEMM less per layer forward (its N x r output is latency-bound: ~4 us each on SDXL, 420 layers).
        base.weight (and base.bias) become views of the buffer, so merge() and the layer's own forward see W as
        before. Only where there is a copy to hold: A's master dtype differs from W's. Returns whether it stacked.

        The layer's output is then a column slice of the (N, d + R') product, which the saved h keeps alive until
        the backward: free for q, k and v, whose outputs SDPA keeps anyway (see AdapterSet.STACK_SUFFIXES)."""
        if self._stack is not None:
            return True
        down = self.down_up()[0]
        w = self.base.weight
        if self.is_conv or w.dtype == down.dtype or not w.dtype.is_floating_point:
            return False
        d, k = w.shape
        rows = d + -(-down.shape[0] // 8) * 8
        stack = w.new_zeros(rows, k)
        stack[:d].copy_(w)
        bias = self.base.bias
        if bias is not None:
            stack_bias = bias.new_zeros(rows)
            stack_bias[:d].copy_(bias)
            self.base.bias = nn.Parameter(stack_bias[:d], requires_grad=False)
            stack_bias = stack_bias.to(w.dtype)  # the op adds it in the compute dtype, as F.linear(x, W, b.to(cd))
        else:
            stack_bias = None
        self.base.weight = nn.Parameter(stack[:d], requires_grad=False)
        self._stack = (stack, stack_bias)
        self._shadow = None  # the next compute_copies writes A's copy into the buffer
        return True

    @torch.no_grad()
    def unstack_down(self) -> None:
        """Give W (and the bias) their own storage again and drop the buffer."""
        if self._stack is None:
            return
        self.base.weight = nn.Parameter(self.base.weight.detach().clone(), requires_grad=False)
        if self.base.bias is not None:
            self.base.bias = nn.Parameter(self.base.bias.detach().clone(), requires_grad=False)
        self._stack = None
        self._shadow = None

    def _stack_slot(self, down: torch.Tensor, cd: torch.dtype) -> torch.Tensor | None:
        """The rows of the stack buffer that hold A's compute copy, when there is a buffer of that dtype."""
        if self._stack is None or self._stack[0].dtype != cd:
            return None
        d = self.base.weight.shape[0]
        stack = self._stack[0]
        if down.shape[1] != stack.shape[1] or d + down.shape[0] > stack.shape[0]:
            return None
        return stack[d:d + down.shape[0]]

    def _stack_for(self, down_c: torch.Tensor):
        """(buffer, bias) for the fused op when down_c is the copy held in the buffer, else None."""
        st = self._stack
        if st is None or torch.compiler.is_compiling() or self.base.weight.data_ptr() != st[0].data_ptr():
            return None  # no buffer, or W was given other storage since (a reload, say)
        slot = self._stack_slot(down_c, down_c.dtype)
        if slot is None or slot.data_ptr() != down_c.data_ptr() or slot.stride() != down_c.stride():
            return None
        return st

    @property
    def param_dtype(self) -> torch.dtype:
        for p in self._parameters.values():
            return p.dtype
        return self.base.weight.dtype

    def delta_weight(self) -> torch.Tensor:
        """The dense update dW (d x k) this adapter adds to the frozen weight."""
        up, down = self.factors()
        return up @ down

    def effective_rank(self, tau: float = 0.9) -> int:
        up, down = self.factors()
        _, s, _ = analysis.cheap_svd(up.detach(), down.detach())
        return int(analysis.energy_rank(s, tau))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base.weight
            w += self._as_weight(self.delta_weight()).to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base.weight
            w -= self._as_weight(self.delta_weight()).to(w.dtype)
            self.merged = False

    def _as_weight(self, dw: torch.Tensor) -> torch.Tensor:
        return dw[:, :, None, None] if self.is_conv else dw

    def mid(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, down[:, :, None, None]) if self.is_conv else F.linear(x, down)

    def up_proj(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, up[:, :, None, None]) if self.is_conv else F.linear(h, up)

    def channel_scale(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multiply the rank channel of h by v: last dim for Linear, dim 1 for conv."""
        return h * (v[:, None, None] if self.is_conv else v)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, native_rank={self.native_rank()}"


class FoldVectors(torch.autograd.Function):
    """s B_i diag(v_i) of n same-shape layers, delivered in the compute dtype as one (n, d, r) tensor:
    apply(scale, compute_dtype, n, in_place, B_1..B_n, v_1..v_n).

    The fp32 stack and product are transient; the backward keeps only the B_i and v_i themselves. Plain autograd
    (stack, multiply, cast) kept a stacked fp32 copy of every B for the multiply's backward and the fp32 product
    for the layers: two extra copies of all B at the step's memory peak (~0.7 GB for LoRA² r64 on SDXL). The
    layers' gradient for s B diag(v) arrives in the compute dtype, as the gradient of any weight used under
    autocast does; the B_i and v_i gradients are formed from it in their own dtype.

    in_place (the trainer in one process, see AdapterSet.set_grads_in_place): the gradients of B_i or v_i that are
    leaf parameters go straight into their .grad in one foreach add, and autograd gets None for them. Returned,
    autograd adds each into its .grad with one small kernel per layer (1,120 on SDXL for TriLoRA's B and sigma).
    """

    @staticmethod
    def forward(ctx, scale, dtype, n, in_place, *tensors):
        ups, vecs = tensors[:n], tensors[n:]
        if triton_ops.fold_ok(ups, vecs) and _fold_trusted(ups[0], scale, dtype):  # CUDA: one pass, into dtype
            out = triton_ops.fold_vectors(ups, torch.stack(vecs), scale, dtype)
        else:
            out = _fold_torch(ups, vecs, scale, dtype)
        ctx.save_for_backward(*tensors)
        ctx.scale, ctx.n = scale, n
        ctx.into = [bool(in_place) and all(t.is_leaf and t.requires_grad for t in part) for part in (ups, vecs)]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        tensors = ctx.saved_tensors
        n, s = ctx.n, ctx.scale
        ups, vecs = tensors[:n], tensors[n:]
        need_up, need_vec = any(ctx.needs_input_grad[4:4 + n]), any(ctx.needs_input_grad[4 + n:])
        out = None
        if triton_ops.fold_ok(ups, vecs):  # CUDA: one pass; B's gradients may already be in their .grad
            out = _fold_backward_kernel(ctx, g, ups, vecs, need_up, need_vec)
        gup, gvec = out if out is not None else _fold_backward_torch(g, ups, vecs, s, need_up, need_vec)
        grad_ups = grad_vecs = (None,) * n
        if gup is not None:
            grad_ups = gup.unbind(0)
            if ctx.into[0]:
                grad_ups = add_into_grads(ups, grad_ups)
        if gvec is not None:
            grad_vecs = gvec.to(vecs[0].dtype).unbind(0)
            if ctx.into[1]:
                grad_vecs = add_into_grads(vecs, grad_vecs)
        return None, None, None, None, *grad_ups, *grad_vecs


def _fold_torch(ups, vecs, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """FoldVectors' forward in torch: (n, d, r) in dtype of B_i * (v_i * scale)."""
    return (torch.stack(ups) * (torch.stack(vecs) * scale)[:, None, :]).to(dtype)


def _fold_backward_torch(g, ups, vecs, scale: float, need_up: bool, need_vec: bool):
    """FoldVectors' backward in torch -> (B's gradients (n, d, r) or None, v's (n, r) or None), in B's dtype."""
    g = g.to(ups[0].dtype)
    gup = g * (torch.stack(vecs).to(g.dtype) * scale)[:, None, :] if need_up else None
    gvec = (g * torch.stack(ups)).sum(1) * scale if need_vec else None
    return gup, gvec


FOLD_CHECK_LAYERS = 3  # layers of random factors a fold kernel's first-use check runs on


def _check_inputs(up: torch.Tensor, seed: int):
    """FOLD_CHECK_LAYERS random (d, r) fp32 factors shaped like up and (n, r) vectors in [0.5, 1.5), from a
    generator of their own (the run's random stream is left alone): never zero, unlike factors at their init."""
    gen = torch.Generator(up.device).manual_seed(seed)
    ups = [torch.randn(up.shape, device=up.device, generator=gen) for _ in range(FOLD_CHECK_LAYERS)]
    vecs = torch.rand(FOLD_CHECK_LAYERS, up.shape[1], device=up.device, generator=gen) + 0.5
    return ups, vecs, gen


def _per_layer(got: torch.Tensor, want: torch.Tensor) -> list[torch.Tensor]:
    """triton_ops.rel_error of each layer (leading index) apart: a wrong layer is not diluted by right ones."""
    return [triton_ops.rel_error(a, b) for a, b in zip(got.unbind(0), want.unbind(0), strict=True)]


def _fold_trusted(up: torch.Tensor, scale: float, dtype: torch.dtype) -> bool:
    """Whether fold_vectors may run for factors shaped like up: at the first launch of a shape (outside a CUDA
    graph capture) the kernel runs on random factors of that shape and its result is compared layer by layer
    with the torch form (triton_ops.verdict, within 1%: the same products, so only a rounding mode could differ);
    a shape that failed, or one not yet checked inside a capture, takes the torch form."""
    key = ("fold", up.device, up.shape, dtype)

    def errors():
        ups, vecs, _ = _check_inputs(up, 0)
        return _per_layer(triton_ops.fold_vectors(ups, vecs, scale, dtype),
                          _fold_torch(ups, list(vecs.unbind(0)), scale, dtype))
    return _kernel_trusted(key, "forward", errors, 1e-2)


def _fold_backward_trusted(up: torch.Tensor, gdtype: torch.dtype, scale: float, need_up: bool, need_vec: bool,
                           into: bool, accumulate: bool) -> bool:
    """_fold_trusted for fold_vectors_backward in this variant (gradient dtype; B's gradient returned, stored
    into tensors of its own or added into existing ones; v's or not): its increments within 0.1% of the torch
    form's, layer by layer (the same products; only the column sums for v run in another order)."""
    key = ("fold_backward", up.device, up.shape, gdtype, need_up, need_vec, into, accumulate)

    def errors():
        ups, vecs, gen = _check_inputs(up, 1)
        g = torch.randn(FOLD_CHECK_LAYERS, *up.shape, device=up.device, generator=gen).to(gdtype)
        dst = [torch.randn(up.shape, device=up.device, generator=gen) for _ in ups] if into else None
        before = torch.stack(dst) if into and accumulate else 0
        gup, gvec = triton_ops.fold_vectors_backward(g, ups, vecs, scale, need_up, need_vec, dst, accumulate)
        want_up, want_vec = _fold_backward_torch(g, ups, list(vecs.unbind(0)), scale, need_up, need_vec)
        found = _per_layer(torch.stack(dst) - before if into else gup, want_up) if need_up else []
        return found + (_per_layer(gvec, want_vec) if need_vec else [])
    return _kernel_trusted(key, "backward", errors, 1e-3)


def _kernel_trusted(key: tuple, what: str, errors, rtol: float) -> bool:
    """The first-use check of a fold kernel at this launch key (errors() -> its figures; see _fold_trusted): a
    kernel that computes wrong values or raises there (cannot compile or get its resources at these sizes) leaves
    that shape to the torch form, with a warning and a notice in the run (triton_ops.fall_back)."""
    if triton_ops.failed(key):
        return False
    if triton_ops.to_check(key):
        name = f"the fold kernel's {what} at {tuple(key[2])}"
        try:
            wrong = triton_ops.verdict(key, name, errors(), rtol)
        except torch.OutOfMemoryError:
            raise  # not the kernel's fault
        except Exception as e:  # noqa: BLE001 - a compile or resource failure at these sizes: the torch form
            wrong = triton_ops.reject(key, name, e)
        if wrong:
            triton_ops.fall_back(f"{wrong} on {key[1]}: using the torch form there", stacklevel=4)
            return False
    return triton_ops.trusted(key)


def _fold_backward_kernel(ctx, g, ups, vecs, need_up: bool, need_vec: bool):
    """FoldVectors' backward products through triton_ops.fold_vectors_backward (one launch) -> (B's gradients
    (n, d, r) or None, v's (n, r) or None), or None where this variant is not trusted at this shape (see
    _fold_backward_trusted: the torch form then). B's gradients that go into .grad (in_place) are written there
    by the kernel and come back None: added when every B has one it can take (the trainer's steps), stored into
    new tensors that become the .grad when none has one yet (an eager step after zero_grad(set_to_none=True));
    with some there and some not, they come back for add_into_grads."""
    grads = [p.grad for p in ups]
    into, accumulate = None, True
    if need_up and ctx.into[0]:
        if all(x is None for x in grads):
            into, accumulate = [], False  # tensors of their own, made once the kernel is trusted
        elif all(x is not None and x.dtype == torch.float32 and x.is_contiguous() and x.shape == ups[0].shape
                 for x in grads) and triton_ops.aligned(grads):
            into = grads
    if not _fold_backward_trusted(ups[0], g.dtype, ctx.scale, need_up, need_vec, into is not None, accumulate):
        return None
    if into is not None and not into:
        into = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in ups]
    gup, gvec = triton_ops.fold_vectors_backward(g, ups, torch.stack(vecs), ctx.scale, need_up, need_vec, into,
                                                 accumulate)
    if into is not None and not accumulate:
        for p, x in zip(ups, into, strict=True):
            p.grad = x
    return gup, gvec


def add_into_grads(params, grads) -> tuple[None, ...]:
    """p.grad += g for every pair, in one foreach add (a .grad not yet there gets its own copy); returns Nones
    for autograd, which then has nothing to add."""
    have = [(p.grad, g) for p, g in zip(params, grads, strict=True) if p.grad is not None]
    if have:
        torch._foreach_add_([a for a, _ in have], [b.to(a.dtype) for a, b in have])
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.to(p.dtype, copy=True).contiguous()
    return (None,) * len(params)


class StackLeaves(torch.autograd.Function):
    """torch.stack of n same-shape leaf parameters, apply(in_place, p_1..p_n); with in_place their gradients go
    straight into .grad in one foreach add (add_into_grads) instead of one autograd accumulation kernel each."""

    @staticmethod
    def forward(ctx, in_place, *params):
        into = bool(in_place) and all(p.is_leaf and p.requires_grad for p in params)
        ctx.params = params if into else None  # the leaves themselves (not saved tensors: no version check)
        return torch.stack(params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        grads = g.unbind(0)
        if ctx.params is not None:
            return None, *add_into_grads(ctx.params, grads)
        return None, *grads


def fold_vector(up: torch.Tensor, vec: torch.Tensor, scale: float) -> torch.Tensor:
    """s B diag(v): the up factor with the per-rank vector and the scale folded in (broadcast over the last dim)."""
    return up * (vec * scale if scale != 1 else vec)


@torch.no_grad()
def reset_moments(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Reset the optimizer state of `params` to a fresh start (moments and step count zero), in place.

    Same effect as dropping the state, but the tensors keep their storage, which a captured optimizer step reads.
    """
    tensors = [v for p in params for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    if tensors:
        torch._foreach_zero_(tensors)


def _versions(down: torch.Tensor, up: torch.Tensor | None) -> tuple:
    """What identifies the masters' current values: version counters and storage of A (and B)."""
    if up is None:
        return down._version, -1, down.data_ptr(), -1
    return down._version, up._version, down.data_ptr(), up.data_ptr()


class AdapterSet:
    """All adapted layers of one model for one method, with the hooks the trainer calls.

    The base class implements plain behaviour (no rank schedule, no extra loss); AC-LoRA and LoRA²
    override `restart`/`before_step`/`extra_loss`.
    """

    method: ClassVar[str] = "base"

    folds_vectors: ClassVar[bool] = False  # TriLoRA, LoRA²: a per-rank vector between the factors
    ranks_move: ClassVar[bool] = False  # LoRA²: native ranks change every step (device_ranks() tracks them)

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, AdapterLayer]):
        self.model = model
        self.config = config
        self.layers = layers
        self._fold_hook = model.register_forward_pre_hook(self._before_forward) if self.folds_vectors else None

    def _before_forward(self, module, args) -> None:
        self.prepare_vectors()
        self.fold_vectors()

    def prepare_vectors(self) -> None:
        """Compute every layer's vector for this forward in batched ops (LoRA²'s importance weights)."""

    def fold_vectors(self) -> None:
        """s B diag(v) for every layer in a few batched ops per shape group (FoldVectors), instead of several small
        kernels per layer forward and backward; the layers pick their slice in their forward."""
        layers = [layer for layer in self.layers.values() if not layer.merged and not layer.is_conv]
        if not layers:
            return
        device_type = layers[0].base.weight.device.type
        autocast = torch.is_autocast_enabled(device_type)
        grad = torch.is_grad_enabled()
        groups: dict[tuple, list[AdapterLayer]] = {}
        for layer in layers:
            cd = torch.get_autocast_dtype(device_type) if autocast else layer.base.weight.dtype
            groups.setdefault((tuple(layer.down_up()[1].shape), layer.scale, cd), []).append(layer)
        for (_, scale, cd), group in groups.items():
            # fp16 keeps an fp32 fold (its gradient stays fp32: a loss-scaled fp16 B-sized gradient could overflow)
            out = torch.float32 if cd == torch.float16 else cd
            folded = FoldVectors.apply(scale, out, len(group), group[0].grads_in_place,
                                       *[layer.down_up()[1] for layer in group],
                                       *[layer.forward_vector() for layer in group])  # (n, d, r)
            compute = folded if out == cd else folded.detach().to(cd)
            for layer, f, c in zip(group, folded.unbind(0), compute.unbind(0), strict=True):
                layer._folded = (f, c, (grad, cd), layer.fold_key())

    # trainer hooks ------------------------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        return [{"params": self.parameters(), "lr": lr, "weight_decay": weight_decay}]

    def before_step(self, step: int, optimizer: torch.optim.Optimizer | None = None, sync: bool = True) -> dict | None:
        """Called before each forward; LoRA² updates its ranks here. Returns an event dict or None.

        Whatever it changes in place (factors, masks, optimizer state) it leaves consistent, compute-dtype copies
        included: a captured CUDA graph reads them next."""
        return None

    def device_ranks(self) -> torch.Tensor | None:
        """Per-layer native ranks on the device when the method moves them every step (LoRA²), else None."""
        return None

    def optimizer_slots(self) -> dict[torch.Tensor, tuple[torch.Tensor, int]]:
        """{param: (bool slot mask, axis)} for factors whose slots outside the mask are idle (all zero, moments
        included): engine.optim.SlotAdamW updates only the active ones. None here; LoRA² has them."""
        return {}

    @torch.no_grad()
    def refresh_shadows(self) -> None:
        """After an optimizer step: re-cast every layer's compute-dtype copies of A and B in one foreach copy."""
        layers = [layer for layer in self.layers.values() if layer._shadow is not None]
        if not layers:
            return
        dst, src = [], []
        for layer in layers:
            down, up = layer.down_up()
            _, dc, uc = layer._shadow
            dst.append(dc)
            src.append(down.detach())
            if uc is not None:
                dst.append(uc)
                src.append(up.detach())
        torch._foreach_copy_(dst, src)
        for layer in layers:
            down, up = layer.down_up()
            key, dc, uc = layer._shadow
            layer._shadow = ((key[0], *_versions(down, None if uc is None else up)), dc, uc)

    # q, k, v: SDPA keeps their outputs, so h inside them costs nothing. Not to_out.0: there h would keep the
    # (N, d + R') product alive until the backward (measured on SDXL: +0.4 GB peak, no faster)
    STACK_SUFFIXES: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v")

    def set_stacked_down(self, on: bool) -> int:
        """Put A's compute copy under the frozen weight of the attention projections (AdapterLayer.stack_down), or
        undo it; returns how many layers are stacked. The trainer on one GPU turns it on (not under
        torch.compile, which fuses on its own)."""
        n = 0
        for name, layer in self.layers.items():
            if on and matches_suffix(name, self.STACK_SUFFIXES):
                n += layer.stack_down()
            else:
                layer.unstack_down()
        return n

    def set_grads_in_place(self, on: bool) -> None:
        """Let the fused op add A's and B's gradients into .grad itself (engine/adapters/fused.py): one kernel less
        per leaf factor and backward (TriLoRA's and LoRA²'s B reach the op folded, through autograd). Only for a
        training loop that reads .grad after backward in one process: torch.autograd.grad and DDP's hooks would not
        see these gradients."""
        for layer in self.layers.values():
            layer.grads_in_place = bool(on)

    def reset_step(self) -> None:
        """Forget per-forward records (LoRA²'s attention entropies) left by sampling or a checkpoint recompute."""

    def extra_loss(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Additional loss terms after the forward (LoRA²'s regularisers)."""
        return None, {}

    def restart_due(self, epoch: int, total_epochs: int, step: int, total_steps: int, epoch_end: bool) -> bool:
        """Whether an AC-LoRA style restart should run now (never for other methods)."""
        return False

    def restart(self, mean_loss: float, epoch: int, total_epochs: int,
                optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        raise NotImplementedError(f"{self.method} has no restart")

    # parameters and state ------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for n, p in layer.named_parameters() if not n.startswith("base.")]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            for key, t in layer.state_dict().items():
                if not key.startswith("base."):
                    out[f"{name}.{key}"] = t.detach().clone()
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        missing, unexpected = expected - set(sd), set(sd) - expected
        if missing or unexpected:
            raise ValueError(f"adapter state does not match the model: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for name, layer in self.layers.items():
                own = {k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}
                for key, t in own.items():
                    t.copy_(sd[f"{name}.{key}"])
        self.after_load()

    def on_remove(self) -> None:
        """Undo anything the method installed besides the layers (the fold hook, LoRA²'s attention processors)."""
        if self._fold_hook is not None:
            self._fold_hook.remove()
            self._fold_hook = None
        for layer in self.layers.values():
            layer._folded = None
            layer.unstack_down()

    def after_load(self) -> None:
        """Recompute derived state (masks, ranks) after loading tensors."""

    def extra_state(self) -> dict[str, Any]:
        """Plain-Python method state to checkpoint beside the tensors (AC-LoRA's kept ranks)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # analysis --------------------------------------------------------------------------------------------
    def vectors(self, layers: list[AdapterLayer]) -> list[torch.Tensor | None]:
        """Each layer's per-rank vector (AdapterLayer.vector()); LoRA² computes them in one batched op."""
        return [layer.vector() for layer in layers]

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's AdapterLayer.factors() in fp32, the same values, made a shape group at a time: one stack
        and one multiply per group, the vectors from vectors(), instead of a few small ops per layer (the trainer's
        rank log, the rank measurement, AC-LoRA's restart and the export all start here; LoRA² on SDXL issued
        ~6,000 kernels a call)."""
        with torch.no_grad():
            layers = list(self.layers.values())
            pairs = [layer.down_up() for layer in layers]  # (down, up)
            vecs = self.vectors(layers)
            groups: dict[tuple, list[int]] = {}
            for i, (layer, (_, up), vec) in enumerate(zip(layers, pairs, vecs, strict=True)):
                vkey = None if vec is None else (vec.dtype, vec.device, tuple(vec.shape))
                groups.setdefault((tuple(up.shape), up.dtype, up.device, layer.scale, vkey), []).append(i)
            ups: list[torch.Tensor | None] = [None] * len(layers)
            for (_, _, _, scale, vkey), idx in groups.items():
                up = torch.stack([pairs[i][1].detach() for i in idx])
                if vkey is None:
                    up.mul_(scale)  # up * scale, as AdapterLayer.factors
                else:  # up * (vec * scale)
                    up.mul_(torch.stack([vecs[i].detach() for i in idx])[:, None, :] * scale)
                for i, u in zip(idx, up.float().unbind(0), strict=True):
                    ups[i] = u
            return {name: (ups[i], pairs[i][0].detach().float()) for i, name in enumerate(self.layers)}

    def spectra(self) -> dict[str, analysis.Spectrum]:
        return analysis.batched_spectra(self.factors())

    def effective_ranks(self, tau: float = 0.9) -> dict[str, int]:
        """r_tau of every layer: singular values only, one energy_rank call per shape group, one host copy."""
        groups = analysis.grouped_singular_values(self.factors())
        if not groups:
            return {}
        ks = [analysis.energy_rank(S, tau) for _, S in groups]
        host = torch.cat([k.to(ks[0].device) for k in ks]).tolist()
        ranks = dict(zip([n for names, _ in groups for n in names], map(int, host), strict=True))
        return {n: ranks[n] for n in self.layers}

    @torch.no_grad()
    def native_ranks(self) -> dict[str, int]:
        """Every layer's native rank: one host read of device_native_ranks() where the method has it (a stale
        per-layer cache or one sync per layer otherwise), else each layer's host value."""
        counts = self.device_native_ranks()
        if counts is None:
            return {name: layer.native_rank() for name, layer in self.layers.items()}
        return dict(zip(self.layers, map(int, counts.tolist()), strict=True))

    def device_native_ranks(self) -> torch.Tensor | None:
        """Native ranks of all layers (in layer order) as one device tensor, for methods that compute them on the
        device (TriLoRA, LoRA²); None where they are host values (LoRA, AC-LoRA)."""
        return None

    @torch.no_grad()
    def rank_probe(self) -> analysis.RankProbe:
        """A rank log started without a host sync: every layer's Gram matrices and the native ranks, on the device
        (the trainer copies them to the host behind an event and finishes the log a step later)."""
        native = self.device_native_ranks()
        return analysis.RankProbe(list(self.layers), analysis.grouped_grams(self.factors()),
                                  native if native is not None else self.native_ranks())

    def export_ranks(self) -> dict[str, int]:
        """Per-layer rank of the plain LoRA this adapter exports to without pruning (the native rank, >= 1)."""
        return {n: max(1, min(layer.export_rank(), layer.out_features, layer.in_features))
                for n, layer in self.layers.items()}

    def to_lora(self, tau: float | None = None, rank: int | None = None, cap: int | None = None,
                criterion: str = "energy", value: float | None = None, kohya_compat: bool = False):
        """Plain per-layer-rank LoRA factors {name: (up, down)}, ranks and kept energy fraction.

        Without tau/rank/value each layer keeps its native rank (AC-LoRA: the k of the last restart).
        """
        factors = self.factors()
        spectra = analysis.batched_spectra(factors)
        if tau is None and rank is None and value is None:
            ranks = self.export_ranks()
            if cap is not None:
                ranks = {n: min(r, cap) for n, r in ranks.items()}
        else:
            ranks = analysis.choose_ranks(spectra, tau=tau, rank=rank, cap=cap, criterion=criterion, value=value,
                                          kohya_compat=kohya_compat)
        out = {n: analysis.truncate(sp, ranks[n]) for n, sp in spectra.items()}
        total = sum(float(sp.S.pow(2).sum()) for sp in spectra.values())
        kept = sum(float(sp.S[: ranks[n]].pow(2).sum()) for n, sp in spectra.items())
        return out, ranks, (1.0 if total == 0 else kept / total)

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (layer.out_features, layer.in_features) for n, layer in self.layers.items()}

    # merge / remove --------------------------------------------------------------------------------------
    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    def remove(self) -> nn.Module:
        """Put the original modules back (unmerged) and return the model."""
        from engine.adapters.inject import remove

        return remove(self)
