"""The benchmark suite, the support command and the README block rewriter, on a tiny toy model."""

from __future__ import annotations

import argparse
import csv
import json
from typing import Any

import pytest
import torch
from torch import nn

from qz_core import ModelSpec, QzError, define_model, get_model_spec
from qz_core.measure import Latency, compare_latency
from qz_core.tools.bench import (
    BenchRow,
    bench_markdown,
    bench_summary_markdown,
    read_bench_json,
    run_benchmark,
    torchvision_int8,
    write_bench_outputs,
)
from qz_core.tools.cli import add_tool_commands
from qz_core.tools.common import select_models
from qz_core.tools.ort_tools import ORT_OWN, ort_op_profile, ort_quantize
from qz_core.tools.readme import replace_block, update_readme_block
from qz_core.tools.support import (
    SupportResult,
    read_support_json,
    run_support,
    support_markdown,
    write_support_outputs,
)

from conftest import TOY_TASK, QuantizableTinyNet

TINY = "qz_test_bench_tinynet"
BROKEN = "qz_test_bench_broken"


def _broken(context: Any, kwargs: dict[str, Any]) -> None:
    if context.quantize:
        raise RuntimeError("deliberately broken in quantize mode")


def _define_once(name: str, **fields: Any) -> None:
    try:
        get_model_spec(name)
    except QzError:
        # A target no model can reach, so the miss path (profiles, notes) runs on every bench of the toy.
        spec = ModelSpec(
            name=name,
            task=TOY_TASK.name,
            family="qz_test",
            make_model=QuantizableTinyNet,
            input_size=(32, 32),
            deployed_ratio_target=0.0,
            **fields,
        )
        define_model(spec)


_define_once(TINY)
_define_once(BROKEN, adjust_kwargs=_broken)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qz")
    add_tool_commands(parser.add_subparsers(dest="command"))
    return parser


def _bench_parser() -> argparse.ArgumentParser:
    """``qz bench`` alone (``qz_core.tools.bench.cli``)."""
    from qz_core.tools.bench.cli import add_bench_command

    parser = argparse.ArgumentParser(prog="qz")
    add_bench_command(parser.add_subparsers(dest="command"), [TOY_TASK.name])
    return parser


@pytest.fixture(scope="module")
def bench_rows() -> list[BenchRow]:
    return run_benchmark([TINY, BROKEN], rounds=3, warmup=1, calib_batches=2, ort_quantize=True, progress=False)


def test_run_benchmark_times_every_runner(bench_rows: list[BenchRow]) -> None:
    tiny = bench_rows[0]
    assert [r.model for r in bench_rows] == [TINY, BROKEN]
    assert tiny.error is None, tiny.error
    assert set(tiny.latency) == {"fp32", "int8", "ort_fp32", "ort_int8", *ORT_OWN}, tiny.notes
    assert all(lat.runs == 3 and lat.p10_ms <= lat.median_ms <= lat.p90_ms for lat in tiny.latency.values())
    assert tiny.eager_ratio == pytest.approx(tiny.ms("int8") / tiny.ms("fp32"))
    best = min(tiny.ms("int8"), tiny.ms("ort_int8"))
    assert tiny.deployed_ratio == pytest.approx(best / tiny.ms("fp32"))
    assert tiny.int8_mb < tiny.fp32_mb and tiny.fp32_onnx_mb > 0 and tiny.int8_onnx_mb > 0
    assert 0 < tiny.start_rss_mb <= tiny.peak_rss_mb and tiny.float_islands == 0
    assert (tiny.family, tiny.input_size, tiny.batch_size) == ("qz_test", (32, 32), 1)


def test_a_miss_is_profiled_and_listed(bench_rows: list[BenchRow]) -> None:
    tiny = bench_rows[0]
    assert tiny.target == 0.0 and tiny.meets_target is False
    assert set(tiny.hotspots) == {"INT8 eager", "ORT INT8"}, tiny.notes
    assert "quantized::conv2d" in tiny.hotspots["INT8 eager"]
    assert "QLinearConv 3x3" in tiny.hotspots["ORT INT8"]
    markdown = bench_markdown(bench_rows)
    miss = next(ln for ln in markdown.splitlines() if ln.startswith(f"- **{TINY}**: deployed ratio"))
    assert f"> target 0.00. INT8 eager: {tiny.hotspots['INT8 eager']}; ORT INT8: " in miss
    assert f"| {TINY} |" in markdown and "| 0.00 | **N** |" in markdown


