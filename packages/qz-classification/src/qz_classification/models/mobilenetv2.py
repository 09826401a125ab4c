"""Quantizable mobilenetv2 models (not written yet)."""
