"""Assertions the model packages' tests share: the support contract every quantizable model must meet."""

from __future__ import annotations

import math
from collections.abc import Sequence

from qz_core.tools.support import DEFAULT_ENGINES, SupportResult

# INT8 output noise below 2/3 of the FP32 output's energy, on every engine. A correct 8-bit quantizer gives
# about 50 dB per tensor and loses about 10 log10(L) dB over L quantized layers, more where activations are
# peaked (random weights); a quantizer that wrecks the model (dropped biases, a wrong scale or layout) gives 0 dB
# or less. The contract also asks INT8 to beat ``unrelated_sqnr``, the FP32 output of another input.
MIN_INT8_SQNR_DB = 2.0


def assert_support_contract(
    result: SupportResult,
    *,
    slack: float = 1.5,
    engines: Sequence[str] = DEFAULT_ENGINES,
    float_islands: int | None = 0,
    min_sqnr: float = MIN_INT8_SQNR_DB,
) -> SupportResult:
    """Asserts what ``probe_model`` found: every step worked, and onnxruntime's INT8 agrees.

    PTQ and QAT reached INT8, the converted model ran on each of ``engines``, FP32 and INT8 ONNX ran
    in onnxruntime, onnxruntime's INT8 output is about as close to FP32 as PyTorch's INT8 output is
    (within ``slack`` times PyTorch's own INT8 error, plus 2% of the output range), and the model has
    ``float_islands`` float islands (None: not checked). On every engine, PyTorch's INT8 output keeps an
    SQNR against FP32 of at least ``min_sqnr`` dB on the (calibrated) example input, and higher than the
    FP32 output of another input scores (``unrelated_sqnr``).
    """
    assert result.errors == {}, result.errors
    assert result.ptq and result.qat, result
    assert result.engines == dict.fromkeys(engines, True), result.engines
    assert result.fp32_onnx and result.int8_onnx, result
    floor = max(min_sqnr, result.unrelated_sqnr if result.unrelated_sqnr is not None else -math.inf)
    low = {engine: db for engine, db in result.int8_sqnr.items() if not db > floor}
    assert set(result.int8_sqnr) == set(engines) and not low, f"INT8 SQNR not above {floor:.1f} dB: {result.int8_sqnr}"
    if float_islands is not None:
        assert result.float_islands == float_islands, result
    bound = slack * result.int8_max_diff + 0.02 * result.output_range
    assert result.onnx_fp32_diff <= bound, result
    return result
