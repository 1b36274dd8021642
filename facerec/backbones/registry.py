"""Backbones by name (as in timm): `@register("name")` on a constructor, `build("name", **kwargs)`."""
from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as `name`; kwargs go to its constructor."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    constructor = _REGISTRY[name]
    options = inspect.signature(constructor).parameters
    unknown = sorted(set(kwargs) - set(options))
    if unknown:  # e.g. a tiny-net option (width) left over after switching `model=`
        raise TypeError(f"backbone {name!r} has no option {', '.join(unknown)}; its options: {', '.join(options)}")
    return constructor(**kwargs)
