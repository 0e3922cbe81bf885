"""Triton kernels for LoRA²'s hot spots, which torch runs as many full memory passes (CUDA only).

- Row entropy of softmax(z) over the last dimension, and its gradient, each in one pass over z: the torch form
  (log_softmax to fp32, exp, multiply, sum; in the backward four more passes) moved ~10 GB a step at SDXL 1024 px.
- LoRA²'s per-step resize: only the slots whose rank moved are rewritten (a row of A, a column of B, their
  optimizer moments and the compute-dtype copy of A), for a whole shape group in one launch through tables of
  pointers. The torch form stacks and rewrites every factor and moment of the group (~9 GB a step at SDXL r16).
- AdamW on the active slots only (engine/optim.py's SlotAdamW): the idle half of LoRA²'s 2r-wide buffers is
  neither read nor written; torch's fused AdamW is the torch form.

Every kernel has a torch equivalent in the caller, used on the CPU, without Triton, and for float64 (the tests);
`ENABLED = False` forces the torch form everywhere (the bench's ablation). The GPU tests check kernel = torch form.
"""
from __future__ import annotations

import math
import warnings

import torch

ENABLED = True  # False: callers use their torch form (ablation, debugging)

try:  # Triton ships with the CUDA builds of torch on Linux; the CPU build and macOS have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


_WORKS: dict[torch.device, bool] = {}  # per device: did a first kernel compile and launch?


