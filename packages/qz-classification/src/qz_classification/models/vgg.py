"""Quantizable vgg models (not written yet)."""
