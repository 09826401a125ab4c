"""``qz study``, ``qz sensitivity`` and mixed precision on qz-core's toy model and task."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import qz_core
from qz_core import QzError
from qz_core.cli import main
from qz_core.mixed_precision import (
    Calibration,
    LayerSensitivity,
    Scorer,
    fused_copy,
    keep_float_until,
    layer_sensitivity,
    quantizable_layers,
    rank_by_sensitivity,
)
from qz_core.tools.study import (
    RowConfig,
    StudyInputs,
    StudySession,
    make_plan,
    read_axes_file,
    run_study,
    runner,
    stage_names,
)
from qz_core.tools.study.axes import parse_sweep_option
from qz_core.tools.study.render import write_study_outputs

from conftest import TINY, TinyNet, random_batches

SENSITIVE = "block.conv"
MAX_DROP = 5.0  # top-1 points: two of the 48 validation images


def _sensitive_checkpoint(folder, images):
    """A two-class TinyNet whose block conv is wrecked by INT8 weights, and nothing else is.

    Stem channel 0 is always zero (its bias sends it below the ReLU), and the block conv weighs that channel
    by 1000 in every output channel: nothing in float, but the per-channel weight scale becomes 1000/127 and
    every other weight of the layer rounds to zero in INT8. The classifier separates the dark first half of
    ``images`` from the bright second half along the mean feature difference, with a wide margin.
    """
    torch.manual_seed(0)
    model = TinyNet(num_classes=2)
    qz_core.estimate_bn_stats(model, random_batches())
    model.stem[1].bias.data[0] = -1000.0
    model.block.conv.weight.data *= 10  # the conv path outweighs the residual one
    model.block.conv.weight.data[:, 0, 1, 1] = 1000.0
    model.eval()
    half = len(images) // 2
    with torch.no_grad():
        features = model.pool(model.block(model.stem(images))).flatten(1)
        dark, bright = features[:half].mean(0), features[half:].mean(0)
        direction, middle = bright - dark, (bright + dark) / 2
        model.fc.weight.data = torch.stack([-direction, direction]) / 2
        model.fc.bias.data = torch.stack([middle @ direction, -(middle @ direction)]) / 2
        labels = model(images).argmax(1)
    path = folder / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path, labels


def _write_images(root, images, labels=None):
    for i, image in enumerate(images):
        sub = root / (str(int(labels[i])) if labels is not None else "")
        sub.mkdir(parents=True, exist_ok=True)
        array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(array).save(sub / f"{i:03d}.png")


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory):
    """Validation folder labelled with the FP32 model's own predictions (FP32 top-1 is 100%), a calibration folder."""
    root = tmp_path_factory.mktemp("toy_study")
    generator = torch.Generator().manual_seed(1)
    images = torch.cat([torch.rand(24, 3, 32, 32, generator=generator) * 0.5 + offset for offset in (0.0, 0.5)])
    # The toy task's transform resizes to 36 and crops 32: label what the model sees.
    from qz_core.registry import get_task

    transform = get_task("qz_test_task").default_transform(qz_core.get_model_spec(TINY))
    _write_images(root / "raw", images)
    seen = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted((root / "raw").glob("*.png"))])
    checkpoint, labels = _sensitive_checkpoint(root, seen)
    assert labels.tolist() == [0] * 24 + [1] * 24
    _write_images(root / "val", images, labels)
    _write_images(root / "calib", images[:24])
    inputs = StudyInputs(
        TINY,
        str(checkpoint),
        root / "val",
        root / "calib",
        batch_size=8,
        model_kwargs={"num_classes": 2},
        latency_rounds=2,
    )
    return inputs, StudySession(inputs)


def _scorer(session):
    return Scorer(session.task, session.val, session.example, session.score_key)


