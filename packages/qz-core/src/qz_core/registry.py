"""Model registry: every task package registers its builders here, through an entry point."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from torch import nn
from torchvision.models import WeightsEnum

from qz_core.errors import QzError, invalid_choice

ENTRY_POINT_GROUP = "qz.models"
TASKS = ("classification", "detection", "segmentation")


@dataclass(frozen=True)
class ModelEntry:
    """What qz knows of one registered model."""

    name: str
    task: str
    builder: Callable[..., nn.Module]
    weights: type[WeightsEnum] | None = None
    input_size: tuple[int, int] = (224, 224)
    meta: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}
_plugins_loaded = False


def register_model(
    name: str | None = None,
    *,
    task: str,
    weights: type[WeightsEnum] | None = None,
    input_size: tuple[int, int] = (224, 224),
    **meta: Any,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a builder under ``name`` (the function's name by default).

    The wrapped builder stamps its name on every model it builds (``model.qz_recipe["name"]``),
    so an INT8 model can be saved and rebuilt later.

    Raises:
        QzError: the name is taken, or the task is unknown.
    """
    if task not in TASKS:
        raise invalid_choice("task", task, TASKS)

    def wrapper(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise QzError(f"An entry is already registered under the name {key!r}.")

        @functools.wraps(builder)
        def build(*args: Any, **kwargs: Any) -> nn.Module:
            model = builder(*args, **kwargs)
            recipe = getattr(model, "qz_recipe", None)
            if isinstance(recipe, dict):
                recipe["name"] = key
            return model

        _REGISTRY[key] = ModelEntry(key, task, build, weights, tuple(input_size), dict(meta))
        return build

    return wrapper


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_models(
    pattern: str | Iterable[str] | None = None,
    *,
    task: str | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[str]:
    """Names of registered models, naturally sorted, filtered by task and wildcards.

    Example:
        ``list_models("resnet*", task="classification")``
    """
    _load_plugins()
    if task is not None and task not in TASKS:
        raise invalid_choice("task", task, TASKS)
    includes = [pattern] if isinstance(pattern, str) else list(pattern or [])
    excludes = [exclude] if isinstance(exclude, str) else list(exclude or [])
    names = [e.name for e in _REGISTRY.values() if task is None or e.task == task]
    if includes:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in includes)]
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in excludes)]
    return sorted(names, key=_natural_key)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name is an error with near matches."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = "" if _REGISTRY else "No model is registered: install qz-classification, -detection or -segmentation."
        raise invalid_choice("model name", name, _REGISTRY, hint=hint) from None


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the registered model ``name`` with the builder's keyword arguments."""
    return get_model_entry(name).builder(**kwargs)


def get_model_transforms(name: str, weights: Any = None) -> Callable[..., Any]:
    """The input transform of model ``name``: its enum weights' own, else its family's default."""
    from qz_core.weights import resolve_weights

    entry = get_model_entry(name)
    source = resolve_weights(weights, entry.weights)
    if source is not None and source.enum_member is not None:
        return source.enum_member.transforms()
    default = entry.meta.get("default_transforms")
    if default is None:
        raise QzError(f"Model {name!r} has no default preprocessing; pass enum weights such as 'DEFAULT'.")
    return default()


def get_model_weights(name: str) -> type[WeightsEnum] | None:
    """The torchvision weights enum of model ``name`` (None if it has none)."""
    return get_model_entry(name).weights
