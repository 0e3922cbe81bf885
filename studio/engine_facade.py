"""The studio's one Engine: heavy objects (pipelines, captioners, the job worker) and the calls the tabs make."""
from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from studio import datasets as ds
from studio.engine_media import MediaMixin
from studio.jobs import Job, JobQueue
from studio.pruning import PruneCache
from studio.runview import RunView, eta_text, read_run

REPO = Path(__file__).resolve().parents[1]
BUNDLED_DATASETS = REPO / "assets" / "datasets"
BASE_MODELS = [("Bundled mini-SD (offline, CPU)", "bundled"),
               ("Stable Diffusion 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
               ("SDXL base 1.0", "stabilityai/stable-diffusion-xl-base-1.0")]
SHARED_ADAPTER_FIELDS = ("rank", "seed")  # set by the train form's own rank and seed boxes
BUNDLED_PREFIX = "bundled: "


def coerce(value: Any, kind: str, name: str) -> Any:
    """A form value as the dataclass field's type ('int', 'float | None', 'str', 'bool', 'list').

    '' means None; so does 0 for optional numbers, whose valid values are all positive.
    """
    optional = "None" in kind
    base = kind.split("|")[0].strip()
    if base == "list":
        lines = value.splitlines() if isinstance(value, str) else list(value or [])
        return [str(line).strip() for line in lines if str(line).strip()]
    blank = value is None or (isinstance(value, str) and not value.strip() and base != "str")
    if blank or (optional and base in ("int", "float") and not isinstance(value, str) and value == 0):
        if optional:  # a number box cannot be empty: 0 means "none" for optional numbers (all of them are > 0)
            return None
        raise ValueError(f"{name} needs a value")
    if base == "int":
        if isinstance(value, str):
            value = float(value.strip())
        if float(value) != int(float(value)):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    if base == "float":
        return float(value)
    if base == "bool":
        return bool(value)
    return str(value)


class Engine(MediaMixin):
    """Everything heavy lives here, shared by all sessions; per-session values stay in the tabs' gr.State."""

    def __init__(self, data_dir: str | os.PathLike = "data", allow_local_folders: bool | None = None) -> None:
        self.data = Path(data_dir).resolve()
        for sub in ("datasets", "runs", "adapters", "exports", "pruned", "previews", "compare", "uploads"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        self.allow_local_folders = (os.environ.get("SPACE_ID") is None) if allow_local_folders is None \
            else allow_local_folders
        self.jobs = JobQueue()
        self.prune_cache = PruneCache()
        self._pipes: OrderedDict[tuple, Any] = OrderedDict()
        self._captioners: dict[str, Any] = {}
        self._lock = threading.Lock()

    # --- heavy objects (called from the worker) ------------------------------------------------------------
    @property
    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def pipeline(self, spec: str, dtype=None):
        """A loaded base pipeline, cached (one at a time, to keep memory flat)."""
        import torch

        from engine import models

        dtype = dtype or (torch.float16 if self.device == "cuda" else torch.float32)
        key = (spec.strip(), str(dtype))
        with self._lock:
            if key in self._pipes:
                return self._pipes[key]
        pipe = models.load_pipeline(spec.strip(), self.device, dtype)
        with self._lock:
            self._pipes.clear()
            self._pipes[key] = pipe
        return pipe

    def captioner(self, model: str):
        from engine.captioning import load_captioner

        if model not in self._captioners:
            self._captioners.clear()
            self._captioners[model] = load_captioner(model)
        return self._captioners[model]

    # --- what the forms are built from ----------------------------------------------------------------------
    def method_choices(self) -> list[tuple[str, str]]:
        from engine.adapters import get_method, method_names

        return [(get_method(n).display, n) for n in method_names()]

    def method_summary(self, name: str) -> str:
        from engine.adapters import get_method

        return get_method(name).summary

    def method_fields(self, name: str) -> dict[str, dict[str, Any]]:
        """The method's own settings (field -> default/help/choices/type), shared rank and seed left out."""
        from engine.adapters import get_method

        return {k: v for k, v in get_method(name).config_cls.field_help().items() if k not in SHARED_ADAPTER_FIELDS}

    def train_fields(self) -> dict[str, dict[str, Any]]:
        from engine.train_config import TrainConfig

        return TrainConfig.field_help()

    def base_model_choices(self) -> list[tuple[str, str]]:
        return list(BASE_MODELS)

    def captioner_choices(self) -> list[str]:
        from engine.captioning import CAPTIONER_CHOICES

        return list(CAPTIONER_CHOICES)

    # --- datasets --------------------------------------------------------------------------------------------
    def dataset_choices(self) -> list[tuple[str, str]]:
        """Working copies in the data folder, then the bundled datasets (copied in when picked)."""
        own = sorted(p.name for p in (self.data / "datasets").iterdir() if p.is_dir())
        bundled = sorted(p.name for p in BUNDLED_DATASETS.iterdir() if p.is_dir()) if BUNDLED_DATASETS.is_dir() else []
        return [(n, n) for n in own] + [(BUNDLED_PREFIX + n, BUNDLED_PREFIX + n) for n in bundled if n not in own]

    def open_dataset(self, choice: str) -> Path:
        """The working folder of a dataset choice; a bundled dataset is copied in first (assets stay untouched)."""
        if not choice:
            raise ValueError("choose a dataset first")
        if choice.startswith(BUNDLED_PREFIX):
            name = choice[len(BUNDLED_PREFIX):]
            dst = self.data / "datasets" / ds.safe_name(name)
            if not dst.is_dir():
                ds.copy_folder(BUNDLED_DATASETS / name, dst)
            return dst
        folder = ds.inside(self.data / "datasets", self.data / "datasets" / choice)
        if not folder.is_dir():
            raise ValueError(f"dataset {choice!r} not found in the data folder")
        return folder

    def import_uploads(self, paths: list[str], name: str) -> str:
        folder = self.data / "datasets" / ds.safe_name(name, "upload")
        return ds.import_uploads(paths, folder).name

    def import_folder(self, path: str) -> str:
        if not self.allow_local_folders:
            raise ValueError("reading server folders is off here (a Space); upload the images or a zip instead")
        src = Path(path).expanduser()
        return ds.copy_folder(src, self.data / "datasets" / ds.safe_name(src.name)).name

    def dataset_view(self, choice: str) -> tuple[str, list[list[str]], list[tuple[str, str]], str]:
        """(folder name, [[file, caption]], gallery [(path, caption)], problems as markdown) of a dataset."""
        from engine.data import scan_dataset

        folder = self.open_dataset(choice)
        rows = ds.caption_rows(folder)
        gallery = [(str(folder / name), caption or "(no caption)") for name, caption in rows]
        report = scan_dataset(folder)
        issues = [f"- **{n}**: {why}" for n, why in sorted(report.problems.items())]
        issues += [f"- {n}: {why}" for n, why in sorted(report.notes.items())]
        head = f"{len(report.examples)} usable image(s) in `{folder.name}`"
        return folder.name, rows, gallery, head + ("\n\n" + "\n".join(issues) if issues else " · no problems")

    def bulk_edit(self, rows: list[list[str]], op: str, a: str = "", b: str = "") -> list[list[str]]:
        return ds.bulk_edit(rows, op, a, b)

    def save_captions(self, choice: str, rows: list[list[str]]) -> int:
        return ds.save_captions(self.open_dataset(choice), rows)

    def auto_caption(self, choice: str, model: str, trigger: str = "", overwrite: bool = False) -> Job:
        from engine.captioning import caption_folder

        folder = self.open_dataset(choice)

        def run(job: Job):
            captioner = self.captioner(model)
            report = caption_folder(folder, captioner, trigger=trigger.strip() or None, overwrite=overwrite,
                                    progress=lambda done, total: job.report(f"captioned {done}/{total}"))
            return report.summary()

        return self.jobs.submit("caption", f"caption {folder.name} ({model})", run)

    # --- training --------------------------------------------------------------------------------------------
    def build_train_config(self, form: dict[str, Any], method_values: dict[str, Any]):
        """A validated TrainConfig from the form (raises ValueError naming the bad field)."""
        from engine.train_config import TrainConfig

        fields = self.train_fields()
        values = {k: coerce(v, str(fields[k]["type"]), k) for k, v in form.items() if k in fields}
        own = self.method_fields(values["method"])
        settings = {k: coerce(v, str(own[k]["type"]), k) for k, v in method_values.items() if k in own}
        values["method_settings"] = {k: v for k, v in settings.items() if v != own[k]["default"]}
        values["dataset"] = str(self.open_dataset(form.get("dataset", "")))
        if values.get("sample_every") and not values.get("sample_prompts"):
            values["sample_prompts"] = [self.first_caption(values["dataset"])]
        values["output_dir"] = ""
        return TrainConfig.from_dict(values)

    def first_caption(self, folder: str) -> str:
        from engine.data import scan_dataset

        caps = [e.caption for e in scan_dataset(folder).examples if e.caption]
        return caps[0] if caps else "a picture"

    def start_training(self, config) -> Job:
        from engine import runs

        run_dir = runs.new_run_dir(self.data / "runs", config.method)
        config = dataclasses.replace(config, output_dir=str(run_dir))
        return self.jobs.submit("train", f"train {config.method} · {run_dir.name}",
                                lambda job: self._train(job, config, resume=False), str(run_dir))

    def resume_training(self, run_dir: str) -> Job:
        from engine import runs
        from engine.train_config import TrainConfig

        run = runs.RunFolder(ds.inside(self.data / "runs", run_dir))
        if any(j.run_dir == str(run.path) and not j.finished for j in self.jobs.jobs()):
            raise ValueError(f"{run.path.name} is already queued or running")
        if run.status().get("state") == "finished":
            raise ValueError(f"{run.path.name} is finished; start a new run to train more")
        config = dataclasses.replace(TrainConfig.from_dict(run.config()), output_dir=str(run.path))
        return self.jobs.submit("train", f"resume {run.path.name}",
                                lambda job: self._train(job, config, resume=True), str(run.path))

    def _train(self, job: Job, config, resume: bool):
        import time

        from engine import events as ev
        from engine.train import train
        from engine.train_config import PRECISIONS

        def emit(event) -> None:
            if isinstance(event, ev.Started):
                job.info.update(step0=event.step, step=event.step, total=event.total_steps, t0=time.time(),
                                mode=event.step_mode.replace("_", " "))
            elif isinstance(event, ev.Step):
                job.info["step"] = event.step
            elif isinstance(event, ev.Notice):
                job.info["notice"] = event.message

        _reset_accelerate()
        job.report("loading the base model")
        pipe = self.pipeline(config.base_model, PRECISIONS[config.mixed_precision])
        job.report("caching the dataset")
        return train(config, emit, job.stop, resume=resume, pipeline=pipe)

    def stop_training(self, run_dir: str) -> str:
        for job in self.jobs.jobs():
            if job.run_dir == run_dir and not job.finished:
                self.jobs.cancel(job)
                return "stopping after this step (a checkpoint is written)" if job.state == "running" else "removed"
        raise ValueError("this run is not queued or running")

    def run_choices(self) -> list[tuple[str, str]]:
        """Runs in the data folder and runs still queued, newest first."""
        from engine import runs

        queued = [j.run_dir for j in self.jobs.jobs() if j.kind == "train" and j.run_dir and not j.finished]
        found = [str(r.path) for r in runs.list_runs(self.data / "runs")]
        out = list(dict.fromkeys(sorted(queued, reverse=True) + found))
        return [(Path(p).name, p) for p in out]

    def active_run(self) -> str | None:
        """The run a fresh page should show: the running training, else a queued one, else the newest run."""
        train_jobs = [j for j in self.jobs.jobs() if j.kind == "train" and not j.finished]
        running = [j for j in train_jobs if j.state == "running"]
        if running or train_jobs:
            return (running or train_jobs)[0].run_dir
        choices = self.run_choices()
        return choices[0][1] if choices else None

    def run_view(self, run_dir: str) -> tuple[RunView, str]:
        """The run's numbers and a status line (queue position, step, ETA, or the error)."""
        view = read_run(run_dir)
        job = next((j for j in reversed(self.jobs.jobs()) if j.run_dir == run_dir), None)
        if job is None:
            line = f"{view.state} · step {view.step}/{view.total_steps}"
        elif job.state == "queued":
            line = f"queued · position {self.jobs.position(job)} in the queue"
        elif job.state == "running":
            line = "running · " + (eta_text(job.info, "running") if job.info.get("total") else job.message)
            if job.info.get("notice") or job.info.get("mode", "eager") != "eager":  # the fast path, or why not
                notice = job.info.get("notice")
                line += f" · steps: {job.info['mode']}" + (f" ({notice})" if notice else "")
        elif job.state == "failed":
            line = f"failed: {job.error}"
        else:
            line = f"{job.state} · step {view.step}/{view.total_steps}"
        return view, f"**{view.name}** · {view.method} · {line}"

    def queue_rows(self) -> list[list[Any]]:
        """[[#, job, state, position]] for every job not yet finished, plus the last few finished."""
        jobs = self.jobs.jobs()
        live = [j for j in jobs if not j.finished] + [j for j in jobs if j.finished][-3:]
        return [[j.id, j.label, j.state + (f": {j.error}" if j.error else ""), self.jobs.position(j) or ""]
                for j in live]


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state so that each run may choose its own mixed precision."""
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    except (ImportError, AttributeError):
        pass
