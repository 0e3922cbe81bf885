"""Profile the real trainer's steps (engine.train.train) on a full-size random UNet: where the host and the GPU
spend a step, with the step mode the trainer picks (CUDA graphs on one GPU).

    python bench/profile_trainer.py --arch sdxl --method lora2 --rank 16 --out bench/results/trainer_profile

Profiles steps 8-13 (after warm-up and graph capture); writes the tables and prints a summary.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import events as ev  # noqa: E402
from engine.train import TrainConfig, train  # noqa: E402


def main(argv=None) -> int:
    import train_gpu

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sdxl", choices=("sd15", "sdxl", "tiny"))
    ap.add_argument("--method", default="lora2")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--step-mode", default="auto")
    ap.add_argument("--out", default="bench/results/trainer_profile")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--sync-debug", action="store_true",
                    help="instead of profiling, record the Python stack of every host sync in steps 8-13")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, batch, size = train_gpu.CASES[args.arch]
    cuda = torch.cuda.is_available()
    pipe = train_gpu.build_pipeline(args.arch, torch.bfloat16).to("cuda" if cuda else "cpu")
    root = Path(tempfile.mkdtemp())
    data = train_gpu.make_dataset(root / "data", size)
    settings = {"max_rank": 2 * args.rank} if args.method == "lora2" else {}
    cfg = TrainConfig(dataset=str(data), base_model=args.arch, method=args.method, rank=args.rank, steps=args.steps,
                      batch_size=batch, mixed_precision="bf16", rank_every=0, method_settings=settings,
                      step_mode=args.step_mode, output_dir=str(root / "run"))
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    marks = {}

    syncs: dict[str, int] = {}
    default_showwarning = warnings.showwarning

    def on_warning(message, category, filename, lineno, file=None, line=None):
        stack = "".join(traceback.format_stack(limit=14)[:-2])
        syncs[f"{message}\n{stack}"] = syncs.get(f"{message}\n{stack}", 0) + 1

    def emit(e):
        if args.sync_debug and isinstance(e, ev.Step) and e.step in (8, 13):
            if cuda:
                torch.cuda.set_sync_debug_mode("warn" if e.step == 8 else "default")
            warnings.showwarning = on_warning if e.step == 8 else default_showwarning
            warnings.simplefilter("always")
            return
        if isinstance(e, ev.Step) and e.step in (8, 13):
            if cuda:
                torch.cuda.synchronize()
            marks[e.step] = time.perf_counter()
            prof.start() if e.step == 8 else prof.stop()

    train(cfg, emit, pipeline=pipe)
    steps = 5
    name = f"{args.arch}_{args.method}_r{args.rank}"
    if args.sync_debug:
        text = "\n\n".join(f"x{n} (over {steps} steps): {k}" for k, n in sorted(syncs.items(), key=lambda kv: -kv[1]))
        (out / f"{name}_syncs.txt").write_text(text or "no host syncs")
        print(f"{name}: {sum(syncs.values())} host syncs in {steps} steps\n{text[:6000]}")
        return 0
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / steps / 1e3
    wall = (marks[13] - marks[8]) / steps * 1e3
    cpu = events.table(sort_by="self_cpu_time_total", row_limit=25)
    gpu = events.table(sort_by="self_device_time_total" if cuda else "cpu_time_total", row_limit=20)
    (out / f"{name}.txt").write_text(f"wall {wall:.1f} ms/step, GPU busy {busy:.1f} ms/step\n\n{cpu}\n\n{gpu}\n")
    print(f"{name}: wall {wall:.1f} ms/step (profiled), GPU busy {busy:.1f} ms/step, "
          f"kernels/step {len(kernels) / steps:.0f}")
    print(cpu)
    print(gpu[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
