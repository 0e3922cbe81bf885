"""Train tab: the form (method settings built from the config dataclasses), Start/Stop/Resume, live run plots."""
from __future__ import annotations

import gradio as gr

from studio import plots, runview
from studio.tabs.common import field_input, guard, keep

MAIN_FIELDS = ("rank", "steps", "lr", "batch_size", "resolution", "seed", "trigger")
MORE_FIELDS = ("sample_every", "sample_prompts", "sample_steps", "rank_every", "tau", "repeats", "lr_schedule",
               "warmup_steps", "checkpoint_every", "mixed_precision", "flip")
STUDIO_DEFAULTS = {"steps": 200, "sample_every": 50, "rank_every": 10}  # quick first run on the bundled mini model


def _method_forms(engine, first: str) -> tuple[dict, list, list]:
    """One group of inputs per method, built from its config dataclass; only the chosen one is visible."""
    groups, inputs, index = {}, [], []
    for display, name in engine.method_choices():
        with gr.Group(visible=name == first) as group:
            gr.Markdown(f"**{display} settings** · {engine.method_summary(name)}")
            for field, info in engine.method_fields(name).items():
                inputs.append(field_input(field, info, elem_id=f"m-{name}-{field}"))
                index.append((name, field))
        groups[name] = group
    return groups, inputs, index


def build(engine, demo: gr.Blocks) -> dict:
    run_dir = gr.State(None)  # the run this session watches
    seen = gr.State(())  # signature of the run files last drawn
    fields = engine.train_fields()
    defaults = {**STUDIO_DEFAULTS, **({"mixed_precision": _gpu_precision()} if engine.device == "cuda" else {})}
    choices = engine.dataset_choices()
    first = next((v for _, v in choices if "style_" in v), choices[0][1] if choices else None)
    with gr.Row():
        with gr.Column(scale=2, min_width=340):
            dataset = gr.Dropdown(choices, value=first, label="Dataset", elem_id="tr-dataset")
            base = gr.Dropdown(engine.base_model_choices(), value="bundled", allow_custom_value=True,
                               label="Base model", info="bundled, a hub id, a diffusers folder or a .safetensors "
                               "file", elem_id="tr-base")
            methods = engine.method_choices()
            method = gr.Dropdown(methods, value=methods[0][1], label="Method", elem_id="tr-method")
            groups, method_inputs, index = _method_forms(engine, methods[0][1])
            main = [field_input(n, fields[n], value=defaults.get(n), elem_id=f"tr-{n}") for n in MAIN_FIELDS]
            with gr.Accordion("More settings", open=False):
                more = [field_input(n, fields[n], value=defaults.get(n), elem_id=f"tr-{n}")
                        for n in MORE_FIELDS]
            with gr.Row():
                start = gr.Button("Start (queue)", variant="primary", elem_id="tr-start")
                stop = gr.Button("Stop", variant="stop", elem_id="tr-stop")
                resume = gr.Button("Resume", elem_id="tr-resume")
        with gr.Column(scale=3):
            with gr.Row():
                runs = gr.Dropdown(engine.run_choices(), label="Run", scale=4, elem_id="tr-run")
                refresh = gr.Button("↻", scale=0, min_width=40)
            status = gr.Markdown(elem_id="tr-status")
            loss = gr.Plot(plots.loss_figure(None), label="Loss", elem_id="tr-loss")
            heat = gr.Plot(plots.rank_heatmap(None), label="Rank heatmap", elem_id="tr-heatmap")
            layers = gr.Dropdown([], multiselect=True, label="Layers to plot",
                                 info="empty = the first three", elem_id="tr-layers")
            lines = gr.Plot(plots.rank_lines(None, None), label="Layer ranks")
            samples = gr.Gallery(label="Samples", columns=4, height=200, elem_id="tr-samples")
            queue = gr.Dataframe(headers=["#", "job", "state", "position"], type="array", interactive=False,
                                 label="Queue (one heavy job at a time, all users)", elem_id="tr-queue")
    timer = gr.Timer(1.0)

    method.change(lambda m: [gr.update(visible=n == m) for n in groups], method, list(groups.values()))
    form_names = ["dataset", "base_model", "method", *MAIN_FIELDS, *MORE_FIELDS]

    @guard
    def start_run(*values):
        form = dict(zip(form_names, values[:len(form_names)], strict=True))
        chosen = {f: v for (m, f), v in zip(index, values[len(form_names):], strict=True) if m == form["method"]}
        job = engine.start_training(engine.build_train_config(form, chosen))
        gr.Info(f"queued {job.label} (position {engine.jobs.position(job)})")
        return job.run_dir, gr.update(choices=engine.run_choices(), value=job.run_dir), ()

    start.click(start_run, [dataset, base, method, *main, *more, *method_inputs], [run_dir, runs, seen])

    @guard
    def resume_run(path):
        if not path:
            raise ValueError("choose a run to resume")
        gr.Info(f"queued {engine.resume_training(path).label}")
        return path, gr.update(choices=engine.run_choices(), value=path), ()

    resume.click(resume_run, runs, [run_dir, runs, seen])
    stop.click(guard(lambda path: gr.Info(engine.stop_training(path or ""))), run_dir, None)
    runs.input(lambda p: (p, ()), runs, [run_dir, seen])
    refresh.click(lambda: gr.update(choices=engine.run_choices()), None, runs)

    def draw(path, chosen, last):
        """Status and queue every tick; plots only when the run's files changed."""
        if not path:
            return ("No run yet: fill the form and press Start.", *[gr.skip()] * 5, engine.queue_rows(), last)
        view, line = engine.run_view(path)
        sig = runview.signature(path)
        if sig == last:
            return (line, *[gr.skip()] * 5, engine.queue_rows(), last)
        return (line, plots.loss_figure(view), plots.rank_heatmap(view), plots.rank_lines(view, chosen),
                gr.update(choices=[(plots.short_name(n), n) for n in view.layers]), view.samples or None,
                engine.queue_rows(), sig)

    outputs = [status, loss, heat, lines, layers, samples, queue, seen]
    timer.tick(draw, [run_dir, layers, seen], outputs, show_progress="hidden")
    layers.change(lambda p, c: plots.rank_lines(engine.run_view(p)[0] if p else None, c), [run_dir, layers], lines)

    def attach():
        """A fresh page (or a refresh) re-attaches to the running training, else to the newest run."""
        path = engine.active_run()
        return path, gr.update(choices=engine.run_choices(), value=path), ()

    demo.load(attach, None, [run_dir, runs, seen])
    return {"refresh": (lambda current: keep(engine.dataset_choices(), current), [dataset])}


def _gpu_precision() -> str:
    """bf16 where the GPU has it (fast path: CUDA graphs), else fp16."""
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
