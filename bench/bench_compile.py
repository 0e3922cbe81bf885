"""Compiled vs eager on SD1.5 (batch 4, 512 px): same loss trajectory and exported adapter, then step-time ratios.

python bench/bench_compile.py --out bench/results   (GPU; each compile warm-up is timed and reported)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import build_unet, make_inputs  # noqa: E402

from engine import speed  # noqa: E402
from engine.adapters import inject, make_config  # noqa: E402


def batches(unet, n: int, batch: int):
    out = []
    for i in range(n):
        x, t, c, kw = make_inputs(unet, "sd15", batch, "cuda", torch.bfloat16)
        g = torch.Generator("cuda").manual_seed(100 + i)
        out.append((torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=g), t, c,
                    torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=g)))
    return out


def train(unet, adapters, data, compiled: bool, extra_steps: int):
    opt = torch.optim.AdamW(adapters.param_groups(1e-3), fused=True)
    losses, times = [], []
    state = speed.compile_blocks(unet) if compiled else speed.CompileState(False)

    def step(x, t, c, target):
        loss = (unet(x, t, c).sample.float() - target.float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    loss, state = speed.first_step_with_fallback(lambda: step(*data[0]), unet, state)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    losses.append(loss)
    for d in data[1:]:
        losses.append(step(*d))
    for i in range(extra_steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(*data[i % len(data)])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return [float(v) for v in losses], statistics.median(times) if times else None, warm, state


def floor_time(compiled: bool, steps: int):
    unet = build_unet("sd15", "cuda", torch.bfloat16)
    if compiled:
        speed.compile_blocks(unet)
    x, t, c, _ = make_inputs(unet, "sd15", 4, "cuda", torch.bfloat16)
    times = []
    t0 = time.perf_counter()
    for i in range(steps + 3):
        if i >= 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        xi = x.detach().requires_grad_(True)
        unet(xi, t, c).sample.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        if i == 0:
            warm = time.perf_counter() - t0
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), warm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--parts", default="numerics,floor", help="numerics,floor")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name(), "method": args.method}
    parts = args.parts.split(",")
    if "numerics" in parts:
        runs = {}
        for compiled in (False, True):
            torch._dynamo.reset()
            unet = build_unet("sd15", "cuda", torch.bfloat16)
            data = batches(unet, args.steps, 4)
            extra = {"max_rank": 32} if args.method == "lora2" else {}
            adapters = inject(unet, make_config(args.method, rank=16, seed=0, **extra))
            losses, step_s, warm, state = train(unet, adapters, data, compiled, extra_steps=10)
            factors, _, _ = adapters.to_lora()
            runs[compiled] = (losses, step_s, warm, state, {n: (u @ d) for n, (u, d) in factors.items()})
            print(json.dumps({"compiled": compiled, "losses": losses[:5], "step_s": step_s, "warmup_s": warm,
                              "compile_enabled": state.enabled, "reason": state.reason}), flush=True)
            del unet, adapters
            torch.cuda.empty_cache()
        le, lc = torch.tensor(runs[False][0]), torch.tensor(runs[True][0])
        rel_loss = ((le - lc).abs() / le.abs()).max().item()
        d_e, d_c = runs[False][4], runs[True][4]
        rel_delta = max(float((d_e[n] - d_c[n]).norm() / d_e[n].norm().clamp_min(1e-12)) for n in d_e)
        result.update({"eager_losses": runs[False][0], "compiled_losses": runs[True][0],
                       "max_rel_loss_diff": rel_loss, "max_rel_adapter_diff": rel_delta,
                       "eager_step_s": runs[False][1], "compiled_step_s": runs[True][1],
                       "compile_warmup_s": runs[True][2], "compile_enabled": runs[True][3].enabled})
        (out / "compile.json").write_text(json.dumps(result, indent=1))
    if "floor" in parts:
        torch._dynamo.reset()
        result["floor_compiled_s"], result["floor_compile_warmup_s"] = floor_time(True, 10)
        if "compiled_step_s" in result:
            result["x_compiled_floor"] = result["compiled_step_s"] / result["floor_compiled_s"]
        (out / "compile.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if "losses" not in k}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
