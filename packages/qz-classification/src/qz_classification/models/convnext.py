"""Quantizable convnext models (not written yet)."""
