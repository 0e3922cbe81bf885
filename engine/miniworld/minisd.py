"""The mini Stable Diffusion: its component configs, builders from config, and save/load in the diffusers layout."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from engine.miniworld import vocab as _vocab

ASSETS = Path(__file__).resolve().parents[2] / "assets"
MINI_SD_DIR = ASSETS / "mini-sd"

TEXT_HIDDEN = 256
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 128], act_fn="silu",
)  # 64x64x3 <-> 16x16x4
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 128, 160],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=32,
)
TEXT_CONFIG = dict(
    hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=_vocab.MAX_LENGTH, hidden_act="quick_gelu", projection_dim=TEXT_HIDDEN,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", steps_offset=1)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = _vocab.build_vocab()
    cfg = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[_vocab.BOS], eos_token_id=vocab[_vocab.EOS],
                         pad_token_id=vocab[_vocab.EOS], **TEXT_CONFIG)
    return CLIPTextModel(cfg)


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def sample_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_pipeline(folder: str | Path, vae, text_encoder, unet, tokenizer=None) -> Path:
    """Write a StableDiffusionPipeline folder (fp16 safetensors, no safety checker) and return its path."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    tokenizer = tokenizer if tokenizer is not None else _vocab.make_tokenizer()
    vae, text_encoder, unet = (copy.deepcopy(m).to("cpu", torch.float16) for m in (vae, text_encoder, unet))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sample_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _vocab.make_tokenizer(folder / "tokenizer")  # adds vocab.json / merges.txt beside tokenizer.json
    return folder


def load_pipeline(path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """StableDiffusionPipeline for the bundled mini-SD (offline, no safety checker, progress bar off)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path or MINI_SD_DIR), dtype=dtype,
                                                   safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
