"""The one way qz imports ultralytics: offline, and without its process-wide patches.

Importing ultralytics replaces ``torch.save`` and ``PIL.Image.open`` with its own wrappers, sets
torch's and numpy's print options, OpenCV's thread count and a few environment variables. qz saves
all of them before the first import and restores them after, so building a YOLO changes nothing
else in the process.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import numpy as np
import PIL.Image
import torch

from qz_core import QzError


def _print_options() -> dict[str, Any]:
    options = torch._tensor_str.PRINT_OPTS
    return {k: getattr(options, k) for k in ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")}


def _snapshot() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch.save": torch.save,
        "PIL.Image.open": PIL.Image.open,
        "torch printoptions": _print_options(),
        "numpy printoptions": np.get_printoptions(),
        "environ": dict(os.environ),
    }
    try:
        import cv2

        state["cv2"] = (cv2, cv2.getNumThreads(), cv2.imread, cv2.imwrite, cv2.imshow)
    except ImportError:
        pass
    return state


def _restore(state: dict[str, Any]) -> None:
    torch.save = state["torch.save"]
    PIL.Image.open = state["PIL.Image.open"]
    torch.set_printoptions(**state["torch printoptions"])
    np.set_printoptions(**state["numpy printoptions"])
    environ = state["environ"]
    for key in [k for k in os.environ if k not in environ]:
        del os.environ[key]
    os.environ.update(environ)
    if "cv2" in state:
        cv2, threads, imread, imwrite, imshow = state["cv2"]
        cv2.setNumThreads(threads)
        cv2.imread, cv2.imwrite, cv2.imshow = imread, imwrite, imshow


def import_ultralytics(module: str = "ultralytics") -> ModuleType:
    """Imports ``module`` (ultralytics or one of its submodules) offline, undoing ultralytics' global patches.

    Raises:
        QzError: ultralytics is not installed.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics reaches for the network at import without it
    state = _snapshot()
    state["environ"].setdefault("YOLO_OFFLINE", "1")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "ultralytics":
            raise QzError("The YOLO models need ultralytics: pip install 'ultralytics>=8.3,<9'.") from exc
        raise
    finally:
        _restore(state)
