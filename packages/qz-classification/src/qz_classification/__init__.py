"""qz-classification: quantizable torchvision classifiers, ImageNet evaluation and the digits demo.

The builders (``from qz_classification import resnet50``) load on first use, so ``qz_classification.task``
imports without defining the models.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    from qz_classification import models

    if name == "models":
        return models
    try:
        return getattr(models, name)
    except AttributeError:
        raise AttributeError(f"module 'qz_classification' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    from qz_classification import models

    return sorted({*globals(), "models", *models.__dict__.get("__all__", dir(models))})