def test_axes_defaults_and_stage_names(toy_study):
    _, session = toy_study
    assert stage_names(session.float_model) == ["block"]  # the stem is first: starting there is "all"
    assert stage_names(qz_core.get_model(TINY)) == ["block"]
    plan = make_plan(parse_sweep_option("fusion,start,observers,calibration"), RowConfig(), ["block"])
    assert [c.fuse_level for c in plan.sweeps["fusion"]] == ["none", "blocks", "all"]
    assert [c.quantize_from for c in plan.sweeps["start"]] == [None, "block"]
    assert len(plan.sweeps["observers"]) == 10
    assert {c.reduce_range for c in plan.sweeps["observers"]} == {True, False}
    assert [c.calib_fraction for c in plan.sweeps["calibration"]] == pytest.approx([i / 10 for i in range(1, 11)])
    # fuse=all, start=all and calibration 100% are one configuration: it runs once.
    assert len(plan.configs()) == 3 + 1 + 10 + 9


@pytest.mark.parametrize(
    ("sweep", "message"),
    [("fusion,obsevers", "Invalid sweep 'obsevers'. Did you mean 'observers'?"), ("", "No sweep named")],
)
def test_bad_sweep_names(sweep, message):
    with pytest.raises(QzError, match=message) as info:
        parse_sweep_option(sweep)
    assert "fusion, observers, start, calibration" in str(info.value) or "Valid sweeps" in str(info.value)


def test_axes_file(tmp_path):
    path = tmp_path / "axes.yaml"
    path.write_text("fusion: [none, all]\ncalibration: [10%, 0.5]\nbase: {calib_fraction: 0.5}\n")
    sweeps, base = read_axes_file(path)
    plan = make_plan(sweeps, base, ["block"])
    assert base.calib_fraction == 0.5
    assert [c.calib_fraction for c in plan.sweeps["calibration"]] == [0.1, 0.5]
    assert [(c.fuse_level, c.calib_fraction) for c in plan.sweeps["fusion"]] == [("none", 0.5), ("all", 0.5)]
    (tmp_path / "axes.json").write_text(json.dumps({"observers": [{"activation": "minmax", "weight": "histogram"}]}))
    sweeps, _ = read_axes_file(tmp_path / "axes.json")
    (config,) = make_plan(sweeps, RowConfig(), []).sweeps["observers"]
    assert (config.activation_observer, config.weight_observer) == ("minmax", "histogram")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fusion: [none, al]", "Invalid fusion value 'al'"),
        ("start: [layer9]", "Invalid start stage 'layer9'.*Valid start stages: all, block"),
        ("calibration: [0]", "fraction in \\(0, 1\\]"),
        ("observers: [{weight: perchannel}]", "Invalid weight observer 'perchannel'"),
        ("fuse: [all]", "Invalid sweep 'fuse'"),
        ("fusion: [none\n  - all", "not valid YAML"),
        ("- fusion", "must map sweep names"),
        ("fusion: []", "non-empty list"),
    ],
)
def test_bad_axes_files(tmp_path, text, message):
    path = tmp_path / "axes.yaml"
    path.write_text(text)
    with pytest.raises(QzError, match=message):
        sweeps, base = read_axes_file(path)
        make_plan(sweeps, base, ["block"])


