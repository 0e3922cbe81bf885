"""AdamW that skips the inactive slots of masked factors (LoRA²'s A rows and B columns beyond each layer's rank D).

LoRA² keeps fixed (R_max, k) and (d, R_max) buffers so that its per-step rank changes never change a shape; a
plain AdamW then reads and writes every slot of every buffer, half of them idle at R_max = 2r (SDXL r64: fused AdamW
2.8 ms a step against 1.3 ms for LoRA at r64). A slot outside the mask holds zero value, zero gradient and zero
moments (the resize zeroes dropped slots and their moments; a grown slot gets fresh A rows and zero moments), and
AdamW leaves such a slot exactly as it is: decay of 0 is 0, and its moments and update stay 0. So updating the
active slots alone is the same step. The masked tensors go through one Triton kernel per shape (engine.adapters.
triton_ops.adamw_slots); every other tensor, and every tensor where the kernel cannot run (CPU, no Triton,
amsgrad, maximize, a grad that is not fp32), takes torch's own AdamW. The optimizer state has torch's layout, so
checkpoints load either way.
"""
from __future__ import annotations

import torch

from engine.adapters import triton_ops


def _unhooked(step):
    """An optimizer class's step without the profiler/hook wrapper torch puts on it (SlotAdamW's own step has it:
    calling the wrapped parent would run the hooks twice)."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class SlotAdamW(torch.optim.AdamW):
    """torch.optim.AdamW plus `slots`: {param: (bool mask (R,), axis)} where axis 0 = rows of the param are the
    slots, 1 = its columns; each mask must be a prefix (slots 0..D-1 active, as LoRA²'s are): the kernel updates
    the first D = mask.sum() slots. `masked_step = False` turns the kernel off (the bench's ablation).
    clip_grad_norm_(max_norm) before step() clips as torch does, the kernel's share inside the kernel."""

    def __init__(self, params, *, slots: dict | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.slots = {id(p): v for p, v in (slots or {}).items()}
        self.masked_step = True
        self._lrs: dict[int, torch.Tensor] = {}  # per group: its lr on the device, when the group holds a float
        self._clip: tuple[torch.Tensor, dict] | None = None  # (coefficient, {id: grad version} left to the kernel)
        self._grad_scale: torch.Tensor | None = None  # that coefficient during step(), for the kernel

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over every parameter's gradient, with the multiply of the gradients the
        kernel will take folded into the next step(): the kernel multiplies as it reads (LoRA² r64 on SDXL: ~0.7 GB
        of gradients not read and written once more). The others are multiplied here, as torch does. Returns the
        total norm; no host sync."""
        self._apply_clip(self._clip, ())  # a clip not yet stepped: its multiply first, as torch would have done
        self._clip = None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.zeros(())
        if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: what clip_grad_norm_ itself calls
            total = torch.nn.utils.get_total_norm(grads, 2.0)
        else:
            norms = torch._foreach_norm(grads, 2.0)
            total = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), 2.0)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's own formula, its order of operations
        kernel = ({id(p) for g in self.param_groups for p in g["params"] if self._eligible(g, p)}
                  if self.masked_step else set())
        rest = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None and id(p) not in kernel]
        if rest:
            torch._foreach_mul_(rest, coef.to(rest[0].device))
        if kernel:  # with the gradients' versions: a gradient changed before step() cannot take this coefficient
            self._clip = (coef, {id(p): p.grad._version for g in self.param_groups for p in g["params"]
                                 if id(p) in kernel})
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._clip = None  # a clip of gradients that are gone
        super().zero_grad(set_to_none)

    def _eligible(self, group: dict, p: torch.Tensor) -> bool:
        """Whether the kernel can take p: what it implements (no amsgrad, maximize, differentiable, GradScaler
        unscaling inside the step, tensor or zero betas) on fp32 CUDA tensors, lr a float or a tensor on p's
        device; anything else goes to torch's AdamW."""
        lr = group["lr"]
        betas = group["betas"]
        return (id(p) in self.slots and p.grad is not None and p.dtype == torch.float32 and p.is_contiguous()
                and p.grad.dtype == torch.float32 and p.grad.is_contiguous() and p.dim() == 2
                and not group["amsgrad"] and not group["maximize"] and not group.get("differentiable", False)
                and getattr(self, "grad_scale", None) is None and getattr(self, "found_inf", None) is None
                and not any(torch.is_tensor(b) for b in betas) and all(0 < b < 1 for b in betas)
                and (not torch.is_tensor(lr) or lr.device == p.device)
                and triton_ops.usable(p))

    @torch.no_grad()
    def step(self, closure=None):
        clip, self._clip = self._clip, None
        if not self.masked_step or not self.slots or closure is not None:  # a closure makes fresh gradients:
            self._apply_clip(clip, ())  # the clip was of the old ones, as torch's would have been
            clip = None
        if not self.masked_step or not self.slots:
            return _unhooked(torch.optim.AdamW.step)(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mine = [[p for p in g["params"] if self._eligible(g, p)] for g in self.param_groups]
        try:
            self._grad_scale = self._apply_clip(clip, {id(p) for ps in mine for p in ps})
            hidden = [(p, p.grad) for ps in mine for p in ps]
            for p, _ in hidden:  # torch's AdamW skips a param without a gradient: it takes the others
                p.grad = None
            try:
                _unhooked(torch.optim.AdamW.step)(self)
            finally:
                for p, g in hidden:
                    p.grad = g
            for gi, (group, ps) in enumerate(zip(self.param_groups, mine, strict=True)):
                if ps:
                    self._masked_group(gi, group, ps)
        finally:
            self._grad_scale = None
        return loss

    def _apply_clip(self, clip: tuple | None, kernel: set[int] | tuple) -> torch.Tensor | None:
        """The coefficient for the kernel to multiply its gradients by, where it takes exactly the parameters
        clip_grad_norm_ left to it (always, unless something changed between the two calls); otherwise those
        gradients are multiplied here and the kernel gets None."""
        if clip is None:
            return None
        coef, left = clip
        params = [p for g in self.param_groups for p in g["params"] if id(p) in left and p.grad is not None]
        changed = [p for p in params if p.grad._version != left[id(p)]]
        if changed:  # torch would have multiplied the gradients as they were then; the new part is unclipped
            raise RuntimeError(f"SlotAdamW: {len(changed)} gradients changed between clip_grad_norm_() and step() "
                               "(a backward in between?); call clip_grad_norm_() right before step()")
        if left.keys() == set(kernel):
            return coef
        if params:
            torch._foreach_mul_([p.grad for p in params], coef.to(params[0].device))
        return None

    def _masked_group(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            st = self.state[p]
            if len(st) == 0:  # as torch's fused/capturable AdamW lays out a fresh state
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif st["step"].device != p.device or st["step"].dtype != torch.float32:
                st["step"] = st["step"].to(p.device, torch.float32)
        lr = group["lr"]
        if not torch.is_tensor(lr):
            t = self._lrs.get(gi)
            if t is None or t.device != params[0].device:
                t = self._lrs[gi] = torch.empty((), dtype=torch.float32, device=params[0].device)
            lr = t.fill_(lr)  # a float lr is read at each step (inside a captured graph: the captured value)
        elif lr.dtype != torch.float32:  # on the params' device already (_eligible)
            lr = lr.float()
        torch._foreach_add_([self.state[p]["step"] for p in params], 1.0)
        beta1, beta2 = group["betas"]
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_shape.setdefault((tuple(p.shape), self.slots[id(p)][1]), []).append(p)
        for (_, axis), ps in by_shape.items():
            sts = [self.state[p] for p in ps]
            triton_ops.adamw_slots(
                ps, [p.grad for p in ps], [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts],
                [s["step"] for s in sts], [self.slots[id(p)][0] for p in ps], axis, lr, float(beta1), float(beta2),
                float(group["eps"]), float(group["weight_decay"]), grad_scale=self._grad_scale)
