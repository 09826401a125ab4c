"""``qz bench`` / ``qz support`` options (help on each, one-line errors before any work), and import lightness."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from qz_core import QzError
from qz_core.tools.cli import add_tool_commands

from conftest import TINY, TOY_TASK

HEAVY = ("matplotlib", "pycocotools", "ultralytics")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qz")
    add_tool_commands(parser.add_subparsers(dest="command"))
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help() -> None:
    commands = _subparsers(_parser())
    assert set(commands) == {"bench", "support", "study", "sensitivity"}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"qz {name} {action.option_strings or action.dest} has no help"
        if name in ("bench", "support"):
            assert TOY_TASK.name in parser.format_help()  # --task lists the installed tasks


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", TINY, "--rounds", "0"], "--rounds must be at least 1; got 0"),
        (["bench", TINY, "--warmup", "-1"], "--warmup must be at least 0"),
        (["bench", TINY, "--budget", "0"], "--budget must be a positive number"),
        (["bench", TINY, "--no-ort", "--ort-quantize"], "--ort-quantize needs onnxruntime"),
        (["bench", "--task", "no_such_task"], "Invalid task 'no_such_task'"),
        (["bench", "qz_test_tinynte"], "Did you mean 'qz_test_tinynet'"),
        (["support", TINY, "--engines", "x68"], "Invalid engine 'x68'"),
        (["support", TINY, "--opset", "9"], "--opset must be at least 10"),
    ],
)
def test_bad_values_are_one_line_errors(argv: list[str], message: str, tmp_path) -> None:
    args = _parser().parse_args([*argv, "--out", str(tmp_path / "out")])
    with pytest.raises(QzError, match=message) as info:
        args.func(args)
    assert "\n" not in str(info.value)


def test_outputs_are_checked_before_any_work(tmp_path) -> None:
    parser = _parser()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    args = parser.parse_args(["support", TINY, "--out", str(a_file)])
    with pytest.raises(QzError, match="is a file; give a folder"):
        args.func(args)
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    args = parser.parse_args(["bench", TINY, "--out", str(tmp_path / "o"), "--readme", str(readme)])
    with pytest.raises(QzError, match="'<!-- bench-table:start -->' is missing"):
        args.func(args)
    assert not (tmp_path / "o").exists()


def test_input_size_format() -> None:
    parser = _parser()
    assert parser.parse_args(["bench", "--input-size", "320x256"]).input_size == (320, 256)
    assert parser.parse_args(["bench", "--input-size", "224"]).input_size == (224, 224)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--input-size", "big"])


_PROBE = """
import json, sys
heavy = {heavy!r}
found = lambda: sorted(m for m in heavy if m in sys.modules)
import qz_core
report = {{"import": found()}}
import qz_core.tools.cli
report["tools.cli"] = found()
try:
    qz_core.list_models()
    report["list_models"] = found()
except Exception as exc:
    report["error"] = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps(report))
"""


def test_import_and_list_models_stay_light() -> None:
    """``import qz_core`` and ``qz_core.list_models()`` import none of matplotlib, pycocotools, ultralytics."""
    code = _PROBE.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["import"] == [] and report["tools.cli"] == [], report
    if "error" in report:
        pytest.skip(f"an installed task package does not import yet: {report['error']}")
    assert report["list_models"] == [], report
