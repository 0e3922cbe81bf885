"""The method comparison: train methods and a rank sweep on one dataset, render one grid, score, write a report."""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import events as ev
from engine import runs
from engine.adapters import method_names
from engine.train_config import TrainConfig


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class CompareConfig:
    """One comparison: every entry trains on the same data with the same seed and step budget."""

    dataset: str = _opt("", "Folder of images with captions (a bundled miniworld style gets oracle scores).",
                        group="data")
    base_model: str = _opt("bundled", "Base model (bundled, hub id, diffusers folder, .safetensors).", group="data")
    methods: list = _opt(list(method_names()), "Methods to train at --rank.", group="entries")
    ranks: list = _opt([], "Fixed ranks of an extra plain-LoRA sweep, e.g. 4 16 64 128.", item=int, group="entries")
    rank: int = _opt(16, "Rank of each method (maximum rank for AC-LoRA/TriLoRA, target for LoRA²).", min=1,
                     group="entries")
    method_settings: dict = _opt({}, "Per-method settings as JSON: {\"ac_lora\": {\"restart_every_epochs\": 2}}.",
                                 group="entries")
    train_settings: dict = _opt({}, "Extra TrainConfig fields for every run as JSON, e.g. {\"lr\": 3e-4}.",
                                group="entries")
    steps: int = _opt(300, "Optimizer steps of every run (the shared budget).", min=1, group="budget")
    seed: int = _opt(0, "Seed of every run.", group="budget")
    prompts: list = _opt([], "Grid prompts (default: four captions of the dataset).", group="grid")
    seeds: list = _opt([0, 1], "Grid seeds.", item=int, group="grid")
    sample_steps: int = _opt(25, "Denoising steps of the grid images.", min=1, group="grid")
    strength: float = _opt(1.0, "Adapter strength in the grid.", group="grid")
    guidance: float = _opt(7.5, "Classifier-free guidance scale of the grid (the bundled mini-SD does best at 5).",
                           min=0.0, group="grid")
    output_dir: str = _opt("", "Report folder (empty = a new folder under $RANKSTUDIO_RUNS or ./runs).", group="grid")

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(method_names())}")
        if not self.methods and not self.ranks:
            raise ValueError("nothing to compare: give methods and/or ranks")
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"ranks must be positive integers, got {r!r}")
        bad = set(self.method_settings) - set(method_names())
        if bad:
            raise ValueError(f"method_settings has unknown method(s) {sorted(bad)}")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        if not self.dataset:
            raise ValueError("dataset must name a folder of images, got ''")
        g = self.guidance
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < 100:
            raise ValueError(f"guidance must be a number in [0, 100), got {self.guidance!r}")
        for cfg in self.entries().values():
            TrainConfig.from_dict(cfg)  # every run's settings are checked before anything trains

    def entries(self) -> dict[str, dict[str, Any]]:
        """label -> TrainConfig dict (output_dir left for compare to fill)."""
        common = {"dataset": self.dataset, "base_model": self.base_model, "steps": self.steps, "seed": self.seed,
                  **self.train_settings}
        out = {m: {**common, "method": m, "rank": self.rank, "method_settings": self.method_settings.get(m, {})}
               for m in self.methods}
        for r in self.ranks:
            if not ("lora" in out and r == self.rank and not self.method_settings.get("lora")):
                out[f"lora_r{r}"] = {**common, "method": "lora", "rank": r}
        return out


@dataclass
class CompareReport:
    """The report folder, one metrics row per entry (plus the base model) and the files written."""

    folder: str
    rows: list[dict[str, Any]]
    files: dict[str, str]


