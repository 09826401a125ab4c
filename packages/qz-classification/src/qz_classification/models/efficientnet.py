"""Quantizable efficientnet models (not written yet)."""