def test_study_cli_refuses_bad_input_before_work(toy_study, tmp_path, capsys):
    inputs, _ = toy_study
    common = ["study", TINY, "--weights", inputs.weights, "--calib", str(inputs.calib), "--out", str(tmp_path / "o")]
    cases = [
        (["--data", str(inputs.val), "--sweep", "fusion,nope"], "Invalid sweep 'nope'"),
        (["--data", str(tmp_path / "missing")], "--data"),
        (["--data", str(inputs.val), "--jobs", "0"], "--jobs must be at least 1"),
    ]
    for extra, message in cases:
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["study", "no_such_net", "--data", "x", "--calib", "x", "--out", str(tmp_path)]) == 2
    assert "Invalid model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_study_rows_cache_resume_and_outputs(toy_study, tmp_path, monkeypatch):
    inputs, session = toy_study
    sweeps = {"fusion": ["none", "all"], "calibration": [0.25, 1.0]}
    plan = make_plan(sweeps, RowConfig(), stage_names(session.float_model))
    assert len(plan.configs()) == 3  # fuse=all at 100% is in both sweeps
    calls = []
    real_row = runner.StudySession.row

    def interrupted(self, config, *, timed):
        calls.append(config)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_row(self, config, timed=timed)

    monkeypatch.setattr(runner.StudySession, "row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(inputs, plan, tmp_path, progress=False, session=session)
    assert len(list((tmp_path / "rows").glob("*.json"))) == 2  # the baseline and the first row
    monkeypatch.setattr(runner.StudySession, "row", real_row)

    resumed = run_study(inputs, plan, tmp_path, progress=False, session=session)
    assert resumed.computed == 2  # the interrupted row and the one after it, not the first again
    again = run_study(inputs, plan, tmp_path, progress=False, session=session)
    assert again.computed == 0 and again.timed == 0

    rows = {c: r for c, r in resumed.sweep_rows("calibration")}
    quarter, full = rows[plan.sweeps["calibration"][0]], rows[plan.sweeps["calibration"][1]]
    assert (quarter.calib_batches, full.calib_batches) == (1, 3)  # 24 images in batches of 8
    for _, row in resumed.sweep_rows("fusion") + resumed.sweep_rows("calibration"):
        assert row.error is None and row.latency_ms > 0 and row.latency_pass == "inline"
        assert row.size_mb > 0 and set(row.scores) == {"top1", "loss"}  # a tiny net's INT8 file is mostly overhead
    assert resumed.baseline.scores["top1"] == 100.0  # the labels are the FP32 model's own predictions

    written = write_study_outputs(resumed, tmp_path, {"model": TINY, "rounds": 2})
    for sweep in sweeps:
        table = (tmp_path / f"{sweep}.md").read_text()
        assert table.count("\n| ") == 2 + 3 and "| FP32 | 100.00 |" in table
        with open(tmp_path / f"{sweep}.csv") as file:
            records = list(csv.DictReader(file))
        assert [r["label"] for r in records][0] == "FP32" and len(records) == 3
        rerun = RowConfig(**{k: _typed(records[1][k]) for k in RowConfig().to_dict()})
        assert rerun in plan.sweeps[sweep]  # the CSV row is enough to rebuild the configuration
        assert written[f"{sweep}.png"].stat().st_size > 5000


def _typed(text):
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text)
    except ValueError:
        return text


def test_parallel_rows_are_timed_in_a_sequential_pass(toy_study, tmp_path):
    inputs, session = toy_study
    plan = make_plan({"fusion": ["none", "blocks"]}, RowConfig(), [])
    result = run_study(inputs, plan, tmp_path, jobs=2, progress=False, session=session)
    rows = [r for _, r in result.sweep_rows("fusion")]
    assert result.computed == 2 and result.timed == 2
    assert all(r.latency_pass == "sequential" and r.latency_ms > 0 and r.error is None for r in rows)
    serial = run_study(inputs, plan, tmp_path / "serial", progress=False, session=session)
    for (_, parallel_row), (_, serial_row) in zip(
        result.sweep_rows("fusion"), serial.sweep_rows("fusion"), strict=True
    ):
        assert parallel_row.scores == pytest.approx(serial_row.scores)


def test_sensitivity_ranks_the_sensitive_layer_first(toy_study):
    _, session = toy_study
    fused = fused_copy(session.float_model)
    assert quantizable_layers(fused) == ["stem.0", SENSITIVE, "fc"]
    calibration = Calibration(session.calib)
    ranking = layer_sensitivity(session.float_model, calibration, _scorer(session), progress=False)
    assert [r.name for r in ranking][0] == SENSITIVE
    worst, *rest = ranking
    assert worst.drop > 10 and all(worst.sqnr_db < r.sqnr_db for r in rest)
    assert all(r.fp32_ms > 0 and r.int8_ms > 0 for r in ranking)


