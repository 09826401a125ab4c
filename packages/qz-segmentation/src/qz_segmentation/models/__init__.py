"""Quantizable segmentation models; importing this module registers them with qz-core.

No segmentation family is registered yet: they arrive in their own issues.
"""
