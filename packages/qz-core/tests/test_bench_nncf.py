"""``qz bench --anchors nncf``: NNCF's INT8 of the same float model, timed in OpenVINO beside qz's."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator

import pytest

from qz_core import ModelSpec, QzError, define_model, get_model_spec
from qz_core.measure import Latency
from qz_core.tools.bench import BenchRow, bench_markdown, read_bench_json, run_benchmark, write_bench_outputs
from qz_core.tools.bench import run as bench_run
from qz_core.tools.bench.cli import add_bench_command
from qz_core.tools.bench.render import nncf_summary

from conftest import TINY, TOY_TASK, QuantizableTinyNet

NNCF_FAILS = "qz_test_nncf_fails"


def _define_failing_twin() -> None:
    try:
        get_model_spec(NNCF_FAILS)
    except QzError:
        define_model(ModelSpec(NNCF_FAILS, TOY_TASK.name, family="tiny", make_model=QuantizableTinyNet))


_define_failing_twin()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qz")
    add_bench_command(parser.add_subparsers(dest="command"), [TOY_TASK.name])
    return parser


@pytest.fixture(scope="module")
def anchored_rows() -> Iterator[list[BenchRow]]:
    """TINY with NNCF's anchor, and a twin whose NNCF step fails (one run, two rounds)."""
    real = bench_run.nncf_openvino_ir

    def fails_on_the_twin(model, batches, example_input, xml_path):
        if NNCF_FAILS in str(xml_path):
            raise RuntimeError("NNCF could not trace the model")
        return real(model, batches, example_input, xml_path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_run, "nncf_openvino_ir", fails_on_the_twin)
        yield run_benchmark([TINY, NNCF_FAILS], anchors=["nncf"], rounds=2, warmup=1, calib_batches=2, progress=False)


def test_nncf_anchor_is_timed_in_openvino_with_the_rest(anchored_rows: list[BenchRow]) -> None:
    tiny = anchored_rows[0]
    assert tiny.error is None and "nncf_int8" not in tiny.notes, tiny.notes
    lat = tiny.latency["nncf_int8"]
    assert math.isfinite(lat.median_ms) and lat.median_ms > 0 and lat.runs == 2
    assert {"ov_fp32", "ov_int8"} <= set(tiny.latency)  # the anchor turns OpenVINO on for qz's INT8 too
    assert any(p in tiny.nncf_int8_precision for p in ("u8", "i8")), tiny.nncf_int8_precision
    qz = min(tiny.ms("int8"), tiny.ms("ort_int8"), tiny.ms("ov_int8"))
    assert tiny.qz_int8_ms == qz and tiny.nncf_ratio == pytest.approx(qz / tiny.ms("nncf_int8"))


def test_nncf_failure_is_the_rows_note_and_the_run_goes_on(anchored_rows: list[BenchRow]) -> None:
    twin = anchored_rows[1]
    assert twin.error is None and twin.notes["nncf_int8"].startswith("RuntimeError: NNCF could not trace the model")
    assert "nncf_int8" not in twin.latency and {"int8", "ov_int8"} <= set(twin.latency)
    assert twin.nncf_ratio is None


def test_nncf_column_summary_and_saved_results(anchored_rows: list[BenchRow], tmp_path) -> None:
    tiny, twin = anchored_rows
    markdown = bench_markdown(anchored_rows)
    header = next(ln for ln in markdown.splitlines() if ln.startswith("| Model |"))
    assert "| OpenVINO INT8 layers | NNCF INT8 (ms) | qz / NNCF | deployed ratio |" in header
    twin_line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {NNCF_FAILS} |"))
    assert "| failed (see notes) | - |" in twin_line
    assert f"- **{NNCF_FAILS}**: nncf_int8: RuntimeError: NNCF could not trace the model" in markdown
    assert markdown.startswith("qz / NNCF (qz's fastest INT8 over NNCF's INT8 in OpenVINO): geometric mean ")
    assert f"{tiny.nncf_ratio:.2f} over 1 model(s)" in markdown
    paths = write_bench_outputs(anchored_rows, tmp_path, {"threads": 1})
    rows, _ = read_bench_json(paths["json"])
    assert rows[0].latency["nncf_int8"] == tiny.latency["nncf_int8"]
    assert rows[0].nncf_int8_precision == tiny.nncf_int8_precision and rows[1].notes == twin.notes


def test_nncf_summary_geometric_mean_and_slower_models() -> None:
    def row(name: str, qz: float, nncf: float) -> BenchRow:
        return BenchRow(name, latency={"int8": Latency(qz, qz, qz, 3), "nncf_int8": Latency(nncf, nncf, nncf, 3)})

    rows = [row("a", 2.0, 4.0), row("b", 8.0, 4.0), row("c", 1.0, 1.0), BenchRow("d")]
    line = nncf_summary(rows)
    assert "geometric mean 1.00 over 3 model(s); qz slower on: b (2.00)." in line  # (0.5 * 2 * 1) ** (1/3)
    assert "qz slower on: none" in nncf_summary(rows[:1])
    partial = BenchRow("det", ort_partial=True, latency={"int8": Latency(1.0, 1, 1, 3)})
    partial.latency |= {"ov_int8": Latency(3.0, 3, 3, 3), "nncf_int8": Latency(2.0, 2, 2, 3)}
    assert partial.qz_int8_ms == 3.0 and partial.nncf_ratio == 1.5  # same work as NNCF's: the export module only


def test_missing_nncf_is_one_line_before_any_work(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf now raises ImportError
    with pytest.raises(QzError, match=r"^NNCF is not installed: pip install 'qz-core\[bench\]'"):
        run_benchmark([TINY], anchors=["nncf"], progress=False)
    out = tmp_path / "out"
    args = _parser().parse_args(["bench", TINY, "--anchors", "nncf", "--out", str(out)])
    with pytest.raises(QzError, match=r"pip install 'qz-core\[bench\]'"):
        args.func(args)
    assert not out.exists()
    args = _parser().parse_args(["bench", TINY, "--anchors", "nncf,ppq", "--out", str(out)])
    with pytest.raises(QzError, match="Invalid anchor 'ppq'"):
        args.func(args)
