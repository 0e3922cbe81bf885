"""The studio in a real browser (Debian chromium via Playwright): caption, train two methods, compare, prune, export.

Runs on the bundled mini model when assets/mini-sd exists, else on a tiny random pipeline saved to a temp folder
(typed in as a custom base model). Saves a screenshot of every tab to assets/screenshots/.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "assets" / "screenshots"
STEPS = 10

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the browser test needs it")
    pytest.importorskip("playwright.sync_api")
    tmp = tmp_path_factory.mktemp("studio")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp / "data" / "gradio-cache")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from studio.app import build_app, launch_kwargs
    from studio.engine_facade import Engine

    if (REPO / "assets" / "mini-sd" / "model_index.json").is_file():
        base = "bundled"
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import save_tiny_pipeline

        base = str(save_tiny_pipeline(tmp / "tiny-sd"))
    engine = Engine(tmp / "data", allow_local_folders=False)
    demo = build_app(engine)
    port = _free_port()
    demo.launch(**launch_kwargs(engine, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                quiet=True))
    yield {"url": f"http://127.0.0.1:{port}/", "engine": engine, "base": base, "tmp": tmp}
    demo.close()


@pytest.fixture(scope="module")
def page(studio):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        context = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(studio["url"])
        pg.wait_for_selector("#tab-dataset", state="attached")
        yield pg
        browser.close()


# --- helpers ------------------------------------------------------------------------------------------------
def tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()
    pg.wait_for_timeout(500)


def choose(pg, elem_id: str, option: str) -> None:
    """Pick an option of a gr.Dropdown by (part of) its label."""
    box = pg.locator(f"#{elem_id} input").first
    box.click()
    pg.get_by_role("option").filter(has_text=option).first.click()
    pg.wait_for_timeout(300)


def type_custom(pg, elem_id: str, text: str) -> None:
    box = pg.locator(f"#{elem_id} input").first
    box.fill(text)
    box.press("Enter")
    box.blur()


def set_number(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def wait_text(pg, elem_id: str, *needles: str, timeout: float = 240) -> str:
    """Wait until the element's text holds one of `needles`; fail fast on an error toast."""
    end = time.time() + timeout
    while time.time() < end:
        text = pg.locator(f"#{elem_id}").inner_text()
        if any(n in text for n in needles):
            return text
        toast = pg.locator(".toast-body.error")
        if toast.count():
            raise AssertionError(f"error shown while waiting for {needles}: {toast.first.inner_text()}")
        pg.wait_for_timeout(500)
    raise AssertionError(f"#{elem_id} never showed {needles}: {pg.locator(f'#{elem_id}').inner_text()!r}")


