"""Quantizable mobilenetv3 models (not written yet)."""
