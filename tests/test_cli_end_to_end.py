"""Cross-package: the installed `qz` script sees every package's models and quantizes real photos."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

import qz_core

ENV = {**os.environ, "YOLO_OFFLINE": "1"}


def _qz(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "qz"
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=ENV, timeout=600)


def _real_photos(tmp_path: Path) -> Path:
    """ultralytics ships two real photos (bus.jpg, zidane.jpg): a real calibration folder."""
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    folder = tmp_path / "calib"
    folder.mkdir()
    for photo in sorted(assets.glob("*.jpg")):
        shutil.copy(photo, folder / photo.name)
    assert len(list(folder.iterdir())) >= 2
    return folder


def test_every_task_package_registers_through_entry_points():
    from importlib.metadata import entry_points

    groups = {ep.value for ep in entry_points(group="qz.models")}
    assert {"qz_classification.models", "qz_detection.models", "qz_segmentation.models"} <= groups
    out = _qz("list", "--task", "classification")
    assert out.returncode == 0 and "resnet50" in out.stdout


def test_quantize_real_photos_then_eval_the_saved_model(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
    calib = _real_photos(tmp_path)
    out, onnx_file = tmp_path / "r18_int8.pt", tmp_path / "r18_int8.onnx"
    result = _qz(
        "quantize", "resnet18", "--weights", str(checkpoint), "--calib", str(calib),
        "--out", str(out), "--onnx", str(onnx_file), "--workers", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "INT8 model saved" in result.stdout and "INT8 ONNX" in result.stdout
    model = qz_core.load_quantized(out)
    assert qz_core.is_quantized(model) and model.qz_recipe["name"] == "resnet18"
    assert onnx_file.stat().st_size < 0.35 * checkpoint.stat().st_size


def test_bad_input_exits_2_with_one_clear_line(tmp_path):
    result = _qz("quantize", "resnet5O", "--calib", str(tmp_path), "--out", str(tmp_path / "x.pt"))
    assert result.returncode == 2
    assert "Invalid model name 'resnet5O'. Did you mean 'resnet50'" in result.stderr
    result = _qz("quantize", "resnet18", "--calib", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_eval_command_is_shared_by_task_packages():
    result = _qz("eval", "--help")
    assert result.returncode == 0 and "classification" in result.stdout
