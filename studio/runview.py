"""What the Train tab shows of a run folder: loss series, rank history, restarts, samples, status and ETA."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import runs


@dataclass
class RunView:
    """Plain numbers read from one run folder (no plotting here)."""

    name: str
    state: str
    step: int
    total_steps: int
    method: str = ""
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    rank_steps: list[int] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    effective: list[list[int]] = field(default_factory=list)  # layers x rank_steps
    native: list[list[int]] = field(default_factory=list)  # layers x rank_steps
    restarts: list[int] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (path, caption)
    error: str | None = None


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard-style smoothing) of a loss series."""
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))
    return out


def read_run(run_dir: str | Path) -> RunView:
    """Everything the live plots need, from the files the trainer appends to (safe while it writes)."""
    run = runs.RunFolder(run_dir)
    status = run.status()
    try:
        method = run.config().get("method", "")
    except (ValueError, OSError):
        method = ""
    view = RunView(run.path.name, status.get("state", "queued"), int(status.get("step", 0)),
                   int(status.get("total_steps", 0)), method, error=status.get("error"))
    rows = [m for m in run.metrics() if m.get("type") == "step"]
    view.steps = [int(m["step"]) for m in rows]
    view.losses = [float(m["loss"]) for m in rows]
    view.smoothed = ema(view.losses)
    history = run.ranks()
    snaps = [r for r in history if r.get("type") == "ranks"]
    if snaps:
        view.layers = list(snaps[-1]["effective"])
        view.rank_steps = [int(r["step"]) for r in snaps]
        view.effective = [[r["effective"].get(n) for r in snaps] for n in view.layers]
        view.native = [[r.get("native", {}).get(n) for r in snaps] for n in view.layers]
    view.restarts = [int(r["step"]) for r in history if r.get("type") == "restart"]
    for path in run.sample_paths()[-8:]:
        view.samples.append((str(path), f"step {int(path.name.split('-')[1])}"))
    return view


def signature(run_dir: str | Path | None) -> tuple:
    """Changes whenever the trainer writes something the plots show (cheap: a few stat calls)."""
    if not run_dir:
        return ()
    run = runs.RunFolder(run_dir)
    out = []
    for name in (runs.METRICS, runs.RANKS, runs.STATUS):
        p = run / name
        out.append(p.stat().st_mtime_ns if p.is_file() else 0)
    out.append(len(run.sample_paths()))
    return tuple(out)


def eta_text(info: dict, state: str, now: float | None = None) -> str:
    """'step 40/100 · 2.1 s/step · ETA 2m06s' from a job's progress info (first step time, steps done, total)."""
    step, total = info.get("step", 0), info.get("total", 0)
    if state != "running" or not total:
        return f"step {step}/{total}" if total else ""
    done = step - info.get("step0", 0)
    if done <= 0 or "t0" not in info:
        return f"step {step}/{total} · starting"
    per = ((now or time.time()) - info["t0"]) / done
    left = max(0.0, (total - step) * per)
    return f"step {step}/{total} · {per:.2f} s/step · ETA {int(left // 60)}m{int(left % 60):02d}s"
