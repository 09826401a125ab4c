"""Anchors: other quantizers run on the same float model and calibration batches, timed beside qz.

``nncf``: NNCF's post-training quantization (``nncf.quantize`` on the float torch module, its defaults),
converted to OpenVINO (``openvino.convert_model``) and saved as IR for OpenVINO's CPU plugin. NNCF is a
bench-only extra (``pip install 'qz-core[bench]'``), imported only when asked for.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qz_core.errors import QzError, invalid_choice

ANCHORS = ("nncf",)
NNCF_MISSING = "NNCF is not installed: pip install 'qz-core[bench]' (the NNCF anchor also needs OpenVINO)."


def check_anchors(anchors: Sequence[str]) -> tuple[str, ...]:
    """The anchors asked for, each known and importable, checked before any work.

    Raises:
        QzError: an unknown anchor, or NNCF or OpenVINO missing (one line naming the extra to install).
    """
    for anchor in anchors:
        if anchor not in ANCHORS:
            raise invalid_choice("anchor", anchor, ANCHORS)
    if "nncf" in anchors:
        import_nncf()
    return tuple(dict.fromkeys(anchors))


def import_nncf() -> Any:
    """The ``nncf`` module, with OpenVINO beside it.

    Raises:
        QzError: NNCF or OpenVINO is not installed.
    """
    try:
        import nncf
        import openvino  # noqa: F401 - NNCF's model is timed in OpenVINO
    except ImportError:
        raise QzError(NNCF_MISSING) from None
    return nncf


@contextlib.contextmanager
def _quiet_nncf(nncf: Any) -> Iterator[None]:
    """NNCF's info messages and tracing warnings off for the block (a bench prints its own progress)."""
    logger = logging.getLogger("nncf")
    level = logger.level
    nncf.set_log_level(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def nncf_openvino_ir(model: nn.Module, batches: Sequence[Any], example_input: Any, xml_path: str | os.PathLike) -> Path:
    """Quantizes a copy of ``model`` with NNCF on ``batches``, converts it to OpenVINO and saves it as IR.

    The float ``model`` is left as it was. The IR's input shapes are those of ``example_input``, fixed as in
    qz's ONNX files, and weights keep their precision (no FP16 compression).

    Raises:
        QzError: NNCF or OpenVINO is missing. NNCF's own errors pass through.
    """
    nncf = import_nncf()
    import openvino as ov

    with _quiet_nncf(nncf):
        dataset = nncf.Dataset(list(batches))
        quantized = nncf.quantize(copy.deepcopy(model).eval(), dataset, subset_size=_samples(batches))
        converted = ov.convert_model(quantized, example_input=example_input, input=_static_shapes(ov, example_input))
    ov.save_model(converted, os.fspath(xml_path), compress_to_fp16=False)
    return Path(xml_path)


def _samples(batches: Sequence[Any]) -> int:
    """How many samples the batches hold (NNCF's ``subset_size`` counts samples, not batches)."""
    sizes = [len(b) if hasattr(b, "__len__") else 1 for b in batches]
    return max(sum(sizes), 1)


def _static_shapes(ov: Any, example_input: Any) -> list[Any]:
    tensors = example_input if isinstance(example_input, (list, tuple)) else (example_input,)
    return [ov.PartialShape(list(t.shape)) for t in tensors]
