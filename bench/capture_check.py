"""Capture one forward+backward of each method on a tiny UNet in a CUDA graph and say which capture fails and why.

    python bench/capture_check.py [--methods lora tri_lora lora2] [--no-in-place]

Each case runs in its own process: a failed capture can leave the CUDA context (and its RNG offsets) unusable.
This is how the in-place stacking of TriLoRA's and LoRA²'s folded factors was found not to capture ("dependency
created on uncaptured work in another stream" in its backward) while the fused op's in-place gradients do.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trial(method: str, in_place: bool) -> None:
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_adapters import inputs, tiny_unet

    from engine.adapters import inject, make_config

    unet = tiny_unet().to("cuda", torch.bfloat16).train()
    ad = inject(unet, make_config(method, rank=4, **({"max_rank": 8} if method == "lora2" else {})))
    ad.set_grads_in_place(in_place)
    x, t, c = (a.to("cuda") for a in inputs())
    x, c = x.bfloat16(), c.bfloat16()

    def step():
        ad.reset_step()
        loss = unet(x, t, c).sample.float().pow(2).mean()
        extra, _ = ad.extra_loss()
        (loss if extra is None else loss + extra).backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):  # as the trainer
            step()
        graph.replay()
        torch.cuda.synchronize()
        print(f"{method} in_place={in_place}: captured and replayed", flush=True)
    except Exception as e:
        print(f"{method} in_place={in_place}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        traceback.print_exc(limit=-6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["lora", "ac_lora", "tri_lora", "lora2"])
    ap.add_argument("--no-in-place", action="store_true", help="gradients returned to autograd (the DDP path)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        trial(args.one[0], args.one[1] == "1")
        return 0
    for method in args.methods:
        r = subprocess.run([sys.executable, __file__, "--one", method, "0" if args.no_in_place else "1"],
                           capture_output=True, text=True)
        print(r.stdout.strip() or r.stderr[-2000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
