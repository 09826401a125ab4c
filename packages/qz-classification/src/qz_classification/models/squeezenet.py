"""Quantizable squeezenet models (not written yet)."""
