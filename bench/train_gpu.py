"""The real trainer (engine.train.train) on SD1.5 and SDXL UNet architectures with random weights, on a GPU.

One GPU:   python bench/train_gpu.py --out bench/train_gpu.json
            (every method, 20 steps, bf16, with and without gradient checkpointing; SD1.5 batch 4 at 512 px,
             SDXL batch 1 at 1024 px; prints one JSON line per case: median step time, peak memory, losses)
Two GPUs:  accelerate launch --num_processes 2 bench/train_gpu.py --arch sd15 --methods lora --no-gc-sweep \\
               --out bench/train_2gpu.json
            then compare its "losses" with the one-GPU run of the same case (same shape expected).
CPU smoke: python bench/train_gpu.py --arch tiny --steps 3   (seconds; checks the script itself)

The text encoders and VAE are small random stand-ins with the real output shapes (the UNet is full size):
the UNet is what a training step costs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import events as ev  # noqa: E402
from engine.adapters import method_names  # noqa: E402
from engine.train import TrainConfig, train  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
CASES = {"sd15": (SD15_UNET, 4, 512), "sdxl": (SDXL_UNET, 1, 1024), "tiny": (TINY_UNET, 2, 32)}


def tokenizer():
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(chr(i) for i in range(33, 127))}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chr(i) for i in range(33, 127))})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def text_encoder(hidden: int, projection: bool, vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=max(1, hidden // 64), vocab_size=vocab, max_position_embeddings=77,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                         projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_pipeline(arch: str, dtype: torch.dtype):
    """A pipeline around a full-size random UNet, with a small VAE of the right downscale factor."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    unet_cfg = CASES[arch][0]
    unet = UNet2DConditionModel(**unet_cfg)
    blocks = 2 if arch == "tiny" else 4  # VAE factor 2 for tiny, 8 for the real architectures
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,) * blocks,
                        down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks,
                        norm_num_groups=8, layers_per_block=1)
    tok = tokenizer()
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if unet_cfg.get("addition_embed_type") == "text_time":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder(768, False, len(tok)),
                                         text_encoder_2=text_encoder(1280, True, len(tok)), tokenizer=tok,
                                         tokenizer_2=tokenizer(), unet=unet, scheduler=sched)
    else:
        hidden = unet_cfg["cross_attention_dim"]
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder(hidden, False, len(tok)), tokenizer=tok,
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype)


def make_dataset(folder: Path, size: int, n: int = 8) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"{i:02d}.png"
        if not path.exists():
            tmp = folder / f".{i:02d}.{os.getpid()}.png"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp)
            os.replace(tmp, path)
            (folder / f"{i:02d}.txt").write_text("a photo of a random texture\n")
    return folder


def run_case(pipe, arch: str, method: str, gc: bool, steps: int, rank: int, root: Path, precision: str,
             step_mode: str = "auto") -> dict:
    """Train `steps` steps through engine.train.train; median step time after warm-up, peak memory, losses."""
    _, batch, size = CASES[arch]
    data = make_dataset(root / f"data-{arch}", size)
    settings = {"max_rank": 2 * rank} if method == "lora2" else {}
    cfg = TrainConfig(dataset=str(data), base_model=arch, method=method, rank=rank, steps=steps, batch_size=batch,
                      lr=1e-4, mixed_precision=precision, gradient_checkpointing=gc, rank_every=0, log_every=1,
                      method_settings=settings, step_mode=step_mode,
                      output_dir=str(root / f"{arch}-{method}-r{rank}-gc{int(gc)}-{step_mode}"))
    stamps, losses, modes, notices = [], [], [], []

    def emit(e):
        if isinstance(e, ev.Step):
            stamps.append(time.perf_counter())
            losses.append(e.loss)
        elif isinstance(e, ev.Started):
            modes.append(e.step_mode)
            if cuda:  # peak memory of the training steps, not of caching the dataset
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        elif isinstance(e, ev.Notice):
            notices.append(e.message)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(cfg, emit, pipeline=pipe)
    deltas = np.diff(stamps)[5:] if len(stamps) > 8 else np.diff(stamps)  # after warm-up and graph capture
    return {"arch": arch, "method": method, "rank": rank, "batch": batch, "resolution": size, "precision": precision,
            "gradient_checkpointing": gc, "steps": result.step, "step_mode": modes[0] if modes else None,
            "notices": notices,
            "step_s": float(statistics.median(deltas)) if len(deltas) else None,  # events reach the main process only
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "wall_s": time.perf_counter() - start, "losses": losses,
            "processes": int(os.environ.get("WORLD_SIZE", "1"))}


def floor_times(unet, arch: str, precision: str) -> dict[str, float]:
    """The frozen UNet's forward+backward at the case's shapes (no adapters), eager and as a CUDA graph, with the
    trainer's precision (autocast or not): the floor each trainer step is divided by."""
    import bench_speed

    _, batch, _ = CASES[arch]
    device, dtype = "cuda", unet.dtype
    unet.requires_grad_(False).train()
    out = {}
    inputs = bench_speed.make_inputs(unet, "mini" if arch == "tiny" else arch, batch, device, dtype)
    for name, graphs in (("floor_eager", False), ("floor_graph", True)):
        step = bench_speed.floor_step(unet, inputs, precision in ("bf16_autocast", "fp16"), device, graphs)
        out[name], _ = bench_speed.time_steps(step, device, warmup=3, steps=10, reset_peak=False)
    unet.eval()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=tuple(CASES))
    p.add_argument("--methods", nargs="+", default=method_names())
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, nargs="+", default=[16])
    p.add_argument("--step-modes", nargs="+", default=["cuda_graph", "eager"],
                   choices=("auto", "cuda_graph", "compile", "eager"))
    p.add_argument("--floor", action="store_true", help="also time the frozen UNet (eager and CUDA graph) and "
                   "report each case as x floor")
    p.add_argument("--precision", default="bf16", choices=("no", "fp16", "bf16", "bf16_autocast"))
    p.add_argument("--no-gc-sweep", action="store_true", help="only without gradient checkpointing")
    p.add_argument("--out", default=None, help="write all results as a JSON list here too")
    args = p.parse_args()
    from accelerate import PartialState

    state = PartialState()
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
             "bf16_autocast": torch.bfloat16}[args.precision]
    tag = [time.strftime("%Y%m%d-%H%M%S")]
    if state.num_processes > 1:  # every process trains into the same run folders
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(tag)
    root = Path(os.environ.get("BENCH_ROOT", tempfile.gettempdir())) / "train_gpu" / tag[0]
    results = []
    for arch in args.arch:
        pipe = build_pipeline(arch, dtype).to(state.device)
        floors = floor_times(pipe.unet, arch, precision=args.precision) if args.floor else {}
        if floors and state.is_main_process:
            print(json.dumps({"arch": arch, "floor": floors}), flush=True)
        for method in args.methods:
            for rank in args.rank:
                for gc in (False,) if args.no_gc_sweep else (False, True):
                    for mode in args.step_modes:
                        row = run_case(pipe, arch, method, gc, args.steps, rank, root, args.precision, mode)
                        for name, sec in floors.items():
                            if not gc and row["step_s"]:
                                row[f"x_{name}"] = row["step_s"] / sec
                        results.append(row)
                        if state.is_main_process:
                            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        del pipe
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if state.is_main_process:
        from bench_speed import kernel_checks
        checks = kernel_checks()  # a failed one ran its torch form: its rows are not the kernels' times
        print(json.dumps({"kernel_checks": checks}), flush=True)
        results.append({"kernel_checks": checks})
    if args.out and state.is_main_process:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