def _works_on(device: torch.device) -> bool:
    """Triton is importable and its kernels compile and launch here (checked once per device, outside any CUDA
    graph capture; no host sync). Triton needs a C compiler at run time to build its launcher: an image without
    one gets a warning and the torch form, not a failed training."""
    ok = _WORKS.get(device)
    if ok is None:
        if triton is None:
            ok = False
        elif torch.cuda.is_current_stream_capturing():
            return False  # not now: compiling inside a capture would break it
        else:
            try:  # each kernel once, on tiny inputs
                z = torch.zeros(2, 16, device=device)
                h, lse = row_entropy(z)
                row_entropy_backward_(z, lse, h, torch.ones(1, device=device))
                a, b = torch.zeros(2, 4, device=device), torch.zeros(3, 2, device=device)
                ranks = torch.arange(2, device=device)
                resize_slots(ranks[:1], ranks[1:], torch.ones(1, device=device), [a], [b],
                             [torch.zeros(2, 4, device=device, dtype=torch.bfloat16)], [[a.clone()]], [[b.clone()]],
                             seed=ranks[:1])  # not from the run's generator: the check leaves its stream alone
                one = torch.ones((), device=device)
                adamw_slots([a], [a.clone()], [a.clone()], [a.clone()], [one], [ranks < 2], 0, one, 0.9, 0.999,
                            1e-8, 0.0)
                ok = True
            except Exception as e:  # noqa: BLE001 - any compile or launch failure means: use the torch form
                warnings.warn(f"Triton kernels unavailable on {device} ({type(e).__name__}: {str(e)[:200]}); "
                              "LoRA² uses its slower torch form", RuntimeWarning, stacklevel=2)
                ok = False
        _WORKS[device] = ok
    return ok


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels here can run on this tensor (CUDA, Triton working there, a 16- or 32-bit float)."""
    return (ENABLED and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and _works_on(t.device))


def _block(n: int) -> tuple[int, int]:
    """Columns per loop iteration and warps per program for rows of n elements."""
    block = min(triton.next_power_of_2(max(n, 16)), 4096)
    return block, max(1, min(8, block // 256))


if triton is not None:
    @triton.jit
    def _row_entropy_fwd(z_ptr, h_ptr, lse_ptr, n_cols, scale, BLOCK: tl.constexpr):
        """H = -sum p log p and lse = log sum exp z of one row z = scale * x, p = softmax(z), fp32, one pass:
        per lane m (max), s = sum e^(z-m), t = sum e^(z-m) z; then H = lse - E_p[z]."""
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * n_cols
        offs = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        t = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, n_cols, BLOCK):
            cols = start + offs
            inside = cols < n_cols
            z = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * scale
            m_new = tl.maximum(m, z)
            alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            e = tl.where(inside, tl.exp(z - m_new), 0.0)
            s = s * alpha + e
            t = t * alpha + e * tl.where(inside, z, 0.0)
            m = m_new
        top = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
        total = tl.sum(s * w, 0)
        lse = top + tl.log(total)
        tl.store(h_ptr + row, lse - tl.sum(t * w, 0) / total)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _row_entropy_bwd(z_ptr, lse_ptr, h_ptr, w_ptr, n_cols, rows_per_w, scale, BLOCK: tl.constexpr):
        """In place over x, z = scale * x: w p (log p + H), which for w = -c scale is the gradient of c H w.r.t. x
        (dH/dz = -p (log p + H)); w per block of rows_per_w rows (one layer)."""
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * n_cols
        lse = tl.load(lse_ptr + row)
        h = tl.load(h_ptr + row)
        w = tl.load(w_ptr + row // rows_per_w)
        offs = tl.arange(0, BLOCK)
        for start in tl.range(0, n_cols, BLOCK):
            cols = start + offs
            inside = cols < n_cols
            logp = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) * scale - lse
            tl.store(base + cols, (tl.exp(logp) * (logp + h) * w).to(z_ptr.dtype.element_ty), mask=inside)


    @triton.jit
    def _resize_slots(old_ptr, new_ptr, std_ptr, seed_ptr, a_tab, b_tab, sh_tab, sh_like, am_tab, bm_tab,
                      n_layers, n_am, n_bm, R, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program i = layer i of the group: for each slot j between its old and new rank, row j of A becomes
        N(0, std_i^2) if the rank grew (else 0) and so does row j of its compute copy (if any); column j of B and
        row j / column j of every optimizer moment become 0. A layer whose rank did not move returns at once."""
        i = tl.program_id(0)
        old = tl.load(old_ptr + i).to(tl.int32)
        new = tl.load(new_ptr + i).to(tl.int32)
        grow = new > old
        std = tl.load(std_ptr + i)
        seed = tl.load(seed_ptr)
        a = tl.load(a_tab + i).to(tl.pointer_type(tl.float32))
        b = tl.load(b_tab + i).to(tl.pointer_type(tl.float32))
        sh_int = tl.load(sh_tab + i)
        sh = sh_int.to(sh_like.dtype)
        ok = tl.arange(0, BLOCK_K)
        od = tl.arange(0, BLOCK_D)
        for j in tl.range(tl.minimum(old, new), tl.maximum(old, new)):
            row = j * K  # int32: one factor has < 2^31 elements
            for c in tl.range(0, K, BLOCK_K):
                cols = c + ok
                inside = cols < K
                noise = tl.randn(seed, (i.to(tl.int64) * R + j) * K + cols)
                val = tl.where(grow, noise * std, 0.0)
                tl.store(a + row + cols, val, mask=inside)
                if sh_int != 0:
                    low = val.to(sh_like.dtype.element_ty, fp_downcast_rounding="rtne")  # as torch's .to()
                    tl.store(sh + row + cols, low, mask=inside)
                for t in tl.range(0, n_am):
                    m = tl.load(am_tab + t * n_layers + i).to(tl.pointer_type(tl.float32))
                    tl.store(m + row + cols, tl.zeros([BLOCK_K], tl.float32), mask=inside)
            for c in tl.range(0, D, BLOCK_D):
                rows = c + od
                inside = rows < D
                at = rows.to(tl.int64) * R + j
                tl.store(b + at, tl.zeros([BLOCK_D], tl.float32), mask=inside)
                for t in tl.range(0, n_bm):
                    m = tl.load(bm_tab + t * n_layers + i).to(tl.pointer_type(tl.float32))
                    tl.store(m + at, tl.zeros([BLOCK_D], tl.float32), mask=inside)


