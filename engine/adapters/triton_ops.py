"""Triton kernels for LoRA²'s hot spots (and TriLoRA's fold), which torch runs as many full memory passes (CUDA only).

- Row entropy of softmax(z) over the last dimension, and its gradient, each in one pass over z: the torch form
  (log_softmax to fp32, exp, multiply, sum; in the backward four more passes) moved ~10 GB a step at SDXL 1024 px.
- LoRA²'s per-step resize: only the slots whose rank moved are rewritten (a row of A, a column of B, their
  optimizer moments and the compute-dtype copy of A), for a whole shape group in one launch through tables of
  pointers. The torch form stacks and rewrites every factor and moment of the group (~9 GB a step at SDXL r16).
- AdamW on the active slots only (engine/optim.py's SlotAdamW): the idle half of LoRA²'s 2r-wide buffers is
  neither read nor written; torch's fused AdamW is the torch form.
- s B diag(v) of a shape group (TriLoRA's and LoRA²'s fold, base.FoldVectors) in one pass from the fp32 factors to
  the compute dtype, and its gradients in one more (B's added into .grad): the torch form stacks B, multiplies
  and casts (forward), and in the backward casts, multiplies, stacks again and adds (~1.6 ms of kernels a step in
  the stop-16 eager profile of LoRA² r64 on SDXL).

Every kernel has a torch equivalent in the caller, used on the CPU, without Triton, and for float64 (the tests);
`ENABLED = False` forces the torch form everywhere (the bench's ablation). The GPU tests check kernel = torch form.
The fold and fused-entropy kernels are also checked against their torch form at each launch shape's first use in
a process (to_check, verdict, trusted; their callers in base.py and lora2.py): a GPU, driver or Triton version
that compiles them wrong gets the torch form there and a notice for the user (fall_back), not wrong gradients.
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
_NOTICES: list[str] = []  # fallbacks not yet taken by the trainer (take_notices), which logs them for the user
_ACTIVE: list[str] = []  # every fallback in effect in this process: a later run there is told too


def fall_back(message: str, stacklevel: int = 2) -> None:
    """A kernel gives way to its torch form (slower, same maths) from now on in this process: a RuntimeWarning,
    and the message queued for the trainer's run log (engine.train turns it into a Notice event: the studio and
    the CLI show it) and kept for the runs after it (active_fallbacks)."""
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
    _NOTICES.append(message)
    if message not in _ACTIVE:
        _ACTIVE.append(message)


def active_fallbacks() -> list[str]:
    """Every fallback message of this process so far (each kernel and shape stays on its torch form)."""
    return list(_ACTIVE)


def take_notices() -> list[str]:
    """The fallback messages since the last call (see fall_back), oldest first."""
    out = _NOTICES[:]
    del _NOTICES[:len(out)]
    return out


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
                v = torch.ones(1, 2, device=device)
                fold_vectors_backward(fold_vectors([b], v, 1.0, torch.bfloat16), [b], v, 1.0, True, True, [b.clone()])
                ok = True
            except Exception as e:  # noqa: BLE001 - any compile or launch failure means: use the torch form
                fall_back(f"Triton kernels unavailable on {device} ({type(e).__name__}: {str(e)[:200]}); "
                          "LoRA² and TriLoRA use their slower torch form", stacklevel=2)
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
    def _adamw_slots(p_tab, g_tab, m_tab, v_tab, step_tab, mask_tab, lr_ptr, gs_ptr, beta1, beta2, log_beta1,
                     log_beta2, eps, wd, R, Q, numel, SLOT_AXIS: tl.constexpr, HAS_GS: tl.constexpr,
                     R_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        """torch's AdamW (decoupled decay, bias corrections from the param's own step) on the active slots only of
        tensor i: rows j < D of an (R, Q) factor (SLOT_AXIS 0) or columns j < D of a (P, R) one (SLOT_AXIS 1), D
        the count of its slot mask, with the gradient times gs if HAS_GS (a gradient-norm clip's coefficient).
        Program (i, b): elements [b BLOCK, (b + 1) BLOCK) of tensor i."""
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
            if HAS_GS:
                gr = gr * tl.load(gs_ptr)  # as clip_grad_norm_'s multiply
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
                lr: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW update (steps already incremented) of same-shape fp32 tensors, touching only their active slots
    (see _adamw_slots): a slot outside the mask has zero value, gradient and moments, where AdamW changes
    nothing. masks: bool (R,) each, prefixes (the first D slots active); lr: a 0-d fp32 device tensor; steps: 0-d
    fp32 device tensors; 0 < beta < 1; grad_scale: a 0-d fp32 device tensor the gradients are multiplied by (a
    clip's coefficient), None for none. A CUDA graph that captures it keeps its pointer tables (_table)."""
    n, dev = len(params), params[0].device
    shape = params[0].shape
    R = shape[axis]
    numel = params[0].numel()
    block = 1024
    tables = tuple(_table([t.data_ptr() for t in ts], dev) for ts in (params, grads, exp_avgs, exp_avg_sqs, steps,
                                                                        masks))
    _adamw_slots[(n, triton.cdiv(numel, block))](
        *tables, lr, lr if grad_scale is None else grad_scale, float(beta1), float(beta2), math.log(beta1),
        math.log(beta2), float(eps), float(weight_decay), R, shape[1], numel, SLOT_AXIS=axis,
        HAS_GS=grad_scale is not None, R_BLOCK=triton.next_power_of_2(R), BLOCK=block, num_warps=4)


_TABLES: dict[tuple, tuple] = {}  # pointer tables by (device, pointers): made once, reused every step
_KEPT: list[tuple] = []  # tables a CUDA graph capture made or used: never freed (see _table)


def capturing() -> bool:
    """Whether a CUDA graph capture is under way on the current stream (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# --- first-use check: each new launch shape is compared once with its torch form ------------------------------
CHECK_FIRST_USE = True  # False: trust the kernels without comparing (the bench's kernel timings may set it)
_CHECKED: dict[tuple, bool] = {}  # launch key -> did the kernel's first result there match its torch form?
ERRORS: dict[tuple, float] = {}  # launch key -> the worst relative error its check measured (for the bench)
_TRIES: dict[tuple, int] = {}  # launch key -> checks so far whose figures said nothing (see verdict)


def to_check(key: tuple) -> bool:
    """Whether the kernel at this launch key (family, device, shapes, variant) is to be compared with its torch
    form now: the first time it runs there, and not inside a CUDA graph capture (the comparison syncs once)."""
    return CHECK_FIRST_USE and key not in _CHECKED and not capturing()


def trusted(key: tuple) -> bool:
    """Whether the kernel may run at this launch key: checks are off, or its check passed, or it has not been
    checked yet outside a CUDA graph capture (the check comes at a later launch: see verdict). Inside a capture
    an unchecked kernel is not trusted: nothing verified what the graph would replay, so the torch form goes in."""
    if not CHECK_FIRST_USE:
        return True
    ok = _CHECKED.get(key)
    return not capturing() if ok is None else ok


def failed(key: tuple) -> bool:
    """Whether the kernel at this launch key gave wrong values at its check: the caller uses its torch form."""
    return _CHECKED.get(key) is False


def rel_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """||got - want|| / ||want|| on the device, no host sync: inf where got has a NaN or inf, or want is zero and
    got is not; NaN (no verdict) where want is not finite (nor were the inputs) or where both are zero (the
    factors at their init, say: a wrong kernel could give zero there too). In fp32 after dividing both by
    max |want|, so that tiny gradients (LoRA²'s entropy term, ~1e-12) neither underflow to a zero norm nor need a
    float64 copy."""
    if want.numel() == 0:
        return torch.full((), math.nan, device=want.device)
    got, want = got.float(), want.float()
    top = want.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    diff, norm = (got - want).div_(top).norm(), (want / top).norm()
    err = torch.where(diff == 0, torch.zeros_like(diff), diff / norm)  # x / 0 = inf
    err = torch.where(norm == 0, torch.where(diff == 0, torch.full_like(err, math.nan), err), err)
    err = torch.where(torch.isfinite(got).all(), err, torch.full_like(err, math.inf))
    return torch.where(torch.isfinite(want).all(), err, torch.full_like(err, math.nan))


CHECK_TRIES = 3  # launches a key is checked at while its figures say nothing (NaN), before it is trusted


def reject(key: tuple, what: str, error: Exception) -> str:
    """Records that the kernel at this launch key raised at its check (it could not compile or get its resources
    at these sizes on this GPU): the torch form there from now on. Returns what went wrong, for the warning."""
    _CHECKED[key] = False
    return f"{what} could not run ({type(error).__name__}: {str(error)[:200]})"


def verdict(key: tuple, what: str, errors: list[torch.Tensor], rtol: float) -> str | None:
    """Records the check of a kernel's first result at this launch key from its rel_error figures (one host
    sync): None when all are within rtol, else what went wrong, for the caller's warning. A GPU, driver or Triton
    version on which a kernel computes wrong values then trains with the torch form, not with wrong gradients.
    A figure that says nothing (NaN: zero or non-finite references) is ignored; where none says anything, the
    key is checked again at its next launch, up to CHECK_TRIES launches (then trusted: no sync every step)."""
    figures = torch.stack([e.reshape(()) for e in errors]).tolist() if errors else []
    known = [x for x in figures if not math.isnan(x)]
    if not known and figures:
        _TRIES[key] = tries = _TRIES.get(key, 0) + 1
        if tries >= CHECK_TRIES:
            _CHECKED[key] = True
        return None
    worst = max(known, default=0.0)
    ERRORS[key] = worst
    _CHECKED[key] = ok = worst <= rtol
    return None if ok else f"{what}: relative error {worst:.3g} against the torch form (tolerance {rtol:g})"


def _table(ptrs: list[int], device: torch.device) -> torch.Tensor:
    """The int64 device tensor of these pointers, made once per pointer list. A new one is copied from pinned
    memory without a host sync (eager steps whose activations or gradients move get new tables). A table that a
    CUDA graph capture makes or uses is kept for good, with its pinned source: every replay repeats the copy from
    that host memory and reads the device table. One made inside a capture is never handed out again: its device
    copy exists only once that graph has replayed, which a failed capture never does."""
    key = (device, tuple(ptrs))
    in_capture = capturing()
    entry = _TABLES.get(key)
    if entry is None:
        if len(_TABLES) > 256:  # pointers of tensors long gone (a new optimizer, a reloaded run)
            _TABLES.clear()
        host = torch.tensor(ptrs or [0], dtype=torch.int64)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
            entry = (host.to(device, non_blocking=True), host)  # the pinned source outlives the copy
        else:
            entry = (host.to(device), host)
        if not in_capture:
            _TABLES[key] = entry
    if in_capture:
        _KEPT.append(entry)  # the graph reads it: a later clear of _TABLES must not free it
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


# --- LoRA²'s cross-attention entropy straight from q and k (no score map) -------------------------------------
FUSED_ENTROPY = True  # False: the scores go through a buffer and the row kernels above (the bench's ablation)
ENTROPY_BLOCK_N = 64  # image positions per tile (32 for heads over 64 channels: no register spills on sm_80/89)
ENTROPY_WARPS = 8  # warps per program (bench/compile_kernels.py: 8 spill no registers on sm_90, 4 did)
ENTROPY_LAYERS = 16  # layers per launch: their q and k are passed as arguments (no pointer table to copy, which a
#                      CUDA graph capture, where the activations get their addresses, could not do safely)
_FUSED_FAILED: set[tuple] = set()  # (device, dtype, head channels, tokens) whose fused launch raised


def _fused_key(q: torch.Tensor, k: torch.Tensor) -> tuple:
    return q.device, q.dtype, q.shape[-1], k.shape[-2]


def fused_entropy_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attn_entropy can take these (B, h, N, hd) queries and (B, h, T, hd) keys: a 16-bit float (the
    tiles' dot products run on the tensor cores), heads of at most 128 channels and at most 256 text tokens (one
    register tile holds a head's keys), unit stride along the head's channels, usable(), and no earlier failure
    at these sizes (fused_failed)."""
    return (FUSED_ENTROPY and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and q.shape[-1] <= 128 and k.shape[-2] <= 256 and q.stride(-1) == 1 and k.stride(-1) == 1
            and not fused_retired(q, k) and usable(q))


def fused_retired(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a fused launch at these sizes has already failed (fused_failed)."""
    return _fused_key(q, k) in _FUSED_FAILED


def fused_failed(q: torch.Tensor, k: torch.Tensor, error: Exception) -> None:
    """A fused launch raised outside a graph capture (it could not compile or get its resources on this GPU, at
    these sizes): warn once; these sizes take the score buffer and row kernels from then on. Inside a capture the
    caller re-raises instead: the trainer then falls back to eager steps, where this is reached."""
    _FUSED_FAILED.add(_fused_key(q, k))
    fall_back(f"LoRA²'s fused entropy kernels failed for heads of {q.shape[-1]} channels and {k.shape[-2]} "
              f"tokens on {q.device} ({type(error).__name__}: {str(error)[:200]}); using the score-buffer "
              "kernels there", stacklevel=3)


if triton is not None:
    @triton.jit
    def _pick(i, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15):
        """Argument i of p0..p15 (i is the program's layer)."""
        p = p0
        p = tl.where(i == 1, p1, p)
        p = tl.where(i == 2, p2, p)
        p = tl.where(i == 3, p3, p)
        p = tl.where(i == 4, p4, p)
        p = tl.where(i == 5, p5, p)
        p = tl.where(i == 6, p6, p)
        p = tl.where(i == 7, p7, p)
        p = tl.where(i == 8, p8, p)
        p = tl.where(i == 9, p9, p)
        p = tl.where(i == 10, p10, p)
        p = tl.where(i == 11, p11, p)
        p = tl.where(i == 12, p12, p)
        p = tl.where(i == 13, p13, p)
        p = tl.where(i == 14, p14, p)
        p = tl.where(i == 15, p15, p)
        return p

    @triton.jit
    def _head_tiles(q, k, bh, heads, sqb, sqh, skb, skh, skt, T, HD: tl.constexpr, VEC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """Head bh = b * heads + h of one layer: its query base pointer and its keys, a (BLOCK_T, BLOCK_D) tile
        (zero beyond T tokens and HD channels). The strides come divided by VEC (see _entropy_plan): multiplying
        them back tells the compiler that rows start on VEC-element boundaries (16-byte loads for VEC = 8)."""
        b = (bh // heads).to(tl.int64)
        h = (bh % heads).to(tl.int64)
        q = q + b * (sqb.to(tl.int64) * VEC) + h * (sqh.to(tl.int64) * VEC)
        k = k + b * (skb.to(tl.int64) * VEC) + h * (skh.to(tl.int64) * VEC)
        rt = tl.arange(0, BLOCK_T)
        rd = tl.arange(0, BLOCK_D)
        kb = tl.load(k + rt[:, None].to(tl.int64) * (skt.to(tl.int64) * VEC) + rd[None, :],
                     mask=(rt[:, None] < T) & (rd[None, :] < HD), other=0.0)
        return q, kb

    @triton.jit
    def _attn_entropy_fwd(q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15,
                          k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13, k14, k15,
                          out0, out1, out2, heads, N, T, span, sqb, sqh, sqn, skb, skh, skt, scale,
                          HD: tl.constexpr, VEC: tl.constexpr, FINAL: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (i, b * heads + h, s): every text token's attention over image positions [s span, (s + 1) span)
        in layer i (q_i, k_i), batch item b, head h, with z = scale k_t . q_n formed tile by tile in fp32 and never
        stored. Per token, online over the tiles: m (max z), e = sum e^(z - m), u = sum e^(z - m) z. FINAL (one
        span): out0 = lse = m + log e and out1 = H = lse - u / e; else out0..2 = m, e, u, each (L, S, B heads, T)."""
        i = tl.program_id(0)
        bh = tl.program_id(1)
        sp = tl.program_id(2)
        q = _pick(i, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15)
        k = _pick(i, k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13, k14, k15)
        q, kb = _head_tiles(q, k, bh, heads, sqb, sqh, skb, skh, skt, T, HD, VEC, BLOCK_T, BLOCK_D)
        rt = tl.arange(0, BLOCK_T)
        rd = tl.arange(0, BLOCK_D)
        rn = tl.arange(0, BLOCK_N)
        m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        e = tl.zeros([BLOCK_T], tl.float32)
        u = tl.zeros([BLOCK_T], tl.float32)
        start = sp * span
        end = tl.minimum(start + span, N)
        for n0 in tl.range(start, end, BLOCK_N):
            cols = n0 + rn
            inside = cols < end
            qt = tl.load(q + cols[:, None].to(tl.int64) * (sqn.to(tl.int64) * VEC) + rd[None, :],
                         mask=inside[:, None] & (rd[None, :] < HD), other=0.0)
            z = tl.dot(kb, tl.trans(qt)) * scale  # (BLOCK_T, BLOCK_N)
            z = tl.where(inside[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a column inside
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])
            e = e * alpha + tl.sum(p, axis=1)
            u = u * alpha + tl.sum(p * tl.where(inside[None, :], z, 0.0), axis=1)
            m = m_new
        row = ((i * tl.num_programs(2) + sp) * tl.num_programs(1) + bh).to(tl.int64) * T + rt
        if FINAL:
            lse = m + tl.log(e)
            tl.store(out0 + row, lse, mask=rt < T)
            tl.store(out1 + row, lse - u / e, mask=rt < T)
        else:
            tl.store(out0 + row, m, mask=rt < T)
            tl.store(out1 + row, e, mask=rt < T)
            tl.store(out2 + row, u, mask=rt < T)

    @triton.jit
    def _attn_entropy_bwd(q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15,
                          k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13, k14, k15,
                          lse_ptr, h_ptr, w_ptr, dq_ptr, dk_ptr, heads, N, T, span, sqb, sqh, sqn, skb, skh, skt,
                          scale, HD: tl.constexpr, VEC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        """Program (i, b * heads + h, s), over the same tiles as _attn_entropy_fwd: the scores' gradient is
        dz = w_i g with g = p (log p + H) (see _row_entropy_bwd; w_i = -c_i scale). g, within [-1/e, log N], is
        rounded to q's dtype for the two GEMMs as a GEMM on a stored dz would take it; w_i multiplies their fp32
        results (w_i g itself, ~1e-12 at LoRA²'s lambda_e, would flush to zero in fp16). dq rows = w_i g^T k go to
        dq (L, B, N, heads, HD) in q's dtype; this span's dk = w_i g q, summed over its tiles in fp32, goes to dk
        (L, S, B, T, heads, HD)."""
        i = tl.program_id(0)
        bh = tl.program_id(1)
        sp = tl.program_id(2)
        n_bh = tl.num_programs(1)
        q = _pick(i, q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15)
        k = _pick(i, k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13, k14, k15)
        q, kb = _head_tiles(q, k, bh, heads, sqb, sqh, skb, skh, skt, T, HD, VEC, BLOCK_T, BLOCK_D)
        dtype = q0.dtype.element_ty
        b = (bh // heads).to(tl.int64)
        h = (bh % heads).to(tl.int64)
        rt = tl.arange(0, BLOCK_T)
        rd = tl.arange(0, BLOCK_D)
        rn = tl.arange(0, BLOCK_N)
        row_ok = rt < T
        d_ok = rd < HD
        row = (i * n_bh + bh).to(tl.int64) * T + rt
        lse = tl.load(lse_ptr + row, mask=row_ok, other=0.0)
        ent = tl.load(h_ptr + row, mask=row_ok, other=0.0)
        w = tl.load(w_ptr + i)
        width = heads * HD  # row stride of dq and dk: (.., positions, heads, HD)
        b_all = n_bh // heads
        dq = dq_ptr + ((i * b_all + b) * N) * width + h * HD
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        start = sp * span
        end = tl.minimum(start + span, N)
        for n0 in tl.range(start, end, BLOCK_N):
            cols = n0 + rn
            inside = cols < end
            tile = inside[:, None] & d_ok[None, :]
            qt = tl.load(q + cols[:, None].to(tl.int64) * (sqn.to(tl.int64) * VEC) + rd[None, :], mask=tile, other=0.0)
            logp = tl.dot(kb, tl.trans(qt)) * scale - lse[:, None]
            g = tl.exp(logp) * (logp + ent[:, None])
            g = tl.where(row_ok[:, None] & inside[None, :], g, 0.0).to(dtype)
            dqt = tl.dot(tl.trans(g), kb) * w  # (BLOCK_N, BLOCK_D)
            tl.store(dq + cols[:, None].to(tl.int64) * width + rd[None, :], dqt.to(dtype), mask=tile)
            acc = tl.dot(g, qt, acc)
        dk = dk_ptr + ((i * tl.num_programs(2) + sp) * b_all + b) * T * width + h * HD
        tl.store(dk + rt[:, None].to(tl.int64) * width + rd[None, :], acc * w, mask=row_ok[:, None] & d_ok[None, :])


_SMS: dict[torch.device, int] = {}


def _entropy_plan(qs, ks) -> tuple[int, int, tuple, dict]:
    """Spans per (layer, head) program, their width, the strides to pass and the kernels' meta-parameters for L
    same-shape layers: enough spans of image positions that a launch fills the GPU about twice (a 64x64 SDXL group
    has 10 heads). Strides that are all multiples of 8 go divided by 8 (VEC = 8): SD1.5's 40-channel heads are
    not 16-aligned as Triton checks arguments, but every row still starts on a 16-byte boundary."""
    dev = qs[0].device
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    b, heads, n, hd = qs[0].shape
    block_d = max(16, triton.next_power_of_2(hd))
    block_n = ENTROPY_BLOCK_N if block_d <= 64 else ENTROPY_BLOCK_N // 2
    tiles = triton.cdiv(n, block_n)
    programs = min(len(qs), ENTROPY_LAYERS) * b * heads
    split = max(1, min(tiles, triton.cdiv(2 * _SMS[dev], programs)))
    span = triton.cdiv(tiles, split) * block_n
    strides = tuple(0 if size == 1 else st for t in (qs[0], ks[0])  # sqb, sqh, sqn, skb, skh, skt; a size-1
                    for size, st in zip(t.shape[:3], t.stride()[:3], strict=True))  # axis is only read at 0
    vec = 8 if all(x % 8 == 0 for x in strides) else 1
    meta = dict(HD=hd, VEC=vec, BLOCK_T=max(16, triton.next_power_of_2(ks[0].shape[2])), BLOCK_N=block_n,
                BLOCK_D=block_d, num_warps=ENTROPY_WARPS)
    return triton.cdiv(n, span), span, tuple(x // vec for x in strides), meta  # no empty span


def _launches(qs, ks):
    """(first layer, layer count, the 32 q and k arguments) of each launch: ENTROPY_LAYERS layers at most, unused
    argument slots repeat the first layer's tensors (never read)."""
    for j in range(0, len(qs), ENTROPY_LAYERS):
        q, k = list(qs[j:j + ENTROPY_LAYERS]), list(ks[j:j + ENTROPY_LAYERS])
        n = len(q)
        yield j, n, q + [q[0]] * (ENTROPY_LAYERS - n) + k + [k[0]] * (ENTROPY_LAYERS - n)


def attn_entropy(qs: list[torch.Tensor], ks: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and log-sum-exp of softmax over image positions of scale * k q^T, for L same-shape layers
    (each q (B, h, N, hd), k (B, h, T, hd), same strides; see fused_entropy_ok) -> fp32 (L * B * h, T) each, as
    row_entropy of their score maps gives, without forming the maps."""
    b, heads, n, _ = qs[0].shape
    t = ks[0].shape[2]
    split, span, strides, meta = _entropy_plan(qs, ks)
    parts = torch.empty(3, len(qs), split, b * heads, t, device=qs[0].device, dtype=torch.float32)
    for j, count, args in _launches(qs, ks):
        _attn_entropy_fwd[(count, b * heads, split)](*args, parts[0, j:], parts[1, j:], parts[2, j:], heads, n, t,
                                                     span, *strides, float(scale), FINAL=split == 1, **meta)
    if split == 1:
        return parts[1].view(-1, t), parts[0].view(-1, t)  # H, lse
    m, e, u = parts
    top = m.amax(1, keepdim=True)
    w = (m - top).exp_()
    total = (e * w).sum(1)
    lse = top.squeeze(1) + total.log()
    return (lse - (u * w).sum(1) / total).view(-1, t), lse.view(-1, t)


def attn_entropy_backward(qs: list[torch.Tensor], ks: list[torch.Tensor], lse: torch.Tensor, ent: torch.Tensor,
                          w: torch.Tensor, scale: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients for q and k of sum_l c_l sum_rows H (w_l = -c_l scale, fp32 (L,)), from attn_entropy's lse and H,
    recomputing the scores tile by tile -> per layer dq (B, N, h, hd) and dk (B, T, h, hd) in q's dtype: the
    (B, S, h * hd) layout of the projections they flow back into. One buffer per launch: autograd frees it once
    its <= 16 layers have taken their gradients, not only after the group's last one."""
    b, heads, n, hd = qs[0].shape
    t = ks[0].shape[2]
    split, span, strides, meta = _entropy_plan(qs, ks)
    lse, ent, w = lse.contiguous().view(len(qs), -1), ent.contiguous().view(len(qs), -1), w.float().contiguous()
    dqs, dks = [], []
    for j, count, args in _launches(qs, ks):
        dq = qs[0].new_empty(count, b, n, heads, hd)
        dk = torch.empty(count, split, b, t, heads, hd, device=qs[0].device, dtype=torch.float32)
        _attn_entropy_bwd[(count, b * heads, split)](*args, lse[j:], ent[j:], w[j:], dq, dk, heads, n, t, span,
                                                     *strides, float(scale), **meta)
        dqs.extend(dq.unbind(0))
        dks.extend((dk[:, 0] if split == 1 else dk.sum(1)).to(qs[0].dtype).unbind(0))
    return dqs, dks


# --- s B diag(v) of a shape group (base.FoldVectors), forward and backward -----------------------------------
FOLD_KERNELS = True  # False: FoldVectors' torch form (stack, multiply, cast; the bench's ablation)
FOLD_TILE = 4096  # elements per program: rows of B times the rank (rounded up to a power of two)


def fold_ok(ups: list[torch.Tensor], vecs: list[torch.Tensor]) -> bool:
    """Whether fold_vectors can take these: n same-shape contiguous 16-byte aligned fp32 (D, R) factors and fp32
    (R,) vectors on a device the kernels run on, R <= 1024, outside torch.compile (the tables hold addresses)."""
    up = ups[0]
    return (FOLD_KERNELS and not torch.compiler.is_compiling() and up.dim() == 2
            and up.shape[1] <= 1024 and up.numel() < 2 ** 31
            and all(u.dtype == torch.float32 and u.device == up.device and u.is_contiguous() and u.shape == up.shape
                    for u in ups)
            and all(v.dtype == torch.float32 and v.shape == up.shape[1:] for v in vecs) and usable(up)
            and aligned(ups))


def aligned(ts: list[torch.Tensor]) -> bool:
    """Whether every tensor starts on a 16-byte boundary (fresh allocations do; a view at an offset may not)."""
    return all(t.data_ptr() % 16 == 0 for t in ts)


def _offsets(ts: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Device table of each tensor's start as an offset in elements from base's (same element size; see _table)."""
    size = base.element_size()
    return _table([(t.data_ptr() - base.data_ptr()) // size for t in ts], base.device)


def _fold_meta(shape: torch.Size) -> tuple[int, dict]:
    d, r = shape
    r_block = triton.next_power_of_2(r)
    block_d = max(1, min(triton.next_power_of_2(d), FOLD_TILE // r_block))
    return triton.cdiv(d, block_d), dict(BLOCK_D=block_d, R_BLOCK=r_block, num_warps=8)


if triton is not None:
    @triton.jit
    def _fold_fwd(up_ptr, up_tab, vec_ptr, out_ptr, scale, D, R, LOW: tl.constexpr, BLOCK_D: tl.constexpr,
                  R_BLOCK: tl.constexpr):
        """out[i] = B_i * (v_i * scale) in out's dtype (rounded to nearest even, as torch's .to()). Program (i, b):
        rows [b BLOCK_D, (b + 1) BLOCK_D) of layer i's fp32 (D, R) factor B_i = up_ptr + up_tab[i] (an offset in
        elements from the first layer's: a multiple of 4, which Triton can see, unlike a pointer read from a
        table); v: (n, R) fp32; out: (n, D, R)."""
        i = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = tl.arange(0, R_BLOCK)
        v = tl.load(vec_ptr + i * R + cols, mask=cols < R, other=0.0) * scale
        inside = (rows[:, None] < D) & (cols[None, :] < R)
        at = rows[:, None] * R + cols[None, :]  # int32: one factor has < 2^31 elements (fold_ok)
        up = up_ptr + tl.multiple_of(tl.load(up_tab + i), 4)  # 16-byte aligned rows: 16-byte loads
        y = tl.load(up + at, mask=inside, other=0.0) * v[None, :]
        dst = out_ptr + i.to(tl.int64) * D * R + at
        if LOW:
            tl.store(dst, y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inside)
        else:
            tl.store(dst, y, mask=inside)

    @triton.jit
    def _fold_bwd(g_ptr, up_ptr, up_tab, vec_ptr, gup_tab, gup_ptr, part_ptr, scale, D, R, UP: tl.constexpr,
                  INTO: tl.constexpr, ACCUM: tl.constexpr, VEC: tl.constexpr, BLOCK_D: tl.constexpr,
                  R_BLOCK: tl.constexpr):
        """From g = dL/d out (n, D, R), for the rows of program (i, b): if UP, g * (v_i * scale) for B_i, into
        the (D, R) fp32 tensor at up_ptr + gup_tab[i] (INTO: added if ACCUM, else stored) or stored in gup (n, D,
        R) fp32; if VEC, the column sums of g * B_i over these rows into part (n, blocks, R), which the caller
        sums and scales."""
        i = tl.program_id(0)
        blk = tl.program_id(1)
        rows = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = tl.arange(0, R_BLOCK)
        inside = (rows[:, None] < D) & (cols[None, :] < R)
        at = rows[:, None] * R + cols[None, :]
        off = i.to(tl.int64) * D * R
        g = tl.load(g_ptr + off + at, mask=inside, other=0.0).to(tl.float32)
        if UP:
            gu = g * (tl.load(vec_ptr + i * R + cols, mask=cols < R, other=0.0) * scale)[None, :]
            if INTO:
                dst = up_ptr + tl.multiple_of(tl.load(gup_tab + i), 4)
                if ACCUM:
                    gu += tl.load(dst + at, mask=inside, other=0.0)
                tl.store(dst + at, gu, mask=inside)
            else:
                tl.store(gup_ptr + off + at, gu, mask=inside)
        if VEC:
            up = up_ptr + tl.multiple_of(tl.load(up_tab + i), 4)
            part = tl.sum(g * tl.load(up + at, mask=inside, other=0.0), axis=0)
            tl.store(part_ptr + (i * tl.num_programs(1) + blk).to(tl.int64) * R + cols, part, mask=cols < R)


def fold_vectors(ups: list[torch.Tensor], vecs: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """(n, D, R) tensor in dtype of B_i * (v_i * scale), one launch (see fold_ok); vecs: (n, R) fp32. The torch form
    (stack, multiply, cast) makes three full passes over the group's B and two fp32 copies of it."""
    n, (d, r), dev = len(ups), ups[0].shape, ups[0].device
    blocks, meta = _fold_meta(ups[0].shape)
    out = torch.empty(n, d, r, device=dev, dtype=dtype)
    _fold_fwd[(n, blocks)](ups[0], _offsets(ups, ups[0]), vecs.contiguous(), out, float(scale), d, r,
                           LOW=dtype != torch.float32, **meta)
    return out


def fold_vectors_backward(g: torch.Tensor, ups: list[torch.Tensor], vecs: torch.Tensor, scale: float,
                          need_up: bool, need_vec: bool, into: list[torch.Tensor] | None = None,
                          accumulate: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fold_vectors' backward in one launch, from g (n, D, R) (any float dtype): (gradient of the B_i as one (n, D,
    R) fp32 tensor, or None when written into `into` (one 16-byte aligned contiguous fp32 (D, R) tensor per B_i:
    their .grad, added to if `accumulate`, else overwritten) or not needed; gradient of the v_i (n, R) fp32, or
    None). Same products as the torch form; only the sums over D run in another order."""
    n, (d, r), dev = len(ups), ups[0].shape, ups[0].device
    blocks, meta = _fold_meta(ups[0].shape)
    g = g.contiguous()
    gup = torch.empty(n, d, r, device=dev, dtype=torch.float32) if need_up and into is None else None
    part = torch.empty(n, blocks, r, device=dev, dtype=torch.float32) if need_vec else None
    tab = _offsets(ups, ups[0])
    _fold_bwd[(n, blocks)](g, ups[0], tab, vecs.contiguous(), _offsets(into, ups[0]) if into is not None else tab,
                           gup if gup is not None else g, part if part is not None else g, float(scale), d, r,
                           UP=need_up, INTO=into is not None, ACCUM=accumulate, VEC=need_vec, **meta)
    return gup, None if part is None else part.sum(1) * scale