def test_ort_op_profile_tells_convolution_kinds_apart(tmp_path) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 16, 3, groups=4)
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), input_names=["input"], dynamo=False)
    shares = ort_op_profile(tmp_path / "m.onnx", x, runs=3, warmup=1)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert list(shares.values()) == sorted(shares.values(), reverse=True)
    kinds = {k.split(" ", 1)[1] for k in shares if "Conv" in k}
    assert {"3x3", "1x1", "depthwise 3x3", "grouped 3x3, 4 ch/group"} <= kinds, shares


def test_slower_than_torchvision_only_beyond_noise() -> None:
    row = BenchRow("m", latency={"int8": Latency(10.0, 9.0, 11.0, 5), "tv_int8": Latency(9.5, 9.2, 10.0, 5)})
    assert row.slower_than_torchvision is False  # overlapping spreads: noise
    row.latency["int8"] = Latency(12.0, 11.0, 13.0, 5)
    assert row.slower_than_torchvision is True
    assert "slower than torchvision's 9.50 ms" in bench_markdown([row])
    assert BenchRow("m").slower_than_torchvision is None


def test_ort_own_quantization_is_timed_with_the_rest(bench_rows: list[BenchRow]) -> None:
    tiny = bench_rows[0]
    assert all(tiny.ms(k) > 0 and tiny.latency[k].runs == 3 for k in ORT_OWN)
    assert tiny.ort_u8s8_key in ("ort_u8s8_qdq", "ort_u8s8_qop")
    assert tiny.ms(tiny.ort_u8s8_key) == min(tiny.ms("ort_u8s8_qdq"), tiny.ms("ort_u8s8_qop"))
    assert tiny.ort_u8s8_format == {"ort_u8s8_qdq": "QDQ", "ort_u8s8_qop": "QOperator"}[tiny.ort_u8s8_key]
    assert tiny.ort_own_best_ms == min(tiny.ms(k) for k in ORT_OWN)
    assert tiny.ort_own_ratio == pytest.approx(tiny.ms("ort_int8") / tiny.ort_own_best_ms)
    record = tiny.as_dict()
    assert record["ort_s8s8_ms"] > 0 and record["ort_u8s8_ms"] == tiny.ms(tiny.ort_u8s8_key)
    assert record["qz_as_fast_as_ort_own"] == (tiny.ort_own_ratio <= 1)


def test_ort_quantize_writes_the_configured_types(tmp_path) -> None:
    import onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    fp32 = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(fp32), input_names=["input"], dynamo=False)
    batches = [torch.randn(2, 3, 8, 8)]
    ops = {}
    for key in ORT_OWN:
        graph = onnx.load(str(ort_quantize(fp32, tmp_path / f"{key}.onnx", batches, key))).graph
        ops[key] = {n.op_type for n in graph.node}
        scales = [t for t in graph.initializer if "scale" in t.name and len(t.dims) == 1 and t.dims[0] == 4]
        assert bool(scales) == ORT_OWN[key][2], key  # per-channel weight scales only where configured
        quant_input = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        zero_point = next(t for t in graph.initializer if t.name == quant_input.input[2])
        assert zero_point.data_type == getattr(onnx.TensorProto, ORT_OWN[key][0].removeprefix("Q").upper()), key
    assert "QuantizeLinear" in ops["ort_s8s8"] and "QLinearConv" in ops["ort_u8s8_qop"]
    with pytest.raises(QzError, match="Invalid onnxruntime quantization 'u8u8'"):
        ort_quantize(fp32, tmp_path / "x.onnx", batches, "u8u8")
    with pytest.raises(QzError, match="ort_quantize needs ort=True"):
        run_benchmark([TINY], ort=False, ort_quantize=True, progress=False)


def test_failing_model_is_an_error_row_and_fp32_is_still_timed(bench_rows: list[BenchRow]) -> None:
    broken = bench_rows[1]
    assert "deliberately broken" in broken.error
    assert "int8" not in broken.latency and broken.ms("fp32") > 0
    assert broken.eager_ratio is None and broken.deployed_ratio is None
    assert broken.ort_own_best_ms > 0 and broken.ort_own_ratio is None  # ORT's own INT8 needs only the FP32 file


def test_unknown_model_is_an_error_row() -> None:
    rows = run_benchmark(["qz_no_such_model"], rounds=1, warmup=0, ort=False, progress=False)
    assert "Invalid model name" in rows[0].error and rows[0].latency == {}


