"""Cross-package: the same verbs (quantize, predict, export) for a model of every task, on real photos."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import qz_core

ENV = {**os.environ, "YOLO_OFFLINE": "1"}


def _qz(*args: str) -> subprocess.CompletedProcess:
    """Runs the installed ``qz``; whatever it does, upstream libraries' warnings never reach the user."""
    script = Path(sys.executable).parent / "qz"
    result = subprocess.run([str(script), *args], capture_output=True, text=True, env=ENV, timeout=900)
    assert not re.search(r"\w+Warning: ", result.stderr), result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos of mixed sizes: ultralytics' bus.jpg and zidane.jpg, and scikit-image's astronaut and coffee."""
    import skimage.data
    import ultralytics

    folder = tmp_path_factory.mktemp("photos")
    images = {p.stem: Image.open(p) for p in (Path(ultralytics.__file__).parent / "assets").glob("*.jpg")}
    images |= {name: Image.fromarray(getattr(skimage.data, name)()) for name in ("astronaut", "coffee")}
    for name, image in images.items():
        image.thumbnail((320, 320))  # smaller, still of mixed sizes: the test's CPU time
        image.save(folder / f"{name}.{'jpg' if name in ('bus', 'zidane') else 'png'}")
    sizes = {Image.open(p).size for p in folder.iterdir()}
    assert len(sizes) >= 3
    return folder


def _torchvision_checkpoint(tmp_path: Path, name: str, **kwargs) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return path


def _ultralytics_checkpoint(tmp_path: Path) -> Path:
    code = (
        "import sys; from ultralytics import YOLO; "
        "YOLO('yolov5nu.yaml').save(sys.argv[1])"
    )  # in a subprocess: ultralytics patches torch.save and PIL when imported
    path = tmp_path / "yolov5nu.pt"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=ENV, timeout=300, capture_output=True)
    return path


def _torchvision(name: str, **kwargs):
    return name, lambda tmp: _torchvision_checkpoint(tmp, name, **kwargs)


CASES = {
    "classification": _torchvision("mobilenet_v3_small"),
    "detection": _torchvision("ssdlite320_mobilenet_v3_large", weights_backbone=None),
    "yolo": ("yolov5nu", _ultralytics_checkpoint),
    "segmentation": _torchvision("lraspp_mobilenet_v3_large", weights_backbone=None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantize_predict_export_on_real_photos(case, photos, tmp_path):
    model, make_checkpoint = CASES[case]
    weights = make_checkpoint(tmp_path)
    out, onnx_file = tmp_path / f"{model}_int8.pt", tmp_path / f"{model}_int8.onnx"
    result = _qz(
        "quantize", model, "--weights", str(weights), "--calib", str(photos), "--out", str(out),
        "--onnx", str(onnx_file), "--batch-size", "2", "--workers", "0", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PTQ, 2 batches" in result.stdout and "INT8 ONNX" in result.stdout and "latency" in result.stdout
    assert "Traceback" not in result.stderr
    int8 = qz_core.load_quantized(out)
    assert qz_core.is_quantized(int8) and qz_core.recipe_of(int8).name == model
    fp32_mb = qz_core.model_size_mb(qz_core.get_model(model, weights=str(weights)))
    assert out.stat().st_size / 2**20 < 0.4 * fp32_mb  # (ultralytics stores half-precision checkpoints)

    pictures = tmp_path / "predictions"
    result = _qz("predict", model, str(photos), "--weights", str(weights), "--int8", str(out), "--out", str(pictures))
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = sorted(pictures.glob("*.png"))
    assert len(drawn) == len(list(photos.iterdir()))
    assert all(Image.open(p).width > Image.open(p).height for p in drawn)  # FP32 and INT8 side by side

    fp32_onnx = tmp_path / f"{model}_fp32.onnx"
    result = _qz("export", model, "--weights", str(weights), "--out", str(fp32_onnx))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FP32 ONNX" in result.stdout and fp32_onnx.stat().st_size > onnx_file.stat().st_size


def test_bad_input_exits_2_with_one_clear_line(tmp_path):
    result = _qz("quantize", "resnet5O", "--calib", str(tmp_path), "--out", str(tmp_path / "x.pt"))
    assert result.returncode == 2
    assert "Invalid model name 'resnet5O'. Did you mean 'resnet50'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = _qz("quantize", "resnet18", "--calib", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt"))
    assert result.returncode == 2 and "is not an existing folder" in result.stderr


def test_every_task_has_its_eval_and_demo_commands():
    for command in ("eval", "demo"):
        result = _qz(command, "--help")
        assert result.returncode == 0
        assert all(task in result.stdout for task in ("classification", "detection", "segmentation")), result.stdout
    assert set(qz_core.list_tasks()) >= {"classification", "detection", "segmentation"}


def test_listing_and_help_import_no_heavy_dependency():
    code = (
        "import sys, qz_core; from qz_core.cli import build_parser; names = qz_core.list_models(); build_parser(); "
        "heavy = [m for m in ('ultralytics', 'matplotlib', 'pycocotools') if m in sys.modules]; "
        "print(len(names), heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    count, heavy = result.stdout.split(" ", 1)
    assert int(count) >= 80 and heavy.strip() == "[]"


def test_using_a_model_of_every_task_leaves_torch_and_pil_alone():
    code = (
        "import torch, PIL.Image, qz_core\n"
        "save, open_ = torch.save, PIL.Image.open\n"
        "for name in ('mobilenet_v3_small', 'yolov5nu', 'ssdlite320_mobilenet_v3_large', "
        "'lraspp_mobilenet_v3_large'):\n"
        "    qz_core.get_model(name)\n"
        "assert 'ultralytics' in __import__('sys').modules\n"
        "print(torch.save is save, PIL.Image.open is open_)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]


@pytest.fixture(scope="module")
def digit_canvases(tmp_path_factory) -> dict[str, Path]:
    """Real handwritten digits on small canvases: COCO json, YOLO txt and image/mask pairs in one folder."""
    from qz_classification.digits_canvas import CanvasConfig, write_digits_canvas

    config = CanvasConfig(num_train=6, num_val=2, size=64, digit_size=(10, 24), seed=1)
    return write_digits_canvas(tmp_path_factory.mktemp("canvases") / "digits", config)


@pytest.mark.parametrize("model", ["ssdlite320_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_qat_from_the_command_line_on_labelled_folders(model, digit_canvases, tmp_path):
    weights = _torchvision_checkpoint(tmp_path, model, weights_backbone=None, num_classes=11)
    out = tmp_path / f"{model}_qat.pt"
    result = _qz(
        "quantize", model, "--weights", str(weights), "--num-classes", "11", "--qat",
        "--train", str(digit_canvases["train"]), "--epochs", "1", "--batch-size", "2", "--lr", "1e-3",
        "--out", str(out), "--workers", "0", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QAT, 1 epoch(s), loss" in result.stdout and "Traceback" not in result.stderr
    int8 = qz_core.load_quantized(out)
    recipe = qz_core.recipe_of(int8)
    assert recipe.is_qat and recipe.model_kwargs["num_classes"] == 11 and qz_core.is_quantized(int8)
