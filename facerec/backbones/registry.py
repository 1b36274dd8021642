"""Backbones by name (as in timm): `@register("name")` on a constructor, `build("name", **kwargs)`."""
from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Keys of a conf/model config that are not constructor options: train.py applies them to the built
# backbone (the weights it starts from; `freeze`, which finetune=partial replaced, is refused there).
TRAINING_INIT_KEYS = ("weights", "freeze")


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
    """Build the backbone registered as `name`; kwargs go to its constructor. The training
    initialisation keys of a model config (TRAINING_INIT_KEYS) are accepted only when unset: a
    freshly built backbone neither loads weights nor freezes parameters."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    for key in TRAINING_INIT_KEYS:
        value = kwargs.pop(key, None)
        if value:
            raise ValueError(
                f"model.{key}={value!r} is applied by train.py to the backbone it builds "
                f"(facerec.training.fit.build_module), not by build({name!r}); build the backbone without it"
            )
    constructor = _REGISTRY[name]
    options = inspect.signature(constructor).parameters
    unknown = sorted(set(kwargs) - set(options))
    if unknown:  # e.g. a tiny-net option (width) left over after switching `model=`
        raise TypeError(f"backbone {name!r} has no option {', '.join(unknown)}; its options: {', '.join(options)}")
    return constructor(**kwargs)
