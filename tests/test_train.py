"""The trainer on a tiny random pipeline: every method trains, run folders, stop, resume after a kill, rank hooks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import REPO, adapter_tensors, make_image_folder, save_tiny_pipeline

from engine import events as ev
from engine.export import load_lora_file
from engine.runs import RunFolder
from engine.train import TrainConfig, resume_run, train

SMALL = {"lora": {}, "ac_lora": {"restart_every_steps": 2}, "tri_lora": {}, "lora2": {"max_rank": 8}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny-sd"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(make_image_folder(tmp_path_factory.mktemp("data") / "ds", n=4))


def config(model, dataset, out, **kw) -> TrainConfig:
    base = dict(dataset=dataset, base_model=model, rank=4, steps=3, lr=1e-3, rank_every=2, output_dir=str(out))
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", list(SMALL))
def test_each_method_trains_and_fills_the_run_folder(model, dataset, tmp_path, method):
    events = []
    cfg = config(model, dataset, tmp_path / "run", method=method, method_settings=SMALL[method],
                 sample_every=2, sample_prompts=["red circle"], sample_steps=2)
    result = train(cfg, emit=events.append)
    assert result.state == "finished" and result.step == 3
    run = RunFolder(result.run_dir)
    for name in ("config.json", "metrics.jsonl", "ranks.jsonl", "status.json", "adapter.safetensors",
                 "lora_kohya.safetensors", "lora_diffusers.safetensors"):
        assert (run / name).is_file(), name
    assert [m["step"] for m in run.metrics()] == [1, 2, 3]
    assert all(m["loss"] > 0 for m in run.metrics())
    assert len(run.sample_paths()) == 2  # step 2 and the end
    assert run.status()["state"] == "finished"
    assert TrainConfig.from_dict(run.config()).method == method
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "Started" and kinds[-1] == "Finished" and kinds.count("Step") == 3
    ranks = [r for r in run.ranks() if r["type"] == "ranks"]
    assert [r["step"] for r in ranks] == [2, 3] and ranks[-1]["effective"]
    for fmt in ("kohya", "diffusers"):
        lora = load_lora_file(run.lora_file(fmt))
        assert lora.fmt == fmt and len(lora.factors) == len(ranks[-1]["native"])
    assert any(t.abs().sum() > 0 for k, t in adapter_tensors(run.path).items() if "B" in k or "Vt" in k)


def test_sdxl_trains(tmp_path, dataset):
    model = save_tiny_pipeline(tmp_path / "tiny-sdxl", sdxl=True)
    result = train(config(str(model), dataset, tmp_path / "run", steps=2))
    assert result.state == "finished"
    assert load_lora_file(RunFolder(result.run_dir).lora_file("kohya")).factors


def test_stop_is_honoured_within_one_step_and_resume_matches(model, dataset, tmp_path):
    cfg = config(model, dataset, tmp_path / "full", method="lora2", steps=6,
                 method_settings={"max_rank": 8, "rho_lr": 0.05, "lambda_r": 0.0})
    full = train(cfg)
    stop = threading.Event()

    def emit(e):
        if isinstance(e, ev.Step) and e.step == 2:
            stop.set()

    part = train(cfg.__class__(**{**cfg.to_dict(), "output_dir": str(tmp_path / "part")}), emit, stop)
    assert part.state == "stopped" and part.step == 2
    assert RunFolder(part.run_dir).latest_checkpoint()[0] == 2
    assert RunFolder(part.run_dir).status()["state"] == "stopped"
    rest = resume_run(part.run_dir)
    assert rest.state == "finished" and rest.step == 6
    a, b = adapter_tensors(full.run_dir), adapter_tensors(rest.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert [m["step"] for m in RunFolder(rest.run_dir).metrics()] == list(range(1, 7))


def _cli_train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "engine", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_resume_after_kill_matches_uninterrupted(model, dataset, tmp_path):
    settings = {"restart_every_steps": 5}
    steps = 24
    cfg = config(model, dataset, tmp_path / "full", method="ac_lora", steps=steps, method_settings=settings,
                 checkpoint_every=4)
    full = train(cfg)
    killed = tmp_path / "killed"
    args = ["--dataset", dataset, "--base-model", model, "--method", "ac_lora", "--rank", "4", "--steps", str(steps),
            "--lr", "1e-3", "--rank-every", "2", "--checkpoint-every", "4", "--method-settings", json.dumps(settings),
            "--output-dir", str(killed)]
    proc = _cli_train(*args)
    run = RunFolder(killed)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        latest = run.latest_checkpoint()
        if latest and latest[0] >= 8:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter.safetensors").exists()
    done = _cli_train("--resume", str(killed))
    _, err = done.communicate(timeout=240)
    assert done.returncode == 0, err[-3000:]
    a, b = adapter_tensors(full.run_dir), adapter_tensors(killed)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert [m["step"] for m in run.metrics()] == list(range(1, steps + 1))
    restarts = [r["step"] for r in run.ranks() if r["type"] == "restart"]
    assert restarts == [r["step"] for r in RunFolder(full.run_dir).ranks() if r["type"] == "restart"]


def test_ac_lora_restarts_at_scheduled_epochs_and_changes_ranks(model, dataset, tmp_path):
    events = []
    cfg = config(model, dataset, tmp_path / "run", method="ac_lora", rank=8, steps=None, epochs=3, lr=1e-2,
                 rank_every=1, method_settings={"restart_every_epochs": 1})
    result = train(cfg, events.append)
    restarts = [e for e in events if isinstance(e, ev.Restart)]
    started = next(e for e in events if isinstance(e, ev.Started))
    assert started.steps_per_epoch == 4 and result.step == 12
    assert [r.epoch for r in restarts] == [0, 1]  # after epochs 0 and 1, never after the last
    assert [r.step for r in restarts] == [4, 8]
    native = {e.step: e.native for e in events if isinstance(e, ev.Ranks)}
    assert set(native[3].values()) == {8}
    assert native[4] == restarts[0].ranks and native[4] != native[3]
    assert all(1 <= k <= 8 for r in restarts for k in r.ranks.values())
    assert all(0.0 <= r.p <= 0.999 for r in restarts)


def _lora2_drift(model, dataset, out, **settings) -> tuple[float, int]:
    events = []
    cfg = config(model, dataset, out, method="lora2", rank=8, steps=8, lr=1e-2, rank_every=0,
                 method_settings={"max_rank": 16, "lambda_e": 0.0, **settings})
    train(cfg, events.append)
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from engine.adapters.lora2 import nu_for_rank

    rhos = [t for k, t in load_file(str(out / "adapter.safetensors")).items() if k.endswith("rho")]
    nu_t = nu_for_rank(8, 0.9)
    drift = max(abs(float(F.softplus(r)) - nu_t) for r in rhos)
    return drift, sum(1 for e in events if isinstance(e, ev.RankChange))


def test_lora2_ranks_move_with_lr_and_regulariser(model, dataset, tmp_path):
    free, free_changes = _lora2_drift(model, dataset, tmp_path / "free", lambda_r=0.0, rho_lr=0.1)
    held, _ = _lora2_drift(model, dataset, tmp_path / "held", lambda_r=10.0, rho_lr=0.1)
    still, still_changes = _lora2_drift(model, dataset, tmp_path / "still", lambda_r=0.0, rho_lr=0.0)
    assert free_changes > 0 and still_changes == 0 and still == pytest.approx(0.0, abs=1e-6)
    assert free > 2 * held


@pytest.mark.parametrize("bad, message", [
    ({"method": "dora"}, "method"), ({"lr": -1.0}, "lr"), ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"),
    ({"mixed_precision": "fp8"}, "mixed_precision"), ({"method_settings": {"nope": 1}}, "nope"),
    ({"dataset": ""}, "dataset"), ({"resolution": 30}, "resolution"), ({"steps": None, "epochs": None}, "steps"),
    ({"sample_prompts": "a cat"}, "sample_prompts")])
def test_config_rejects_bad_values_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"dataset": "x", **bad})


def test_bad_dataset_is_a_clear_error(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        train(config(model, str(empty), tmp_path / "run"))
    failed = RunFolder(tmp_path / "run")
    assert failed.status()["state"] == "failed" and "broken.png" in failed.status()["error"]
    with pytest.raises(ValueError, match="not found"):
        train(config(model, str(tmp_path / "missing"), tmp_path / "run2"))


def test_existing_run_folder_is_not_overwritten(model, dataset, tmp_path):
    train(config(model, dataset, tmp_path / "run", steps=1))
    with pytest.raises(ValueError, match="already holds a run"):
        train(config(model, dataset, tmp_path / "run", steps=1))


def test_given_pipeline_is_returned_clean(model, dataset, tmp_path):
    from engine.models import load_pipeline

    pipe = load_pipeline(model)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    train(config(model, dataset, tmp_path / "run", steps=2), pipeline=pipe)
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_checkpointing_follows_each_runs_setting_on_a_shared_pipeline(model, dataset, tmp_path):
    """A checkpointed run must not leave checkpointing on for the next run on the same pipeline (it did: the flag
    lives on diffusers' blocks, not on the model, so the release step missed it and later bench rows were wrong)."""
    from engine.models import load_pipeline

    pipe = load_pipeline(model)
    seen = []

    def emit(e):
        if isinstance(e, ev.Step):
            seen.append(pipe.unet.is_gradient_checkpointing)

    train(config(model, dataset, tmp_path / "gc", steps=2, gradient_checkpointing=True), emit, pipeline=pipe)
    assert seen == [True, True] and not pipe.unet.is_gradient_checkpointing
    pipe.unet.enable_gradient_checkpointing()  # a caller's pipeline that comes with it on
    train(config(model, dataset, tmp_path / "plain", steps=2), emit, pipeline=pipe)
    assert seen[2:] == [False, False]


def test_precision_can_change_between_runs_in_one_process(model, dataset, tmp_path):
    assert train(config(model, dataset, tmp_path / "a", steps=1)).state == "finished"
    assert train(config(model, dataset, tmp_path / "b", steps=1, mixed_precision="bf16")).state == "finished"


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpu", REPO / "bench" / "train_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("gc", [False, True])
def test_gpu_real_architectures_train_every_method_in_bf16(arch, gc, tmp_path):
    bench = _bench()
    pipe = bench.build_pipeline(arch, torch.bfloat16).to("cuda")
    for method in SMALL:
        row = bench.run_case(pipe, arch, method, gc, 3, 16, tmp_path, "bf16")
        assert row["steps"] == 3 and all(np.isfinite(row["losses"])), row


# --- step modes ---------------------------------------------------------------------------------------------
def _losses(run_dir) -> list[float]:
    return [m["loss"] for m in RunFolder(run_dir).metrics()]


def test_step_modes_on_cpu_run_eagerly_and_say_why(model, dataset, tmp_path):
    events = []
    train(config(model, dataset, tmp_path / "auto", steps=2), emit=events.append)
    started = [e for e in events if isinstance(e, ev.Started)][0]
    assert started.step_mode == "eager" and not [e for e in events if isinstance(e, ev.Notice)]  # auto: quiet
    events.clear()
    result = train(config(model, dataset, tmp_path / "graph", steps=2, step_mode="cuda_graph"), emit=events.append)
    notices = [e.message for e in events if isinstance(e, ev.Notice)]
    assert result.state == "finished" and len(notices) == 1 and "CUDA graphs need a CUDA GPU" in notices[0]
    assert _losses(tmp_path / "graph") == _losses(tmp_path / "auto")
    with pytest.raises(ValueError, match="step_mode must be one of .* got 'warp'"):
        config(model, dataset, tmp_path / "x", step_mode="warp")


def test_lora2_rank_changes_are_logged_at_their_steps_without_host_reads(model, dataset, tmp_path):
    cfg = config(model, dataset, tmp_path / "run", method="lora2", steps=8, rank_every=0,
                 method_settings={"max_rank": 12, "rho_lr": 0.2, "lambda_e": 0.0})
    events = []
    train(cfg, emit=events.append)
    changes = [e for e in events if isinstance(e, ev.RankChange)]
    assert changes and all(1 <= c.step <= 8 for c in changes)
    ranks = {n: cfg.rank for n in changes[0].ranks}  # every layer starts at the target rank
    ranks.update({n: cfg.rank for c in changes for n in c.ranks if n not in ranks})
    for c in changes:
        ranks.update(c.ranks)
    final = [r for r in RunFolder(tmp_path / "run").ranks() if r["type"] == "ranks"][-1]["native"]
    assert all(final[n] == r for n, r in ranks.items())
    order = [(type(e).__name__, e.step) for e in events if isinstance(e, (ev.RankChange, ev.Step))]
    assert order.index(("RankChange", changes[0].step)) < order.index(("Step", changes[0].step))


def test_compile_failure_falls_back_to_eager_with_the_same_losses(model, dataset, tmp_path, monkeypatch):
    from engine import speed

    def broken_compile(unet, mode=None):  # compiled blocks whose first call fails, as a failing inductor would
        def explode(*args, **kwargs):
            raise RuntimeError("inductor exploded")
        for block in speed.unet_blocks(unet):
            block._compiled_call_impl = explode
        return speed.CompileState(True)

    monkeypatch.setattr(speed, "compile_blocks", broken_compile)
    events = []
    result = train(config(model, dataset, tmp_path / "compiled", steps=3, step_mode="compile",
                          method="lora2", method_settings=SMALL["lora2"]), emit=events.append)
    notices = [e.message for e in events if isinstance(e, ev.Notice)]
    assert result.state == "finished" and len(notices) == 1 and "inductor exploded" in notices[0]
    train(config(model, dataset, tmp_path / "eager", steps=3, step_mode="eager", method="lora2",
                 method_settings=SMALL["lora2"]))
    assert _losses(tmp_path / "compiled") == _losses(tmp_path / "eager")


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(SMALL))
def test_gpu_cuda_graph_steps_match_eager_steps(method, tmp_path):
    """20 steps replayed from CUDA graphs give the eager losses and adapter (bf16, two bucket shapes, grad accum,
    a mid-run sample, AC-LoRA restarts, LoRA² rank changes), and a stopped graph run resumes to the same end."""
    from helpers import save_tiny_pipeline

    model = str(save_tiny_pipeline(tmp_path / "tiny-sd"))
    data = str(make_image_folder(tmp_path / "ds", n=6, sizes=[(32, 32), (48, 32)]))
    settings = {**SMALL[method], **({"restart_every_steps": 7} if method == "ac_lora" else {})}
    runs = {}
    for mode in ("eager", "cuda_graph"):
        events = []
        cfg = config(model, data, tmp_path / mode, steps=20, method=method, method_settings=settings,
                     mixed_precision="bf16", grad_accum=2, step_mode=mode, sample_every=10,
                     sample_prompts=["red circle"], sample_steps=2, rank_every=5)
        assert train(cfg, emit=events.append).state == "finished"
        assert [e.step_mode for e in events if isinstance(e, ev.Started)] == [mode]
        assert not [e for e in events if isinstance(e, ev.Notice)]
        runs[mode] = (np.array(_losses(tmp_path / mode)), adapter_tensors(tmp_path / mode))
    (le, ae), (lg, ag) = runs["eager"], runs["cuda_graph"]
    assert len(lg) == 20 and np.allclose(lg, le, rtol=2e-2, atol=1e-4), (le, lg)
    for k in ae:
        a, g = ae[k].float(), ag[k].float()
        assert torch.allclose(g, a, rtol=5e-2, atol=1e-4 + 2e-2 * float(a.abs().max())), k
    if method == "lora2":
        changes = [r for r in RunFolder(tmp_path / "cuda_graph").ranks() if r["type"] == "rankchange"]
        assert changes  # the ranks did move while the steps were replayed
    # stop after 8 steps (a checkpoint), resume in graph mode: the same end as the uninterrupted graph run
    stop = threading.Event()
    cfg = config(model, data, tmp_path / "resumed", steps=20, method=method, method_settings=settings,
                 mixed_precision="bf16", grad_accum=2, step_mode="cuda_graph", rank_every=5)
    train(cfg, emit=lambda e: stop.set() if isinstance(e, ev.Step) and e.step == 8 else None, stop=stop)
    assert resume_run(tmp_path / "resumed").state == "finished"
    assert np.allclose(_losses(tmp_path / "resumed"), lg, rtol=2e-2, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(SMALL))
