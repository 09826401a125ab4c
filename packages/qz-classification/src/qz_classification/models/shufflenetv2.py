"""Quantizable shufflenetv2 models (not written yet)."""