def shot(pg, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    closers = pg.locator(".toast-close")
    for i in range(closers.count()):
        closers.nth(i).click()
    pg.wait_for_timeout(800)
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


# --- the flow -----------------------------------------------------------------------------------------------
def test_dataset_tab_opens_and_captions_the_bundled_dataset(page, studio):
    started = time.time()
    choose(page, "ds-choice", "bundled: style_ink")
    page.locator("#ds-open").click()
    wait_text(page, "ds-problems", "usable image")
    assert page.locator("#ds-gallery img").count() >= 10
    oracle = (REPO / "assets" / "oracle" / "oracle.safetensors").is_file()
    page.locator("#ds-overwrite input").check()
    page.locator("#ds-caption").click()
    if oracle:
        wait_text(page, "ds-status", "captioned")
    else:  # the bundled captioner needs the mini-world oracle: the user gets the reason, not a traceback
        page.wait_for_selector(".toast-body.error", timeout=60_000)
        assert "oracle" in page.locator(".toast-body.error").first.inner_text()
        page.locator(".toast-body.error").first.click()
    page.locator("#ds-arg-a textarea, #ds-arg-a input").first.fill("zkw")
    page.locator("#ds-apply").click()
    page.wait_for_timeout(800)
    assert "zkw" in page.locator("#ds-table").inner_text()
    shot(page, "dataset")
    studio["t_dataset"] = time.time() - started


def _start(page, method: str, studio, **fields) -> None:
    choose(page, "tr-method", method)
    for name, value in fields.items():
        set_number(page, name, value)
    page.locator("#tr-start").click()
    page.wait_for_timeout(800)


def test_train_two_methods_and_watch_the_plots(page, studio):
    tab(page, "Train")
    if studio["base"] != "bundled":
        type_custom(page, "tr-base", studio["base"])
    page.get_by_text("More settings").click()
    for name, value in (("tr-steps", STEPS), ("tr-rank", 4), ("tr-rank_every", 2), ("tr-sample_every", 5),
                        ("tr-sample_steps", 3), ("tr-lr", 0.001)):
        set_number(page, name, value)
    _start(page, "LoRA", studio)
    _start(page, "AC-LoRA", studio, **{"m-ac_lora-restart_every_steps": 4})
    engine = studio["engine"]
    trains = [j for j in engine.jobs.jobs() if j.kind == "train"]
    assert len(trains) == 2, [j.label for j in engine.jobs.jobs()]
    wait_text(page, "tr-queue", "train lora")
    # a refresh re-attaches to the running training
    page.reload()
    tab(page, "Train")
    wait_text(page, "tr-status", "running", "done")
    watched = page.locator("#tr-status").inner_text()
    assert Path(engine.active_run()).name in watched or "done" in watched
    assert trains[1].done_event.wait(240), "training did not finish in time"
    assert all(j.state == "done" for j in trains), [(j.label, j.error) for j in trains]
    choose(page, "tr-run", Path(trains[1].run_dir).name)
    wait_text(page, "tr-status", "done")
    page.wait_for_timeout(2500)
    loss = page.locator("#tr-loss").inner_text()
    heat = page.locator("#tr-heatmap").inner_text()
    assert "no steps yet" not in loss and "smoothed" in loss
    assert "no rank snapshot yet" not in heat and "restart" in heat  # AC-LoRA restarts are marked
    assert page.locator("#tr-heatmap .hm, #tr-heatmap image").count() >= 1
    shot(page, "train")


def test_compare_the_two_adapters(page, studio):
    tab(page, "Compare")
    labels = page.locator("#cmp-adapters label")
    assert labels.count() >= 2
    for i in range(2):
        labels.nth(i).click()
    page.locator("#cmp-prompts textarea").fill("zkw style, a big green star in the center, grass background")
    page.locator("#cmp-go").click()
    wait_text(page, "cmp-status", "done in")
    page.wait_for_selector("#cmp-grid img")
    table = page.locator("#cmp-table").inner_text()
    assert "lora" in table and "ac_lora" in table and "base" in table
    if studio["base"] == "bundled":  # oracle scores; the base column against the style the adapters learn (ink)
        # cells come one per line; the base row has no ranks: base, base, MB, parameters, prompt fid., style fid.
        cells = table.split("style fidelity", 1)[1].split()
        assert cells[:2] == ["base", "base"] and float(cells[4]) > 0.5 and 0 <= float(cells[5]) < 0.2, cells
    shot(page, "compare")


def test_prune_slider_updates_numbers_and_preview(page, studio):
    tab(page, "Prune")
    choose(page, "pr-adapter", "-lora")  # the plain LoRA run
    first = wait_text(page, "pr-summary", "parameters")
    slider = page.locator("#pr-tau input[type=range]")
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.8, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.3, y, steps=5)
    page.mouse.up()
    end = time.time() + 20
    while page.locator("#pr-summary").inner_text() == first and time.time() < end:
        page.wait_for_timeout(200)
    assert page.locator("#pr-summary").inner_text() != first
    wait_text(page, "pr-status", "preview at tau")
    assert page.locator("#pr-before img").count() == 1 and page.locator("#pr-after img").count() == 1
    page.locator("#pr-save").click()
    page.wait_for_selector("#pr-download", state="visible")
    shot(page, "prune")


def test_export_a_file_and_load_it_with_diffusers(page, studio):
    import torch
    from diffusers import StableDiffusionPipeline

    from engine.models import bundled_path

    tab(page, "Export")
    choose(page, "ex-source", "-lora")
    page.wait_for_selector("#ex-kohya", state="visible")
    assert "rankstudio.method" in page.locator("#ex-meta").inner_text()
    with page.expect_download() as info:
        page.locator("#ex-kohya").click()
    target = studio["tmp"] / "downloaded_kohya.safetensors"
    info.value.save_as(str(target))
    shot(page, "export")
    base = str(bundled_path()) if studio["base"] == "bundled" else studio["base"]
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt, size = "zkw style, a big green star", pipe.unet.config.sample_size * pipe.vae_scale_factor

    def render():
        return pipe(prompt, num_inference_steps=3, height=size, width=size, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    plain = render()
    pipe.load_lora_weights(str(target))
    assert abs(render() - plain).max() > 0  # the adapter loads and changes the image


def test_only_the_data_folder_is_served(studio):
    import urllib.error
    import urllib.request

    for path in (REPO / "app.py", REPO / "assets" / "datasets" / "style_ink" / "00.png"):
        try:
            with urllib.request.urlopen(f"{studio['url']}gradio_api/file={path}") as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        assert status in (403, 404), f"{path} is served ({status})"
