"""The command line: --help for every command, each method trains as a subprocess, export/prune/generate."""
from __future__ import annotations

import json

import pytest
from helpers import make_image_folder, run_cli, save_tiny_pipeline

from engine.__main__ import build_parser, main
from engine.export import load_lora_file
from engine.runs import RunFolder

METHOD_SETTINGS = {"lora": "{}", "ac_lora": '{"restart_every_steps": 1}', "tri_lora": "{}",
                   "lora2": '{"max_rank": 8}'}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return str(save_tiny_pipeline(root / "tiny-sd")), str(make_image_folder(root / "ds", n=2)), root


def test_help_reads_well(capsys):
    for command in ("train", "generate", "prune", "export", "compare"):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([command, "--help"])
        assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--method-settings", "--gradient-checkpointing", "--sample-prompts", "--resume", "--tau",
                   "--strength", "--ranks"):
        assert option in out


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_each_method_trains_from_the_cli(setup, method):
    model, data, root = setup
    out = root / f"run-{method}"
    proc = run_cli("train", "--dataset", data, "--base-model", model, "--method", method, "--rank", "4",
                   "--steps", "2", "--method-settings", METHOD_SETTINGS[method], "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["state"] == "finished" and result["step"] == 2
    assert RunFolder(out).lora_file("kohya").is_file() and RunFolder(out).lora_file("diffusers").is_file()


def test_export_prune_and_generate_in_process(setup, capsys):
    model, data, root = setup
    run = root / "run-main"
    assert main(["train", "--dataset", data, "--base-model", model, "--rank", "4", "--steps", "2", "--lr", "1e-2",
                 "--output-dir", str(run)]) == 0
    assert main(["export", str(run), "--format", "diffusers", "--out", str(root / "e.safetensors")]) == 0
    assert load_lora_file(root / "e.safetensors").fmt == "diffusers"
    assert main(["prune", str(run), "--rank", "2", "--out", str(root / "p.safetensors")]) == 0
    assert set(load_lora_file(root / "p.safetensors").ranks.values()) == {2}
    assert main(["prune", str(root / "p.safetensors"), "--rank", "1", "--out", str(root / "p1.safetensors")]) == 0
    assert set(load_lora_file(root / "p1.safetensors").ranks.values()) == {1}
    assert main(["generate", "--base-model", model, "--adapter", str(run), "--prompt", "red", "--seed", "0", "1",
                 "--steps", "2", "--out", str(root / "g.png")]) == 0
    assert (root / "g.png").is_file()
    assert main(["train", "--config", str(run / "config.json"), "--steps", "1", "--output-dir",
                 str(root / "from-config")]) == 0
    assert RunFolder(root / "from-config").config()["lr"] == 1e-2  # taken from the file, steps overridden
    capsys.readouterr()


def test_bad_input_is_a_message_not_a_traceback(setup, tmp_path, capsys):
    model, _, _ = setup
    assert main(["train", "--dataset", str(tmp_path / "nothing"), "--base-model", model]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "x.ckpt"), "--tau", "0.9", "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "pickle" in capsys.readouterr().err
