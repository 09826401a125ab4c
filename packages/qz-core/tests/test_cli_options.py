"""Every ``qz`` option has help, and numbers that make no sense stop ``qz`` with one line and status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import qz_core.job
from qz_core.cli import build_parser, main
from qz_core.cli.arguments import QzArgumentParser, undocumented_options
from qz_core.cli.evaluation import add_eval_arguments
from qz_core.registry import get_task, list_tasks

from conftest import TINY


def _one_line_error(err: str, *names: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and all(name in lines[0] for name in names), err
    return lines[0]


def test_every_command_and_option_has_help() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"list", "quantize", "predict", "export", "eval", "demo", "bench", "support"} <= set(commands)
    assert undocumented_options(parser) == []


def test_every_installed_demo_option_has_help() -> None:
    for name in list_tasks():
        parser = QzArgumentParser(prog=f"qz demo --task {name}")
        if get_task(name).add_demo_command(parser):
            assert undocumented_options(parser) == [], name


def test_an_option_without_help_is_found() -> None:
    parser = QzArgumentParser(prog="qz")
    parser.add_argument("--documented", help="has help")
    sub = parser.add_subparsers().add_parser("verb")
    sub.add_argument("--bare", type=int)
    assert undocumented_options(parser) == ["qz verb", "qz verb --bare"]


@pytest.mark.parametrize(
    ("argv", "option", "value"),
    [
        (["quantize", TINY, "--calib", "c", "--out", "o.pt", "--num-classes", "0"], "--num-classes", "'0'"),
        (["quantize", TINY, "--calib", "c", "--out", "o.pt", "--opset", "9"], "--opset", "'9'"),
        (["predict", TINY, "img.png", "--out", "p", "--num-classes", "-3"], "--num-classes", "'-3'"),
        (["export", TINY, "--out", "m.onnx", "--opset", "-1"], "--opset", "'-1'"),
        (["export", TINY, "--out", "m.onnx", "--num-classes", "two"], "--num-classes", "'two'"),
    ],
)
def test_bad_numbers_stop_parsing_with_one_line(argv, option, value, capsys, monkeypatch) -> None:
    monkeypatch.setattr(qz_core.job, "get_model_builder", lambda name: pytest.fail("built a model"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = _one_line_error(capsys.readouterr().err, f"argument {option}", value)
    assert line.startswith(f"qz {argv[0]}: error:") and ">=" in line


@pytest.mark.parametrize(
    ("extra", "option", "value"),
    [
        (["--workers", "-1"], "--workers", "'-1'"),
        (["--limit", "0"], "--limit", "'0'"),
        (["--limit", "-5"], "--limit", "'-5'"),
        (["--num-classes", "0"], "--num-classes", "'0'"),
        (["--calib-batches", "0"], "--calib-batches", "'0'"),
        (["--calib-batches", "1.5"], "--calib-batches", "'1.5'"),
    ],
)
def test_shared_eval_options_refuse_bad_numbers(extra, option, value, capsys) -> None:
    parser = QzArgumentParser(prog="qz eval toy")
    add_eval_arguments(parser, task="toy", weights_help="weights", data_help="data")
    assert parser.parse_args(["--data", "d", "--workers", "0", "--limit", "1"]).workers == 0
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--data", "d", *extra])
    assert exit_info.value.code == 2
    _one_line_error(capsys.readouterr().err, "qz eval toy: error:", f"argument {option}", value)


@pytest.mark.parametrize("budget", ["nan", "inf", "-1"])
def test_bench_budget_must_be_finite(budget, tmp_path, capsys) -> None:
    assert main(["bench", TINY, "--budget", budget, "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys.readouterr().err, "--budget", budget)


def test_qz_in_a_fresh_process_exits_2_with_one_line(tmp_path) -> None:
    code = "from qz_core.cli import main; raise SystemExit(main())"
    argv = ["export", "resnet18", "--out", "m.onnx", "--opset", "3"]
    command = [sys.executable, "-c", code, *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    _one_line_error(result.stderr, "qz export: error: argument --opset", "'3'", ">= 10")
