"""The trainer: TrainConfig (fields with help text) and one readable accelerate loop that writes a run folder."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from engine import data as data_mod
from engine import events as ev
from engine import models, runs, speed, step_graph
from engine.adapters import inject, triton_ops
from engine.adapters.fused import out_dtype_ok
from engine.optim import SlotAdamW
from engine.train_config import AUTOCAST, PRECISIONS, TrainConfig

__all__ = ["RunResult", "TrainConfig", "load_run_adapters", "resume_run", "train"]


@dataclass
class RunResult:
    """How a run ended: state finished/stopped, steps done, final files by format, wall time of this call."""

    run_dir: str
    state: str
    step: int
    total_steps: int
    files: dict[str, str]
    wall_s: float


Emit = Callable[[ev.Event], None]


@dataclass
class _Session:
    """Everything the loop touches, built once by _setup."""

    acc: Any
    pipe: Any
    unet: Any  # the prepared (maybe DDP-wrapped) UNet
    adapters: Any
    optimizer: Any
    noise: Any  # DDPM scheduler for the forward process
    data: data_mod.TrainData
    base_lrs: list[float]
    gen: torch.Generator
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    resolution: int
    step: int = 0
    loss_sum: torch.Tensor | None = None  # since the last AC-LoRA restart (device tensor: no host sync per step)
    loss_count: int = 0
    mode: str = "eager"  # how steps run: eager, cuda_graph or compile
    notice: str = ""  # why a requested mode fell back to eager (reported once the run has started)
    graphed: step_graph.GraphedStep | None = None  # the captured step (mode cuda_graph)
    compiled: speed.CompileState | None = None  # torch.compile state (mode compile), checked on the first step
    ranks_seen: list[int] | None = None  # LoRA²: the per-layer ranks last logged (RankChange reports moves)
    rank_logs: list = dataclasses.field(default_factory=list)  # (step, tau, RankProbe being copied, event)


def _setup(cfg: TrainConfig, pipeline=None) -> _Session:
    from diffusers import DDPMScheduler

    acc = _accelerator(AUTOCAST[cfg.mixed_precision])
    dtype = PRECISIONS[cfg.mixed_precision]
    pipe = pipeline.to(acc.device) if pipeline is not None else models.load_pipeline(cfg.base_model, acc.device, dtype)
    multiple = models.size_multiple(pipe)
    resolution = cfg.resolution or models.native_resolution(pipe)
    if resolution % multiple:
        raise ValueError(f"resolution must be a multiple of {multiple} for this model, got {resolution!r}")
    report = data_mod.scan_dataset(cfg.dataset, cfg.trigger, min_side=max(8, resolution // 4))
    examples = data_mod.require_usable(report)
    data = data_mod.build_cache(pipe, examples, resolution, multiple, buckets=cfg.buckets, flip=cfg.flip,
                                device=acc.device)
    micro = data.batches_per_epoch(cfg.batch_size, cfg.repeats)
    spe = micro // (cfg.grad_accum * acc.num_processes)
    if spe < 1:
        raise ValueError(f"the dataset gives {micro} batch(es) per epoch, fewer than grad_accum ({cfg.grad_accum}) x "
                         f"processes ({acc.num_processes}): lower them or add images/repeats")
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    torch.manual_seed(cfg.seed)  # same on every process: restarts and LoRA² growth draw from it
    adapters = inject(pipe.unet, cfg.adapter_config())
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    elif _checkpointing(pipe.unet):  # a caller's pipeline may come with it on
        pipe.unet.disable_gradient_checkpointing()
    pipe.unet.train()
    mode, notice = _step_mode(cfg, acc)
    if acc.device.type == "cuda":  # asked once here, outside any compile or capture (see fused.out_dtype_ok)
        for low in (torch.bfloat16, torch.float16):
            out_dtype_ok(acc.device, low)
    compiled = speed.compile_blocks(pipe.unet) if mode == "compile" else None
    if compiled is not None and not compiled.enabled:
        mode, notice = "eager", compiled.reason
    groups = adapters.param_groups(cfg.lr, cfg.weight_decay)
    # fused AdamW: one kernel for all tensors; capturable: state a CUDA graph can step (fp16 keeps the plain one,
    # which accelerate's loss scaler has always driven)
    fused = acc.device.type == "cuda" and cfg.mixed_precision != "fp16"
    # SlotAdamW: LoRA²'s idle slots (beyond each layer's rank) are skipped, same update (engine/optim.py)
    optimizer = SlotAdamW(groups, slots=adapters.optimizer_slots(), lr=cfg.lr, fused=True, capturable=True) if fused \
        else torch.optim.AdamW(groups, lr=cfg.lr)
    unet, optimizer = acc.prepare(pipe.unet, optimizer)
    gen = torch.Generator(acc.device).manual_seed(cfg.seed * 1009 + acc.process_index)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    return _Session(acc, pipe, unet, adapters, optimizer, noise, data, [g["lr"] for g in groups], gen, spe, total,
                    math.ceil(total / spe), resolution, mode=mode, notice=notice, compiled=compiled)


def _step_mode(cfg: TrainConfig, acc) -> tuple[str, str]:
    """The step mode this run uses and, when it differs from the one asked for, why."""
    if cfg.step_mode in ("eager", "compile"):
        return cfg.step_mode, ""
    why = step_graph.graphs_unsupported(acc.device, acc.num_processes, cfg.mixed_precision)
    if not why:
        return "cuda_graph", ""
    return "eager", ("" if cfg.step_mode == "auto" else why)


def _start_graphs(s: _Session, cfg: TrainConfig) -> None:
    """Wrap the step's two halves in a GraphedStep (after a resume has loaded the optimizer state)."""
    step_graph.tensor_lrs(s.optimizer, s.acc.device)
    scale = 1.0 / cfg.grad_accum  # one process: every step has grad_accum micro-batches
    s.graphed = step_graph.GraphedStep(lambda inputs: _forward_backward(s, inputs, scale),
                                       lambda: _update(s, cfg), s.adapters.parameters())


