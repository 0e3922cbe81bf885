"""The mini-SD recipe: train the VAE, the oracle, then the text encoder with the UNet, from scratch on rendered data.

    python -m engine.miniworld.recipe --stage all --out runs/minisd          # VAE, oracle, UNet, eval
    python -m engine.miniworld.recipe --stage unet --out runs/minisd --minutes 7.5

Every stage is seeded, renders its data on the fly (worker processes) and fits in 10 minutes on one H100.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from engine.miniworld import corpus, minisd, vocab, world
from engine.miniworld import datasets as mw_datasets
from engine.miniworld import oracle as mw_oracle


def log(msg: str, **fields) -> None:
    print(json.dumps({"t": round(time.time(), 1), "msg": msg, **fields}), flush=True)


def lr_at(progress: float, base: float, warmup: float = 0.03) -> float:
    """Linear warm-up then cosine decay to 5% of `base`, as a function of training progress in [0, 1]."""
    if progress < warmup:
        return base * progress / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup))))


class Clock:
    """Progress = max(step / steps, elapsed / budget): a run ends on whichever limit comes first."""

    def __init__(self, minutes: float, steps: int | None) -> None:
        self.t0, self.budget, self.steps = time.time(), minutes * 60, steps

    def progress(self, step: int) -> float:
        p = (time.time() - self.t0) / self.budget
        return max(p, step / self.steps) if self.steps else p


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 64, 64, 3) uint8 -> (B, 3, 64, 64) float in [-1, 1]."""
    return x_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        e, m = list(ema.parameters()), list(model.parameters())
        torch._foreach_lerp_(e, m, 1.0 - decay)


# ---------------------------------------------------------------- VAE
def stage_vae(a: argparse.Namespace) -> None:
    dev = a.device
    torch.manual_seed(a.seed)
    data = corpus.render_corpus(a.seed + 1, a.n_vae, shapes=world.ALL_SHAPES, styles=world.STYLES,
                                n_objects=(0, 1, 2, 3), p_objects=(0.05, 0.35, 0.45, 0.15), workers=a.workers)
    log("vae data", n=len(data.images))
    x_all = torch.from_numpy(data.images).to(dev)
    vae = minisd.build_vae().to(dev).train()
    log("vae params", n=minisd.n_params(vae))
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr_vae, betas=(0.9, 0.99), weight_decay=0.0)
    clock, step, g = Clock(a.minutes_vae, a.steps), 0, torch.Generator(device=dev).manual_seed(a.seed)
    while (p := clock.progress(step)) < 1:
        for group in opt.param_groups:
            group["lr"] = lr_at(p, a.lr_vae)
        x = to_unit(x_all[torch.randint(len(x_all), (a.batch_vae,), device=dev, generator=g)])
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        l1 = (rec - x).abs().mean()
        grad = ((rec.diff(dim=2) - x.diff(dim=2)).abs().mean() + (rec.diff(dim=3) - x.diff(dim=3)).abs().mean())
        kl = post.kl().mean() / 1024.0  # per latent element
        loss = l1 + 0.5 * grad + a.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            log("vae", step=step, progress=round(p, 3), l1=round(l1.item(), 4), kl=round(kl.item(), 3))
    vae.eval()
    with torch.no_grad():  # scaling factor: unit variance of base-style latents (like SD's 0.18215)
        base = data.styles < len(world.BASE_STYLES)
        xs = to_unit(x_all[torch.from_numpy(np.flatnonzero(base)[:4096]).to(dev)])
        z = torch.cat([vae.encode(xs[i:i + 512]).latent_dist.mean for i in range(0, len(xs), 512)])
        rec = torch.cat([vae.decode(z[i:i + 512]).sample for i in range(0, len(z), 512)])
        vae.register_to_config(scaling_factor=float(1.0 / z.float().std()))
        mae = float((rec.clamp(-1, 1) - xs).abs().mean() * 127.5)
    log("vae done", steps=step, scaling_factor=vae.config.scaling_factor, recon_mae_uint8=mae)
    out = Path(a.out) / "vae"
    copy.deepcopy(vae).to("cpu", torch.float16).save_pretrained(str(out), safe_serialization=True)
    _write_metrics(a.out, "vae", steps=step, params=minisd.n_params(vae), recon_mae_uint8=mae,
                   scaling_factor=vae.config.scaling_factor, minutes=round((time.time() - clock.t0) / 60, 2))


