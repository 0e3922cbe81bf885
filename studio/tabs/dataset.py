"""Dataset tab: pick, upload or copy in a dataset; thumbnails, an editable caption table, bulk edits, auto-caption."""
from __future__ import annotations

import gradio as gr

from studio.tabs.common import follow, guard, keep

EDITS = [("Add trigger word at the front", "trigger"), ("Prefix tags", "prefix"), ("Append tags", "suffix"),
         ("Find / replace", "replace"), ("Remove a word / style phrase", "strip"), ("Remove duplicate tags", "dedupe")]


def build(engine, demo: gr.Blocks) -> dict:
    folder = gr.State(None)  # the dataset choice this session is editing
    with gr.Row():
        choice = gr.Dropdown(engine.dataset_choices(), label="Dataset", scale=3, elem_id="ds-choice",
                             info="Your datasets in the data folder, then the bundled ones (copied in when opened).")
        open_btn = gr.Button("Open", variant="primary", scale=1, elem_id="ds-open")
    with gr.Accordion("Add images", open=False):
        with gr.Row():
            uploads = gr.File(file_count="multiple", label="Images, .txt captions or a .zip", scale=3,
                              file_types=["image", ".txt", ".zip", ".jsonl"])
            with gr.Column(scale=1):
                new_name = gr.Textbox(label="New dataset name", value="my-dataset")
                import_btn = gr.Button("Import uploads")
        with gr.Row(visible=engine.allow_local_folders):
            local = gr.Textbox(label="Copy a folder on this machine", placeholder="/path/to/images", scale=3)
            local_btn = gr.Button("Copy folder in", scale=1)
    problems = gr.Markdown("Open a dataset to see its images.", elem_id="ds-problems")
    gallery = gr.Gallery(label="Thumbnails", columns=8, height=260, object_fit="contain", allow_preview=True,
                         elem_id="ds-gallery")
    table = gr.Dataframe(headers=["file", "caption"], datatype=["str", "str"], type="array", interactive=True,
                         static_columns=[0], wrap=True, max_height=360, label="Captions (edit, then Save)",
                         elem_id="ds-table")
    with gr.Row():
        op = gr.Dropdown(EDITS, value="trigger", label="Edit every caption", scale=2)
        arg_a = gr.Textbox(label="Word / text / find", scale=2, elem_id="ds-arg-a")
        arg_b = gr.Textbox(label="Replace with", scale=2)
        apply_btn = gr.Button("Apply to table", scale=1, elem_id="ds-apply")
        save_btn = gr.Button("Save captions", variant="primary", scale=1, elem_id="ds-save")
    with gr.Row():
        captioner = gr.Dropdown(engine.captioner_choices(), value=engine.captioner_choices()[0], label="Captioner",
                                allow_custom_value=True, scale=2, info="bundled reads mini-world images offline; "
                                "hub models must be in the local cache when offline.")
        trigger = gr.Textbox(label="Trigger word (put first in each new caption)", scale=1)
        overwrite = gr.Checkbox(label="Overwrite existing captions", value=False, scale=1, elem_id="ds-overwrite")
        caption_btn = gr.Button("Auto-caption", scale=1, elem_id="ds-caption")
    status = gr.Markdown(elem_id="ds-status")

    @guard
    def show(name):
        folder_name, rows, thumbs, issues = engine.dataset_view(name)
        return folder_name, gr.update(choices=engine.dataset_choices(), value=folder_name), thumbs, rows, issues

    view_outputs = [folder, choice, gallery, table, problems]
    open_btn.click(show, choice, view_outputs)

    @guard
    def do_import(files, name):
        return show(engine.import_uploads([f if isinstance(f, str) else f.name for f in files or []], name))

    import_btn.click(do_import, [uploads, new_name], view_outputs)
    local_btn.click(guard(lambda path: show(engine.import_folder(path))), local, view_outputs)

    @guard
    def apply(rows, kind, a, b):
        return engine.bulk_edit(rows or [], kind, a or "", b or "")

    apply_btn.click(apply, [table, op, arg_a, arg_b], table)

    @guard
    def save(name, rows):
        if not name:
            raise ValueError("open a dataset first")
        n = engine.save_captions(name, rows or [])
        gr.Info(f"saved {n} caption file(s)")
        return show(name)

    save_btn.click(save, [folder, table], view_outputs)

    @guard
    def auto_caption(name, model, word, force):
        if not name:
            raise ValueError("open a dataset first")
        job = engine.auto_caption(name, model, word or "", bool(force))
        yield from follow(engine, job)
        yield job.result or "done"

    caption_btn.click(auto_caption, [folder, captioner, trigger, overwrite], status, concurrency_limit=None
                      ).success(show, folder, view_outputs)
    return {"refresh": (lambda current: keep(engine.dataset_choices(), current), [choice])}
