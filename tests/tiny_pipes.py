"""Tiny SD1.x and SDXL pipelines built from config with random weights (no hub), for real-client tests."""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def tiny_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_config(hidden: int, vocab_size: int, projection: int | None = None) -> CLIPTextConfig:
    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
              vocab_size=vocab_size, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if projection:
        kw["projection_dim"] = projection
    return CLIPTextConfig(**kw)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                         norm_num_groups=8, sample_size=32)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    te = CLIPTextModel(_text_config(32, len(tok)))
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, norm_num_groups=8)
    te1 = CLIPTextModel(_text_config(32, len(tok)))
    te2 = CLIPTextModelWithProjection(_text_config(32, len(tok), projection=32))
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tiny_tokenizer(), unet=unet,
                                     scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 7, prompt: str = "a red circle"):
    g = torch.Generator().manual_seed(seed)
    size = 32
    return pipe(prompt, num_inference_steps=3, guidance_scale=3.0, generator=g, output_type="np",
                height=size, width=size).images[0]
