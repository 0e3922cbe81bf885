"""What every tab shares: engine errors as readable messages, following a queued job, forms from field metadata."""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from studio.jobs import FAILED, Job, readable_error

log = logging.getLogger("studio")


def _as_gr_error(error: Exception) -> gr.Error:
    if not isinstance(error, (ValueError, OSError)):
        log.exception("unexpected error in a studio callback")
    return gr.Error(readable_error(error), print_exception=False)


def guard(fn: Callable) -> Callable:
    """Wrap a callback (plain or generator) so that any engine error reaches the user as a message, not a trace."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as error:  # noqa: BLE001
                raise _as_gr_error(error) from None
        return gen

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001
            raise _as_gr_error(error) from None
    return plain


def follow(engine, job: Job, poll: float = 0.5) -> Iterator[str]:
    """Yield status lines (queue position, progress) until the job ends; a failed job raises its message."""
    while not job.done_event.wait(poll):
        position = engine.jobs.position(job)
        yield f"queued · position {position}" if position else f"running · {job.message or job.label}"
    if job.state == FAILED:
        raise gr.Error(job.error or "the job failed", print_exception=False)


def field_input(name: str, info: dict[str, Any], label: str | None = None, value: Any = None,
                elem_id: str | None = None) -> gr.components.Component:
    """A form input for one dataclass field: dropdown for choices, checkbox for bools, number, or text."""
    kind = str(info.get("type", "str"))
    base = kind.split("|")[0].strip()
    default = info.get("default") if value is None else value
    label = label or name.replace("_", " ")
    help_text = info.get("help", "")
    if info.get("choices"):
        return gr.Dropdown([str(c) for c in info["choices"]], value=str(default), label=label, info=help_text,
                           elem_id=elem_id, allow_custom_value=name == "targets")
    if base == "bool":
        return gr.Checkbox(value=bool(default), label=label, info=help_text, elem_id=elem_id)
    if base in ("int", "float"):
        optional = "None" in kind  # a number box cannot be empty: 0 stands for none, the engine checks bounds
        return gr.Number(value=0 if optional and default is None else default,
                         label=label + (" (0 = none)" if optional else ""), info=help_text,
                         precision=0 if base == "int" else None, minimum=None if optional else info.get("min"),
                         maximum=info.get("max"), elem_id=elem_id)
    if base == "list":
        default = "\n".join(map(str, default or []))
    return gr.Textbox(value="" if default is None else str(default), label=label, info=help_text, elem_id=elem_id)


def keep(choices: list[tuple[str, str]], current: Any) -> dict:
    """New dropdown/checkbox choices that keep the current selection where it still exists.

    A bundled dataset that was opened ('bundled: x') becomes its working copy ('x').
    """
    values = {v for _, v in choices}
    if isinstance(current, list):
        return gr.update(choices=choices, value=[c for c in current if c in values])
    if current and current not in values and str(current).startswith("bundled: "):
        current = str(current).removeprefix("bundled: ")
    return gr.update(choices=choices, value=current if current in values else None)
