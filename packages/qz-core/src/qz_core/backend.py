"""Platform-aware choice of the quantized engine (x86 on Intel/AMD, qnnpack on ARM)."""

from __future__ import annotations

import os
import platform

import torch

from qz_core.errors import QzError, invalid_choice

BACKEND_ENV = "QZ_BACKEND"
_PLATFORM_BACKENDS = {
    "x86_64": "x86",
    "amd64": "x86",
    "i386": "x86",
    "i686": "x86",
    "aarch64": "qnnpack",
    "arm64": "qnnpack",
    "armv7l": "qnnpack",
}


def supported_backends() -> list[str]:
    """Quantized engines this PyTorch build can run (without the 'none' placeholder)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def platform_backend(machine: str | None = None) -> str:
    """Returns the engine for a CPU architecture name (``platform.machine()`` by default)."""
    machine = machine if machine is not None else platform.machine()
    try:
        return _PLATFORM_BACKENDS[machine.lower()]
    except KeyError:
        raise QzError(
            f"Unknown platform {machine!r}: qz cannot pick a quantized engine for it. "
            f"Known platforms: {', '.join(sorted(_PLATFORM_BACKENDS))}. "
            f"Pass backend= (or set {BACKEND_ENV}) to one of {supported_backends()}."
        ) from None


def resolve_backend(backend: str | None = None) -> str:
    """Picks the engine: an explicit ``backend``, else ``$QZ_BACKEND``, else the platform's.

    Raises:
        QzError: the engine is unknown or this PyTorch build lacks it.
    """
    chosen = backend or os.environ.get(BACKEND_ENV) or platform_backend()
    available = supported_backends()
    if chosen not in available:
        source = "backend" if backend else (BACKEND_ENV if os.environ.get(BACKEND_ENV) else "platform backend")
        raise invalid_choice(source, chosen, available, hint="(the engines this PyTorch build supports)")
    return chosen


def set_backend(backend: str | None = None) -> str:
    """Resolves the engine and makes it PyTorch's quantized engine; the one place qz sets it."""
    chosen = resolve_backend(backend)
    if torch.backends.quantized.engine != chosen:
        torch.backends.quantized.engine = chosen
    return chosen
