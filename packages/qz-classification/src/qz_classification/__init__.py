"""qz-classification: quantizable torchvision classifiers, ImageNet evaluation and the digits demo.

The builders (``from qz_classification import resnet50``) load on first use, so ``qz_classification.task``
imports without defining the models.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    models = importlib.import_module("qz_classification.models")

    if name == "models":
        return models
    try:
        return getattr(models, name)
    except AttributeError:
        raise AttributeError(f"module 'qz_classification' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    models = importlib.import_module("qz_classification.models")

    return sorted({*globals(), "models", *models.__dict__.get("__all__", dir(models))})