def test_gpu_steps_never_wait_for_the_gpu(method, tmp_path):
    """Nothing in the loop blocks the host on the GPU, rank logs included: torch's sync debug mode turns any
    synchronizing CUDA call (a .item(), a copy from pageable host memory, ...) into an error for steps 6-14.
    The only waits left are the lagged reads of losses and rank logs (events, a step behind), which it allows."""
    from helpers import save_tiny_pipeline

    model = str(save_tiny_pipeline(tmp_path / "tiny-sd"))
    data = str(make_image_folder(tmp_path / "ds", n=6))
    settings = {**SMALL[method], **({"restart_every_steps": 100} if method == "ac_lora" else {})}
    seen = []

    def watch(e):
        if isinstance(e, ev.Step) and e.step in (6, 14):
            torch.cuda.set_sync_debug_mode("error" if e.step == 6 else "default")
            seen.append(e.step)

    cfg = config(model, data, tmp_path / "run", steps=20, method=method, method_settings=settings,
                 mixed_precision="bf16", step_mode="cuda_graph", rank_every=5)
    events = []
    try:
        assert train(cfg, emit=lambda e: (events.append(e), watch(e))).state == "finished"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert seen == [6, 14]
    assert [e.step for e in events if isinstance(e, ev.Ranks)] == [5, 10, 15, 20]


