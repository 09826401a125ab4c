"""Assertions the model packages' tests share: the support contract every quantizable model must meet."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from qz_core.task import Task
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


def assert_task_commands_documented(task: Task) -> None:
    """Asserts that every option of ``qz eval TASK`` and ``qz demo --task TASK`` has help text."""
    from qz_core.cli.arguments import QzArgumentParser, undocumented_options

    evaluate, demo = QzArgumentParser(prog=f"qz eval {task.name}"), QzArgumentParser(prog=f"qz demo --task {task.name}")
    task.add_eval_command(evaluate)
    task.add_demo_command(demo)
    assert undocumented_options(evaluate) == [] and undocumented_options(demo) == []


def assert_cli_refuses(argv: Sequence[str], option: str, value: str, capsys: Any) -> str:
    """Runs ``qz ARGV`` in-process and asserts it stops while parsing: status 2, one line naming option and value.

    ``capsys`` is pytest's fixture. Returns the error line.
    """
    import pytest

    from qz_core.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"argument {option}: must be an integer >=" in lines[0] and repr(value) in lines[0], err
    return lines[0]
