"""build_app(engine): the five tabs in one gr.Blocks, each tab refreshing its lists when shown; launch settings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from studio.tabs import compare, dataset, export, prune, train

TABS = (("Dataset", dataset), ("Train", train), ("Compare", compare), ("Prune", prune), ("Export", export))
CSS = """
#tr-status, #ds-status, #cmp-status, #pr-status {min-height: 1.6em}
.gradio-container {max-width: 1500px !important}
"""


def build_app(engine) -> gr.Blocks:
    """The studio: Dataset · Train · Compare · Prune · Export over one shared Engine (heavy work in its worker)."""
    with gr.Blocks(title="Rank Studio · adaptive-rank LoRA", analytics_enabled=False) as demo:
        gr.Markdown("## Rank Studio · train, compare, prune and export LoRA, AC-LoRA, TriLoRA and LoRA² adapters")
        with gr.Tabs():
            for title, module in TABS:
                with gr.Tab(title, id=title.lower(), elem_id=f"tab-{title.lower()}") as tab:
                    hooks = module.build(engine, demo)
                if "refresh" in hooks:  # (fn, outputs): lists of datasets/runs/adapters may have changed elsewhere
                    fn, outputs = hooks["refresh"]
                    tab.select(fn, outputs, outputs, show_progress="hidden")
    demo.queue(default_concurrency_limit=4)
    return demo


def launch_kwargs(engine, **overrides: Any) -> dict[str, Any]:
    """launch() settings: only the data folder is served; theme and css (Gradio 6 takes them here)."""
    return {"allowed_paths": [str(Path(engine.data))], "theme": gr.themes.Soft(), "css": CSS, "show_error": True,
            **overrides}
