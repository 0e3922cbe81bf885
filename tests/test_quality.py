"""Quality on the bundled mini world: a plain LoRA, trained by the real trainer on 2 CPU cores, teaches the mini-SD
a held-out style. Oracle-measured on held-out prompts (none is in any training set), base vs adapter, same seeds."""
from __future__ import annotations

import time

import pytest
import torch

from engine.generate import merged_lora
from engine.miniworld import datasets, minisd
from engine.miniworld.oracle import Oracle
from engine.train import TrainConfig, train

STYLE = "watercolour"
# 300 steps at batch 8 take ~85-90 s on the 2 cores here (the bound is 3 minutes); the same recipe on the
# other held-out styles is in the closing note of the mini-world issue.
RECIPE = dict(method="lora", rank=16, steps=300, lr=3e-3, batch_size=8, seed=0, rank_every=0)
N_PROMPTS, SAMPLE_STEPS, GUIDANCE = 32, 12, 5.0


def render(pipe, prompts: list[str]):
    return pipe(prompts, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
def test_plain_lora_lifts_a_held_out_style_and_keeps_the_prompts(tmp_path):
    trigger = datasets.STYLE_TRIGGERS[STYLE]
    cfg = TrainConfig(dataset=f"style_{STYLE}", output_dir=str(tmp_path / "run"), **RECIPE)
    started = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - started
    assert result.state == "finished" and result.step == RECIPE["steps"]

    oracle, pipe = Oracle.load(), minisd.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"{trigger} style, {p}" for p in datasets.eval_prompts(N_PROMPTS)]
    assert not set(datasets.eval_prompts(N_PROMPTS)) & {c.split(", ", 1)[1] for _, c in datasets.style_dataset(STYLE)}
    base, base4 = render(pipe, prompts), render(pipe, prompts[:4])
    with merged_lora(pipe.unet, result.files["kohya"]):
        styled = render(pipe, prompts)
    base_style, lora_style = oracle.style_fidelity(base, STYLE), oracle.style_fidelity(styled, STYLE)
    base_prompt, lora_prompt = oracle.prompt_fidelity(base, prompts), oracle.prompt_fidelity(styled, prompts)
    print(f"\n{STYLE}: trained {train_s:.0f} s; style fidelity {base_style:.3f} -> {lora_style:.3f}; "
          f"prompt fidelity {base_prompt:.3f} -> {lora_prompt:.3f}")
    assert base_style < 0.05  # the base model never saw this style
    assert base_prompt >= 0.85  # and follows the held-out prompts, trigger word included
    assert lora_style >= 0.80
    assert lora_prompt >= 0.70
    # the base model's images come back exactly once the adapter is unmerged
    assert [im.tobytes() for im in render(pipe, prompts[:4])] == [im.tobytes() for im in base4]
