"""Export tab: kohya (A1111 / ComfyUI) and diffusers files of a run or a pruned file, metadata, download buttons."""
from __future__ import annotations

import gradio as gr

from studio.tabs.common import guard, keep

FORMATS = (("kohya", "kohya · A1111 / ComfyUI"), ("diffusers", "diffusers / PEFT"))


def build(engine, demo: gr.Blocks) -> dict:
    with gr.Row():
        source = gr.Dropdown(engine.export_sources(), label="Finished run or adapter file", scale=4,
                             elem_id="ex-source")
        refresh = gr.Button("↻", scale=0, min_width=40)
    gr.Markdown("kohya files load in A1111, ComfyUI and diffusers (`pipe.load_lora_weights`); diffusers files "
                "are what `save_lora_weights` writes. Both keep per-layer ranks.")
    with gr.Row():
        buttons = [gr.DownloadButton(f"Download {label}", visible=False, elem_id=f"ex-{fmt}")
                   for fmt, label in FORMATS]
    meta = gr.JSON(label="Metadata", elem_id="ex-meta")

    refresh.click(lambda: gr.update(choices=engine.export_sources()), None, source)

    @guard
    def prepare(src):
        if not src:
            return *[gr.update(visible=False) for _ in FORMATS], None
        updates, shown = [], None
        for fmt, label in FORMATS:
            try:
                path, metadata = engine.export(src, fmt)
            except ValueError:
                updates.append(gr.update(visible=False))
                continue
            shown = shown or metadata
            updates.append(gr.update(value=path, visible=True, label=f"Download {label}"))
        if shown is None:
            raise ValueError("nothing to export from this source")
        return *updates, shown

    source.change(prepare, source, [*buttons, meta])
    return {"refresh": (lambda current: keep(engine.export_sources(), current), [source])}
