"""The studio builds with a fake engine; the facade's pure logic (forms, pruning numbers, run views, jobs) is exact."""
from __future__ import annotations

import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio")

from studio import datasets as ds  # noqa: E402
from studio import plots, runview  # noqa: E402
from studio.app import build_app  # noqa: E402
from studio.engine_facade import Engine, coerce  # noqa: E402
from studio.jobs import DONE, FAILED, JobQueue  # noqa: E402
from studio.tabs.common import guard  # noqa: E402


class FakeEngine:
    """Only what the tabs call while the app is built: no models, no files."""

    allow_local_folders = False
    device = "cpu"

    def dataset_choices(self):
        return [("bundled: style_ink", "bundled: style_ink")]

    def captioner_choices(self):
        return ["bundled", "Salesforce/blip-image-captioning-base"]

    def method_choices(self):
        return [("LoRA", "lora"), ("AC-LoRA", "ac_lora")]

    def method_summary(self, name):
        return f"{name} summary"

    def method_fields(self, name):
        fields = {"alpha": {"default": None, "type": "float | None", "help": "scale"}}
        if name == "ac_lora":
            fields["mode"] = {"default": "product", "type": "str", "help": "mode", "choices": ("product", "paper")}
        return fields

    def train_fields(self):
        from engine.train_config import TrainConfig

        return TrainConfig.field_help()

    def base_model_choices(self):
        return [("Bundled", "bundled")]

    def run_choices(self):
        return []

    def adapter_choices(self):
        return []

    def export_sources(self):
        return []


def test_app_builds_with_five_tabs_from_a_fake_engine():
    demo = build_app(FakeEngine())
    tabs = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert tabs == ["Dataset", "Train", "Compare", "Prune", "Export"]
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"m-ac_lora-mode", "m-lora-alpha", "tr-loss", "tr-heatmap", "pr-tau", "ex-kohya"} <= ids
    assert any(isinstance(b, gr.Timer) for b in demo.blocks.values())


def test_coerce_form_values():
    assert coerce(8.0, "int", "rank") == 8
    assert coerce("", "int | None", "resolution") is None
    assert coerce(0, "int | None", "resolution") is None and coerce(0, "int", "seed") == 0
    assert coerce("3e-4", "float", "lr") == pytest.approx(3e-4)
    assert coerce("a\n\n b ", "list", "sample_prompts") == ["a", "b"]
    with pytest.raises(ValueError, match="rank must be a whole number"):
        coerce(2.5, "int", "rank")
    with pytest.raises(ValueError, match="steps needs a value"):
        coerce(None, "int", "steps")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(tmp_path_factory.mktemp("data"), allow_local_folders=True)


def _form(**over):
    form = dict(dataset="bundled: style_ink", base_model="bundled", method="ac_lora", rank=8.0, steps=20.0, lr=1e-3,
                batch_size=1.0, resolution=None, seed=0.0, trigger="", sample_every=0.0, sample_prompts="",
                rank_every=5.0, tau=0.9, mixed_precision="no")
    return form | over


def test_build_train_config_keeps_only_changed_method_settings(engine):
    cfg = engine.build_train_config(_form(), {"restart_every_steps": 5.0, "mode": "product", "alpha": None,
                                              "init": "kaiming"})
    assert cfg.method == "ac_lora" and cfg.rank == 8 and cfg.steps == 20
    assert cfg.method_settings == {"restart_every_steps": 5}
    assert Path(cfg.dataset).parent == engine.data / "datasets"  # a working copy, never assets/
    assert cfg.adapter_config().restart_every_steps == 5
    with pytest.raises(ValueError, match="mode must be one of"):
        engine.build_train_config(_form(), {"mode": "nonsense"})
    with pytest.raises(ValueError, match="steps"):
        engine.build_train_config(_form(steps=0), {})


def test_method_fields_come_from_the_config_dataclasses(engine):
    from engine.adapters import get_method

    for _, name in engine.method_choices():
        fields = engine.method_fields(name)
        assert "rank" not in fields and "seed" not in fields
        assert set(fields) == set(get_method(name).config_cls.field_help()) - {"rank", "seed"}
        assert all(info.get("help") for info in fields.values())


