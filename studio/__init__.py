"""Gradio front end of the studio: thin tabs that call the engine."""