def _accelerator(mixed_precision: str):
    """An Accelerator; in a single process a new precision replaces the old one (the studio trains run after run)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=False)  # accelerate's own way to re-create its state
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _reset_step_state(adapters) -> None:
    """Drop per-forward records (LoRA²'s attention entropies) left by sampling or checkpoint recomputation."""
    adapters.reset_step()


def _micro_inputs(s: _Session, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's inputs and the loss target of one micro-batch: noise and timesteps drawn, latents noised."""
    latents = batch["latents"].float()
    noise = torch.randn(latents.shape, generator=s.gen, device=latents.device)
    t = torch.randint(0, s.noise.config.num_train_timesteps, (latents.shape[0],), generator=s.gen,
                      device=latents.device)
    noisy = s.noise.add_noise(latents, noise, t)
    kind = s.noise.config.prediction_type
    target = {"epsilon": noise, "sample": latents}.get(kind)
    if kind == "v_prediction":
        target = s.noise.get_velocity(latents, noise, t)
    if target is None:
        raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler")
    dtype = s.pipe.unet.dtype
    inputs = {"noisy": noisy.to(dtype), "t": t, "text": batch["text"].to(dtype), "target": target}
    if "text_embeds" in batch:
        inputs.update(text_embeds=batch["text_embeds"].to(dtype), time_ids=batch["time_ids"])
    return inputs


def _forward_backward(s: _Session, inputs: dict[str, torch.Tensor], scale: float) -> tuple[torch.Tensor, dict]:
    """DDPM loss (MSE between the UNet output and the target) plus the method's terms; backward of scale x it."""
    extra = {}
    if "text_embeds" in inputs:
        extra["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    with s.acc.autocast():
        pred = s.unet(inputs["noisy"], inputs["t"], encoder_hidden_states=inputs["text"], **extra).sample
        loss = F.mse_loss(pred.float(), inputs["target"].float())
        more, parts = s.adapters.extra_loss()
        s.acc.backward((loss if more is None else loss + more) * scale)
    return loss.detach(), {k: v.detach().float() for k, v in parts.items()}


def _update(s: _Session, cfg: TrainConfig) -> None:
    """Clip, AdamW step, zero the gradients (kept allocated under CUDA graphs), refresh the factors' copies."""
    if cfg.max_grad_norm > 0:
        inner = getattr(s.optimizer, "optimizer", s.optimizer)  # accelerate wraps it
        if (isinstance(inner, SlotAdamW) and inner.slots and s.acc.num_processes == 1
                and getattr(s.acc, "sync_gradients", True)):  # a step follows: the pending multiply is used
            inner.clip_grad_norm_(cfg.max_grad_norm)  # the same clip, LoRA²'s factors multiplied inside the kernel
        else:
            s.acc.clip_grad_norm_(s.adapters.parameters(), cfg.max_grad_norm)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=s.graphed is None)
    s.adapters.refresh_shadows()  # bf16 copies of A and B for the next forward, one foreach copy for all layers


def _optimizer_step(s: _Session, cfg: TrainConfig, micro: list[list[tuple[int, bool]]],
                    log: _Log) -> tuple[torch.Tensor, dict]:
    """Forward/backward over this process's micro-batches (gradients synced on the last), then the update."""
    from contextlib import nullcontext

    acc, total, terms = s.acc, torch.zeros((), device=s.acc.device), {}
    for i, batch in enumerate(micro):
        _reset_step_state(s.adapters)
        inputs = _micro_inputs(s, s.data.collate(batch, acc.device))
        with nullcontext() if i == len(micro) - 1 else acc.no_sync(s.unet):
            loss, parts = _micro(s, inputs, 1.0 / len(micro), log)
        total = total + loss / len(micro)
        for k, v in parts.items():
            terms[k] = terms.get(k, 0) + v / len(micro)
    if s.graphed is not None:
        try:
            s.graphed.update()
        except step_graph.CaptureError as e:
            _graph_fallback(s, log, e)
            _update(s, cfg)
    else:
        _update(s, cfg)
    if acc.num_processes > 1:
        total = acc.reduce(total, reduction="mean")
    return total, terms


def _micro(s: _Session, inputs: dict[str, torch.Tensor], scale: float, log: _Log) -> tuple[torch.Tensor, dict]:
    """One micro-batch in the session's mode; a failed capture or compile falls back to eager, nothing lost."""
    if s.graphed is not None:
        try:
            return s.graphed.micro(inputs)
        except step_graph.CaptureError as e:  # capture records without running: the batch has not been used
            _graph_fallback(s, log, e)
            _reset_step_state(s.adapters)
    elif s.compiled is not None and s.compiled.enabled and not s.compiled.checked:
        def first() -> tuple[torch.Tensor, dict]:
            _reset_step_state(s.adapters)
            s.optimizer.zero_grad(set_to_none=True)  # the first micro-batch of the run: nothing to keep
            return _forward_backward(s, inputs, scale)
        out, s.compiled = speed.first_step_with_fallback(first, s.acc.unwrap_model(s.unet), s.compiled)
        s.compiled.checked = True
        if not s.compiled.enabled:
            s.mode = "eager"
            log(ev.Notice(s.step, f"torch.compile could not run, training continues eagerly ({s.compiled.reason})"))
        return out
    return _forward_backward(s, inputs, scale)


def _graph_fallback(s: _Session, log: _Log, error: Exception) -> None:
    s.graphed, s.mode = None, "eager"
    log(ev.Notice(s.step, f"CUDA graph capture failed, training continues eagerly ({error})"))


class _Log:
    """Sends events to the callback and appends them to the run folder (main process only)."""

    FILES: ClassVar[dict] = {ev.Step: runs.METRICS, ev.Ranks: runs.RANKS, ev.Restart: runs.RANKS,
                             ev.RankChange: runs.RANKS}

    def __init__(self, run: runs.RunFolder, emit: Emit | None, main: bool):
        self.run, self.emit, self.main = run, emit, main

    def __call__(self, event: ev.Event) -> None:
        if not self.main:
            return
        runs.append_jsonl(self.run / self.FILES.get(type(event), runs.EVENTS), ev.to_dict(event))
        if self.emit is not None:
            self.emit(event)


def train(config: TrainConfig, emit: Emit | None = None, stop: threading.Event | None = None, *,
          resume: bool = False, pipeline=None) -> RunResult:
    """Train one adapter and write its run folder; `stop` is honoured between steps; `resume` continues the folder.

    Events (engine.events) go to `emit` and to the folder. Errors are emitted as Failed, then raised.
    `pipeline`: an already loaded pipeline to train on instead of loading config.base_model (the studio keeps one);
    its UNet gets its original modules back when training ends.
    """
    from accelerate import PartialState

    stop = stop or threading.Event()
    started = time.time()
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    root = os.environ.get("RANKSTUDIO_RUNS", "runs")
    run = runs.RunFolder(config.output_dir or runs.new_run_dir(root, config.method))
    if main and not resume and (run / runs.CONFIG).exists():
        raise ValueError(f"{str(run.path)!r} already holds a run; resume it or choose another output_dir")
    config = dataclasses.replace(config, output_dir=str(run.path))
    if main:
        run.create()
        if not resume:
            runs.atomic_write_json(run / runs.CONFIG, config.to_dict())
    log = _Log(run, emit, main=main)
    s = None
    try:
        s = _setup(config, pipeline)
        # in one process outside compile, the factors' gradients go into .grad from the backward's own GEMMs (DDP's
        # hooks need autograd to deliver them; compile traces the op) and q/k/v take x [W; A]^T in one GEMM
        # (AdapterLayer.stack_down): set here so that the finally below always resets both
        lean = s.mode != "compile" and s.acc.num_processes == 1
        s.adapters.set_grads_in_place(lean)
        s.adapters.set_stacked_down(lean)
        if resume:
            _restore(s, run)
        if s.mode == "cuda_graph":
            _start_graphs(s, config)
        log(ev.Started(str(run.path), s.step, s.total_steps, s.steps_per_epoch, config.method, resume, s.mode))
        if s.notice:
            log(ev.Notice(s.step, s.notice))
        triton_ops.take_notices()  # those queued so far are among the active ones, told here once
        for text in triton_ops.active_fallbacks():  # kernels on their torch form in this process, earlier runs' too
            log(ev.Notice(s.step, text))
        state = _loop(s, config, run, log, stop)
        files = _finish(s, config, run, log, started) if state == "finished" else {}
        return RunResult(str(run.path), state, s.step, s.total_steps, files, time.time() - started)
    except BaseException as e:
        step = s.step if s is not None else 0
        if log.main:
            run.write_status("failed", step, s.total_steps if s else 0, error=str(e))
            log(ev.Failed(step, str(e) or type(e).__name__, type(e).__name__))
        raise
    finally:
        if s is not None:
            s.graphed = None  # its graphs hold the step's activation memory
            s.adapters.set_grads_in_place(False)
            s.adapters.set_stacked_down(False)
        if pipeline is not None and s is not None:
            _release(s)


def _release(s: _Session) -> None:
    """Give a caller's pipeline back as it came: adapters removed, no checkpointing, eval mode, no grads."""
    s.adapters.remove()
    unet = s.acc.unwrap_model(s.unet, keep_fp32_wrapper=False)
    speed.uncompile(unet)  # drops accelerate's autocast forward wrapper
    if _checkpointing(unet):
        unet.disable_gradient_checkpointing()
    unet.eval().requires_grad_(False)


def _checkpointing(unet) -> bool:
    """diffusers keeps the flag on the blocks (ModelMixin.is_gradient_checkpointing), not on the model itself."""
    return bool(getattr(unet, "is_gradient_checkpointing", False) or getattr(unet, "gradient_checkpointing", False))


def resume_run(run_dir: str | os.PathLike, emit: Emit | None = None, stop: threading.Event | None = None) -> RunResult:
    """Continue a stopped or killed run from its last checkpoint, with the config stored in the folder."""
    config = TrainConfig.from_dict(runs.RunFolder(run_dir).config())
    return train(dataclasses.replace(config, output_dir=str(run_dir)), emit, stop, resume=True)


def _loop(s: _Session, cfg: TrainConfig, run: runs.RunFolder, log: _Log, stop: threading.Event) -> str:
    """The training loop: one optimizer step per iteration, hooks at their times, logging, samples, checkpoints."""
    pending: list[tuple] = []  # (step, epoch, lr, term names, values being copied to the host, event, ranks?)
    batches, batches_epoch = [], -1
    per_step = cfg.grad_accum * s.acc.num_processes
    lag = 1 if s.acc.device.type == "cuda" else 0  # read losses one step late: the host never waits for the GPU
    if s.loss_sum is None:
        s.loss_sum = torch.zeros((), device=s.acc.device)
    if s.adapters.ranks_move:
        s.ranks_seen = list(s.adapters.native_ranks().values())
    while s.step < s.total_steps:
        if stop.is_set():
            _flush(s, pending, log)
            path = _checkpoint(s, cfg, run, log)
            log(ev.Stopped(s.step, str(path)))
            run.write_status("stopped", s.step, s.total_steps)
            return "stopped"
        epoch, pos = divmod(s.step, s.steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = s.data.epoch_batches(epoch, cfg.batch_size, cfg.seed, cfg.repeats), epoch
        chunk = batches[pos * per_step:(pos + 1) * per_step]
        micro = chunk[s.acc.process_index::s.acc.num_processes]
        s.adapters.before_step(s.step, s.optimizer, sync=False)  # LoRA²'s ranks, read back when the step is logged
        factor = _lr_factor(cfg, s.step, s.total_steps)
        for group, base in zip(s.optimizer.param_groups, s.base_lrs):
            step_graph.set_lr(group, base * factor)
        loss, terms = _optimizer_step(s, cfg, micro, log)
        s.step += 1
        for text in triton_ops.take_notices():  # a kernel fell back to its torch form: slower, say why
            log(ev.Notice(s.step, text))
        s.loss_sum, s.loss_count = s.loss_sum + loss, s.loss_count + 1
        ranks = s.adapters.device_ranks()
        pending.append((s.step, epoch, cfg.lr * factor, list(terms), *_to_host(loss, terms, ranks), ranks is not None))
        if s.step % cfg.log_every == 0:  # on a GPU all but this step, whose loss is still being computed
            if _flush(s, pending, log, keep=lag) and log.main:
                run.write_status("running", s.step - len(pending), s.total_steps)
        epoch_end = pos + 1 == s.steps_per_epoch
        if s.adapters.restart_due(epoch, s.total_epochs, s.step - 1, s.total_steps, epoch_end):
            mean = float(s.loss_sum / max(s.loss_count, 1))
            info = s.adapters.restart(mean, epoch, s.total_epochs, s.optimizer)
            s.adapters.refresh_shadows()
            s.loss_sum, s.loss_count = torch.zeros_like(s.loss_sum), 0
            log(ev.Restart(s.step, epoch, float(info["p"]), mean, dict(info["ranks"])))
        if cfg.rank_every and s.step % cfg.rank_every == 0 and s.step < s.total_steps and log.main:
            # started here, read back like the losses: emitted once the GPU is past this step (at once on a CPU)
            s.rank_logs.append((s.step, cfg.tau, *_probe_to_host(s.adapters.rank_probe())))
            _emit_ranks(s, log, s.step - lag)
        if cfg.sample_every and cfg.sample_prompts and s.step % cfg.sample_every == 0 and s.step < s.total_steps:
            _flush(s, pending, log)
            _samples(s, cfg, run, log)
        if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0 and s.step < s.total_steps:
            _flush(s, pending, log)
            _checkpoint(s, cfg, run, log)
    _flush(s, pending, log)
    return "finished"


def _probe_to_host(probe) -> tuple[Any, Any]:
    """A rank probe with its tensors being copied to pinned host memory, and the event that ends the copy."""
    tensors = probe.tensors()
    if not any(t.is_cuda for t in tensors):
        return probe, None
    host = []
    for t in tensors:
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        host.append(h)
    event = torch.cuda.Event()
    event.record()
    return probe.with_tensors(host), event


def _to_host(loss: torch.Tensor, terms: dict, ranks: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    """One step's loss, terms and ranks packed in one tensor whose copy to the host starts now. On a GPU: into
    pinned memory with an event, so that reading it later waits for this step only, not for the steps queued
    after it (a plain .tolist() would wait for the whole stream)."""
    parts = [loss.detach().float().reshape(1)] + [v.detach().float().reshape(1) for v in terms.values()]
    if ranks is not None:
        parts.append(ranks.float())
    flat = torch.cat(parts)
    if not flat.is_cuda:
        return flat, None
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _flush(s: _Session, pending: list, log: _Log, keep: int = 0) -> int:
    """Emit the pending steps but the newest `keep`: a RankChange where LoRA²'s ranks moved, and a Step event.

    Keeping the step just launched lets the GPU run it while the host reads the previous ones. Returns how many."""
    done = pending[:len(pending) - keep] if keep else list(pending)
    for step, epoch, lr, names, values, event, has_ranks in done:
        if event is not None:
            event.synchronize()
        row = values.tolist()
        if has_ranks:
            now = [int(r) for r in row[1 + len(names):]]
            moved = {n: r for n, r, o in zip(s.adapters.layers, now, s.ranks_seen, strict=True) if r != o}
            if moved:
                log(ev.RankChange(step, moved))
            s.ranks_seen = now
        log(ev.Step(step, row[0], lr, epoch, dict(zip(names, row[1:1 + len(names)]))))
        _emit_ranks(s, log, step)
    del pending[:len(done)]
    if not keep:
        _emit_ranks(s, log, s.step)
    return len(done)


def _emit_ranks(s: _Session, log: _Log, upto: int) -> None:
    """Finish the rank logs started at or before step `upto` (their copies are done by now: the GPU has finished
    that step) and emit them: eigenvalues of r x r matrices on the host, while the GPU runs the next step."""
    while s.rank_logs and s.rank_logs[0][0] <= upto:
        step, tau, probe, event = s.rank_logs.pop(0)
        if event is not None:
            event.synchronize()
        effective, native = probe.finish(tau)
        log(ev.Ranks(step, effective, native, tau))


def _log_ranks(s: _Session, cfg: TrainConfig, log: _Log) -> None:
    """A rank log now (the end of a run); during training they are started in the loop and emitted by _flush."""
    if log.main:
        probe, event = _probe_to_host(s.adapters.rank_probe())
        if event is not None:
            event.synchronize()
        effective, native = probe.finish(cfg.tau)
        log(ev.Ranks(s.step, effective, native, cfg.tau))


def _samples(s: _Session, cfg: TrainConfig, run: runs.RunFolder, log: _Log) -> None:
    from engine.generate import sample_images

    if log.main:
        with s.acc.autocast():
            images = sample_images(s.pipe, cfg.sample_prompts, cfg.seed, cfg.sample_steps, s.resolution)
        _reset_step_state(s.adapters)
        paths = []
        for i, image in enumerate(images):
            path = run.samples / f"step-{s.step:07d}-{i}.png"
            tmp = path.with_name(f".{path.name}.tmp.png")
            image.save(tmp)
            os.replace(tmp, path)
            paths.append(str(path))
        log(ev.Sample(s.step, paths, list(cfg.sample_prompts)))
    s.acc.wait_for_everyone()


def _rng_state(s: _Session) -> dict[str, torch.Tensor]:
    state = {"noise": s.gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(s.acc.device)
    return state


def _optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with plain-number learning rates (they are device tensors under CUDA graphs)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if torch.is_tensor(group.get("lr")):
            group["lr"] = float(group["lr"])
    return state


def _checkpoint(s: _Session, cfg: TrainConfig, run: runs.RunFolder, log: _Log) -> Path:
    """Adapter tensors, optimizer moments, RNG states, step and loss-since-restart: all a resume needs."""
    path = run.checkpoints / f"step-{s.step:07d}"
    if log.main:
        state = {"step": s.step, "loss_sum": float(s.loss_sum), "loss_count": s.loss_count,
                 "extra_state": s.adapters.extra_state(), "total_steps": s.total_steps}
        path = runs.write_checkpoint(run, s.step, s.adapters.state_dict(), _optimizer_state(s.optimizer),
                                     _rng_state(s), state, keep=cfg.keep_checkpoints)
        log(ev.Checkpoint(s.step, str(path)))
    s.acc.wait_for_everyone()
    return path


def _restore(s: _Session, run: runs.RunFolder) -> None:
    """Load the latest checkpoint (if any) and drop log rows past it, which the resumed run will write again."""
    latest = run.latest_checkpoint()
    step = 0
    if latest is not None:
        adapter, optimizer, rng, state = runs.read_checkpoint(latest[1])
        s.adapters.load_state_dict(adapter)
        s.adapters.load_extra_state(state.get("extra_state", {}))
        flags = [{k: g[k] for k in ("fused", "capturable", "foreach") if k in g} for g in s.optimizer.param_groups]
        s.optimizer.load_state_dict(optimizer)
        for group, keep in zip(s.optimizer.param_groups, flags):  # this machine's kernels, not the saver's
            group.update(keep)
            for p in group["params"] if keep.get("fused") or keep.get("capturable") else []:
                st = s.optimizer.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(p.device, torch.float32)
        s.gen.set_state(rng["noise"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], s.acc.device)
        step = s.step = int(state["step"])
        s.loss_sum = torch.tensor(state["loss_sum"], device=s.acc.device)
        s.loss_count = int(state["loss_count"])
    if s.acc.is_main_process:
        for name in (runs.METRICS, runs.RANKS, runs.EVENTS):
            runs.truncate_jsonl(run / name, step)
        for old in run.sample_paths():
            if int(old.name.split("-")[1]) > step:
                old.unlink()


def _finish(s: _Session, cfg: TrainConfig, run: runs.RunFolder, log: _Log, started: float) -> dict[str, str]:
    """Final ranks, samples, adapter state and both LoRA formats; status finished."""
    from engine.export import export_lora

    files: dict[str, str] = {}
    if log.main:
        _log_ranks(s, cfg, log)
        if cfg.sample_prompts:
            _samples(s, cfg, run, log)
        runs.atomic_save_tensors(run / runs.ADAPTER_STATE, s.adapters.state_dict())
        runs.atomic_write_json(run / runs.ADAPTER_EXTRA, {"method": cfg.method, "step": s.step,
                                                          "extra_state": s.adapters.extra_state(),
                                                          "native_ranks": s.adapters.native_ranks()})
        files["state"] = str(run / runs.ADAPTER_STATE)
        meta = {"steps": s.step, "base_model": cfg.base_model, "seed": cfg.seed, "trigger": cfg.trigger}
        for fmt in runs.LORA_FILES:
            res = export_lora(s.adapters, run.lora_file(fmt), fmt, unet_config=s.pipe.unet.config, metadata=meta)
            files[fmt] = res.path
        wall = time.time() - started
        run.write_status("finished", s.step, s.total_steps, files=files, wall_s=wall)
        log(ev.Finished(s.step, files, wall))
    else:
        _samples(s, cfg, run, log) if cfg.sample_prompts else None
    s.acc.wait_for_everyone()
    return files


def load_run_adapters(run_dir: str | os.PathLike, unet) -> Any:
    """Inject a run's method into `unet` and load its final adapter (or its latest checkpoint): an AdapterSet."""
    run = runs.RunFolder(run_dir)
    cfg = TrainConfig.from_dict(run.config())
    from safetensors.torch import load_file

    if (run / runs.ADAPTER_STATE).is_file():
        tensors = load_file(str(run / runs.ADAPTER_STATE))
        extra = json.loads((run / runs.ADAPTER_EXTRA).read_text()).get("extra_state", {})
    elif (latest := run.latest_checkpoint()) is not None:
        tensors, _, _, state = runs.read_checkpoint(latest[1])
        extra = state.get("extra_state", {})
    else:
        raise ValueError(f"run {str(run.path)!r} has no adapter yet (no final file and no checkpoint)")
    adapters = inject(unet, cfg.adapter_config())
    adapters.load_state_dict(tensors)
    adapters.load_extra_state(extra)
    return adapters
