"""Assertions the model packages' tests share: the support contract every quantizable model must meet."""

from __future__ import annotations

from collections.abc import Sequence

from qz_core.tools.support import DEFAULT_ENGINES, SupportResult


def assert_support_contract(
    result: SupportResult,
    *,
    slack: float = 1.5,
    engines: Sequence[str] = DEFAULT_ENGINES,
    float_islands: int | None = 0,
) -> SupportResult:
    """Asserts what ``probe_model`` found: every step worked, and onnxruntime's INT8 agrees.

    PTQ and QAT reached INT8, the converted model ran on each of ``engines``, FP32 and INT8 ONNX ran
    in onnxruntime, onnxruntime's INT8 output is about as close to FP32 as PyTorch's INT8 output is
    (within ``slack`` times PyTorch's own INT8 error, plus 2% of the output range), and the model has
    ``float_islands`` float islands (None: not checked).
    """
    assert result.errors == {}, result.errors
    assert result.ptq and result.qat, result
    assert result.engines == dict.fromkeys(engines, True), result.engines
    assert result.fp32_onnx and result.int8_onnx, result
    if float_islands is not None:
        assert result.float_islands == float_islands, result
    bound = slack * result.int8_max_diff + 0.02 * result.output_range
    assert result.onnx_fp32_diff <= bound, result
    return result
