"""Rank analysis speed on the real layer shapes: full per-layer rank measurement and an AC-LoRA restart, per route.

GPU:  python bench/bench_svd.py --out bench/results     (SD1.5 and SDXL UNets from config, ranks 16 and 64)

"qr" is the QR route of analysis.cheap_svd (batched QR and r x r SVD: on CUDA, one solver call per matrix);
"gram" is analysis.gram_svd (batched Gram products, batched Cholesky, one r x r eigh per layer on the GPU for
r <= 32 and on the CPU above). Both routes must give the same ranks; the JSON says whether they did.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import build_unet, time_steps  # noqa: E402

from engine import analysis  # noqa: E402
from engine.adapters import inject, make_config  # noqa: E402


def timed(fn, device: str, repeat: int = 5) -> float:
    return time_steps(fn, device, warmup=1, steps=repeat)[0]


def measure(arch: str, rank: int, device: str) -> dict:
    unet = build_unet(arch, device, torch.bfloat16 if device == "cuda" else torch.float32)
    ad = inject(unet, make_config("ac_lora", rank=rank))
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, device=device, generator=g) * 0.02)
    state = [p.detach().clone() for p in ad.parameters()]
    row = {"arch": arch, "rank": rank, "layers": len(ad.layers), "device": device}
    original = analysis.grouped_spectra
    ranks = {}

    def reset():
        with torch.no_grad():
            for p, s in zip(ad.parameters(), state, strict=True):
                p.copy_(s)
    for route in ("qr", "gram"):
        analysis.grouped_spectra = functools.partial(original, route=route)
        try:
            reset()
            row[f"rank_measure_{route}_s"] = timed(lambda: ad.effective_ranks(0.9), device)
            ranks[route] = ad.effective_ranks(0.9)

            def restart():
                reset()
                return ad.restart(0.2, 3, 10)
            row[f"restart_{route}_s"] = timed(restart, device)
            ranks[f"restart_{route}"] = restart()["ranks"]
        finally:
            analysis.grouped_spectra = original
    row["ranks_equal"] = ranks["qr"] == ranks["gram"]
    row["restart_ranks_equal"] = ranks["restart_qr"] == ranks["restart_gram"]
    row["mean_rank_tau0.9"] = sum(ranks["gram"].values()) / len(ranks["gram"])
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", nargs="+", default=None)
    ap.add_argument("--ranks", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    archs = args.arch or (["sd15", "sdxl"] if args.device == "cuda" else ["mini"])
    rows = []
    for arch in archs:
        for rank in args.ranks:
            row = measure(arch, rank, args.device)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"svd_{args.device}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
