"""VOC-layout evaluation: mIoU and pixel accuracy on a fixture with known answers, errors, `qz eval segmentation`."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.transforms.functional import to_tensor

from qz_core import ModelSpec, QzError, calibrate, convert, define_model, save_quantized
from qz_core.registry import unregister_model
from qz_segmentation.evaluate import ConfusionMatrix, evaluate_segmenter
from qz_segmentation.task import TASK

STUB = "qz_test_color_segmenter"
BLOCK = 4  # each fixture cell is a BLOCK x BLOCK square of pixels
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # class k is the colour with channel k lit
# (predicted cells, target cells) per image; 255 = ignore. Counted by hand, (target, predicted) pixels
# in cells: (0,0)=3, (0,2)=1, (1,0)=1, (1,1)=5, (2,2)=2: 10 of 12 cells right.
# IoU: class 0 = 3/(4+4-3) = 0.6, class 1 = 5/(6+5-5) = 5/6, class 2 = 2/(2+3-2) = 2/3.
FIXTURE = {
    "a": ([[0, 0, 1, 1], [2, 2, 2, 2]], [[0, 1, 1, 255], [2, 2, 0, 255]]),
    "b": ([[1, 1, 1, 1], [0, 0, 0, 0]], [[1, 1, 1, 1], [0, 0, 255, 255]]),
}
PIXEL_ACC = 100 * 10 / 12
MIOU = 100 * (0.6 + 5 / 6 + 2 / 3) / 3


class ColorSegmenter(nn.Module):
    """Predicts class k where channel k is brightest: an identity 1x1 conv, quantizable end to end."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(num_classes, 3).view(num_classes, 3, 1, 1))
            self.conv.bias.zero_()
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.dequant(self.conv(self.quant(x)))}

    def fuse_model(self, is_qat: bool = False, level: str = "all") -> None:
        """Nothing to fuse."""


@pytest.fixture(scope="module", autouse=True)
def color_segmenter():
    builder = define_model(
        ModelSpec(
            name=STUB, task="segmentation", family="test", make_model=ColorSegmenter, preprocess=lambda: to_tensor
        )
    )
    yield builder
    unregister_model(STUB)


def _eval_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    TASK.add_eval_command(parser)
    args = parser.parse_args(argv)
    return args.func(args)


def _cells_to_image(cells: list[list[int]], mode: str) -> Image.Image:
    rows, cols = len(cells), len(cells[0])
    if mode == "RGB":
        image = Image.new("RGB", (cols * BLOCK, rows * BLOCK))
    else:
        image = Image.new("P", (cols * BLOCK, rows * BLOCK))
        image.putpalette([v for k in range(256) for v in (k, 255 - k, 0)])
    for r, row in enumerate(cells):
        for c, value in enumerate(row):
            fill = COLORS[value] if mode == "RGB" else value
            image.paste(fill, (c * BLOCK, r * BLOCK, (c + 1) * BLOCK, (r + 1) * BLOCK))
    return image


