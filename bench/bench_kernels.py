"""Time each Triton kernel family of engine/adapters/triton_ops.py against the torch form it replaces, alone, at
SDXL 1024 px sizes (LoRA² r64, R_max 128), forward + backward through the same autograd entry points the trainer
uses; and the fused entropy under a few tile configurations. Medians of CUDA-event timings, one process.

python bench/bench_kernels.py [--out bench/results/kernels] [--quick]

--quick: small sizes and few repeats (a smoke run; with TRITON_INTERPRET=1 it runs on the CPU, times meaningless).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.adapters import triton_ops  # noqa: E402
from engine.adapters.base import FoldVectors  # noqa: E402
from engine.adapters.lora2 import batched_token_entropies  # noqa: E402

# SDXL at 1024 px, batch 1: cross-attention groups (layers, heads, image positions, head channels, projection
# width: q is a column slice of the stacked (N, d + R') product) and the fold groups (layers, B rows), R_max 128
ENTROPY_GROUPS = [(10, 10, 4096, 64, 640 + 128), (60, 20, 1024, 64, 1280 + 128)]
FOLD_GROUPS = [(80, 640), (480, 1280)]
QUICK_ENTROPY = [(3, 2, 256, 64, 160)]
QUICK_FOLD = [(3, 64)]


def timed(fn, device: str, reps: int) -> float:
    """Median seconds of fn() (CUDA events on the GPU, wall time elsewhere) after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def entropy_case(groups, device: str, dtype: torch.dtype):
    """fn() running every group's entropy forward and backward as LoRA2Set.extra_loss does."""
    g = torch.Generator(device).manual_seed(0)
    pending = []
    for layers, heads, n, hd, width in groups:
        for _ in range(layers):
            full = torch.randn(1, n, width, device=device, generator=g).to(dtype).requires_grad_()
            ctx = torch.randn(1, 77, heads * hd, device=device, generator=g).to(dtype).requires_grad_()
            q = full[..., :heads * hd].view(1, n, heads, hd).transpose(1, 2)
            k = ctx.view(1, 77, heads, hd).transpose(1, 2)
            pending.append((q, k, hd ** -0.5))

    def fn():
        ent = batched_token_entropies(pending)
        torch.stack(ent).mean().backward()
    return fn


def fold_case(groups, device: str, rank: int = 128):
    """fn() running every fold group's forward and backward (gradients into existing .grad, as the trainer)."""
    g = torch.Generator(device).manual_seed(0)
    cases = []
    for layers, rows in groups:
        ups = [torch.randn(rows, rank, device=device, generator=g).requires_grad_() for _ in range(layers)]
        vecs = torch.rand(layers, rank, device=device, generator=g).requires_grad_()
        for u in ups:
            u.grad = torch.zeros_like(u)
        w = torch.randn(layers, rows, rank, device=device, generator=g).to(torch.bfloat16)
        cases.append((ups, vecs, w))

    def fn():
        for ups, vecs, w in cases:
            out = FoldVectors.apply(0.5, torch.bfloat16, len(ups), True, *ups, *vecs.unbind(0))
            out.backward(w)
    return fn


def run_cases(device: str, quick: bool) -> list[dict]:
    """Every case's row: {"case", "ms"} or {"case", "error"}."""
    reps = 3 if quick else 20
    egroups, fgroups = (QUICK_ENTROPY, QUICK_FOLD) if quick else (ENTROPY_GROUPS, FOLD_GROUPS)
    rows = []

    def row(name: str, fn, **flags) -> None:
        saved = {k: getattr(triton_ops, k) for k in flags}
        triton_ops._FUSED_FAILED.clear()  # a size an earlier case retired is tried again
        triton_ops._CHECKED.clear()  # each tile configuration meets its first-use check (triton_ops.verdict)
        triton_ops.ERRORS.clear()
        triton_ops._TRIES.clear()
        try:
            for k, v in flags.items():
                setattr(triton_ops, k, v)
            sec = timed(fn, device, reps)
            rows.append({"case": name, "ms": sec * 1e3})
            if triton_ops.ERRORS:  # the worst relative error against the torch maths at the first call
                rows[-1]["check"] = max(triton_ops.ERRORS.values())
            if triton_ops._FUSED_FAILED or not all(triton_ops._CHECKED.values()):
                rows[-1]["note"] = "a kernel failed (see its warning): timed the fallback"
        except Exception as e:  # noqa: BLE001 - report the case, go on with the others
            rows.append({"case": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        finally:
            for k, v in saved.items():
                setattr(triton_ops, k, v)
        print(json.dumps(rows[-1]), flush=True)

    ent = entropy_case(egroups, device, torch.bfloat16)
    row("entropy fwd+bwd, fused kernels", ent)
    for block_n in (32, 128):
        row(f"entropy fwd+bwd, fused, BLOCK_N {block_n}", ent, ENTROPY_BLOCK_N=block_n)
    row("entropy fwd+bwd, fused, 4 warps", ent, ENTROPY_WARPS=4)
    row("entropy fwd+bwd, score buffer + row kernels", ent, FUSED_ENTROPY=False)
    row("entropy fwd+bwd, torch form", ent, ENABLED=False)
    fold = fold_case(fgroups, device)
    row("fold fwd+bwd, kernels", fold)
    row("fold fwd+bwd, torch form", fold, FOLD_KERNELS=False)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/kernels")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print("no GPU: use --quick (a smoke run)", file=sys.stderr)
        return 2
    reps = 3 if args.quick else 20
    usable = triton_ops.usable
    if device == "cpu" and triton_ops.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
        triton_ops.usable = lambda t: triton_ops.ENABLED and t.dtype != torch.float64  # the interpreter takes them
    try:
        rows = run_cases(device, args.quick)
    finally:
        triton_ops.usable = usable
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [f"Device: {name}; torch {torch.__version__}; medians of {reps}", "",
             "| case | ms | first-use check (worst relative error) |", "|---|---|---|"]
    lines += [f"| {r['case']} | " + (f"{r['ms']:.3f} {r.get('note', '')}".strip() if "ms" in r else r["error"])
              + " | " + (f"{r['check']:.2g}" if "check" in r else "-") + " |" for r in rows]
    tmp = out / "kernels.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "kernels.md")
    tmp = out / "kernels.json.tmp"
    tmp.write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    tmp.replace(out / "kernels.json")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
