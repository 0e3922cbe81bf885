"""The comparison: methods plus a rank sweep on one dataset and budget; report folder with grids, metrics, charts."""
from __future__ import annotations

import csv
import json

import pytest
from helpers import make_image_folder, save_tiny_pipeline

from engine.compare import CompareConfig, compare, miniworld_style


def test_small_comparison_writes_a_report(tmp_path):
    model = str(save_tiny_pipeline(tmp_path / "tiny-sd"))
    data = str(make_image_folder(tmp_path / "ds", n=2))
    cfg = CompareConfig(dataset=data, base_model=model, methods=["lora", "ac_lora"], ranks=[2], rank=4, steps=2,
                        prompts=["red circle"], seeds=[0], sample_steps=2, output_dir=str(tmp_path / "report"),
                        method_settings={"ac_lora": {"restart_every_steps": 1}}, train_settings={"rank_every": 1})
    report = compare(cfg)
    labels = [r["label"] for r in report.rows]
    assert labels == ["base", "lora", "ac_lora", "lora_r2"]
    folder = tmp_path / "report"
    for name in ("grid_all.png", "grids/lora.png", "metrics.csv", "metrics.json", "report.md",
                 "fidelity_vs_size.html", "rank_heatmap.html", "ranks_ac_lora.html", "plotly.min.js"):
        assert (folder / name).is_file(), name
    rows = {r["label"]: r for r in json.loads((folder / "metrics.json").read_text())}
    assert rows["lora_r2"]["size_mb"] < rows["lora"]["size_mb"] and rows["base"]["size_mb"] == 0
    assert rows["ac_lora"]["restarts"] == 1 and rows["lora"]["final_loss"] > 0
    with open(folder / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    again = compare(cfg)  # finished runs are reused, not retrained
    assert [r["wall_s"] for r in again.rows[1:]] == [r["wall_s"] for r in report.rows[1:]]


def test_config_validation():
    with pytest.raises(ValueError, match="unknown method"):
        CompareConfig(dataset="x", methods=["dora"])
    with pytest.raises(ValueError, match="ranks"):
        CompareConfig(dataset="x", ranks=[0])
    with pytest.raises(ValueError, match="nothing to compare"):
        CompareConfig(dataset="x", methods=[], ranks=[])
    with pytest.raises(ValueError, match="lr"):
        CompareConfig(dataset="x", train_settings={"lr": -1.0})
    with pytest.raises(ValueError, match="guidance must be a number in \\[0, 100\\), got -1"):
        CompareConfig(dataset="x", guidance=-1)
    assert set(CompareConfig(dataset="x", ranks=[4, 16], rank=16).entries()) == {"lora", "ac_lora", "tri_lora",
                                                                                 "lora2", "lora_r4"}


def test_miniworld_style_detection(tmp_path):
    data = make_image_folder(tmp_path / "plain", n=1)
    assert miniworld_style(str(data)) is None


def test_oracle_scores_on_a_bundled_style(tmp_path):
    """_score reads prompt/style fidelity and memorisation (vs the dataset's own images) for every column."""
    from PIL import Image

    from engine.compare import _score
    from engine.data import scan_dataset
    from engine.generate import GridResult
    from engine.miniworld import datasets, world

    examples = scan_dataset("style_ink").examples[:3]
    train = [Image.open(e.path).convert("RGB") for e in examples]
    prompts = [e.caption for e in examples]
    held_out = [world.render(world.parse_caption(p), "ink") for p in datasets.eval_prompts(3)]
    flat = [world.render(world.parse_caption(p), "flat") for p in prompts]
    grid = GridResult(["base", "copies", "fresh"], prompts, [0], {"base": flat, "copies": train, "fresh": held_out})
    rows = [{"label": label} for label in grid.labels]
    _score(rows, grid, "style_ink")
    by = {r["label"]: r for r in rows}
    assert all(r["style"] == "ink" for r in rows)
    assert by["copies"]["style_fidelity"] > 0.95 and by["base"]["style_fidelity"] < 0.05
    assert by["copies"]["prompt_fidelity"] > 0.95 and by["base"]["prompt_fidelity"] > 0.95  # same scenes, flat style
    assert by["fresh"]["prompt_fidelity"] < 0.8  # other scenes than the prompts ask for
    assert by["copies"]["memorisation"] < 0.01  # exact copies (float32 distance expansion leaves ~0.004)
    assert by["fresh"]["memorisation"] > 0.05 and by["base"]["memorisation"] > 0.02
