"""Quantizable densenet models (not written yet)."""
