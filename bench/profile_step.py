"""Profile one training step (torch profiler): kernel count, GPU-busy time vs wall time, top ops; finds launch-bound
cost.

python bench/profile_step.py --arch sd15 --cases floor,lora,lora_unfused,peft --out bench/results
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import TARGETS, build_unet, floor_step, make_inputs, train_step  # noqa: E402

from engine.adapters import inject, make_config  # noqa: E402


def make_case(case: str, arch: str, batch: int, rank: int = 16):
    unet = build_unet(arch, "cuda", torch.bfloat16)
    unet.train()
    inputs = make_inputs(unet, arch, batch, "cuda", torch.bfloat16)
    if case == "floor":
        return floor_step(unet, inputs, False, "cuda")
    if case == "peft":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights="gaussian"))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        return train_step(unet, inputs, params, True, "cuda")
    from engine.adapters import triton_ops

    method = case
    for suffix in ("_unfused", "_noent", "_nostack", "_scorebuf", "_torchfold"):
        method = method.replace(suffix, "")
    triton_ops.FUSED_ENTROPY = not case.endswith("_scorebuf")  # LoRA²'s entropy through a score buffer
    triton_ops.FOLD_KERNELS = not case.endswith("_torchfold")  # s B diag(v) in torch's stack-multiply-cast
    extra = {"max_rank": 2 * rank} if method == "lora2" else {}
    if case.endswith("_noent"):  # LoRA² without its cross-attention entropy term
        extra["lambda_e"] = 0.0
    ad = inject(unet, make_config(method, rank=rank, **extra))
    for layer in ad.layers.values():
        layer.fused = not case.endswith("_unfused")
    ad.set_grads_in_place(True)  # as the trainer in one process
    ad.set_stacked_down(not case.endswith("_nostack"))  # x [W; A]^T in one GEMM, as the trainer
    return train_step(unet, inputs, ad.param_groups(1e-4), False, "cuda", ad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="sd15")
    ap.add_argument("--cases", default="floor,lora,lora_unfused,peft")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch = 4 if args.arch == "sd15" else 1
    summary = []
    for case in args.cases.split(","):
        step = make_case(case, args.arch, batch, args.rank)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 5
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 3 / 1e6
        table = events.table(sort_by="self_device_time_total", row_limit=15)
        cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=12)
        (out / f"profile_{args.arch}_{case}.txt").write_text(table + "\n\n" + cpu_table)
        per_kernel: dict[str, list[float]] = {}  # GPU ms and launches a step, by kernel name (to diff two cases)
        for e in kernels:
            acc = per_kernel.setdefault(e.name, [0.0, 0.0])
            acc[0] += e.device_time / 3 / 1e3
            acc[1] += 1 / 3
        (out / f"kernels_{args.arch}_r{args.rank}_{case}.json").write_text(json.dumps(per_kernel, indent=0))
        row = (f"{case}: wall {wall * 1e3:.1f} ms/step, GPU busy {busy * 1e3:.1f} ms, "
               f"kernels/step {len(kernels) / 3:.0f}")
        print(row, flush=True)
        print(table[:3000], flush=True)
        summary.append(row)
        del step
        torch.cuda.empty_cache()
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