def compare(config: CompareConfig, emit=None, stop: threading.Event | None = None) -> CompareReport:
    """Train (or reuse finished / resume stopped runs), render one grid, score every entry and write the report."""
    from engine.generate import GridResult, generate_grid, save_grid
    from engine.models import load_pipeline
    from engine.train import resume_run, train

    stop = stop or threading.Event()
    folder = Path(config.output_dir or runs.new_run_dir(os.environ.get("RANKSTUDIO_RUNS", "runs"), "compare"))
    folder.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_json(folder / "compare.json", dataclasses.asdict(config))
    results: dict[str, dict[str, Any]] = {}
    for label, cfg in config.entries().items():
        run = runs.RunFolder(folder / "runs" / label)
        status = run.status().get("state") if (run / runs.CONFIG).is_file() else None
        if status != "finished":
            res = (resume_run(run.path, emit, stop) if status is not None
                   else train(TrainConfig.from_dict({**cfg, "output_dir": str(run.path)}), emit, stop))
            if res.state != "finished":
                raise RuntimeError(f"comparison stopped during {label!r}; run compare again to continue")
        results[label] = {"run": run, "method": cfg["method"], "rank": cfg["rank"]}
    pipe = load_pipeline(config.base_model)
    prompts = config.prompts or _default_prompts(config.dataset)
    grid = generate_grid(pipe, {k: str(v["run"].path) for k, v in results.items()}, prompts, config.seeds,
                         strength=config.strength, steps=config.sample_steps, guidance=config.guidance,
                         out=folder / "grid_all.png")
    files = {"grid_all": str(grid.path)}
    for label in grid.labels:
        one = GridResult([label], grid.prompts, grid.seeds, {label: grid.images[label]})
        files[f"grid_{label}"] = str(save_grid(one, folder / "grids" / f"{label}.png"))
    rows = [_row(label, results.get(label), grid) for label in grid.labels]
    _score(rows, grid, config.dataset)
    files.update(_write_tables(rows, folder))
    files.update(_write_charts(rows, results, folder))
    if emit is not None:
        emit(ev.Finished(0, files, sum(r.get("wall_s") or 0 for r in rows)))
    return CompareReport(str(folder), rows, files)


