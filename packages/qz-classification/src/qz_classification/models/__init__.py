"""Quantizable classification models; importing this module registers them with qz-core."""

from qz_classification.models.resnet import *  # noqa: F401,F403