def _synthetic_lora(path: Path, n_layers: int, rank: int, d: int = 320, k: int = 320, fmt: str = "kohya"):
    """LoRA file whose layer i has singular values 2^-j (j < rank): energy kept is known exactly."""
    from engine.export import save_lora

    g = torch.Generator().manual_seed(0)
    factors = {}
    for i in range(n_layers):
        u, _ = torch.linalg.qr(torch.randn(d, rank, generator=g))
        v, _ = torch.linalg.qr(torch.randn(k, rank, generator=g))
        s = 2.0 ** -torch.arange(rank, dtype=torch.float32)
        factors[f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q{i}"] = (u * s, v.T.contiguous())
    return save_lora(factors, path, fmt, dtype=torch.float32), factors


def test_prune_numbers_are_exact_and_the_size_estimate_is_close(tmp_path, engine):
    from engine.export import prune_file

    res, _ = _synthetic_lora(engine.data / "adapters" / "a.safetensors", 6, 8)
    n = engine.prune_numbers(res.path, 0.9)
    # s^2 = 4^-j: cumulative energy 0.75, 0.9375 -> tau 0.9 keeps 2 components per layer
    assert set(n.after.values()) == {2} and set(n.before.values()) == {8}
    assert n.params_before == 6 * (8 * 640 + 1) and n.params_after == 6 * (2 * 640 + 1)
    assert n.kept_energy == pytest.approx(0.9375, abs=1e-4)
    assert n.bytes_before == res.bytes
    assert set(engine.prune_numbers(res.path, 0.99, cap=3).after.values()) == {3}
    out = prune_file(engine.prune_cache.get(res.path).lora, tmp_path / "p.safetensors", tau=0.9)
    assert abs(n.bytes_after - out.bytes) / out.bytes < 0.03
    _synthetic_lora(tmp_path / "outside.safetensors", 1, 2)
    with pytest.raises(ValueError, match="outside the studio's data folder"):
        engine.prune_numbers(str(tmp_path / "outside.safetensors"), 0.9)


def test_prune_slider_is_fast_once_spectra_are_cached(tmp_path, engine):
    path = _synthetic_lora(engine.data / "adapters" / "big.safetensors", 128, 32, d=320, k=768)[0].path
    engine.prune_numbers(path, 0.9)  # loads and computes spectra once
    start = time.perf_counter()
    for tau in (0.5, 0.7, 0.8, 0.9, 0.95):
        engine.prune_numbers(path, tau)
    assert (time.perf_counter() - start) / 5 < 1.0


def test_run_view_reads_losses_ranks_and_restarts(tmp_path):
    from engine import runs

    run = runs.RunFolder(tmp_path / "run").create()
    runs.atomic_write_json(run / runs.CONFIG, {"method": "ac_lora"})
    for step, loss in enumerate([1.0, 0.5, 0.25], start=1):
        runs.append_jsonl(run / runs.METRICS, {"type": "step", "step": step, "loss": loss})
    for step, r in ((1, 8), (3, 4)):
        runs.append_jsonl(run / runs.RANKS, {"type": "ranks", "step": step, "effective": {"a": r, "b": r // 2},
                                             "native": {"a": 8, "b": 8}})
    runs.append_jsonl(run / runs.RANKS, {"type": "restart", "step": 2, "ranks": {"a": 4}})
    run.write_status("running", 3, 10)
    view = runview.read_run(run.path)
    assert view.steps == [1, 2, 3] and view.losses == [1.0, 0.5, 0.25]
    assert view.smoothed[0] == pytest.approx(1.0)  # debiased EMA starts at the first value
    assert view.smoothed[2] == pytest.approx((0.081 * 1.0 + 0.09 * 0.5 + 0.1 * 0.25) / (1 - 0.9**3))
    assert view.layers == ["a", "b"] and view.effective == [[8, 4], [4, 2]] and view.restarts == [2]
    assert (view.state, view.step, view.total_steps, view.method) == ("running", 3, 10, "ac_lora")
    fig = plots.rank_heatmap(view)
    assert list(fig.data[0].z[0]) == [8, 4] and len(fig.layout.shapes) == 1  # the restart line
    assert runview.eta_text({"step": 5, "total": 10, "step0": 0, "t0": 100.0}, "running", now=110.0).endswith(
        "ETA 0m10s")


def test_ema_matches_the_closed_form():
    assert runview.ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert runview.ema([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_jobs_run_one_at_a_time_in_order_with_positions_and_readable_errors():
    q = JobQueue()
    gate, order = threading.Event(), []
    first = q.submit("x", "first", lambda job: (gate.wait(5), order.append(1)))
    second = q.submit("x", "second", lambda job: order.append(2))
    bad = q.submit("x", "bad", lambda job: (_ for _ in ()).throw(ValueError("rank must be positive, got 0")))
    time.sleep(0.2)
    assert q.position(first) == 0 and q.position(second) == 1 and q.position(bad) == 2
    gate.set()
    assert bad.done_event.wait(5)
    assert order == [1, 2] and first.state == second.state == DONE
    assert bad.state == FAILED and bad.error == "rank must be positive, got 0"
    late = q.submit("x", "late", lambda job: time.sleep(0.5))
    queued = q.submit("x", "queued", lambda job: order.append(3))
    q.cancel(queued)
    late.done_event.wait(5)
    time.sleep(0.1)
    assert queued.state == "cancelled" and 3 not in order


def test_guard_turns_engine_errors_into_messages():
    @guard
    def boom():
        raise ValueError("tau must be in (0, 1], got 2")

    with pytest.raises(gr.Error) as info:
        boom()
    assert "tau must be in (0, 1], got 2" in str(info.value)


def test_dataset_edits_uploads_and_the_data_folder_fence(tmp_path, engine):
    rows = [["a.png", "red circle"], ["b.png", "zkw, blue star"]]
    assert ds.bulk_edit(rows, "trigger", "zkw") == [["a.png", "zkw, red circle"], ["b.png", "zkw, blue star"]]
    assert ds.bulk_edit(rows, "replace", "red", "green")[0][1] == "green circle"
    with pytest.raises(ValueError, match="needs a word"):
        ds.bulk_edit(rows, "prefix", " ")
    src = Path(__file__).resolve().parents[1] / "assets" / "datasets" / "style_ink"
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(src / "00.png", "../../evil/00.png")  # only base names are used: nothing escapes the folder
        zf.writestr("00.txt", "zkw style, a star")
        zf.writestr("notes.exe", "x")
    name = engine.import_uploads([str(archive)], "../zipped")
    folder = engine.data / "datasets" / name
    assert folder.parent == engine.data / "datasets"
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "00.txt"]
    _, table, gallery, problems = engine.dataset_view(name)
    assert table == [["00.png", "zkw style, a star"]] and len(gallery) == 1 and "1 usable" in problems
    assert engine.save_captions(name, [["00.png", "new caption"]]) == 1
    assert (folder / "00.txt").read_text().strip() == "new caption"
    with pytest.raises(ValueError, match="outside"):
        engine.save_captions(name, [["../../x.png", "c"]])
    with pytest.raises(ValueError, match="outside"):
        engine.open_dataset("../../etc")


def test_export_and_metadata_of_a_standalone_file(tmp_path, engine):
    _synthetic_lora(engine.data / "adapters" / "syn.safetensors", 2, 4)
    src = str(engine.data / "adapters" / "syn.safetensors")
    path, meta = engine.export(src, "kohya")
    assert Path(path).parent == engine.data / "exports" and meta["layers"] == 2 and meta["ranks min/max"] == [4, 4]
    with pytest.raises(ValueError, match="is a kohya file"):
        engine.export(src, "diffusers")
    assert json.loads(json.dumps(meta))  # shown in gr.JSON


def test_resume_and_stop_explain_what_cannot_be_done(engine):
    from engine import runs

    run = runs.RunFolder(engine.data / "runs" / "finished-run").create()
    runs.atomic_write_json(run / runs.CONFIG, {"dataset": "x"})
    run.write_status("finished", 10, 10)
    with pytest.raises(ValueError, match="is finished"):
        engine.resume_training(str(run.path))
    with pytest.raises(ValueError, match="not queued or running"):
        engine.stop_training(str(run.path))
    with pytest.raises(ValueError, match="outside"):
        engine.resume_training("/etc")
    assert engine.active_run() == str(run.path)  # nothing running: a fresh page shows the newest run


def test_run_line_says_how_steps_run_and_why_not_faster(engine, tmp_path):
    from engine import runs

    run = runs.RunFolder(tmp_path / "graphrun").create()
    runs.atomic_write_json(run / runs.CONFIG, {"method": "lora"})
    run.write_status("running", 1, 10)
    release, started = threading.Event(), threading.Event()

    def work(job):
        job.info.update(step0=0, step=1, total=10, t0=time.time(), mode="eager",
                        notice="CUDA graphs need a CUDA GPU (training runs on cpu)")
        started.set()
        release.wait(10)

    job = engine.jobs.submit("train", "graphrun", work, str(run.path))
    try:
        assert started.wait(10)
        _, line = engine.run_view(str(run.path))
        assert "steps: eager (CUDA graphs need a CUDA GPU (training runs on cpu))" in line
        job.info.pop("notice")
        job.info["mode"] = "cuda graph"
        assert "steps: cuda graph" in engine.run_view(str(run.path))[1]
        job.info["mode"] = "eager"
        assert "steps:" not in engine.run_view(str(run.path))[1]  # plain eager on a CPU: nothing to say
    finally:
        release.set()