def _default_prompts(dataset: str, n: int = 4) -> list[str]:
    from engine.data import scan_dataset

    captions = sorted({e.caption for e in scan_dataset(dataset).examples if e.caption})
    if not captions:
        raise ValueError("the dataset has no captions to use as grid prompts; pass prompts")
    step = max(1, len(captions) // n)
    return captions[::step][:n]


def _row(label: str, info: dict | None, grid) -> dict[str, Any]:
    """Size, wall time, final loss and ranks of one entry (the base model row has only its grid time)."""
    row: dict[str, Any] = {"label": label, "method": "base" if info is None else info["method"],
                           "rank": None if info is None else info["rank"], "grid_s": round(grid.seconds[label], 3)}
    if info is None:
        return row | {"size_mb": 0.0, "params": 0}
    run: runs.RunFolder = info["run"]
    from safetensors import safe_open

    with safe_open(str(run.lora_file("kohya")), framework="pt") as f:
        params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    losses = [m["loss"] for m in run.metrics() if m.get("type") == "step"]
    final = [r for r in run.ranks() if r.get("type") == "ranks"]
    eff = final[-1]["effective"] if final else {}
    nat = final[-1]["native"] if final else {}
    tail = losses[-max(1, len(losses) // 10):]
    return row | {"size_mb": round(run.lora_file("kohya").stat().st_size / 2**20, 4), "params": params,
                  "wall_s": round(float(run.status().get("wall_s") or 0), 2),
                  "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
                  "mean_effective_rank": round(sum(eff.values()) / len(eff), 2) if eff else None,
                  "mean_native_rank": round(sum(nat.values()) / len(nat), 2) if nat else None,
                  "restarts": sum(1 for r in run.ranks() if r.get("type") == "restart")}


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def miniworld_style(dataset: str) -> str | None:
    """The miniworld style a dataset shows (folder name or majority caption style), or None for other data."""
    try:
        from engine.miniworld import world
    except ImportError:
        return None
    from engine.data import resolve_dataset

    name = resolve_dataset(dataset).name.removeprefix("style_")
    if name in world.STYLES:
        return name
    from engine.data import scan_dataset

    styles = Counter(world.caption_style(e.caption) for e in scan_dataset(dataset).examples)
    styles.pop(None, None)
    return styles.most_common(1)[0][0] if styles else None


def _score(rows: list[dict[str, Any]], grid, dataset: str) -> None:
    """Oracle scores (prompt fidelity, style fidelity, memorisation) when the dataset is a miniworld style."""
    style = miniworld_style(dataset)
    if style is None:
        return
    try:
        from engine.miniworld.oracle import Oracle

        oracle = Oracle.load()
    except (ImportError, FileNotFoundError):
        return
    from engine.data import scan_dataset
    from engine.images import load_image

    train_images = [load_image(e.path) for e in scan_dataset(dataset).examples]
    size = grid.images[grid.labels[0]][0].size
    train_images = [im.resize(size) for im in train_images]
    prompts = [p for p in grid.prompts for _ in grid.seeds]
    for row in rows:
        images = grid.images[row["label"]]
        row["prompt_fidelity"] = round(oracle.prompt_fidelity(images, prompts), 4)
        row["style_fidelity"] = round(oracle.style_fidelity(images, style), 4)
        row["memorisation"] = round(oracle.memorisation(images, train_images), 4)
        row["style"] = style


def _write_tables(rows: list[dict[str, Any]], folder: Path) -> dict[str, str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    runs.atomic_write_bytes(folder / "metrics.csv", buf.getvalue().encode())
    runs.atomic_write_json(folder / "metrics.json", rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
    runs.atomic_write_bytes(folder / "report.md", ("\n".join(lines) + "\n").encode())
    return {"metrics_csv": str(folder / "metrics.csv"), "metrics_json": str(folder / "metrics.json"),
            "report_md": str(folder / "report.md")}


def _write_charts(rows: list[dict[str, Any]], results: dict[str, dict], folder: Path) -> dict[str, str]:
    """Plotly HTML: fidelity (or final loss) vs size; final per-layer effective ranks; per-run ranks over steps."""
    import plotly.graph_objects as go

    files = {}
    y_key = "style_fidelity" if any("style_fidelity" in r for r in rows) else "final_loss"
    pts = [r for r in rows if r.get(y_key) is not None]
    fig = go.Figure(go.Scatter(x=[r["size_mb"] for r in pts], y=[r[y_key] for r in pts], mode="markers+text",
                               text=[r["label"] for r in pts], textposition="top center"))
    fig.update_layout(title=f"{y_key.replace('_', ' ')} vs adapter size", xaxis_title="kohya file size (MB)",
                      yaxis_title=y_key.replace("_", " "))
    files["chart_fidelity_vs_size"] = _html(fig, folder / "fidelity_vs_size.html")
    finals = {k: [r for r in v["run"].ranks() if r.get("type") == "ranks"] for k, v in results.items()}
    finals = {k: v[-1]["effective"] for k, v in finals.items() if v}
    if finals:
        layers = list(next(iter(finals.values())))
        fig = go.Figure(go.Heatmap(z=[[finals[k].get(n) for k in finals] for n in layers], x=list(finals),
                                   y=[_short(n) for n in layers], colorbar={"title": "rank"}))
        fig.update_layout(title="final per-layer effective rank", height=max(400, 14 * len(layers)))
        files["chart_rank_heatmap"] = _html(fig, folder / "rank_heatmap.html")
    for label, info in results.items():
        hist = [r for r in info["run"].ranks() if r.get("type") == "ranks"]
        if len(hist) > 1:
            layers = list(hist[0]["effective"])
            fig = go.Figure(go.Heatmap(z=[[h["effective"][n] for h in hist] for n in layers],
                                       x=[h["step"] for h in hist], y=[_short(n) for n in layers]))
            for r in info["run"].ranks():
                if r.get("type") == "restart":
                    fig.add_vline(x=r["step"], line_dash="dash", line_color="white")
            fig.update_layout(title=f"{label}: effective rank per layer over steps", xaxis_title="step",
                              height=max(400, 14 * len(layers)))
            files[f"chart_ranks_{label}"] = _html(fig, folder / f"ranks_{label}.html")
    return files


def _short(name: str) -> str:
    return name.replace("transformer_blocks.", "tb").replace("attentions.", "at").replace("_blocks.", ".")


def _html(fig, path: Path) -> str:
    html = fig.to_html(include_plotlyjs="directory", full_html=True)
    runs.atomic_write_bytes(path, html.encode())
    if not (path.parent / "plotly.min.js").is_file():
        from plotly.offline import get_plotlyjs

        runs.atomic_write_bytes(path.parent / "plotly.min.js", get_plotlyjs().encode())
    return str(path)
