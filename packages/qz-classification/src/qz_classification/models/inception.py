"""Quantizable inception models (not written yet)."""
