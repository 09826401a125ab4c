"""What ``qz bench`` and ``qz support`` share: which models to run, how a failure reads, the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qz_core.errors import QzError
from qz_core.registry import get_model_spec, get_task, list_models


def describe_error(exc: BaseException) -> str:
    """One line for a failed step: the exception type, its first line and the function it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].name})" if frames else ""
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first}{where}"


def _in_task(task: str | None) -> str:
    return f" in task {task!r}" if task else ""


def select_models(patterns: Sequence[str] = (), *, task: str | None = None, all_models: bool = False) -> list[str]:
    """The models a command runs on: names or wildcards, all of a task, or every registered model.

    Raises:
        QzError: nothing selected, an unknown name or task, or a wildcard that matches nothing.
    """
    if task is not None:
        get_task(task)  # raises, listing the installed tasks
    if all_models and patterns:
        raise QzError("Pass model names or --all, not both.")
    if not patterns:
        if not all_models and task is None:
            raise QzError("Name models (wildcards allowed), or pass --task TASK or --all.")
        names = list_models(task=task)
        if not names:
            raise QzError(f"No model is registered{_in_task(task)}.")
        return names
    names: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            found = list_models(pattern, task=task)
            if not found:
                raise QzError(f"No registered model matches {pattern!r}{_in_task(task)}.")
        else:
            spec = get_model_spec(pattern)  # raises with near matches
            if task is not None and spec.task != task:
                raise QzError(f"Model {pattern!r} is a {spec.task} model, not {task}.")
            found = [pattern]
        names += [n for n in found if n not in names]
    return names


def machine_info(threads: int, backend: str) -> dict[str, Any]:
    """What the numbers were measured on, saved beside them."""
    import onnxruntime

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "onnxruntime": onnxruntime.__version__,
        "threads": threads,
        "backend": backend,
    }
