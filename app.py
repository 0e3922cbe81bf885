"""Rank Studio: build the one Engine, build the Gradio app around it, launch (also the Hugging Face Space entry)."""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("STUDIO_DATA_DIR", "data")).resolve()
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", str(DATA_DIR / "gradio-cache"))  # uploads and served copies stay in data/
os.environ.setdefault("RANKSTUDIO_RUNS", str(DATA_DIR / "runs"))
if os.environ.get("SPACE_ID"):  # on a Space, downloaded models are cached in the data folder too
    os.environ.setdefault("HF_HOME", str(DATA_DIR / "hf-cache"))

from studio.app import build_app, launch_kwargs  # noqa: E402  (after the environment is set)
from studio.engine_facade import Engine  # noqa: E402


def main() -> None:
    engine = Engine(DATA_DIR)
    demo = build_app(engine)
    host = os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    demo.launch(**launch_kwargs(engine, server_name=host, server_port=port))


if __name__ == "__main__":
    main()
