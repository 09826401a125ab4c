"""Quantizable detection models; importing this module registers them with qz-core.

No detection family is registered yet: they arrive in their own issues.
"""
