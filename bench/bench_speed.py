"""Training-step speed of our adapters against the frozen-UNet floor and PEFT LoRA, measured side by side in one run.

GPU:  python bench/bench_speed.py --out bench/results            (SD1.5 batch 4 at 512 px, SDXL batch 1 at 1024 px)
CPU:  python bench/bench_speed.py --device cpu --arch mini        (bundled mini model; seconds; no bars asserted)

Writes results.json and results.md (ratios: x floor in the same mode, x PEFT). UNets are built from config
with random weights: speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.adapters import inject, make_config, method_names  # noqa: E402
from engine.optim import SlotAdamW  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_unet(arch: str, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    if arch == "mini":
        mini = Path(__file__).resolve().parents[1] / "assets" / "mini-sd" / "unet"
        if mini.is_dir():
            unet = UNet2DConditionModel.from_pretrained(mini)
        else:
            unet = UNet2DConditionModel(sample_size=16, block_out_channels=(64, 128), layers_per_block=1,
                                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                                        attention_head_dim=8, norm_num_groups=32)
        return unet.to(device, dtype).requires_grad_(False)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SD15 if arch == "sd15" else SDXL))
    return unet.to(dtype).requires_grad_(False)


def make_inputs(unet, arch: str, batch: int, device: str, dtype: torch.dtype):
    cfg = unet.config
    size = cfg.sample_size
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, size, size, device=device, dtype=dtype, generator=g)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    c = torch.randn(batch, 77 if arch != "mini" else 16, cfg.cross_attention_dim, device=device, dtype=dtype,
                    generator=g)
    kw = {}
    if cfg.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype, generator=g),
                                   "time_ids": torch.randn(batch, 6, device=device, dtype=dtype, generator=g)}
    return x, t, c, kw


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device: str, warmup: int, steps: int, reset_peak: bool = True) -> tuple[float, float]:
    """Median seconds per step after warm-up (on CUDA: between events recorded after each step, with no host wait
    in between, so a step's host work overlaps the GPU work queued before it, as in the trainer), and peak memory
    in GiB (CUDA only; reset after the warm-up unless `reset_peak` is False: a replayed CUDA graph allocates
    nothing, its peak was reached when it was captured)."""
    for _ in range(warmup):
        step()
    sync(device)
    if device == "cuda" and reset_peak:
        torch.cuda.reset_peak_memory_stats()
    times = []
    if device == "cuda":  # steps back to back as in training (the host runs ahead); intervals between GPU events
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for i in range(steps):
            step()
            marks[i + 1].record()
        sync(device)
        times = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    for _ in range(steps if device != "cuda" else 0):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return statistics.median(times), peak


def floor_step(unet, inputs, autocast: bool, device: str, graphs: bool = False):
    x, t, c, kw = inputs
    xi = x.detach().requires_grad_(True)

    def core():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = unet(xi, t, c, **kw).sample
        out.float().pow(2).mean().backward()
    return graphed(core, None) if graphs else core


def train_step(unet, inputs, params, autocast: bool, device: str, adapters=None, graphs: bool = False,
               clip: bool | str = True, rank_updates: bool | str = "sync-free", masked_adamw: bool = True):
    """One training step as the trainer runs it (engine/train.py's _update): forward, loss (+ the method's terms),
    backward, the gradients' norm clipped to 1 (the trainer's default max_grad_norm; SlotAdamW's clip where it
    has slots, else torch's clip_grad_norm_; "torch": torch's always, False: none, both ablations), AdamW, the
    gradients zeroed (kept allocated under a graph, as the trainer's captured update does); `rank_updates`:
    LoRA²'s per-step rank update as the trainer runs it ("sync-free"), with one host read a step (True), or
    skipped (False, an ablation); `masked_adamw`: LoRA²'s idle slots skipped
    by the optimizer as in the trainer (engine/optim.py), or stepped like every other (False, an ablation)."""
    x, t, c, kw = inputs
    fused = device == "cuda"
    opt = SlotAdamW(params, slots=adapters.optimizer_slots() if adapters is not None and masked_adamw else None,
                    lr=1e-4, fused=True, capturable=graphs) if fused else torch.optim.AdamW(params, lr=1e-4)
    counter = [0]
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else list(params)

    def core():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = unet(x, t, c, **kw).sample
        loss = out.float().pow(2).mean()
        if adapters is not None:
            extra, _ = adapters.extra_loss()
            if extra is not None:
                loss = loss + extra
        loss.backward()
        if clip and clip != "torch" and isinstance(opt, SlotAdamW) and opt.slots:
            opt.clip_grad_norm_(1.0)  # the multiply of LoRA²'s factors' gradients inside the kernel
        elif clip:
            torch.nn.utils.clip_grad_norm_(flat, 1.0)
        opt.step()
        if adapters is not None:
            adapters.refresh_shadows()
        opt.zero_grad(set_to_none=not graphs)

    def before():
        if adapters is not None and rank_updates:  # LoRA² rank update: outside any graph
            adapters.before_step(counter[0], opt, sync=rank_updates != "sync-free")
        counter[0] += 1
    if graphs:
        return graphed(core, before)

    def step():
        before()
        core()
    return step


def graphed(core, before):
    """Capture one whole step (forward, backward, optimizer) in a CUDA graph; each call replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the graph (allocations, autotuning, lazy optimizer state)
            if before:
                before()
            core()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # the warm-up's stream, as the trainer (engine/step_graph.py)
        core()

    def step():
        if before:
            before()
        graph.replay()
    return step


def run_case(name, unet_fn, arch, batch, device, dtype, warmup, steps, kind, rank=16, method=None, mode="bf16",
             checkpointing=False, fused=True, graphs=False, results=None, extra=None, op="chain", clip=True,
             rank_updates: bool | str = "sync-free", grads_in_place: bool = True, batched_entropy: bool = True,
             kernels: bool = True, stacked: bool = True, masked_adamw: bool = True, fused_entropy: bool = True,
             fold_kernels: bool = True):
    from engine.adapters import fused as fused_module
    from engine.adapters import triton_ops

    triton_ops.ENABLED = kernels  # LoRA²'s Triton kernels (entropy, resize) or their torch form; restored
    triton_ops.FUSED_ENTROPY = fused_entropy  # False: the entropy's scores through a buffer and row kernels
    triton_ops.FOLD_KERNELS = fold_kernels  # False: s B diag(v) (TriLoRA, LoRA²) in torch's stack-multiply-cast

    fused_module.FORWARD = op  # the fused op's form (see engine/adapters/fused.py); restored below
    try:
        unet = unet_fn()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        inputs = make_inputs(unet, arch, batch, device, dtype)
        autocast = mode == "autocast"
        adapters = None
        if device == "cuda":  # graphs are captured while the step is built: count their warm-up and capture
            sync(device)
            torch.cuda.reset_peak_memory_stats()
        if kind == "floor":
            step = floor_step(unet, inputs, autocast, device, graphs)
        elif kind == "peft":
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                        init_lora_weights="gaussian"))
            params = [p for p in unet.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()  # fp32 adapter weights, as the diffusers training scripts cast them
            step = train_step(unet, inputs, params, autocast, device, graphs=graphs, clip=clip)
        else:
            extra = {**({"max_rank": max(rank * 2, 8)} if method == "lora2" else {}), **(extra or {})}
            adapters = inject(unet, make_config(method, rank=rank, **extra))
            for layer in adapters.layers.values():
                layer.fused = fused
            adapters.set_grads_in_place(grads_in_place)  # as the trainer in one process
            adapters.set_stacked_down(stacked)  # attention projections: x [W; A]^T in one GEMM, as the trainer
            if method == "lora2":
                adapters._entropy_options["batched"] = batched_entropy
            step = train_step(unet, inputs, adapters.param_groups(1e-4), autocast, device, adapters, graphs, clip,
                              rank_updates, masked_adamw)
        sec, peak = time_steps(step, device, warmup, steps, reset_peak=not graphs)
    finally:
        fused_module.FORWARD = "chain"
        triton_ops.ENABLED = triton_ops.FUSED_ENTROPY = triton_ops.FOLD_KERNELS = True
    row = {"name": name, "arch": arch, "batch": batch, "kind": kind, "method": method or kind, "rank": rank,
           "mode": mode + (" graph" if graphs else ""), "checkpointing": checkpointing, "fused": fused,
           "step_s": sec, "peak_gib": peak}
    print(json.dumps(row), flush=True)
    results.append(row)
    del unet, adapters, step
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def svd_timings(arch, device, dtype, rank, results):
    """AC-LoRA restart and a full per-layer rank measurement (batched cheap SVD) on random adapters, and the
    trainer's rank log for AC-LoRA and LoRA² (whose per-rank weights come from rho and the masks)."""
    unet = build_unet(arch, device, dtype)
    out = {}

    def median_time(fn) -> float:
        fn()
        sync(device)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def rank_log(ad, host: bool = True):
        """The trainer's rank log: probe on the device, pinned copies, and (host) the eigenvalues on the CPU."""
        from engine.train import _probe_to_host

        probe, event = _probe_to_host(ad.rank_probe())
        if host:
            if event is not None:
                event.synchronize()
            probe.finish(0.9)

    for method, prefix in (("ac_lora", ""), ("lora2", "lora2_")):
        ad = inject(unet, make_config(method, rank=rank, **({"max_rank": 2 * rank} if method == "lora2" else {})))
        with torch.no_grad():
            for p in ad.parameters():
                if p.dim() > 0:
                    p.normal_(0, 0.02)
        cases = {"rank_log_s": lambda ad=ad: rank_log(ad),  # device and host parts back to back (the trainer
                 "rank_log_launch_s": lambda ad=ad: rank_log(ad, host=False)}  # overlaps them); what it waits for
        if method == "ac_lora":
            cases = {"rank_measure_s": lambda ad=ad: ad.effective_ranks(0.9), **cases,
                     "ac_restart_s": lambda ad=ad: ad.restart(0.2, 3, 10)}
        for label, fn in cases.items():
            out[prefix + label] = median_time(fn)
        layers = len(ad.layers)
        unet = ad.remove()
    row = {"name": f"{arch} svd r{rank}", "arch": arch, "kind": "svd", "rank": rank, "layers": layers, **out}
    print(json.dumps(row), flush=True)
    results.append(row)


def ablation() -> list[tuple[str, dict]]:
    """Where LoRA²'s extra time goes (CUDA graphs, rank 16 and 64), and what the trainer's clip costs."""
    g = dict(kind="ours", rank=16, graphs=True)
    return [("floor bf16 graph", dict(kind="floor", graphs=True)),
            ("lora r16 graph", dict(method="lora", **g)),
            ("lora r64 graph", dict(method="lora", **{**g, "rank": 64})),
            ("lora r16 graph, projections not stacked", dict(method="lora", stacked=False, **g)),
            ("lora r64 graph, projections not stacked", dict(method="lora", stacked=False, **{**g, "rank": 64})),
            ("tri_lora r16 graph", dict(method="tri_lora", **g)),
            ("tri_lora r64 graph", dict(method="tri_lora", **{**g, "rank": 64})),
            ("tri_lora r64 graph, fold in torch", dict(method="tri_lora", fold_kernels=False, **{**g, "rank": 64})),
            ("lora2 r16 graph", dict(method="lora2", **g)),
            ("lora2 r16 graph, torch form (no Triton kernels)", dict(method="lora2", kernels=False, **g)),
            ("lora2 r16 graph, no entropy", dict(method="lora2", extra={"lambda_e": 0.0}, **g)),
            ("lora2 r16 graph, entropy per layer", dict(method="lora2", batched_entropy=False, **g)),
            ("lora2 r16 graph, entropy through a score buffer", dict(method="lora2", fused_entropy=False, **g)),
            ("lora2 r64 graph, entropy through a score buffer", dict(method="lora2", fused_entropy=False,
                                                                      **{**g, "rank": 64})),
            ("lora2 r64 graph", dict(method="lora2", **{**g, "rank": 64})),
            ("lora2 r64 graph, fold in torch", dict(method="lora2", fold_kernels=False, **{**g, "rank": 64})),
            ("lora2 r16 graph, fold in torch", dict(method="lora2", fold_kernels=False, **g)),
            ("lora2 r16 graph, projections not stacked", dict(method="lora2", stacked=False, **g)),
            ("lora2 r16 graph, AdamW on every slot", dict(method="lora2", masked_adamw=False, **g)),
            ("lora2 r64 graph, AdamW on every slot", dict(method="lora2", masked_adamw=False, **{**g, "rank": 64})),
            ("lora2 r64 graph, projections not stacked", dict(method="lora2", stacked=False, **{**g, "rank": 64})),
            ("lora2 r64 graph, torch form (no Triton kernels)", dict(method="lora2", kernels=False,
                                                                     **{**g, "rank": 64})),
            ("lora2 r64 graph, no rank updates", dict(method="lora2", rank_updates=False, **{**g, "rank": 64})),
            ("lora r64 graph, no clip", dict(method="lora", clip=False, **{**g, "rank": 64})),
            ("lora2 r64 graph, no clip", dict(method="lora2", clip=False, **{**g, "rank": 64})),
            ("lora2 r64 graph, torch's clip", dict(method="lora2", clip="torch", **{**g, "rank": 64})),
            ("lora2 r16 graph, no rank updates", dict(method="lora2", rank_updates=False, **g)),
            ("lora2 r16 graph, max_rank 16", dict(method="lora2", extra={"max_rank": 16}, **g)),
            ("lora2 r16 graph, none of these", dict(method="lora2", rank_updates=False,
                                                    extra={"lambda_e": 0.0, "lambda_r": 0.0, "max_rank": 16}, **g))]


def plan(arch: str, quick: bool, graphs: bool = False):
    """(name, kwargs) for each case of one architecture."""
    if graphs:
        cases = [("floor bf16 graph", dict(kind="floor", graphs=True))]
        for m in method_names():
            for r in (16, 64):  # graph mode is where the bars are read: both ranks even with --quick
                cases.append((f"{m} r{r} bf16 graph", dict(kind="ours", method=m, rank=r, graphs=True)))
        for r in (16, 64):  # the ablations (merged-weight op, LoRA² parts) are in ablation()
            cases.append((f"peft r{r} autocast graph", dict(kind="peft", rank=r, mode="autocast", graphs=True)))
        return cases
    cases = [("floor bf16", dict(kind="floor", mode="bf16")), ("floor autocast", dict(kind="floor", mode="autocast")),
             ("floor bf16 ckpt", dict(kind="floor", mode="bf16", checkpointing=True))]
    ranks = (16,) if quick else (16, 64)
    for m in method_names():
        for r in ranks:
            cases.append((f"{m} r{r} bf16", dict(kind="ours", method=m, rank=r)))
    if not quick:
        for m in method_names():
            cases.append((f"{m} r16 bf16 ckpt", dict(kind="ours", method=m, rank=16, checkpointing=True)))
        cases.append(("lora r16 autocast", dict(kind="ours", method="lora", rank=16, mode="autocast")))
        cases.append(("lora r16 bf16 unfused", dict(kind="ours", method="lora", rank=16, fused=False)))
    cases += [(f"peft r{r} autocast", dict(kind="peft", rank=r, mode="autocast")) for r in ranks]
    cases.append(("peft r16 bf16", dict(kind="peft", rank=16, mode="bf16")))
    if not quick:
        cases.append(("peft r16 autocast ckpt", dict(kind="peft", rank=16, mode="autocast", checkpointing=True)))
    return cases


def ratios(results):
    floors = {(r["arch"], r["mode"], r["checkpointing"]): r["step_s"] for r in results if r["kind"] == "floor"}
    peft = {(r["arch"], r["rank"], r["checkpointing"], r["mode"]): r for r in results if r["kind"] == "peft"}
    for r in results:
        if r["kind"] in ("svd",):
            continue
        f = floors.get((r["arch"], r["mode"], r["checkpointing"]))
        r["x_floor"] = r["step_s"] / f if f else None
        key = (r["arch"], r["rank"], r["checkpointing"])
        usual = "autocast graph" if r["mode"].endswith("graph") else "autocast"  # PEFT as it is usually run
        p = peft.get((*key, usual)) or peft.get((*key, r["mode"]))
        r["x_peft"] = r["step_s"] / p["step_s"] if p and r["kind"] != "floor" else None
        r["mem_vs_peft"] = r["peak_gib"] / p["peak_gib"] if p and p["peak_gib"] else None


BARS = {"x_floor": 1.3, "mem_vs_peft": 1.0, "x_lora": 1.1, "svd_s": 0.3}  # ../shared/design/PERFORMANCE.md


def bars(results) -> list[dict]:
    """Issue 7's bars read off one run's rows (graph mode, no checkpointing: where the bars are read): every
    method's step <= 1.3x the floor and its peak <= PEFT's; LoRA² and TriLoRA <= 1.1x our LoRA at the same rank;
    an AC-LoRA restart and a full rank measurement <= 0.3 s on SDXL r64. One dict per bar: the cases it covers,
    the worst case and figure, and whether it is met."""
    ours = {(r["arch"], r["method"], r["rank"]): r for r in results
            if r["kind"] == "ours" and r["mode"].endswith("graph") and not r["checkpointing"]
            and r["name"] == f"{r['method']} r{r['rank']} bf16 graph"}
    checks = {"step <= 1.3x the floor": [], "peak memory <= PEFT's": [], "LoRA², TriLoRA <= 1.1x our LoRA": [],
              "AC-LoRA restart <= 0.3 s (SDXL r64)": [], "full rank measurement <= 0.3 s (SDXL r64)": []}
    for (arch, method, rank), r in ours.items():
        case = f"{arch} {method} r{rank}"
        if r.get("x_floor") is not None:
            checks["step <= 1.3x the floor"].append((case, r["x_floor"], BARS["x_floor"]))
        if r.get("mem_vs_peft") is not None:
            checks["peak memory <= PEFT's"].append((case, r["mem_vs_peft"], BARS["mem_vs_peft"]))
        lora = ours.get((arch, "lora", rank))
        if method in ("lora2", "tri_lora") and lora is not None:
            checks["LoRA², TriLoRA <= 1.1x our LoRA"].append((case, r["step_s"] / lora["step_s"], BARS["x_lora"]))
    for r in results:
        if r["kind"] == "svd" and r["arch"] == "sdxl":
            checks["AC-LoRA restart <= 0.3 s (SDXL r64)"].append((r["name"], r["ac_restart_s"], BARS["svd_s"]))
            checks["full rank measurement <= 0.3 s (SDXL r64)"].append((r["name"], r["rank_measure_s"],
                                                                        BARS["svd_s"]))
    out = []
    for bar, cases in checks.items():
        if cases:
            case, worst, limit = max(cases, key=lambda c: c[1] / c[2])
            out.append({"bar": bar, "cases": len(cases), "worst_case": case, "worst": worst,
                        "met": all(v <= lim for _, v, lim in cases)})
    return out


def markdown(results, device_name: str) -> str:
    lines = [f"Device: {device_name}; torch {torch.__version__}", "",
             "| case | arch | batch | step s | peak GiB | x floor (same mode) | x PEFT (autocast) | mem / PEFT |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in results:
        if r["kind"] == "svd":
            continue
        lines.append(f"| {r['name']} | {r['arch']} | {r['batch']} | {r['step_s']:.4f} | {fmt(r['peak_gib'])} | "
                     f"{fmt(r.get('x_floor'))} | {fmt(r.get('x_peft'))} | {fmt(r.get('mem_vs_peft'))} |")
    verdicts = bars(results)
    if verdicts:
        lines += ["", "Bars (graph mode, this run):", "", "| bar | cases | worst case | worst | met |",
                  "|---|---|---|---|---|"]
        lines += [f"| {b['bar']} | {b['cases']} | {b['worst_case']} | {b['worst']:.3f} | "
                  f"{'yes' if b['met'] else '**no**'} |" for b in verdicts]
    for r in results:
        if r["kind"] == "svd":
            lines.append(f"\n{r['name']} ({r['layers']} layers): full rank measurement {r['rank_measure_s']:.3f} s, "
                         f"AC-LoRA restart {r['ac_restart_s']:.3f} s, trainer rank log {r['rank_log_s']:.3f} s "
                         f"(device part, timed with a sync: {r['rank_log_launch_s']:.3f} s)"
                         + (f"; LoRA² rank log {r['lora2_rank_log_s']:.3f} s (device part "
                            f"{r['lora2_rank_log_launch_s']:.3f} s)" if "lora2_rank_log_s" in r else ""))
    return "\n".join(lines)


def kernel_checks() -> dict:
    """The Triton kernels' first-use checks in this process (triton_ops.verdict): how many launch shapes passed,
    which failed (those ran their torch form: a failed one means the timings are not the kernels') and which are
    trusted unverified (CHECK_TRIES checks whose references were all zero)."""
    from engine.adapters import triton_ops
    worst: dict[str, float] = {}
    for key, err in triton_ops.ERRORS.items():
        name = " ".join(str(x) for x in key[:2])  # family and what
        worst[name] = max(worst.get(name, 0.0), err)
    return {"passed": sum(ok and k in triton_ops.ERRORS for k, ok in triton_ops._CHECKED.items()),
            "failed": [str(k) for k, ok in triton_ops._CHECKED.items() if not ok],
            "unverified": [str(k) for k, ok in triton_ops._CHECKED.items() if ok and k not in triton_ops.ERRORS],
            "worst_relative_error": worst}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", nargs="+", default=None, help="sd15 sdxl (GPU default) or mini (CPU default)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="rank 16 only, no checkpointing variants")
    ap.add_argument("--graphs", action="store_true",
                    help="also time every case with the step captured in a CUDA graph")
    ap.add_argument("--only-graphs", action="store_true")
    ap.add_argument("--ablation", action="store_true", help="only the LoRA² ablation cases (see ablation())")
    ap.add_argument("--match", nargs="+", default=None, help="only the cases whose name contains one of these")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    device = args.device
    archs = args.arch or (["sd15", "sdxl"] if device == "cuda" else ["mini"])
    warmup = args.warmup if args.warmup is not None else (4 if device == "cuda" else 1)
    steps = args.steps if args.steps is not None else (12 if device == "cuda" else 3)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results: list[dict] = []
    for arch in archs:
        batch = {"sd15": 4, "sdxl": 1, "mini": 8}[arch]
        cases = [] if args.only_graphs or args.ablation else plan(arch, args.quick or device == "cpu")
        if (args.graphs or args.only_graphs) and device == "cuda":
            cases += plan(arch, args.quick, graphs=True)
        if args.ablation:
            cases = ablation()
        if args.match:
            cases = [(n, kw) for n, kw in cases if n.startswith("floor") or any(m in n for m in args.match)]
        for name, kw in cases:
            if device == "cpu" and kw.get("mode") == "autocast":
                continue
            if device == "cpu":
                kw = {**kw, "mode": "fp32"}
                name = name.replace("bf16", "fp32")
            try:
                run_case(name, lambda arch=arch: build_unet(arch, device, dtype), arch, batch, device, dtype, warmup,
                         steps, results=results, **kw)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # report and go on with the other cases
                print(json.dumps({"name": name, "arch": arch, "error": str(e)[:200]}), flush=True)
        if device == "cuda" and arch in ("sdxl", "sd15") and not args.ablation:
            svd_timings(arch, device, dtype, 64, results)
    ratios(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    checks = kernel_checks()
    print("kernel checks:", json.dumps(checks), flush=True)
    (out / f"results_{device}.json").write_text(json.dumps({"device": name, "results": results,
                                                            "kernel_checks": checks, "bars": bars(results)},
                                                           indent=1))
    md = markdown(results, name)
    (out / f"results_{device}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
