import json

import numpy as np
import pytest
import torch
from PIL import Image

import qz_core
import qz_core.job
from qz_core import QzError
from qz_core.cli import main

from conftest import TINY, random_batches


def _int8(path, backend="x86"):
    model = qz_core.get_model(TINY, weights=str(path), quantize=True, backend=backend)
    qz_core.calibrate(model, random_batches(), progress=False)
    return qz_core.convert(model)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_int8_onnx_runs_in_onnxruntime_and_agrees(checkpoint, tmp_path, backend):
    int8 = _int8(checkpoint[0], backend)
    x = random_batches(1, batch=1, seed=7)[0]
    report = qz_core.export_onnx(int8, tmp_path / "tiny_int8.onnx", x)
    assert report.quantized and report.opset == 13 and report.path.exists()
    assert report.max_abs_diff <= 0.05 * report.output_range
    import onnx

    ops = {node.op_type for node in onnx.load(report.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_int8_hardswish_runs_in_integers_in_onnxruntime(tmp_path, backend):
    import onnx
    import torch.ao.quantization as tq

    from qz_core.tools.ort_tools import ort_session

    model = torch.nn.Sequential(
        tq.QuantStub(), torch.nn.Conv2d(3, 8, 1), torch.nn.Hardswish(), torch.nn.Conv2d(8, 4, 1), tq.DeQuantStub()
    ).eval()
    model.qconfig = qz_core.make_qconfig(backend)
    qz_core.set_backend(backend)
    tq.prepare(model, inplace=True)
    x = 3 * torch.randn(2, 3, 16, 16)  # wide enough to reach both of hardswish's bends (-3 and 3)
    model(x)
    int8 = tq.convert(model)
    report = qz_core.export_onnx(int8, tmp_path / "hardswish.onnx", x)
    out_scale = int8[3].scale  # the last conv's output step
    # onnxruntime's integer kernels round differently from PyTorch's: a few output steps at most
    assert report.max_abs_diff <= 4 * float(out_scale) + 1e-6, (report.max_abs_diff, float(out_scale))
    optimized = tmp_path / "optimized.onnx"
    ort_session(report.path, 1, optimized_model_filepath=str(optimized))
    ops = [node.op_type for node in onnx.load(optimized).graph.node]
    assert "QLinearAdd" in ops and "QLinearMul" in ops
    assert not {"HardSwish", "HardSigmoid", "Mul", "Add"} & set(ops), ops  # no float island left


def test_fp32_onnx_matches_closely(checkpoint, tmp_path):
    _, float_model = checkpoint
    report = qz_core.export_onnx(float_model, tmp_path / "tiny.onnx", random_batches(1, batch=2)[0], dynamic_batch=True)
    assert not report.quantized and report.max_abs_diff < 1e-4
    out = qz_core.run_onnx(report.path, torch.randn(5, 3, 32, 32))[0]
    assert out.shape == (5, 4)


def test_export_failure_is_a_clear_error(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0].real  # no ONNX symbolic

    with pytest.raises(QzError, match="ONNX export of Bad"):
        qz_core.export_onnx(Bad(), tmp_path / "bad.onnx", torch.randn(2, 2))


def test_latency_and_size_helpers(checkpoint):
    path, float_model = checkpoint
    int8 = _int8(path)
    x = random_batches(1, batch=1)[0]
    stats = qz_core.compare_latency({"fp32": lambda: float_model(x), "int8": lambda: int8(x)}, warmup=1, rounds=5)
    assert set(stats) == {"fp32", "int8"}
    assert all(s.runs == 5 and 0 < s.p10_ms <= s.median_ms <= s.p90_ms for s in stats.values())
    denormal = torch.tensor([1e-40])  # a float32 denormal: flushed only while timing, kept after
    assert (denormal * 1.0).item() != 0.0
    assert qz_core.model_size_mb(int8) < qz_core.model_size_mb(float_model)


def _images(folder, n=4, size=40):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_cli_list(capsys):
    assert main(["list", "qz_test_*"]) == 0
    assert TINY in capsys.readouterr().out


def test_cli_quantize_end_to_end(checkpoint, tmp_path, capsys):
    calib = _images(tmp_path / "calib")
    out, onnx_path = tmp_path / "tiny_int8.pt", tmp_path / "tiny_int8.onnx"
    args = ["quantize", TINY, "--weights", str(checkpoint[0]), "--calib", str(calib), "--out", str(out)]
    assert main([*args, "--onnx", str(onnx_path), "--batch-size", "2", "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "PTQ, 2 batches" in text and "INT8 ONNX" in text and "latency" in text
    loaded = qz_core.load_quantized(out)
    assert qz_core.is_quantized(loaded) and onnx_path.exists()


def test_cli_qat_end_to_end(checkpoint, tmp_path):
    train = tmp_path / "train"
    _images(train / "a")
    _images(train / "b")
    out = tmp_path / "qat.pt"
    args = ["quantize", TINY, "--weights", str(checkpoint[0]), "--out", str(out), "--qat"]
    assert main([*args, "--train", str(train), "--epochs", "1", "--batch-size", "4", "--workers", "0"]) == 0
    assert qz_core.recipe_of(qz_core.load_quantized(out)).is_qat is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quantize", "resnet5O", "--calib", "x", "--out", "y"], "Invalid model name 'resnet5O'"),
        (
            ["quantize", TINY, "--calib", "/no/such/folder", "--out", "y"],
            "--calib '/no/such/folder' is not an existing folder",
        ),
    ],
)
def test_cli_errors_are_one_clear_line(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_empty_calibration_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["quantize", TINY, "--calib", str(tmp_path / "empty"), "--out", str(tmp_path / "o.pt")]) == 2
    assert "holds no images" in capsys.readouterr().err


def test_cli_unknown_backend_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", TINY, "--calib", "x", "--out", "y", "--backend", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_support_probe_reports_each_step(tmp_path):
    from qz_core.tools.support import probe_model

    result = probe_model(TINY, work_dir=tmp_path)
    assert result.errors == {} and result.ptq and result.qat
    assert result.engines == {"x86": True, "qnnpack": True} and result.int8_onnx and result.fp32_onnx
    json.dumps(result.as_dict())


def test_int8_model_with_dict_outputs_exports(tmp_path):
    import torch.ao.quantization as tq

    class TwoHeads(torch.nn.Module):  # a segmenter's {"out", "aux"}, a detector's dicts
        def __init__(self):
            super().__init__()
            self.quant, self.dequant, self.dequant_aux = tq.QuantStub(), tq.DeQuantStub(), tq.DeQuantStub()
            self.out, self.aux = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            x = self.quant(x)
            return {"out": self.dequant(self.out(x)), "extra": [{"aux": self.dequant_aux(self.aux(x))}]}

    model = TwoHeads().eval()
    model.qconfig = qz_core.make_qconfig("x86")
    qz_core.set_backend("x86")
    tq.prepare(model, inplace=True)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    int8 = tq.convert(model)
    report = qz_core.export_onnx(int8, tmp_path / "two_heads.onnx", x)
    outputs = qz_core.run_onnx(report.path, x)
    assert [o.shape for o in outputs] == [(2, 4, 8, 8), (2, 2, 8, 8)]  # flattened in the dict's order
    assert report.max_abs_diff <= 0.05 * report.output_range


def _quantized_file(checkpoint, tmp_path):
    out = tmp_path / "tiny_int8.pt"
    args = ["quantize", TINY, "--weights", str(checkpoint[0]), "--calib", str(_images(tmp_path / "calib"))]
    assert main([*args, "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    return out


def test_cli_predict_draws_fp32_beside_int8(checkpoint, tmp_path, capsys):
    int8 = _quantized_file(checkpoint, tmp_path)
    images = _images(tmp_path / "photos", n=2, size=48)
    args = ["predict", TINY, str(images), "--weights", str(checkpoint[0]), "--int8", str(int8)]
    assert main([*args, "--out", str(tmp_path / "pred")]) == 0
    written = sorted((tmp_path / "pred").glob("*.png"))
    assert [p.name for p in written] == [f"0_{TINY}.png", f"1_{TINY}.png"]
    assert Image.open(written[0]).size == (2 * 48, 48)  # the toy task draws the image itself: two panels
    assert main(["predict", str(images / "0.png"), "--int8", str(int8), "--out", str(tmp_path / "int8_only")]) == 0
    assert Image.open(tmp_path / "int8_only" / f"0_{TINY}.png").size == (48, 48)


def test_cli_export_fp32_and_int8(checkpoint, tmp_path, capsys):
    int8 = _quantized_file(checkpoint, tmp_path)
    out = tmp_path / "tiny.onnx"
    assert main(["export", TINY, "--weights", str(checkpoint[0]), "--int8", str(int8), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.exists() and (tmp_path / "tiny_int8.onnx").exists()
    assert "FP32 ONNX" in text and "INT8 ONNX" in text


def test_cli_without_weights_warns_that_they_are_random(tmp_path, capsys):
    args = ["quantize", TINY, "--calib", str(_images(tmp_path / "calib")), "--out", str(tmp_path / "r.pt")]
    assert main([*args, "--workers", "0", "--no-progress"]) == 0
    assert "weights are random" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "{tmp}/same.onnx", "--onnx", "{tmp}/same.onnx"], "should end in .pt or .pth"),
        (["--out", "{tmp}/same.pt", "--onnx", "{tmp}/same.pt"], "should end in .onnx"),
        (["--out", "{tmp}"], "is a folder"),
        (["--out", "{weights}"], "would overwrite the weights file"),
        (["--out", "{tmp}/o.pt", "--epochs", "-1"], "--epochs must be a positive number; got -1"),
        (["--out", "{tmp}/o.pt", "--lr", "nan"], "--lr must be a positive number; got nan"),
        (["--out", "{tmp}/o.pt", "--batch-size", "0"], "--batch-size must be a positive number; got 0"),
        (["--out", "{tmp}/o.pt", "--workers", "-1"], "--workers must be 0 or more; got -1"),
        (["--out", "{tmp}/o.pt", "--calib-fraction", "1.5"], "--calib-fraction must be in (0, 1]"),
        (["--out", "{tmp}/o.pt", "--qat"], "--qat needs --train DIR"),
    ],
)
def test_cli_checks_options_before_any_work(checkpoint, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(qz_core.job, "get_model_builder", lambda name: pytest.fail("built a model"))
    calib = _images(tmp_path / "calib")
    values = {"tmp": str(tmp_path), "weights": str(checkpoint[0])}
    args = ["quantize", TINY, "--weights", str(checkpoint[0]), "--calib", str(calib)]
    assert main([*args, *(a.format(**values) for a in extra)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_failed_save_keeps_the_previous_model(checkpoint, tmp_path, monkeypatch):
    out = _quantized_file(checkpoint, tmp_path)
    before = out.read_bytes()

    def torn_write(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    int8 = qz_core.load_quantized(out)
    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError, match="No space left"):
        qz_core.save_quantized(int8, out)
    assert out.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path, capsys):
    def interrupted(request):
        raise KeyboardInterrupt

    monkeypatch.setattr("qz_core.cli.models.quantize_model", interrupted)
    args = ["quantize", TINY, "--calib", str(_images(tmp_path / "calib")), "--out", str(tmp_path / "o.pt")]
    assert main(args) == 130
    assert capsys.readouterr().err.strip() == "qz: interrupted"


def test_version_and_list_count_on_stdout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"qz {qz_core.__version__}"
    assert main(["list", TINY]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "1 model"


def test_an_empty_calibration_folder_is_refused_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qz_core.job, "get_model_builder", lambda name: pytest.fail("built a model"))
    (tmp_path / "empty").mkdir()
    assert main(["quantize", TINY, "--calib", str(tmp_path / "empty"), "--out", str(tmp_path / "o.pt")]) == 2
    assert "holds no images" in capsys.readouterr().err
