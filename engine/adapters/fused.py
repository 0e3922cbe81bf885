"""One fused autograd op for every method's linear layer: y = x (W + s B diag(v) A)^T + b, with hand-written backward.

Why: an adapted layer done as separate ops (two matmuls, a scale, an add on the N x d output, dtype casts) costs
several kernel launches and autograd nodes per layer; on SDXL's 560 adapted layers that dominates the step.

Two forms, same maths (FORWARD picks one; the bench times both):
- "chain" (default): y = x W^T + b, then y += s (x A^T) B^T in place (addmm_); h = x A^T is kept for the
  backward, where grad_x = g W, then grad_x += s (g B) A in place. 3 kernels forward, 5 backward (2 forward
  when A's compute copy sits under W in one buffer: one GEMM x [W; A]^T gives both x W^T and h). With a
  per-rank vector v (TriLoRA's sigma, LoRA²'s weights), v's gradient is the diagonal of (g B)^T h.
  With `grads_in_place` (the trainer, one process) the factors' gradients are accumulated by the GEMM itself
  straight into A.grad and B.grad (beta = 1, fp32 accumulation of the bf16 product) instead of being returned:
  autograd would otherwise add each returned gradient into .grad with one more kernel per parameter (1,120 on
  SDXL), the same "gradient accumulation fusion" large-model trainers use. Off under torch.compile, under DDP
  (its hooks wait for autograd to deliver every gradient) and for callers of torch.autograd.grad.
- "merged": the forward forms W + s B A with one addmm and runs the layer's own matmul; the backward recomputes
  the merged weight. On CUDA an out-of-place addmm first copies its d x k input (a memcpy per call), so this
  costs 3 forward and 7 backward launches, and reads/writes d x k twice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_OUT_DTYPE: dict[tuple, bool] = {}  # (device, input dtype) -> torch.mm / torch.addmm take out_dtype=float32 there


def out_dtype_ok(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this build runs mm and addmm with out_dtype=float32 on `dtype` inputs (CUDA builds of recent torch;
    the project allows torch >= 2.4). Tried once per device and dtype without reading anything back: the trainer
    asks at setup; otherwise the first backward asks (always eager: CUDA graphs capture after warm-up steps).
    Inside torch.compile it only reads the answer (a write there would break the graph at every layer)."""
    key = (torch.device(device), dtype)
    if torch.compiler.is_compiling():
        return _OUT_DTYPE.get(key, False)
    if key not in _OUT_DTYPE:
        try:
            a = torch.zeros(2, 2, device=device, dtype=dtype)
            c = torch.zeros(2, 2, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
            _OUT_DTYPE[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE[key] = False
    return _OUT_DTYPE[key]


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b delivered in `dtype`: on CUDA a bf16/fp16 product accumulates straight into fp32 (one kernel, no cast)."""
    if a.dtype == dtype:
        return a @ b
    if (a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)
            and out_dtype_ok(a.device, a.dtype)):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def _scaled_up(up: torch.Tensor, vec: torch.Tensor | None, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """s * B diag(v) in the compute dtype (up is already in it)."""
    if vec is None:
        return up * scale if scale != 1 else up
    return up * (vec * scale if scale != 1 else vec).to(dtype)


FORWARD = "chain"


def _into_grad(param: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """param.grad += alpha * a @ b with the GEMM accumulating in place (allocated on first use); a, b in the compute
    dtype, param.grad in the master dtype."""
    g = param.grad
    if g is None:
        out = _mm_to(a, b, param.dtype)
        param.grad = out.mul_(alpha) if alpha != 1 else out
    elif g.dtype == a.dtype:
        g.addmm_(a, b, alpha=alpha)
    elif g.is_cuda and g.dtype == torch.float32 and a.dtype == torch.bfloat16 and out_dtype_ok(g.device):
        torch.addmm(g, a, b, out_dtype=torch.float32, alpha=alpha, out=g)  # one cuBLAS call, C = D = the grad
        # (bf16 only: the GPU-tested case; fp16 and builds without out_dtype add the product below)
    else:
        g.add_(_mm_to(a, b, g.dtype), alpha=alpha)


def _accumulates(t: torch.Tensor) -> bool:
    return t.is_leaf and t.requires_grad


class ChainLowRankLinear(torch.autograd.Function):
    """Same contract as MergedLowRankLinear; the low-rank chain is added in place to the base output."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, vec, scale, down_c, up_c, in_place=False, stack=None,
                stack_bias=None):
        down_c = down if down_c is None else down_c
        up_c = up if up_c is None else up_c
        with torch.autocast(x.device.type, enabled=False):
            cd = x.dtype
            k = x.shape[-1]
            x2 = x.reshape(-1, k)
            if stack is not None:  # [W; A] in one buffer (see lowrank_linear): one GEMM gives x W^T and h = x A^T
                d = weight.shape[0]
                ycat = F.linear(x2, stack, stack_bias)  # (N, d + R')
                y, h = ycat[:, :d], ycat[:, d:d + down_c.shape[0]]  # row stride d + R': GEMMs read them in place
            else:
                h = x2 @ down_c.T  # (N, r)
                y = F.linear(x2, weight.to(cd), None if bias is None else bias.to(cd))
            hs = h if vec is None else h * vec.to(cd)
            y.addmm_(hs, up_c.T, alpha=scale)
        ctx.save_for_backward(x, weight, down_c, up_c, vec, h)  # h before diag(v): the backward needs both forms
        ctx.scale = scale
        ctx.master_dtypes = (down.dtype, up.dtype)
        # the masters whose gradient the backward adds into .grad itself (see the module doc): plain references
        in_place = in_place and vec is None and not torch.compiler.is_compiling()
        ctx.into = (down if in_place and _accumulates(down) else None, up if in_place and _accumulates(up) else None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x, weight, downc, upc, vec, h = ctx.saved_tensors
        s = ctx.scale
        down_dtype, up_dtype = ctx.master_dtypes
        with torch.autocast(g.device.type, enabled=False):
            cd = x.dtype
            k, d = x.shape[-1], g.shape[-1]
            x2, g2 = x.reshape(-1, k), g.to(cd).reshape(-1, d)
            gb = g2 @ upc  # (N, r)
            gbs = gb if vec is None else gb * vec.to(cd)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = g2 @ weight.to(cd)
                grad_x.addmm_(gbs, downc, alpha=s)
                grad_x = grad_x.view(x.shape)
            into_down, into_up = ctx.into
            grad_up = grad_down = None
            if into_up is not None:
                _into_grad(into_up, g2.T, h, s)
            else:
                grad_up = _mm_to(g2.T, h, up_dtype)  # (d, r): diag(v) and s scale its columns, a small op
                if vec is not None:
                    grad_up = grad_up * (vec * s if s != 1 else vec).to(up_dtype)
                elif s != 1:
                    grad_up = grad_up * s
            if into_down is not None:
                _into_grad(into_down, gbs.T, x2, s)
            else:
                grad_down = _mm_to(gbs.T, x2, down_dtype)
                if s != 1:
                    grad_down = grad_down * s
            grad_vec = None
            if vec is not None and ctx.needs_input_grad[5]:
                # v_i's gradient is s sum_n gb[n, i] h[n, i]: the diagonal of an (r, r) product (one kernel that
                # accumulates in fp32) instead of recomputing h and three elementwise passes over (N, r)
                acc = torch.promote_types(cd, torch.float32)
                grad_vec = (_mm_to(gb.T, h, acc).diagonal() * s).to(vec.dtype)
        return grad_x, None, None, grad_down, grad_up, grad_vec, None, None, None, None, None, None


class MergedLowRankLinear(torch.autograd.Function):
    """x: (..., k) in the compute dtype; weight (d, k) frozen; down A (r, k), up B (d, r), vec v (r) or None.

    down_c / up_c are A and B in the compute dtype (the same tensors when no cast is needed): the layer keeps
    them between optimizer steps, so the fp32 -> bf16 casts are not paid again in every forward and backward.
    Gradients are returned for the master tensors `down` and `up` in their own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, vec, scale, down_c, up_c):
        down_c = down if down_c is None else down_c
        up_c = up if up_c is None else up_c
        with torch.autocast(x.device.type, enabled=False):
            cd = x.dtype
            w = torch.addmm(weight.to(cd), _scaled_up(up_c, vec, scale, cd), down_c)
            y = F.linear(x, w, None if bias is None else bias.to(cd))
        ctx.save_for_backward(x, weight, down_c, up_c, vec)
        ctx.scale = scale
        ctx.master_dtypes = (down.dtype, up.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, downc, upc, vec = ctx.saved_tensors
        s = ctx.scale
        with torch.autocast(g.device.type, enabled=False):
            cd = x.dtype
            g = g.to(cd)
            k, d = x.shape[-1], g.shape[-1]
            x2, g2 = x.reshape(-1, k), g.reshape(-1, d)
            grad_x = None
            if ctx.needs_input_grad[0]:
                w = torch.addmm(weight.to(cd), _scaled_up(upc, vec, s, cd), downc)
                grad_x = (g2 @ w).view(x.shape)
            h = x2 @ downc.T  # (N, r)
            gb = g2 @ upc  # (N, r)
            down_dtype, up_dtype = ctx.master_dtypes
            if vec is None:
                ls = None
                grad_up = _mm_to(g2.T, h, up_dtype)
                grad_down = _mm_to(gb.T, x2, down_dtype)
                if s != 1:
                    grad_up, grad_down = grad_up * s, grad_down * s
            else:
                ls = (vec * s if s != 1 else vec).to(cd)
                grad_up = g2.T @ (h * ls)
                grad_down = (gb * ls).T @ x2
            grad_vec = None
            if vec is not None and ctx.needs_input_grad[5]:
                acc = torch.promote_types(cd, torch.float32)
                grad_vec = ((gb.to(acc) * h.to(acc)).sum(0) * s).to(vec.dtype)
        return grad_x, None, None, grad_down.to(down_dtype), grad_up.to(up_dtype), grad_vec, None, None, None


def lowrank_linear(x, weight, bias, down, up, vec, scale: float, down_c=None, up_c=None, grads_in_place=False,
                   stack=None):
    """down_c / up_c: the compute-dtype copies, or None (or the masters themselves) when no cast is needed. The
    op gets None then: torch.compile cannot trace an autograd.Function given one tensor as two inputs.
    grads_in_place: leaf factors get their gradient added into .grad by the backward's GEMMs (chain form only).
    stack: (S, bias or None) where S is a (d + R') x k buffer whose first d rows are `weight` and whose next rows are
    down_c (AdapterLayer.stack_down): the chain form then gets x W^T and x A^T from one GEMM, one kernel less per
    layer forward; y is then a column slice of the (N, d + R') product."""
    args = (x, weight, bias, down, up, vec, scale, None if down_c is down else down_c, None if up_c is up else up_c)
    if FORWARD == "chain":
        if stack is not None:
            return ChainLowRankLinear.apply(*args, grads_in_place, *stack)
        return ChainLowRankLinear.apply(*args, grads_in_place)
    return MergedLowRankLinear.apply(*args)
