"""Train the same tiny run with two step modes and compare the loss trajectories (CPU or GPU, no downloads).

    python bench/trainer_modes_check.py --method lora --modes eager compile      (CPU: ~2 min, compile dominates)
    python bench/trainer_modes_check.py --method lora2 --modes eager cuda_graph --precision bf16   (GPU)

Prints each mode's wall time, notices and the largest relative loss difference over the steps.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from engine import events as ev  # noqa: E402
from engine.runs import RunFolder  # noqa: E402
from engine.train import TrainConfig, train  # noqa: E402


def main(argv=None) -> int:
    from helpers import make_image_folder, save_tiny_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--settings", default="{}", help="method settings as JSON")
    ap.add_argument("--modes", nargs=2, default=["eager", "compile"])
    ap.add_argument("--precision", default="no")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="modes-"))
    model = str(save_tiny_pipeline(root / "tiny"))
    data = str(make_image_folder(root / "ds", n=4))
    losses = {}
    for i, mode in enumerate(args.modes):
        events: list = []
        t0 = time.time()
        cfg = TrainConfig(dataset=data, base_model=model, method=args.method, rank=4, steps=args.steps, lr=1e-3,
                          rank_every=0, step_mode=mode, mixed_precision=args.precision,
                          output_dir=str(root / f"{i}-{mode}"),
                          method_settings=json.loads(args.settings))
        train(cfg, emit=events.append)
        losses[i] = np.array([m["loss"] for m in RunFolder(root / f"{i}-{mode}").metrics()])
        print(json.dumps({"mode": mode, "ran_as": [e.step_mode for e in events if isinstance(e, ev.Started)],
                          "wall_s": round(time.time() - t0, 1),
                          "notices": [e.message for e in events if isinstance(e, ev.Notice)]}))
    a, b = losses[0], losses[1]
    diff = float(np.max(np.abs(a - b) / np.abs(a)))
    print(json.dumps({"method": args.method, "steps": len(a), "max_rel_loss_diff": diff}))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
