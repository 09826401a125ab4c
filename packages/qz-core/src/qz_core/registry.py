"""Registries of models and tasks, filled by the task packages through entry points.

``qz.tasks`` entry points name each package's ``Task`` object; ``qz.models`` entry points name the
modules whose ``define_model`` calls register the package's models. Both are read on first use, and
model modules keep heavy third-party imports out of import time.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from torch import nn
from torchvision.models import WeightsEnum

from qz_core.errors import QzError, invalid_choice

if TYPE_CHECKING:
    from qz_core.builder import ModelBuilder, ModelSpec
    from qz_core.task import Task

MODEL_ENTRY_POINTS = "qz.models"
TASK_ENTRY_POINTS = "qz.tasks"

_MODELS: dict[str, tuple[ModelSpec, ModelBuilder[Any]]] = {}
_TASKS: dict[str, Task] = {}
_loaded = {"models": False, "tasks": False}


def register_spec(spec: ModelSpec, builder: ModelBuilder[Any]) -> None:
    """Adds ``spec`` and its public builder (``define_model`` calls this).

    Raises:
        QzError: the name is taken, or no installed task has the spec's task name.
    """
    if spec.name in _MODELS:
        raise QzError(f"An entry is already registered under the name {spec.name!r}.")
    get_task(spec.task)
    _MODELS[spec.name] = (spec, builder)


def unregister_model(name: str) -> None:
    """Removes a model (tests that register throwaway models clean up with it)."""
    _MODELS.pop(name, None)


def register_task(task: Task) -> Task:
    """Adds a task adapter (its package's ``qz.tasks`` entry point does this).

    Raises:
        QzError: another task has the name.
    """
    known = _TASKS.get(task.name)
    if known is not None and known is not task:
        raise QzError(f"A task is already registered under the name {task.name!r}.")
    _TASKS[task.name] = task
    return task


def _load_tasks() -> None:
    if not _loaded["tasks"]:
        _loaded["tasks"] = True
        for point in entry_points(group=TASK_ENTRY_POINTS):
            register_task(point.load())


def _load_models() -> None:
    if not _loaded["models"]:
        _loaded["models"] = True
        _load_tasks()
        for point in entry_points(group=MODEL_ENTRY_POINTS):
            point.load()


def list_tasks() -> list[str]:
    """Names of the installed tasks."""
    _load_tasks()
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """The adapter of task ``name``; an unknown name is an error listing the installed ones."""
    _load_tasks()
    try:
        return _TASKS[name]
    except KeyError:
        hint = "" if _TASKS else "No task is installed: install a qz task package (pip install qz-<task>)."
        raise invalid_choice("task", name, _TASKS, hint=hint) from None


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
        ``list_models("mobile*", task=..., exclude="*_large")``
    """
    _load_models()
    if task is not None:
        get_task(task)
    includes = [pattern] if isinstance(pattern, str) else list(pattern or [])
    excludes = [exclude] if isinstance(exclude, str) else list(exclude or [])
    names = [name for name, (spec, _) in _MODELS.items() if task is None or spec.task == task]
    if includes:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in includes)]
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in excludes)]
    return sorted(names, key=_natural_key)


def _lookup(name: str) -> tuple[ModelSpec, ModelBuilder[Any]]:
    _load_models()
    try:
        return _MODELS[name]
    except KeyError:
        hint = "" if _MODELS else "No model is registered: install a qz task package (pip install qz-<task>)."
        raise invalid_choice("model name", name, _MODELS, hint=hint) from None


def get_model_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; an unknown name is an error with near matches."""
    return _lookup(name)[0]


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The public builder of model ``name``."""
    return _lookup(name)[1]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the registered model ``name`` with the builder's keyword arguments."""
    return _lookup(name)[1](**kwargs)


def get_model_task(name: str) -> Task:
    """The task adapter of model ``name``."""
    return get_task(get_model_spec(name).task)


def get_model_transforms(name: str, weights: Any = None) -> Callable[..., Any]:
    """The input transform of model ``name``: its enum weights' own, else its spec's or task's default."""
    from qz_core.weights import resolve_weights

    spec = get_model_spec(name)
    return get_task(spec.task).transform(spec, resolve_weights(weights, spec.weights_enum))


def get_model_weights(name: str) -> type[WeightsEnum] | None:
    """The torchvision weights enum of model ``name`` (None if it has none)."""
    return get_model_spec(name).weights_enum
