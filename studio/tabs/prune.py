"""Prune tab: the tau slider and rank cap with live per-layer ranks, sizes and a preview rendered on release."""
from __future__ import annotations

import gradio as gr

from studio import plots
from studio.tabs.common import follow, guard, keep


def _summary(n) -> str:
    mb = 2**20
    return (f"**parameters** {n.params_before:,} → **{n.params_after:,}** "
            f"({100 * n.params_after / max(n.params_before, 1):.0f} %) · "
            f"**file** {n.bytes_before / mb:.3f} MB → **≈ {n.bytes_after / mb:.3f} MB** · "
            f"**energy kept** {100 * n.kept_energy:.1f} % · "
            f"**ranks** {sum(n.before.values())} → {sum(n.after.values())} over {len(n.layers)} layers")


def build(engine, demo: gr.Blocks) -> dict:
    with gr.Row():
        adapter = gr.Dropdown(engine.adapter_choices(), label="Adapter", scale=4, elem_id="pr-adapter")
        refresh = gr.Button("↻", scale=0, min_width=40)
    with gr.Row():
        tau = gr.Slider(0.5, 1.0, value=0.9, step=0.01, label="tau: energy kept per layer", scale=3,
                        elem_id="pr-tau")
        cap = gr.Number(value=0, precision=0, minimum=0, label="Rank cap (0 = none)", scale=1, elem_id="pr-cap")
    summary = gr.Markdown("Choose an adapter.", elem_id="pr-summary")
    bars = gr.Plot(label="Ranks", elem_id="pr-bars")
    with gr.Row():
        prompt = gr.Textbox(label="Preview prompt (empty = the run's sample prompt)", scale=3, elem_id="pr-prompt")
        seed = gr.Number(value=0, precision=0, label="Seed", scale=1)
        preview_btn = gr.Button("Preview", scale=1, elem_id="pr-preview")
    status = gr.Markdown(elem_id="pr-status")
    with gr.Row():
        before = gr.Image(label="Unpruned", type="pil", interactive=False, elem_id="pr-before", height=256)
        after = gr.Image(label="Pruned", type="pil", interactive=False, elem_id="pr-after", height=256)
    with gr.Row():
        save = gr.Button("Save pruned file", variant="primary", elem_id="pr-save")
        download = gr.DownloadButton("Download pruned file", visible=False, elem_id="pr-download")

    refresh.click(lambda: gr.update(choices=engine.adapter_choices()), None, adapter)

    @guard
    def live(path, t, c):
        if not path:
            return "Choose an adapter.", None
        n = engine.prune_numbers(path, t, c)
        return _summary(n), plots.prune_figure(n.layers, n.before, n.after)

    for event in (adapter.change, tau.change, cap.change):
        event(live, [adapter, tau, cap], [summary, bars], trigger_mode="always_last", show_progress="hidden")
    adapter.change(lambda p: engine.default_prompt(p) if p else "", adapter, prompt)

    @guard
    def preview(path, t, c, text, s):
        if not path:
            raise ValueError("choose an adapter first")
        job = engine.prune_preview(path, t, c, text, int(s or 0))
        for line in follow(engine, job):
            yield line, gr.skip(), gr.skip()
        yield f"preview at tau {t:.2f}" + (f", cap {int(c)}" if c else ""), job.result[0], job.result[1]

    for event in (tau.release, preview_btn.click):
        event(preview, [adapter, tau, cap, prompt, seed], [status, before, after], concurrency_limit=None,
              trigger_mode="always_last")

    @guard
    def save_file(path, t, c):
        if not path:
            raise ValueError("choose an adapter first")
        res = engine.save_pruned(path, t, c)
        gr.Info(f"saved {res.path.rsplit('/', 1)[-1]} ({res.bytes / 2**20:.3f} MB)")
        return gr.update(value=res.path, visible=True), gr.update(choices=engine.adapter_choices())

    save.click(save_file, [adapter, tau, cap], [download, adapter])
    return {"refresh": (lambda current: keep(engine.adapter_choices(), current), [adapter])}
