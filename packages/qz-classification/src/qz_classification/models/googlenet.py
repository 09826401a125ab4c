"""Quantizable googlenet models (not written yet)."""