if triton is not None:
    @triton.jit
    def _adamw_slots(p_tab, g_tab, m_tab, v_tab, step_tab, mask_tab, lr_ptr, beta1, beta2, log_beta1, log_beta2,
                     eps, wd, R, Q, numel, SLOT_AXIS: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        """torch's AdamW (decoupled decay, bias corrections from the param's own step) on the active slots only of
        tensor i: rows j < D of an (R, Q) factor (SLOT_AXIS 0) or columns j < D of a (P, R) one (SLOT_AXIS 1), D
        the count of its slot mask. Program (i, b): elements [b BLOCK, (b + 1) BLOCK) of tensor i."""
        i = tl.program_id(0)
        start = tl.program_id(1) * BLOCK
        keep = tl.load(tl.load(mask_tab + i).to(tl.pointer_type(tl.int8)) + tl.arange(0, R_BLOCK),
                       mask=tl.arange(0, R_BLOCK) < R, other=0)
        d = tl.sum(keep.to(tl.int32), axis=0)
        offs = start + tl.arange(0, BLOCK)
        if SLOT_AXIS == 0:
            live = offs < d * Q
        else:
            live = (offs < numel) & ((offs % R) < d)
        if tl.max(live.to(tl.int32), axis=0) > 0:
            p = tl.load(p_tab + i).to(tl.pointer_type(tl.float32))
            g = tl.load(g_tab + i).to(tl.pointer_type(tl.float32))
            m = tl.load(m_tab + i).to(tl.pointer_type(tl.float32))
            v = tl.load(v_tab + i).to(tl.pointer_type(tl.float32))
            step = tl.load(tl.load(step_tab + i).to(tl.pointer_type(tl.float32)))
            lr = tl.load(lr_ptr)
            bc1 = 1.0 - tl.exp(step * log_beta1)
            bc2_sqrt = tl.sqrt_rn(1.0 - tl.exp(step * log_beta2))  # IEEE sqrt and division, as torch's
            x = tl.load(p + offs, mask=live, other=0.0)
            gr = tl.load(g + offs, mask=live, other=0.0)
            ma = tl.load(m + offs, mask=live, other=0.0)
            va = tl.load(v + offs, mask=live, other=0.0)
            x = x - lr * wd * x  # the order of torch's fused AdamW
            ma = beta1 * ma + (1.0 - beta1) * gr
            va = beta2 * va + (1.0 - beta2) * gr * gr
            denom = tl.div_rn(tl.sqrt_rn(va), bc2_sqrt) + eps
            x = x - tl.div_rn(tl.div_rn(lr, bc1) * ma, denom)
            tl.store(p + offs, x, mask=live)
            tl.store(m + offs, ma, mask=live)
            tl.store(v + offs, va, mask=live)


def adamw_slots(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], masks: list[torch.Tensor], axis: int,
                lr: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update (steps already incremented) of same-shape fp32 tensors, touching only their active slots
    (see _adamw_slots): a slot outside the mask has zero value, gradient and moments, where AdamW changes
    nothing. masks: bool (R,) each, prefixes (the first D slots active); lr: a 0-d fp32 device tensor; steps: 0-d
    fp32 device tensors; 0 < beta < 1. Returns the pointer tables it launched with."""
    n, dev = len(params), params[0].device
    shape = params[0].shape
    R = shape[axis]
    numel = params[0].numel()
    block = 1024
    tables = tuple(_table([t.data_ptr() for t in ts], dev) for ts in (params, grads, exp_avgs, exp_avg_sqs, steps,
                                                                        masks))
    _adamw_slots[(n, triton.cdiv(numel, block))](
        *tables, lr, float(beta1), float(beta2), math.log(beta1), math.log(beta2), float(eps), float(weight_decay),
        R, shape[1], numel, SLOT_AXIS=axis, R_BLOCK=triton.next_power_of_2(R), BLOCK=block, num_warps=4)
    return tables


_TABLES: dict[tuple, torch.Tensor] = {}  # pointer tables by (device, pointers): made once, reused every step


def _table(ptrs: list[int], device: torch.device) -> torch.Tensor:
    """The int64 device tensor of these pointers, made once per pointer list. A new one is copied from pinned
    memory without a host sync (eager steps whose gradients move get new tables). Callers whose launches are
    replayed by a CUDA graph keep their own reference (SlotAdamW): a cleared entry is then not freed."""
    key = (device, tuple(ptrs))
    entry = _TABLES.get(key)
    if entry is None:
        if len(_TABLES) > 256:  # pointers of tensors long gone (a new optimizer, a reloaded run)
            _TABLES.clear()
        host = torch.tensor(ptrs or [0], dtype=torch.int64)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
            entry = _TABLES[key] = (host.to(device, non_blocking=True), host)  # the pinned source outlives the copy
        else:
            entry = _TABLES[key] = (host.to(device), host)
    return entry[0]


def resize_slots(old: torch.Tensor, new: torch.Tensor, std: torch.Tensor, a: list[torch.Tensor],
                 b: list[torch.Tensor], shadows: list[torch.Tensor | None], a_moments: list[list[torch.Tensor]],
                 b_moments: list[list[torch.Tensor]], seed: torch.Tensor | None = None) -> None:
    """Rewrite the slots between old[i] and new[i] of same-shape layers i (see _resize_slots), in place.

    a: fp32 (R, k) factors, b: fp32 (d, R), shadows: each A's compute-dtype copy or None, a_moments/b_moments:
    per optimizer state key, the fp32 moment of every layer's A / B. old, new: (n,) ranks; std: (n,) fp32.
    Random rows come from `seed` (a (1,) int64 device tensor), by default drawn from the device's torch generator
    (reproducible under manual_seed)."""
    n, dev = len(a), a[0].device
    (R, K), D = a[0].shape, b[0].shape[0]
    if seed is None:
        seed = torch.randint(0, 2 ** 62, (1,), device=dev)
    real = [s for s in shadows if s is not None]  # one dtype, bf16 or fp16 (the caller checks)
    like = real[0] if real else torch.empty(1, device=dev, dtype=torch.bfloat16)  # no copy is written then
    block_k = min(triton.next_power_of_2(K), 1024)
    block_d = min(triton.next_power_of_2(D), 1024)
    _resize_slots[(n,)](old, new, std.float().contiguous(), seed, _table([t.data_ptr() for t in a], dev),
                        _table([t.data_ptr() for t in b], dev),
                        _table([0 if s is None else s.data_ptr() for s in shadows], dev), like,
                        _table([t.data_ptr() for ts in a_moments for t in ts], dev),
                        _table([t.data_ptr() for ts in b_moments for t in ts], dev),
                        n, len(a_moments), len(b_moments), R, K, D, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)


def row_entropy(z: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and log-sum-exp of softmax(scale * z) over the last dimension, fp32, one per row."""
    z = z.contiguous()
    n = z.shape[-1]
    rows = z.numel() // n
    h = torch.empty(z.shape[:-1], device=z.device, dtype=torch.float32)
    lse = torch.empty_like(h)
    if rows:
        block, warps = _block(n)
        _row_entropy_fwd[(rows,)](z, h, lse, n, float(scale), BLOCK=block, num_warps=warps)
    return h, lse


def row_entropy_backward_(z: torch.Tensor, lse: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                          scale: float = 1.0) -> torch.Tensor:
    """Overwrite contiguous z with w_l p (log p + H), p = softmax(scale * z), row by row (z's rows split evenly over
    the weights w_l, fp32) and return it: for w_l = -c_l scale, the gradient of sum_l c_l sum_rows H w.r.t. z."""
    n = z.shape[-1]
    rows = z.numel() // n
    if rows:
        assert z.is_contiguous() and rows % w.numel() == 0
        block, warps = _block(n)
        _row_entropy_bwd[(rows,)](z, lse, h, w.float().contiguous(), n, rows // w.numel(), float(scale),
                                  BLOCK=block, num_warps=warps)
    return z
