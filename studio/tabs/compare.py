"""Compare tab: the base model and each chosen adapter in columns, same prompts and seeds in rows, with metrics."""
from __future__ import annotations

import gradio as gr

from studio.tabs.common import follow, guard, keep

HEADERS = ["column", "method", "file MB", "parameters", "rank min / mean / max", "prompt fidelity",
           "style fidelity"]


def build(engine, demo: gr.Blocks) -> dict:
    with gr.Row():
        adapters = gr.CheckboxGroup(engine.adapter_choices(), label="Adapters (runs and files)", scale=4,
                                    elem_id="cmp-adapters")
        with gr.Column(scale=1, min_width=200):
            refresh = gr.Button("↻ Refresh list")
            upload = gr.File(label="Add a LoRA file (.safetensors)", file_types=[".safetensors"])
    with gr.Row():
        prompts = gr.Textbox(label="Prompts (one per line; empty = the first run's sample prompt)", lines=3, scale=3,
                             elem_id="cmp-prompts")
        with gr.Column(scale=2):
            seeds = gr.Textbox(value="0, 1", label="Seeds", elem_id="cmp-seeds")
            strength = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Adapter strength")
            steps = gr.Slider(1, 60, value=20, step=1, label="Denoising steps")
            base = gr.Textbox(label="Base model (empty = the one the first adapter was trained on)")
    go = gr.Button("Render comparison grid", variant="primary", elem_id="cmp-go")
    status = gr.Markdown(elem_id="cmp-status")
    gr.Markdown("**Grid** · columns: base model, then each adapter · rows: prompt x seed (same seeds everywhere)")
    grid = gr.Image(type="filepath", elem_id="cmp-grid", interactive=False, show_label=False)
    table = gr.Dataframe(headers=HEADERS, type="array", interactive=False, label="Metrics (oracle scores on the "
                         "bundled mini-world only)", elem_id="cmp-table")

    refresh.click(lambda: gr.update(choices=engine.adapter_choices()), None, adapters)

    @guard
    def add(file, chosen):
        path = engine.add_adapter_file(file if isinstance(file, str) else file.name)
        return gr.update(choices=engine.adapter_choices(), value=[*(chosen or []), path])

    upload.upload(add, [upload, adapters], adapters)

    @guard
    def run(chosen, text, seed_text, power, n_steps, base_model):
        text = text.strip() or engine.default_prompt(chosen[0] if chosen else None)
        job = engine.compare(chosen or [], text, seed_text, power, int(n_steps), base_model)
        for line in follow(engine, job):
            yield line, gr.skip(), gr.skip()
        path, rows = job.result
        yield f"done in {job.ended - job.started:.1f} s", path, rows

    go.click(run, [adapters, prompts, seeds, strength, steps, base], [status, grid, table], concurrency_limit=None)
    return {"refresh": (lambda current: keep(engine.adapter_choices(), current), [adapters])}