def test_bench_outputs_written(bench_rows: list[BenchRow], tmp_path) -> None:
    paths = write_bench_outputs(bench_rows, tmp_path, {"threads": 1, "backend": "x86", "rounds": 3})
    with paths["csv"].open() as f:
        records = list(csv.DictReader(f))
    assert [r["model"] for r in records] == [TINY, BROKEN]
    assert float(records[0]["eager_ratio"]) == pytest.approx(bench_rows[0].eager_ratio)
    assert "deliberately broken" in records[1]["error"]
    payload = json.loads(paths["json"].read_text())
    assert payload["meta"]["threads"] == 1 and payload["rows"][0]["int8_onnx_mb"] > 0
    markdown = paths["markdown"].read_text()
    assert "| Model | before (ms) | after (ms) | ratio | ORT FP32 (ms) | ORT INT8 (ms) |" in markdown
    assert "| ORT own S8S8 (ms) | ORT own U8S8 (ms) | U8S8 format | qz / ORT own | qz as fast |" in markdown
    assert float(records[0]["ort_u8s8_qop_ms"]) > 0 and records[0]["ort_u8s8_format"] in ("QDQ", "QOperator")
    assert set(ORT_OWN) <= set(payload["runners"])
    assert f"| {BROKEN} |" in markdown and "error" in markdown
    for key in ("ratio_png", "size_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_markdown_values() -> None:
    row = BenchRow("m", latency={"fp32": Latency(10.0, 9.0, 11.0, 5), "int8": Latency(4.0, 3.5, 4.5, 5)})
    row.latency["ort_int8"] = Latency(2.5, 2.0, 3.0, 5)
    line = next(ln for ln in bench_markdown([row]).splitlines() if ln.startswith("| m |"))
    assert line.startswith("| m | 10.00 | 4.00 | 0.40 | - | 2.50 | 0.25 | 0.25 | 1.00 | Y |")
    row.target = 0.2
    missed = bench_markdown([row])
    assert "| 0.25 | 0.25 | 0.20 | **N** |" in missed and "deployed ratio 0.25 > target 0.20" in missed
    assert "ORT own" not in bench_markdown([row])
    row.latency |= {"ort_s8s8": Latency(6.0, 5, 7, 5), "ort_u8s8_qdq": Latency(2.4, 2, 3, 5)}
    row.latency["ort_u8s8_qop"] = Latency(2.0, 1.5, 2.5, 5)
    lines = bench_markdown([row]).splitlines()
    assert lines[0].endswith(
        "| ORT own S8S8 (ms) | ORT own U8S8 (ms) | U8S8 format | qz / ORT own | qz as fast | FP32 (MB) | INT8 (MB) "
        "| peak RSS (MB) |"
    )
    line = next(ln for ln in lines if ln.startswith("| m |"))
    assert "| 0.25 | 0.25 | 0.20 | **N** | 6.00 | 2.00 | QOperator | 1.25 | N |" in line


def test_int8_no_faster_than_the_fastest_fp32_runtime_is_flagged() -> None:
    row = BenchRow("m", target=0.5, latency={"fp32": Latency(30.0, 29, 31, 5), "int8": Latency(24.0, 23, 25, 5)})
    row.latency |= {"ort_fp32": Latency(13.0, 12, 14, 5), "ort_int8": Latency(10.0, 9, 11, 5)}
    row.latency |= {"ov_fp32": Latency(12.5, 12, 13, 5), "ov_int8": Latency(16.0, 15, 17, 5)}
    assert row.deployed_ratio == pytest.approx(10.0 / 30.0) and row.meets_target  # against FP32 eager: fine
    assert row.int8_vs_fastest_fp32 == pytest.approx(10.0 / 12.5) and row.worth_deploying is False
    text = bench_markdown([row])
    assert "| 0.33 | 0.80 **!** | 0.50 | Y |" in text
    assert "its fastest INT8 takes 0.80 of the fastest FP32 runtime's time" in text
    row.ort_partial = True  # runtimes that ran only part of the model compare eager with eager
    assert row.int8_vs_fastest_fp32 == pytest.approx(24.0 / 30.0)


def test_torchvision_int8_runs_with_the_same_weights() -> None:
    from torchvision.models import resnet18

    float_model = resnet18(num_classes=10).eval()
    batches = [torch.randn(2, 3, 64, 64)]
    int8 = torchvision_int8("resnet18", float_model.state_dict(), batches, "qnnpack", num_classes=10)
    assert type(int8.fc).__module__.startswith("torch.ao.nn.quantized")
    assert int8(batches[0]).shape == (2, 10)
    with pytest.raises(QzError, match="Invalid torchvision quantizable model 'vgg16'"):
        torchvision_int8("vgg16", {}, batches, "qnnpack")


def test_support_on_the_toy(tmp_path) -> None:
    results = run_support([TINY, BROKEN], engines=["qnnpack"], progress=False)
    tiny, broken = results
    assert tiny.ptq and tiny.qat and tiny.engines == {"qnnpack": True} and tiny.int8_onnx
    assert not broken.ptq and "ptq[qnnpack]" in broken.errors
    lines = support_markdown(results).splitlines()
    assert lines[0] == (
        "| Model | Quantization Support (PTQ, QAT) | qnnpack | FP32 ONNX | INT8 ONNX | ONNX opset | float islands |"
    )
    assert lines[2] == f"| {TINY} | PTQ, QAT | Y | Y | Y | 13 | 0 |"
    assert lines[3] == f"| {BROKEN} | N | N | Y | N | 13 | - |"
    assert any("deliberately broken" in ln for ln in lines)


def test_support_command_writes_files_and_readme(tmp_path, capsys) -> None:
    parser = _parser()
    readme = tmp_path / "README.md"
    readme.write_text("# t\n<!-- support-table:start -->\nold\n<!-- support-table:end -->\ntail\n")
    args = parser.parse_args(["support", TINY, "--engines", "qnnpack", "--out", str(tmp_path / "s")])
    args.readme = str(readme)
    assert args.func(args) == 0
    assert json.loads((tmp_path / "s" / "support.json").read_text())["rows"][0]["name"] == TINY
    text = readme.read_text()
    assert "old" not in text and f"| {TINY} | PTQ, QAT |" in text and text.endswith("tail\n")


def test_readme_block_round_trip(tmp_path) -> None:
    text = "intro\n<!-- bench-table:start -->\n| a |\n<!-- bench-table:end -->\noutro\n"
    once = replace_block(text, "bench-table", "| b |\n")
    assert once == "intro\n<!-- bench-table:start -->\n| b |\n<!-- bench-table:end -->\noutro\n"
    assert replace_block(once, "bench-table", "| a |") == text
    path = tmp_path / "README.md"
    path.write_text(text)
    assert update_readme_block(path, "bench-table", "| b |") is True
    assert update_readme_block(path, "bench-table", "| b |") is False
    assert path.read_text() == once


def test_readme_block_errors(tmp_path) -> None:
    with pytest.raises(QzError, match="'<!-- support-table:start -->' is missing from README"):
        replace_block("no markers", "support-table", "x", source="README")
    with pytest.raises(QzError, match="comes before"):
        replace_block("<!-- t:end -->\n<!-- t:start -->", "t", "x")
    with pytest.raises(QzError, match="appears 2 times"):
        replace_block("<!-- t:start --><!-- t:start --><!-- t:end -->", "t", "x")
    with pytest.raises(QzError, match="does not exist"):
        update_readme_block(tmp_path / "missing.md", "t", "x")


def test_select_models() -> None:
    assert select_models(["qz_test_bench_*"]) == [BROKEN, TINY]
    assert select_models([TINY, "qz_test_bench_*"]) == [TINY, BROKEN]
    assert TINY in select_models(task=TOY_TASK.name)
    with pytest.raises(QzError, match="Did you mean 'qz_test_bench_tinynet'"):
        select_models(["qz_test_bench_tinynte"])
    with pytest.raises(QzError, match="--task TASK or --all"):
        select_models([])
    with pytest.raises(QzError, match="No registered model matches"):
        select_models(["zzz_nothing_*"])
    with pytest.raises(QzError, match="Invalid task 'detect'"):
        select_models(task="detect")


def test_summary_by_family_counts_targets_met() -> None:
    def row(model: str, family: str, int8: float, target: float) -> BenchRow:
        r = BenchRow(model, task="classification", family=family, target=target)
        r.latency = {"fp32": Latency(10.0, 9.0, 11.0, 5), "int8": Latency(int8, int8, int8, 5)}
        return r

    rows = [row("a1", "a", 2.0, 0.3), row("a2", "a", 4.0, 0.3), row("a3", "a", 2.5, 0.3), row("b1", "b", 1.0, 0.18)]
    lines = bench_summary_markdown(rows).splitlines()
    assert lines[2] == "| classification | a | 3 | 0.20 / 0.25 / 0.40 | 0.20 / 0.25 / 0.40 | 0.30 | 2/3 | - | a2 |"
    assert lines[3] == "| classification | b | 1 | 0.10 | 0.10 | 0.18 | 1/1 | - | - |"
    full = bench_markdown(rows, collapse=True)
    assert full.index("By family") < full.index("<details><summary>Every model</summary>") < full.index("| a1 |")
    assert "- **a2**: deployed ratio 0.40 > target 0.30." in full


def test_saved_results_read_back_and_re_render(bench_rows: list[BenchRow], tmp_path, capsys) -> None:
    paths = write_bench_outputs(bench_rows, tmp_path / "run", {"threads": 1, "rounds": 3})
    rows, meta = read_bench_json(paths["json"])
    assert meta["threads"] == 1 and [r.model for r in rows] == [TINY, BROKEN]
    for got, want in zip(rows, bench_rows, strict=True):
        assert got.latency == want.latency and got.notes == want.notes and got.hotspots == want.hotspots
        assert (got.target, got.error, got.int8_mb, got.input_size) == (want.target, want.error, want.int8_mb, (32, 32))
    assert bench_markdown(rows, meta) == bench_markdown(bench_rows, meta)

    parser = _bench_parser()
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-table:start -->\n<!-- bench-table:end -->\n")
    later = BenchRow(TINY, latency={"fp32": Latency(8.0, 8.0, 8.0, 3), "int8": Latency(2.0, 2.0, 2.0, 3)})
    second = write_bench_outputs([later], tmp_path / "second", {"threads": 2})["json"]
    merge = ["bench", "--from", str(paths["json"]), str(second), "--out", str(tmp_path / "merged")]
    args = parser.parse_args([*merge, "--allow-busy"])  # rows timed here may be flagged busy: other jobs share CPUs
    args.readme = str(readme)
    assert args.func(args) == 0
    merged, _ = read_bench_json(tmp_path / "merged" / "bench.json")
    assert [r.model for r in merged] == [TINY, BROKEN] and merged[0].ms("int8") == 2.0  # the later run wins
    assert "<details><summary>Every model</summary>" in readme.read_text()
    with pytest.raises(QzError, match="No bench result at"):
        read_bench_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(QzError, match="is not a qz bench result"):
        read_bench_json(tmp_path / "bad.json")
    args = parser.parse_args(["bench", TINY, "--from", str(second)])
    with pytest.raises(QzError, match="--from re-renders saved results"):
        args.func(args)


def test_busy_machine_is_flagged() -> None:
    row = BenchRow("m", latency={"fp32": Latency(10.0, 9.0, 11.0, 5)})
    quiet = {"threads": 1, "load_average": [0.1, 0.1, 0.1], "load_average_end": [1.2, 1.0, 0.5]}
    assert "Busy machine" not in bench_markdown([row], quiet)
    busy = quiet | {"load_average_end": [3.9, 3.0, 2.0]}
    assert "1-minute load average 0.1 before and 3.9 after the run" in bench_markdown([row], busy)


def test_budget_cuts_rounds_of_slow_runners_only() -> None:
    import time

    def slow() -> None:
        time.sleep(0.02)

    timed = compare_latency({"a": slow, "b": slow}, warmup=1, rounds=20, budget_s=0.2)
    assert timed["a"].runs == timed["b"].runs == 5  # 0.2 s / 0.04 s a round, but never below 5
    assert compare_latency({"a": slow}, warmup=1, rounds=3, budget_s=0.01)["a"].runs == 3  # never above rounds
    assert compare_latency({"a": lambda: None}, warmup=1, rounds=7, budget_s=0.2)["a"].runs == 7


def test_rows_are_handed_over_as_they_come(tmp_path) -> None:
    seen = []
    rows = run_benchmark(
        [TINY, "qz_no_such_model"], rounds=1, warmup=0, ort=False, progress=False, on_row=lambda r: seen.append(len(r))
    )
    assert seen == [1, 2] and rows[1].error
    meta = {"threads": 1, "rounds": 20, "budget_s": 30.0, "partial": 1}
    text = bench_markdown(rows[:1], meta)
    assert "median of up to 20 (fewer, at least 5, past 30 s a model" in text and "1 model(s) so far" in text


def test_support_results_merge_from_saved_files(tmp_path) -> None:
    first = [SupportResult("a", "classification", ptq=True), SupportResult("b", "detection", errors={"qat": "x"})]
    fixed = [SupportResult("b", "detection", ptq=True, qat=True, float_islands=1)]
    one = write_support_outputs(first, tmp_path / "one")["json"]
    two = write_support_outputs(fixed, tmp_path / "two")["json"]
    rows, _ = read_support_json(one)
    assert rows == first
    parser = _parser()
    readme = tmp_path / "README.md"
    readme.write_text("<!-- support-table:start -->\n<!-- support-table:end -->\n")
    args = parser.parse_args(["support", "--from", str(one), str(two), "--out", str(tmp_path / "m")])
    args.readme = str(readme)
    assert args.func(args) == 0
    merged, _ = read_support_json(tmp_path / "m" / "support.json")
    assert [r.name for r in merged] == ["a", "b"] and merged[1] == fixed[0]  # replaced where it stood
    assert "| b | PTQ, QAT |" in readme.read_text()
    with pytest.raises(QzError, match="is not a qz support result"):
        read_support_json(tmp_path / "one" / "support.md")


def test_torchvision_comparison_is_by_name_from_torchvision_itself() -> None:
    from qz_core.tools.bench import torchvision_quantizable

    names = torchvision_quantizable()
    assert {"resnet18", "mobilenet_v3_large", "shufflenet_v2_x1_0"} <= set(names) and "resnet" not in names
    (row,) = run_benchmark([TINY], rounds=1, warmup=0, ort=False, compare_torchvision=True, progress=False)
    assert row.notes["tv_int8"] == "torchvision has no quantizable model of this name" and "tv_int8" not in row.latency


def _denormals_flushed() -> bool:
    return bool((torch.tensor([1e-39]) * 1.0).item() == 0.0)


def test_timing_puts_threads_and_denormal_handling_back() -> None:
    from qz_core.measure import measure_latency

    threads = torch.get_num_threads()
    seen = []
    compare_latency({"probe": lambda: seen.append((torch.get_num_threads(), _denormals_flushed()))}, threads=1)
    assert seen and all(state == (1, True) for state in seen)  # timed with one thread, denormals flushed
    assert torch.get_num_threads() == threads and not _denormals_flushed()
    measure_latency(nn.Linear(2, 2), torch.ones(1, 2), threads=1, warmup=0, rounds=1)
    assert torch.get_num_threads() == threads and not _denormals_flushed()


def _timed_row(model: str, int8: float = 4.0, **fields: Any) -> BenchRow:
    latency = {"fp32": Latency(10.0, 9.0, 11.0, 3), "int8": Latency(int8, int8, int8, 3)}
    return BenchRow(model, latency=latency, **fields)


def test_busy_is_read_from_other_processes_cpu_while_timing() -> None:
    from qz_core.tools.bench.results import is_busy
    from qz_core.tools.bench.run import CpuSample, cpu_sample, other_cores

    before, after = CpuSample(10.0, 100.0, 5.0), CpuSample(12.0, 104.0, 7.0)
    assert other_cores(before, after) == pytest.approx(1.0)  # 4 busy CPU seconds, 2 of them ours, over 2 s
    assert other_cores(before, CpuSample(12.0, 101.0, 7.0)) == 0.0 and other_cores(None, after) is None
    assert is_busy(0.1, 0.6, threads=1) and not is_busy(9.0, 0.2, threads=1)  # other processes' cores decide
    assert is_busy(2.0, None, threads=1) and not is_busy(1.2, None, threads=1)  # else the load average
    sample = cpu_sample()
    assert sample is None or sample.machine_busy_s > 0
    (row,) = run_benchmark([TINY], rounds=1, warmup=0, ort=False, progress=False)
    assert row.load_average is not None and row.other_cores is not None and row.other_cores >= 0
    assert row.busy == is_busy(row.load_average, row.other_cores, threads=1)


def test_readme_refuses_busy_rows_unless_allowed(tmp_path) -> None:
    rows = [_timed_row("quiet"), _timed_row("loaded", busy=True, other_cores=1.3, load_average=2.5)]
    saved = write_bench_outputs(rows, tmp_path / "run", {"threads": 1}, plots=False)["json"]
    assert "- **loaded**: 1.30 other cores, load 2.50" in bench_markdown(rows)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\n")
    parser = _bench_parser()
    argv = ["bench", "--from", str(saved), "--out", str(tmp_path / "out"), "--readme", str(readme)]
    args = parser.parse_args(argv)
    with pytest.raises(QzError, match=r"^Not writing the README block: 1 row\(s\) timed on a busy machine \(loaded\)"):
        args.func(args)
    assert "old" in readme.read_text()
    args = parser.parse_args([*argv, "--allow-busy"])
    assert args.func(args) == 0 and "| loaded |" in readme.read_text()
    rows[1].busy = False
    quiet = write_bench_outputs(rows, tmp_path / "quiet", {"threads": 1}, plots=False)["json"]
    args = parser.parse_args(["bench", "--from", str(quiet), "--out", str(tmp_path / "o2"), "--readme", str(readme)])
    assert args.func(args) == 0


def test_retime_busy_times_only_busy_rows_and_merges(tmp_path, capsys) -> None:
    from qz_core.tools.bench.cli import run_settings

    parser = _bench_parser()
    settings = run_settings(parser.parse_args(["bench", "--rounds", "2", "--warmup", "0", "--no-ort"]), "x86")
    rows = [_timed_row(TINY, int8=999.0, busy=True), _timed_row("kept", int8=3.0)]
    saved = write_bench_outputs(rows, tmp_path / "run", {"threads": 1, "settings": settings}, plots=False)["json"]
    args = parser.parse_args(["bench", "--from", str(saved), "--retime-busy", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    merged, meta = read_bench_json(tmp_path / "out" / "bench.json")
    assert [r.model for r in merged] == [TINY, "kept"] and merged[1].latency == rows[1].latency
    assert merged[0].latency["int8"].runs == 2 and merged[0].ms("int8") != 999.0 and merged[0].other_cores is not None
    assert meta["retimed"][0]["models"] == [TINY] and f"Re-timing 1 busy row(s): {TINY}" in capsys.readouterr().out
    with pytest.raises(QzError, match="--retime-busy re-times the busy rows of saved results"):
        args = parser.parse_args(["bench", TINY, "--retime-busy", "--out", str(tmp_path / "x")])
        args.func(args)
    old = write_bench_outputs(rows, tmp_path / "old", {"threads": 1}, plots=False)["json"]
    args = parser.parse_args(["bench", "--from", str(old), "--retime-busy", "--out", str(tmp_path / "y")])
    with pytest.raises(QzError, match="do not record their run settings"):
        args.func(args)


def test_each_row_is_read_against_its_spec_target_and_the_targets_are_shown() -> None:
    row = _timed_row("r", int8=2.0, target=0.15)
    row.family = "tiny"
    other = _timed_row("s", int8=1.0, target=0.4)
    other.family = "wide"
    text = bench_markdown([row, other], {"threads": 1, "rounds": 3})
    assert "deployed ratio (set by each model's task package) at most tiny 0.15; wide 0.40." in text
    assert "INT8 / fastest FP32 at most 0.70" in text and "| 0.20 | 0.20 | 0.15 | **N** |" in text


def test_ratio_plot_has_one_axis_per_task_and_a_bounded_size(tmp_path) -> None:
    from PIL import Image

    from qz_core.tools.bench.render import PLOT_DPI, PLOT_MAX_HEIGHT_IN, PLOT_WIDTH_IN, plot_ratios, ratio_figure

    tasks = {"classification": ("resnet", "mobilenet"), "detection": ("yolo",), "segmentation": ("fcn",)}
    rows = [
        _timed_row(f"{family}{i}", int8=1.0 + i % 15, task=task, family=family)
        for task, families in tasks.items()
        for family in families
        for i in range(40)
    ]
    rows.append(BenchRow("unmeasured", task="other"))
    figure = ratio_figure(rows)
    assert [ax.get_title(loc="left") for ax in figure.axes] == list(tasks)
    assert len(figure.axes[0].get_yticks()) == 80
    path = plot_ratios(rows, tmp_path / "bench_ratio.png")
    width, height = Image.open(path).size
    assert width <= PLOT_WIDTH_IN * PLOT_DPI + 1 and height <= PLOT_MAX_HEIGHT_IN * PLOT_DPI + 1
    assert [p.name for p in tmp_path.iterdir()] == ["bench_ratio.png"]  # no temporary file left beside it