def _voc_fixture(root, fixture=FIXTURE, calib=("c",)):
    """The FIXTURE as a VOC layout (JPEG images at quality 100 without chroma subsampling), splits val and train."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    everything = dict(fixture) | {c: ([[0, 1], [2, 0]], [[0, 1], [2, 0]]) for c in calib}
    for image_id, (predicted, target) in everything.items():
        _cells_to_image(predicted, "RGB").save(root / "JPEGImages" / f"{image_id}.jpg", quality=100, subsampling=0)
        _cells_to_image(target, "P").save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i}\n" for i in fixture))
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in calib))
    return root


def test_confusion_matrix_counts_by_hand():
    matrix = ConfusionMatrix(3)
    for predicted, target in FIXTURE.values():
        matrix.update(torch.tensor(predicted), torch.tensor(target))
    assert matrix.matrix.tolist() == [[3, 0, 1], [1, 5, 0], [0, 0, 2]]
    scores = matrix.scores()
    assert scores["pixel_acc"] == pytest.approx(PIXEL_ACC)
    assert scores["miou"] == pytest.approx(MIOU)
    # A class in neither masks nor predictions does not count towards the mean.
    wider = ConfusionMatrix(5)
    wider.matrix[:3, :3] = matrix.matrix
    assert wider.scores()["miou"] == pytest.approx(MIOU)
    with pytest.raises(QzError, match=r"Mask values \[7\] are not classes of a 3-class model"):
        matrix.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [255, 1]]))


def test_fp32_and_int8_scores_on_known_fixture(tmp_path):
    root = _voc_fixture(tmp_path / "voc")
    result = evaluate_segmenter(
        STUB, data=root, quantize="ptq", calib_split="train", backend="x86", calib_batches=4, progress=False
    )
    assert result.images == 2 and result.num_classes == 3 and result.split == "val"
    assert result.fp32.pixel_acc == pytest.approx(PIXEL_ACC)
    assert result.fp32.miou == pytest.approx(MIOU)
    assert result.fp32.class_iou == pytest.approx([60.0, 100 * 5 / 6, 100 * 2 / 3])
    # The identity conv keeps every argmax in INT8: the same scores, by construction.
    assert result.int8.miou == pytest.approx(MIOU) and result.int8.pixel_acc == pytest.approx(PIXEL_ACC)
    assert result.delta == pytest.approx({"miou": 0.0, "pixel_acc": 0.0})
    assert result.int8_source == "PTQ" and result.backend == "x86"
    assert "split 'train'" in result.calibration
    table = result.table()
    assert f"{MIOU:.2f}" in table and f"{PIXEL_ACC:.2f}" in table and "INT8 PTQ x86" in table


def test_int8_file_and_cli_json(tmp_path, capsys, color_segmenter):
    _voc_fixture(tmp_path / "parent" / "VOCdevkit" / "VOC2012")
    prepared = color_segmenter(quantize=True, backend="x86")
    calibrate(prepared, [torch.rand(1, 3, 8, 8)], progress=False)
    save_quantized(convert(prepared), tmp_path / "int8.pt")
    out = tmp_path / "result.json"
    code = _eval_command(
        ["--int8", str(tmp_path / "int8.pt"), "--data", str(tmp_path / "parent"),
         "--workers", "0", "--no-progress", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["model"] == STUB and payload["fp32"] is None
    assert payload["int8"]["miou"] == pytest.approx(MIOU)
    assert "mIoU" in capsys.readouterr().out


def test_bad_folders_and_splits_are_clear_errors(tmp_path):
    with pytest.raises(QzError, match="does not exist"):
        evaluate_segmenter(STUB, data=tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QzError, match="lacks JPEGImages, SegmentationClass"):
        evaluate_segmenter(STUB, data=tmp_path / "empty", progress=False)
    root = _voc_fixture(tmp_path / "voc")
    with pytest.raises(QzError, match=r"Invalid split 'vall'\. Did you mean 'val'\?.*train, val"):
        evaluate_segmenter(STUB, data=root, split="vall", progress=False)
    (root / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(QzError, match=r"do not exist: SegmentationClass/b\.png"):
        evaluate_segmenter(STUB, data=root, progress=False)
    with pytest.raises(QzError, match="segmentation model; 'resnet18' is a classification model"):
        evaluate_segmenter("resnet18", data=root, progress=False)
    with pytest.raises(QzError, match="Invalid split 'test'"):
        _eval_command(["--model", STUB, "--data", str(root), "--split", "test", "--workers", "0"])


def test_held_out_calibration_with_a_real_segmenter(tmp_path):
    """LRASPP on the fixture: held-out calibration leaves the other images to both rows."""
    fixture = {f"i{k}": ([[0, 1, 2, 0]] * 4, [[0, 1, 2, 255]] * 4) for k in range(5)}
    root = _voc_fixture(tmp_path / "voc", fixture)
    result = evaluate_segmenter(
        "lraspp_mobilenet_v3_large",
        data=root,
        quantize="ptq",
        backend="qnnpack",
        activation_observer="minmax",
        num_classes=3,
        calib_batches=1,
        progress=False,
    )
    assert result.images == 4 and "1 of the 5 images" in result.calibration
    for scores in (result.fp32, result.int8):
        assert 0.0 <= scores.miou <= 100.0 and 0.0 <= scores.pixel_acc <= 100.0 and scores.images == 4