def test_compile_mode_compiles_once_while_lora2_ranks_move(model, dataset, tmp_path):
    """Step mode compile (bf16: the layers' compute-dtype copies in play): no graph break in our code, and nothing
    compiles again after the first steps although LoRA²'s ranks move (fixed R_max buffers and masks; version
    counters are not read inside compiled code)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    seen = {}

    def watch(e):
        if isinstance(e, ev.Step) and e.step == 3:
            seen["frames"] = dict(counters["frames"])
        if isinstance(e, ev.RankChange):
            seen.setdefault("moves", []).append(e.step)

    cfg = config(model, dataset, tmp_path / "run", method="lora2", steps=10, rank_every=0, step_mode="compile",
                 mixed_precision="bf16", method_settings={"max_rank": 12, "rho_lr": 0.2, "lambda_e": 0.0})
    events = []
    assert train(cfg, emit=lambda e: (events.append(e), watch(e))).state == "finished"
    assert not [e for e in events if isinstance(e, ev.Notice)]
    assert [e.step_mode for e in events if isinstance(e, ev.Started)] == ["compile"]
    assert any(s > 3 for s in seen.get("moves", [])), seen  # ranks moved after the snapshot
    assert seen["frames"].get("ok", 0) > 0 and dict(counters["frames"]) == seen["frames"], (seen, counters["frames"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_gradients_in_place_on_while_training_and_off_after(model, dataset, tmp_path, monkeypatch):
    """The trainer turns the fused op's in-place gradients on for a one-process eager run and off when it ends,
    also when the run fails (a bad step count would fail at setup; here a failing step)."""
    from engine.adapters.base import AdapterSet

    calls = []
    real = AdapterSet.set_grads_in_place
    monkeypatch.setattr(AdapterSet, "set_grads_in_place", lambda self, on: (calls.append(on), real(self, on))[1])
    assert train(config(model, dataset, tmp_path / "ok", method="lora")).state == "finished"
    assert calls == [True, False]
    calls.clear()

    def boom(*a, **k):
        raise RuntimeError("step failed")
    monkeypatch.setattr("engine.train._optimizer_step", boom)
    with pytest.raises(RuntimeError, match="step failed"):
        train(config(model, dataset, tmp_path / "bad", method="lora"))
    assert calls == [True, False]


def test_a_kernel_that_fails_its_check_changes_nothing_but_a_notice(model, dataset, tmp_path, monkeypatch):
    """A fold kernel that computes wrong values on this machine (faked on the CPU: v taken 1.5x) is caught by its
    first-use check: the run's losses and exported adapter equal those of a run without it, and the user is told
    (a Notice event, which the studio and the CLI show, also in the run folder's events), in this run and in the
    process's later ones."""
    from engine.adapters import triton_ops

    cfg = dict(method="tri_lora", steps=3, rank_every=0, seed=1)
    plain = train(config(model, dataset, tmp_path / "plain", **cfg))

    def wrong_fwd(ups, vecs, scale, dtype):
        return (torch.stack(ups) * (vecs * scale * 1.5)[:, None, :]).to(dtype)

    def wrong_bwd(g, ups, vecs, scale, need_up, need_vec, into=None, accumulate=True):
        gup = g.float() * (vecs * scale * 1.5)[:, None, :]
        gvec = (g.float() * torch.stack(ups)).sum(1) * scale * 1.5 if need_vec else None
        if into is not None:
            for x, y in zip(into, gup.unbind(0), strict=True):
                x.add_(y) if accumulate else x.copy_(y)
            gup = None
        return gup, gvec

    monkeypatch.setattr(triton_ops, "fold_ok", lambda ups, vecs: True)
    monkeypatch.setattr(triton_ops, "fold_vectors", wrong_fwd)
    monkeypatch.setattr(triton_ops, "fold_vectors_backward", wrong_bwd)
    events = []
    with pytest.warns(RuntimeWarning, match="against the torch form"):
        faked = train(config(model, dataset, tmp_path / "faked", **cfg), emit=events.append)
    notices = [e for e in events if isinstance(e, ev.Notice)]
    assert notices and all("using the torch form there" in e.message for e in notices)
    assert {"forward", "backward"} <= {w for e in notices for w in ("forward", "backward") if w in e.message}
    assert any(json.loads(line)["type"] == "notice"
               for line in (RunFolder(faked.run_dir) / "events.jsonl").read_text().splitlines())
    losses = [[m["loss"] for m in RunFolder(r.run_dir).metrics()] for r in (plain, faked)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    a, b = adapter_tensors(plain.run_dir), adapter_tensors(faked.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not triton_ops.take_notices()  # the run took them all
    # a later run in the same process (the studio's next one) keeps the torch form there, and is told so too
    later = []
    train(config(model, dataset, tmp_path / "later", **{**cfg, "steps": 1}), emit=later.append)
    assert {e.message for e in later if isinstance(e, ev.Notice)} == {e.message for e in notices}
