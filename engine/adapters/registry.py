"""One registration call per adapter method; names are checked unique and looked up with a clear error."""
from __future__ import annotations

from dataclasses import dataclass

from engine.adapters.base import AdapterConfig, AdapterLayer, AdapterSet


@dataclass(frozen=True)
class Method:
    """What the engine needs to know about one adapter method."""

    name: str  # code name: lora, ac_lora, tri_lora, lora2
    display: str  # on screen: LoRA, AC-LoRA, TriLoRA, LoRA²
    config_cls: type[AdapterConfig]
    layer_cls: type[AdapterLayer]
    set_cls: type[AdapterSet]
    summary: str


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"adapter method {method.name!r} is registered twice")
    if method.config_cls.method != method.name or method.set_cls.method != method.name:
        raise ValueError(f"method {method.name!r}: its config and adapter-set classes carry other names")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; choose one of {', '.join(_METHODS)}") from None


def method_names() -> list[str]:
    return list(_METHODS)


def make_config(method: str, **settings) -> AdapterConfig:
    """Build and validate the config of a method from keyword settings (unknown keys are an error)."""
    return get_method(method).config_cls.from_dict(settings)
