"""qz-classification: quantizable torchvision classifiers, ImageNet evaluation and the digits demo."""

from qz_classification import models as models
from qz_classification.models import *  # noqa: F401,F403

__version__ = "0.1.0"