def test_ranking_counts_a_metric_rise_as_no_drop():
    layers = [
        LayerSensitivity("unknown", 0.0, 0.0, None),
        LayerSensitivity("flat", 0.0, 0.0, 50.0),
        LayerSensitivity("rise", 0.0, -0.3, 30.0),  # one image better: noise, its SQNR is the lowest
        LayerSensitivity("drop", 0.0, 1.0, 60.0),
    ]
    assert [r.name for r in rank_by_sensitivity(layers)] == ["drop", "rise", "flat", "unknown"]


def test_max_drop_keeps_sensitive_layers_float_until_the_drop_holds(toy_study):
    _, session = toy_study
    scorer = _scorer(session)
    steps = []
    model, result = keep_float_until(
        session.float_model,
        Calibration(session.calib),
        scorer,
        MAX_DROP,
        latency_aware=False,
        progress=False,
        on_step=lambda layers, metric: steps.append((layers, metric)),
    )
    assert result.fp32.metric == 100.0 and result.all_int8.metric < 100.0 - MAX_DROP
    assert result.float_layers[0] == SENSITIVE and result.met
    assert result.mixed.metric >= 100.0 - MAX_DROP and steps[-1][1] == result.mixed.metric
    assert all(metric < 100.0 - MAX_DROP for _, metric in steps[:-1])  # it stopped at the first that held
    assert qz_core.count_float_islands(model) == len(result.float_layers)
    assert scorer.metric(model) == result.mixed.metric
    assert result.mixed.size_mb > result.all_int8.size_mb  # the float layer costs size
    assert "kept in float" in result.summary()


def test_max_drop_keeps_layers_slower_in_int8_float(toy_study, monkeypatch):
    from qz_core import mixed_precision

    _, session = toy_study
    monkeypatch.setattr(
        mixed_precision, "time_layer", lambda fused, q, layer, example: (1.0, 2.0 if layer == "fc" else 0.5)
    )
    _, result = keep_float_until(
        session.float_model, Calibration(session.calib), _scorer(session), 100.0, progress=False
    )
    assert result.slow_layers == ["fc"] and result.float_layers == ["fc"]  # a drop of 100 needs no other layer


def test_max_drop_refuses_negative(toy_study):
    _, session = toy_study
    with pytest.raises(QzError, match="--max-drop must be a number >= 0; got -1"):
        keep_float_until(session.float_model, Calibration(session.calib), _scorer(session), -1.0)


def test_quantize_cli_max_drop(toy_study, tmp_path, capsys):
    inputs, _ = toy_study
    base = ["quantize", TINY, "--weights", inputs.weights, "--num-classes", "2", "--calib", str(inputs.calib)]
    out = ["--out", str(tmp_path / "m.pt"), "--no-progress", "--workers", "0"]
    assert main([*base, *out, "--max-drop", "0.5"]) == 2
    assert "--max-drop needs --val" in capsys.readouterr().err
    assert main([*base, *out, "--max-drop", "-1", "--val", str(inputs.val)]) == 2
    assert "--max-drop must be" in capsys.readouterr().err
    assert main([*base, *out, "--max-drop", str(MAX_DROP), "--val", str(inputs.val)]) == 0
    text = capsys.readouterr().out
    assert "kept in float" in text and SENSITIVE in text
    int8 = qz_core.load_quantized(tmp_path / "m.pt")
    assert qz_core.count_float_islands(int8) >= 1


def test_sensitivity_cli(toy_study, tmp_path, capsys):
    inputs, _ = toy_study
    argv = ["sensitivity", TINY, "--weights", inputs.weights, "--num-classes", "2", "--data", str(inputs.val)]
    argv += ["--calib", str(inputs.calib), "--out", str(tmp_path), "--no-progress", "--batch-size", "8"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"  1. {SENSITIVE}:")
    with open(tmp_path / "sensitivity.csv") as file:
        assert [r["layer"] for r in csv.DictReader(file)][0] == SENSITIVE
    assert (tmp_path / "sensitivity.md").exists() and (tmp_path / "sensitivity.png").exists()


def test_data_loaders_read_small_folders_once(toy_study):
    _, session = toy_study
    assert isinstance(session.val, list) and not isinstance(session.val, DataLoader)
