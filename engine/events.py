"""Frozen event dataclasses the trainer emits to callbacks and run folders, with plain dict round trips."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Started:
    """Training began (or resumed) in `run_dir`; `step` is the number of optimizer steps already done."""

    run_dir: str
    step: int
    total_steps: int
    steps_per_epoch: int
    method: str
    resumed: bool = False
    step_mode: str = "eager"  # how steps run: eager, cuda_graph or compile (see TrainConfig.step_mode)


@dataclass(frozen=True)
class Step:
    """One optimizer step finished; `loss` is its mean diffusion loss, `terms` the method's extra loss terms."""

    step: int
    loss: float
    lr: float
    epoch: int = 0
    terms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranks:
    """Per-layer effective rank (energy fraction tau) and the method's native rank at `step`."""

    step: int
    effective: dict[str, int]
    native: dict[str, int]
    tau: float = 0.9


@dataclass(frozen=True)
class Restart:
    """An AC-LoRA restart after epoch `epoch`: threshold p from the mean loss since the last restart; kept ranks."""

    step: int
    epoch: int
    p: float
    mean_loss: float
    ranks: dict[str, int]


@dataclass(frozen=True)
class RankChange:
    """LoRA² moved the rank of some layers before `step` (only the layers that changed)."""

    step: int
    ranks: dict[str, int]


@dataclass(frozen=True)
class Sample:
    """Sample images written at `step` (one per sample prompt)."""

    step: int
    paths: list[str]
    prompts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Checkpoint:
    """A resumable checkpoint was written."""

    step: int
    path: str


@dataclass(frozen=True)
class Stopped:
    """Training stopped on request after `step` steps; the run can be resumed from its last checkpoint."""

    step: int
    checkpoint: str


@dataclass(frozen=True)
class Finished:
    """Training completed: final adapter files by format (kohya, diffusers, state) and wall time."""

    step: int
    files: dict[str, str]
    wall_s: float


@dataclass(frozen=True)
class Notice:
    """Something the user should know that does not stop training (e.g. a speed-up fell back to eager)."""

    step: int
    message: str


@dataclass(frozen=True)
class Failed:
    """Training raised; `error` is the readable message, `kind` the exception class name."""

    step: int
    error: str
    kind: str = "Error"


Event = Started | Step | Ranks | Restart | RankChange | Sample | Checkpoint | Stopped | Finished | Notice | Failed
EVENT_TYPES: dict[str, type] = {cls.__name__.lower(): cls for cls in (Started, Step, Ranks, Restart, RankChange,
                                                                     Sample, Checkpoint, Stopped, Finished, Notice,
                                                                     Failed)}


def to_dict(event: Event) -> dict[str, Any]:
    """The event as a JSON-ready dict with a "type" key (step, ranks, restart, ...)."""
    return {"type": type(event).__name__.lower(), **dataclasses.asdict(event)}


def from_dict(d: dict[str, Any]) -> Event:
    """Rebuild an event from `to_dict` output (unknown keys are ignored, so older readers keep working)."""
    kind = d.get("type")
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}; expected one of {', '.join(EVENT_TYPES)}")
    cls = EVENT_TYPES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
