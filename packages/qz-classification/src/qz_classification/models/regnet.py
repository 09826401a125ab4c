"""Quantizable regnet models (not written yet)."""
