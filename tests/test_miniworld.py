"""The bundled mini world: renderer, grammar, tokenizer, mini-SD files and pipeline, oracle, datasets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.miniworld import datasets, minisd, vocab, world
from engine.miniworld.oracle import Oracle, attribute_match

MIB = 1024 * 1024
# bundled weights (2.7-minute UNet run): 0.506 at seed 0 (0.506-0.558 over seeds 0-2); raise when retrained
PROMPT_FIDELITY_BAR_32 = 0.90  # measured 0.960 on CPU (fp32, 12 DPM steps, g5); 0.999 on 200 prompts at 25 steps


def test_renderer_is_deterministic_and_styles_differ():
    scenes = world.sample_scenes(7, 20, shapes=world.ALL_SHAPES)
    assert [s.key() for s in scenes] == [s.key() for s in world.sample_scenes(7, 20, shapes=world.ALL_SHAPES)]
    for style in world.STYLES:
        a, b = world.render_batch(scenes, style), world.render_batch(scenes, style)
        assert a.shape == (20, 64, 64, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    img = world.render(scenes[0], "flat")
    assert img.size == (64, 64) and img.mode == "RGB"
    renders = [world.render_array(scenes[0], s).astype(np.float32) for s in world.STYLES]
    for i in range(len(renders)):
        for j in range(i + 1, len(renders)):
            assert np.abs(renders[i] - renders[j]).mean() > 3.0, (world.STYLES[i], world.STYLES[j])


def test_world_sizes_match_the_issue():
    assert len(world.SHAPES) >= 6 and world.HELDOUT_SHAPE not in world.SHAPES
    assert len(world.COLOURS) == 8 and len(world.SIZES) == 2 and len(world.POSITIONS) == 5
    assert len(world.BACKGROUNDS) == 4 and len(world.STYLES) >= 6 and len(world.HELDOUT_STYLES) >= 4


def test_grammar_round_trip():
    for scene in world.sample_scenes(3, 300, shapes=world.ALL_SHAPES, n_objects=(0, 1, 2, 3)):
        for style, trigger in ((None, None), ("flat", None), (None, "zkw style"), ("soft", "sks")):
            text = scene.caption(style=style, trigger=trigger)
            assert world.parse_caption(text) == scene
            assert world.caption_style(text) == style
    with pytest.raises(ValueError):
        world.parse_caption("a big red blob on the left, night background")
    with pytest.raises(ValueError):
        world.Scene((world.Obj("star", "red", "big", "left"), world.Obj("circle", "blue", "small", "left")), "sky")


def test_tokenizer_gives_one_id_per_grammar_word():
    vocab.check_tokenizer(vocab.make_tokenizer())
    from transformers import CLIPTokenizer

    saved = CLIPTokenizer.from_pretrained(str(minisd.MINI_SD_DIR / "tokenizer"))
    vocab.check_tokenizer(saved)
    ids = saved("flat style, a big red star on the left, sky background")["input_ids"]
    assert ids[0] == saved.bos_token_id and ids[-1] == saved.eos_token_id and len(ids) == 15


def test_mini_sd_files_are_small_fp16_safetensors():
    files = [p for p in minisd.MINI_SD_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * MIB
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3 and not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    from safetensors import safe_open

    for p in weights:
        assert p.stat().st_size <= 16 * MIB, p
        with safe_open(str(p), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, p
    index = json.loads((minisd.MINI_SD_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]


def test_pipeline_loads_offline_and_generates():
    pipe = minisd.load_pipeline()
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    names = {n.rsplit(".", 1)[-1] for n, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names  # LoRA targets exist
    g = torch.Generator().manual_seed(0)
    images = pipe(["flat style, a big red circle on the left, night background"], num_inference_steps=4,
                  guidance_scale=5.0, generator=g).images
    assert images[0].size == (64, 64)


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle.load()


def test_oracle_reads_fresh_ground_truth(oracle):
    scenes = world.sample_scenes(424_242, 350, shapes=world.ALL_SHAPES)
    styles = [world.STYLES[i % len(world.STYLES)] for i in range(len(scenes))]
    images = world.render_batch(scenes, styles)
    readings = oracle.readings(images)
    attribute = np.mean([attribute_match(s, r.scene) for s, r in zip(scenes, readings)])
    style = np.mean([st == r.style for st, r in zip(styles, readings)])
    assert attribute >= 0.98 and style >= 0.98, (attribute, style)
    prompts = [s.caption(style=st) for s, st in zip(scenes, styles)]
    assert oracle.prompt_fidelity(list(images[:40]), prompts[:40]) >= 0.98  # a list of arrays works too


def test_oracle_metrics(oracle):
    scenes = world.sample_scenes(5, 12)
    images = [world.render(s, "neon") for s in scenes]
    assert oracle.style_fidelity(images, "neon") > 0.9 and oracle.style_fidelity(images, "flat") < 0.1
    assert oracle.memorisation(images, images) == pytest.approx(0.0, abs=1e-3)
    assert oracle.memorisation(images[:6], images[6:]) > 0.05
    prompts = [s.caption() for s in world.sample_scenes(6, 12)]
    assert oracle.prompt_fidelity(images, prompts) < 0.6  # wrong prompts score low


@pytest.mark.slow
def test_base_model_prompt_fidelity_on_held_out_prompts(oracle):
    pipe = minisd.load_pipeline()
    prompts = datasets.base_style_prompts(32)
    g = torch.Generator().manual_seed(0)
    images = pipe(prompts, num_inference_steps=12, guidance_scale=5.0, generator=g).images
    fidelity = oracle.prompt_fidelity(images, prompts)
    print(f"prompt fidelity on 32 held-out prompts: {fidelity:.3f}")
    assert fidelity >= PROMPT_FIDELITY_BAR_32


def test_datasets_and_eval_prompts_are_reproducible_and_held_out(tmp_path: Path):
    committed = datasets.ASSETS
    written = datasets.write_all(tmp_path)
    for p in written:
        assert p.read_bytes() == (committed / p.relative_to(tmp_path)).read_bytes(), p
    prompts = (committed / "eval_prompts.txt").read_text().splitlines()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    eval_keys = {world.parse_caption(p).key() for p in prompts}
    for folder in sorted((committed / "datasets").iterdir()):
        captions = sorted(folder.glob("*.txt"))
        assert len(captions) == 15 and len(list(folder.glob("*.png"))) == 15, folder
        for c in captions:
            text = c.read_text().strip()
            assert world.parse_caption(text).key() not in eval_keys
            trigger = text.split(",")[0].split()[0]
            assert trigger in set(datasets.STYLE_TRIGGERS.values()) | {datasets.SUBJECT_TRIGGER}
    assert world.HELDOUT_SHAPE not in " ".join(prompts)
