"""Quantizable mnasnet models (not written yet)."""