def load_vae(out: str, dev: str, folder: str | None = None):
    """The VAE from `folder` (e.g. assets/mini-sd/vae) or else from the vae stage's `out`/vae."""
    from diffusers import AutoencoderKL

    folder = Path(folder) if folder else Path(out) / "vae"
    return AutoencoderKL.from_pretrained(str(folder), dtype=torch.float32).to(dev).eval()


# ---------------------------------------------------------------- oracle
def stage_oracle(a: argparse.Namespace) -> None:
    dev = a.device
    torch.manual_seed(a.seed + 2)
    kw = dict(shapes=world.ALL_SHAPES, styles=world.STYLES, n_objects=(0, 1, 2, 3), p_objects=(0.05, 0.35, 0.45, 0.15),
              workers=a.workers, with_targets=True)
    data = corpus.render_corpus(a.seed + 3, a.n_oracle, **kw)
    val = corpus.render_corpus(a.seed + 4, 3000, **kw)
    log("oracle data", n=len(data.images))
    vae = None
    if a.oracle_vae_aug:  # read VAE reconstructions too, so generated images are read as well as renders
        for _ in range(int(a.wait_vae * 60)):
            if (Path(a.out) / "vae" / "config.json").is_file():
                break
            time.sleep(1)
        if (Path(a.out) / "vae" / "config.json").is_file():
            time.sleep(2)
            vae = load_vae(a.out, dev)
    log("oracle vae augmentation", on=vae is not None)
    x_all, y_all = torch.from_numpy(data.images).to(dev), torch.from_numpy(data.targets).to(dev)
    net = mw_oracle.OracleNet().to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr_oracle, weight_decay=0.02)
    clock, step, g = Clock(a.minutes_oracle, a.steps), 0, torch.Generator(device=dev).manual_seed(a.seed + 2)
    amp = dict(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda"))
    while (p := clock.progress(step)) < 1:
        for group in opt.param_groups:
            group["lr"] = lr_at(p, a.lr_oracle)
        idx = torch.randint(len(x_all), (a.batch_oracle,), device=dev, generator=g)
        x, y = to_unit(x_all[idx]), y_all[idx]
        with torch.no_grad():
            if vae is not None:
                half = len(x) // 2
                with torch.autocast(**amp):
                    x[:half] = vae.decode(vae.encode(x[:half]).latent_dist.mean).sample.float().clamp(-1, 1)
            x = x + torch.randn_like(x) * torch.rand(len(x), 1, 1, 1, device=dev) * 0.06
        with torch.autocast(**amp):
            loss = mw_oracle.oracle_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            log("oracle", step=step, progress=round(p, 3), loss=round(loss.item(), 4))
    net.eval()
    oracle = mw_oracle.Oracle(net, dev)
    metrics = oracle_metrics(oracle, val)
    log("oracle done", steps=step, **metrics)
    save_oracle(net, Path(a.out) / "oracle", metrics)
    _write_metrics(a.out, "oracle", steps=step, params=minisd.n_params(net), **metrics,
                   minutes=round((time.time() - clock.t0) / 60, 2))


def oracle_metrics(oracle: mw_oracle.Oracle, val: corpus.Corpus) -> dict:
    """Attribute accuracy (= prompt fidelity on ground truth), exact-slot accuracy and style accuracy."""
    got = oracle.readings(val.images)
    want = [world.parse_caption(k) for k in val.keys]
    return dict(
        attribute_accuracy=float(np.mean([mw_oracle.attribute_match(w, r.scene) for w, r in zip(want, got)])),
        slot_accuracy=float(np.mean([mw_oracle.slot_accuracy(w, r.scene) for w, r in zip(want, got)])),
        style_accuracy=float(np.mean([world.STYLES[s] == r.style for s, r in zip(val.styles, got)])),
        n_val=len(got))


def save_oracle(net: torch.nn.Module, folder: Path, metrics: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
          for k, v in net.state_dict().items()}
    save_file(sd, str(folder / "oracle.safetensors"))
    cfg = dict(widths=[32, 64, 96, 128], hidden=256, styles=list(world.STYLES), shapes=list(mw_oracle.SLOT_SHAPES),
               colours=list(mw_oracle.COLOURS), backgrounds=list(mw_oracle.BACKGROUNDS),
               positions=list(world.POSITIONS), sizes=list(world.SIZES), trained_metrics=metrics)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")


# ---------------------------------------------------------------- UNet + text encoder
def tokenize(tok, captions: list[str]) -> torch.Tensor:
    ids = tok(captions, padding="max_length", max_length=vocab.MAX_LENGTH, truncation=True)["input_ids"]
    return torch.tensor(ids, dtype=torch.int32)


def random_triggers(seed: int, n: int, avoid: set[str]) -> list[str]:
    """n random letter strings (1-6 letters, spelled out by the tokenizer like any user's trigger word), none in
    `avoid`: captions prefixed with them teach the base model that an unknown prefix changes nothing."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    while len(out) < n:
        word = "".join(rng.choice(letters, size=int(rng.integers(1, 7))))
        if word not in avoid:
            out.append(word)
    return out


def stage_unet(a: argparse.Namespace) -> None:
    dev = a.device
    torch.manual_seed(a.seed + 5)
    data = corpus.render_corpus(a.seed + 6, a.n_unet, shapes=world.SHAPES, styles=world.BASE_STYLES,
                                exclude=mw_datasets.eval_keys(), workers=a.workers)
    tok = vocab.make_tokenizer()
    vocab.check_tokenizer(tok)
    styled = [f"{world.STYLES[s]} style, {k}" for k, s in zip(data.keys, data.styles)]
    ids_styled, ids_plain, ids_empty = tokenize(tok, styled).to(dev), tokenize(tok, data.keys).to(dev), \
        tokenize(tok, [""]).to(dev)
    if a.p_trigger > 0:  # '<random letters> style, <caption>' or '<random letters>, <style> style, <caption>'
        avoid = set(mw_datasets.STYLE_TRIGGERS.values()) | {mw_datasets.SUBJECT_TRIGGER}
        words = random_triggers(a.seed + 7, len(styled), avoid)
        prefixed = [f"{w} style, {k}" if i % 2 else f"{w}, {c}" for i, (w, k, c) in
                    enumerate(zip(words, data.keys, styled))]
        ids_trigger = tokenize(tok, prefixed).to(dev)
        log("trigger captions", example=prefixed[:2])
    vae = load_vae(a.out, dev, a.vae_dir)
    with torch.no_grad(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
        x_all = torch.from_numpy(data.images)
        lat = torch.cat([vae.encode(to_unit(x_all[i:i + 1024].to(dev))).latent_dist.mean.float().half()
                         for i in range(0, len(x_all), 1024)]) * vae.config.scaling_factor
    log("unet data", n=len(lat), latent_std=float(lat.float().std()))
    del x_all, data
    unet, te = minisd.build_unet(), minisd.build_text_encoder()
    if a.init:  # continue from an existing mini-SD (e.g. assets/mini-sd) instead of from scratch
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(str(Path(a.init) / "unet"), dtype=torch.float32)
        te = CLIPTextModel.from_pretrained(str(Path(a.init) / "text_encoder"), dtype=torch.float32)
    unet, te = unet.to(dev).train(), te.to(dev).train()
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    log("unet params", unet=minisd.n_params(unet), text_encoder=minisd.n_params(te))
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr_unet, betas=(0.9, 0.99), weight_decay=0.01,
                            fused=dev.startswith("cuda"))
    ab = minisd.train_scheduler().alphas_cumprod.to(dev)
    clock, step, g = Clock(a.minutes_unet, a.steps), 0, torch.Generator(device=dev).manual_seed(a.seed + 5)
    last_save, B = time.time(), a.batch_unet
    amp = dict(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda"))
    while (p := clock.progress(step)) < 1:
        for group in opt.param_groups:
            group["lr"] = lr_at(p, a.lr_unet)
        idx = torch.randint(len(lat), (B,), device=dev, generator=g)
        r = torch.rand(B, device=dev, generator=g)
        ids = torch.where((r < 0.3)[:, None], ids_plain[idx], ids_styled[idx])  # 20% without the style words
        if a.p_trigger > 0:
            ids = torch.where(((r >= 0.3) & (r < 0.3 + a.p_trigger))[:, None], ids_trigger[idx], ids)
        ids = torch.where((r < 0.1)[:, None], ids_empty, ids).long()  # 10% empty: classifier-free guidance
        z0 = lat[idx].float()
        noise = torch.randn(z0.shape, device=dev, generator=g)
        t = torch.randint(0, len(ab), (B,), device=dev, generator=g)
        abt = ab[t][:, None, None, None]
        zt = abt.sqrt() * z0 + (1 - abt).sqrt() * noise
        with torch.autocast(**amp):
            pred = unet(zt, t, te(ids)[0]).sample.float()
        snr = ab[t] / (1 - ab[t])
        w = snr.clamp(max=5.0) / snr  # min-SNR-5 weighting for epsilon prediction (Hang et al. 2023, eq. 9)
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(a.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, te, decay)
        if step % 200 == 0:
            log("unet", step=step, progress=round(p, 3), loss=round(loss.item(), 4), lr=opt.param_groups[0]["lr"])
        if time.time() - last_save > a.save_every:
            minisd.save_pipeline(Path(a.out) / "mini-sd", vae, ema_te, ema_unet, tok)
            log("checkpoint", step=step)
            last_save = time.time()
    minisd.save_pipeline(Path(a.out) / "mini-sd", vae, ema_te, ema_unet, tok)
    log("unet done", steps=step)
    _write_metrics(a.out, "unet", steps=step, unet_params=minisd.n_params(unet),
                   text_encoder_params=minisd.n_params(te),
                   vae_params=minisd.n_params(vae), minutes=round((time.time() - clock.t0) / 60, 2), batch=B)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 100) -> list:
    images = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator(device="cpu").manual_seed(seed + i)
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g).images
    return images


def stage_eval(a: argparse.Namespace) -> None:
    dev = a.device
    pipe = minisd.load_pipeline(Path(a.out) / "mini-sd", device=dev)
    oracle_dir = Path(a.out) / "oracle"
    oracle = mw_oracle.Oracle.load(oracle_dir if (oracle_dir / "config.json").is_file() else None, device=dev)
    prompts = mw_datasets.base_style_prompts(a.n_eval)
    result = {}
    for guidance in a.guidance:
        images = generate(pipe, prompts, a.seed, a.eval_steps, guidance)
        fid = oracle.prompt_fidelity(images, prompts)
        sty = float(np.mean([oracle.style_fidelity([im], world.caption_style(p)) for im, p in zip(images, prompts)]))
        result[f"g{guidance}"] = dict(prompt_fidelity=fid, style_fidelity=sty)
        log("eval", guidance=guidance, prompt_fidelity=fid, style_fidelity=sty, steps=a.eval_steps)
    # the held-out style triggers in front of the prompts: an unknown trigger should not cost prompt fidelity
    triggers = list(mw_datasets.STYLE_TRIGGERS.values())
    trig_prompts = [f"{triggers[i % len(triggers)]} style, {p}"
                    for i, p in enumerate(mw_datasets.eval_prompts(a.n_eval))]
    images = generate(pipe, trig_prompts, a.seed, a.eval_steps, a.guidance[0])
    result["trigger_prompt_fidelity"] = oracle.prompt_fidelity(images, trig_prompts)
    log("eval", trigger_prompt_fidelity=result["trigger_prompt_fidelity"], guidance=a.guidance[0])
    gt = [world.render(world.parse_caption(p), world.caption_style(p)) for p in prompts]
    result["ground_truth_prompt_fidelity"] = oracle.prompt_fidelity(gt, prompts)
    _write_metrics(a.out, "eval", n_prompts=len(prompts), sampling_steps=a.eval_steps, **result)
    save_grid(pipe, Path(a.out) / "miniworld_grid.png", seed=a.seed, guidance=a.guidance[0], steps=a.eval_steps)


def save_grid(pipe, path: Path, seed: int = 0, guidance: float = 5.0, steps: int = 25, n: int = 8) -> None:
    """Rows per base style: ground truth, then two seeds of base-model samples; 8 held-out prompts, 2x scale."""
    from PIL import Image

    scenes = mw_datasets.eval_scenes()[:n]
    rows = []
    for style in world.BASE_STYLES:
        prompts = [s.caption(style=style) for s in scenes]
        rows.append([world.render(s, style) for s in scenes])
        for k in range(2):
            rows.append(generate(pipe, prompts, seed + 1000 * k, steps, guidance))
    grid = Image.new("RGB", (64 * n + 4 * (n - 1), 64 * len(rows) + 8 * (len(rows) // 3 - 1)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * 68, r * 64 + 8 * (r // 3)))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path, optimize=True)


def _write_metrics(out: str, stage: str, **fields) -> None:
    path = Path(out) / "metrics.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[stage] = fields
    path.write_text(json.dumps(data, indent=1) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["vae", "oracle", "unet", "eval", "all"], required=True)
    ap.add_argument("--out", required=True, help="output folder: vae/, oracle/, mini-sd/, metrics.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="rendering processes")
    ap.add_argument("--steps", type=int, default=None, help="cap on optimizer steps per stage (tests)")
    ap.add_argument("--n-vae", type=int, default=150_000)
    ap.add_argument("--n-oracle", type=int, default=200_000)
    ap.add_argument("--n-unet", type=int, default=600_000)
    ap.add_argument("--minutes-vae", type=float, default=2.5)
    ap.add_argument("--minutes-oracle", type=float, default=2.0)
    ap.add_argument("--minutes-unet", type=float, default=7.5)
    ap.add_argument("--batch-vae", type=int, default=256)
    ap.add_argument("--batch-oracle", type=int, default=512)
    ap.add_argument("--batch-unet", type=int, default=512)
    ap.add_argument("--lr-vae", type=float, default=5e-4)
    ap.add_argument("--lr-oracle", type=float, default=2e-3)
    ap.add_argument("--lr-unet", type=float, default=6e-4)
    ap.add_argument("--kl", type=float, default=1e-4, help="KL weight per latent element")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=float, default=90.0, help="seconds between UNet checkpoints")
    ap.add_argument("--oracle-vae-aug", type=int, default=1, help="also train the oracle on VAE reconstructions")
    ap.add_argument("--wait-vae", type=float, default=6.0, help="minutes the oracle waits for the VAE to appear")
    ap.add_argument("--vae-dir", default=None, help="VAE folder for the unet stage (default: OUT/vae)")
    ap.add_argument("--init", default=None, help="mini-SD folder whose UNet and text encoder the unet stage continues")
    ap.add_argument("--p-trigger", type=float, default=0.0,
                    help="fraction of captions prefixed with a random letter-string trigger (robust to user triggers)")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--eval-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    stages = ["vae", "oracle", "unet", "eval"] if a.stage == "all" else [a.stage]
    for stage in stages:
        t0 = time.time()
        {"vae": stage_vae, "oracle": stage_oracle, "unet": stage_unet, "eval": stage_eval}[stage](a)
        log("stage finished", stage=stage, minutes=round((time.time() - t0) / 60, 2))


if __name__ == "__main__":
    main()
