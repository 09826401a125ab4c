"""Mask R-CNN: torchvision float equality, INT8 on x86 and qnnpack, QAT, ONNX, COCO box and mask mAP, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from torch import nn
from torch.ao.quantization import get_default_qconfig
from torchvision.models.detection import mask_rcnn as tv
from torchvision.ops.misc import FrozenBatchNorm2d

import qz_core
from qz_core import QzError, get_model_spec
from qz_core.tools.support import probe_model
from qz_core.tools.testing import assert_support_contract
from qz_core.weights import WeightsSource
from qz_detection.coco import CategoryMap, load_coco
from qz_detection.models._common import upgrade
from qz_segmentation.evaluate import evaluate_instance_segmenter, names_instance_model
from qz_segmentation.instances import (
    InstanceBatch,
    annotation_masks,
    instance_results,
    instance_scores,
    random_instance_targets,
)
from qz_segmentation.models.mask_rcnn import QuantizableMaskRCNNPredictor
from qz_segmentation.task import TASK

NAMES = ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]
# Small inputs and few proposals keep the default run short; torchvision's transform resizes to these bounds.
SMALL = {"min_size": 96, "max_size": 112}
FEW = {
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "box_batch_size_per_image": 16,
    "box_detections_per_img": 5,
}
# Tiny COCO folder: per image (width, height) and objects (category id, shape, xyxy box).
COCO_IMAGES = {
    "a.png": ((80, 64), [(1, "ellipse", (8, 6, 40, 40)), (2, "rectangle", (44, 20, 76, 60))]),
    "b.png": ((72, 72), [(2, "ellipse", (10, 30, 60, 68))]),
    "c.png": ((64, 80), [(1, "rectangle", (4, 4, 30, 50)), (1, "ellipse", (34, 40, 60, 76))]),
}


@torch.no_grad()
def _freeze_batchnorm(model: nn.Module) -> int:
    """Swaps the backbone body's BatchNorm2d for FrozenBatchNorm2d with random statistics, as with weights."""
    generator = torch.Generator().manual_seed(0)
    count = 0
    for module in list(model.backbone.body.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                n = child.num_features
                frozen.weight.copy_(1 + 0.1 * torch.randn(n, generator=generator))
                frozen.bias.copy_(0.1 * torch.randn(n, generator=generator))
                frozen.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                frozen.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                setattr(module, name, frozen)
                count += 1
    return count


@pytest.mark.parametrize(("name", "frozen"), [(NAMES[0], True), (NAMES[1], False)], ids=["v1_frozen_bn", "v2"])
@torch.no_grad()
def test_matches_torchvision_exactly(tmp_path, name, frozen):
    torch.manual_seed(0)
    kwargs = {**SMALL, "rpn_post_nms_top_n_test": 200, "box_detections_per_img": 20}
    reference = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs).eval()
    if frozen:
        assert _freeze_batchnorm(reference) > 0
    reference.roi_heads.score_thresh = 0.0
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    model = qz_core.get_model(name, weights=str(path), **kwargs).eval()  # qz's strict loader
    model.roi_heads.score_thresh = 0.0
    assert sum(type(m) is FrozenBatchNorm2d for m in model.modules()) == sum(
        type(m) is FrozenBatchNorm2d for m in reference.modules()
    )
    images = [torch.rand(3, 150, 170), torch.rand(3, 140, 120)]
    got, expected = model(images), reference(images)
    assert all(len(e["masks"]) for e in expected), "the comparison needs some detections"
    for g, e in zip(got, expected, strict=True):
        assert len(g["masks"]) == 20
        for key in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(g[key], e[key]), key


def test_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.get_model(NAMES[0], weights=None, weights_backbone=None).state_dict()
    state["roi_heads.mask_head.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(QzError, match="extra"):
        qz_core.get_model(NAMES[0], weights=str(tmp_path / "extra.pth"))
    del state["roi_heads.mask_head.extra.weight"], state["roi_heads.mask_predictor.conv5_mask.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(QzError, match="conv5_mask"):
        qz_core.get_model(NAMES[0], weights=str(tmp_path / "missing.pth"))


def test_weights_enums_load_through_the_builder(monkeypatch):
    """The enum path as with a download: torchvision's state dict, FrozenBatchNorm2d, COCO_V1's eps 0, 91 classes."""
    torch.manual_seed(0)
    state = torchvision.models.get_model(NAMES[0], weights=None, weights_backbone=None).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # FrozenBatchNorm2d's keys
    monkeypatch.setattr(WeightsSource, "state_dict", lambda self, progress=True: state)
    model = qz_core.get_model(NAMES[0], weights=tv.MaskRCNN_ResNet50_FPN_Weights.COCO_V1)
    frozen = [m for m in model.modules() if type(m) is FrozenBatchNorm2d]
    assert frozen and all(m.eps == 0.0 for m in frozen)
    assert torch.equal(
        model.roi_heads.mask_predictor.mask_fcn_logits.weight, state["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    )
    assert get_model_spec(NAMES[1]).weights_enum is tv.MaskRCNN_ResNet50_FPN_V2_Weights
    with pytest.raises(QzError, match="weights"):
        qz_core.get_model(NAMES[0], weights=tv.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1)


def test_registered_as_segmentation_models_at_detection_size():
    listed = qz_core.list_models(task="segmentation")
    for name in NAMES:
        spec = get_model_spec(name)
        assert name in listed and spec.task == "segmentation" and spec.input_size == (800, 800)
        assert spec.family == "mask_rcnn"


def test_transposed_conv_quantizes_with_per_tensor_weights_on_x86():
    """Eager mode refuses x86's per-channel weights for ConvTranspose2d; the predictor hands it per-tensor ones."""
    plain = tv.MaskRCNNPredictor(8, 8, 3).eval()
    plain.qconfig = get_default_qconfig("x86")
    with pytest.raises(AssertionError, match="ConvTranspose"):
        torch.ao.quantization.prepare(plain)
    predictor = upgrade(tv.MaskRCNNPredictor(8, 8, 3).eval(), QuantizableMaskRCNNPredictor)
    predictor.qconfig = get_default_qconfig("x86")
    quantized = torch.ao.quantization.QuantWrapper(predictor)
    torch.ao.quantization.prepare(quantized, inplace=True)
    x = torch.rand(4, 8, 14, 14)
    quantized(x)
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "x86"
        torch.ao.quantization.convert(quantized, inplace=True)
        conv = predictor.conv5_mask
        assert conv.weight().q_zero_point() == 0
        assert (
            isinstance(conv, torch.ao.nn.quantized.ConvTranspose2d)
            and conv.weight().qscheme() == torch.per_tensor_affine  # symmetric: zero point 0
        )
    finally:
        torch.backends.quantized.engine = engine
    assert quantized(x).shape == (4, 3, 28, 28)


def test_support_contract_on_x86_and_qnnpack(tmp_path):
    """PTQ and QAT reach INT8 on both engines; the dense network (mask head included) exports to INT8 ONNX."""
    x = torch.rand(1, 3, 96, 112, generator=torch.Generator().manual_seed(1))
    build_kwargs = {**SMALL, **FEW, "activation_observer": "minmax"}
    result = probe_model(NAMES[1], example_input=x, calib_batches=1, work_dir=tmp_path, build_kwargs=build_kwargs)
    assert 0 < result.int8_max_diff < 0.5 * result.output_range, result
    assert_support_contract(result, float_islands=2)  # the box and the mask MultiScaleRoIAlign, reported


def test_qat_loss_falls_on_a_fixed_batch(tmp_path):
    spec = get_model_spec(NAMES[0])
    model = qz_core.get_model(NAMES[0], **SMALL, **FEW)
    TASK.settle_random_weights(model, [torch.rand(2, 3, 96, 112, generator=torch.Generator().manual_seed(2))])
    torch.save(model.state_dict(), tmp_path / "settled.pth")
    qat = qz_core.get_model(
        NAMES[0], weights=str(tmp_path / "settled.pth"), quantize=True, is_qat=True, backend="qnnpack", **SMALL, **FEW
    )
    qat.backbone.body.requires_grad_(False)  # heads and FPN train: a shorter backward, the same losses
    batch = TASK.example_training_batch(spec)
    assert isinstance(batch, InstanceBatch) and batch.targets[0]["masks"].shape[-2:] == spec.input_size
    torch.manual_seed(0)
    losses = qz_core.train_qat(qat, [batch], step_loss=TASK.training_loss, epochs=3, lr=5e-3, progress=False)
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


# --- COCO evaluation -------------------------------------------------------------------------


def _draw(shape: str, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    canvas = Image.new("L", size, 0)
    getattr(ImageDraw.Draw(canvas), shape)(box, fill=1)
    return np.array(canvas, dtype=np.uint8)


def _write_coco(root) -> None:
    """``val2017/`` PNGs (objects painted in their category's colour) and ``annotations/instances_val2017.json``.

    Ellipses are stored as RLE (pycocotools' encoding), rectangles as polygons.
    """
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id, (file_name, (size, objects)) in enumerate(COCO_IMAGES.items(), start=1):
        pixels = np.full((size[1], size[0], 3), 40, dtype=np.uint8)
        for category, shape, box in objects:
            mask = _draw(shape, size, box)
            pixels[mask == 1] = (220, 60, 60) if category == 1 else (60, 60, 220)
            rle = mask_utils.encode(np.asfortranarray(mask))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            if shape == "ellipse":
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:
                x0, y0, x1, y1 = box
                segmentation = [[x0, y0, x1 + 1, y0, x1 + 1, y1 + 1, x0, y1 + 1]]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "iscrowd": 0}
                | {"bbox": [x, y, w, h], "area": float(mask.sum()), "segmentation": segmentation}
            )
        Image.fromarray(pixels).save(root / "val2017" / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(payload))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    _write_coco(root)
    return root


def _ground_truth_predictions(coco, shift: int = 0) -> tuple[list, list]:
    boxes, segments = [], []
    for image_id in coco.getImgIds():
        annotations, masks = annotation_masks(coco, image_id)
        xywh = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32)
        prediction = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) + shift,
            "scores": torch.ones(len(annotations)),
            "labels": torch.tensor([a["category_id"] for a in annotations]),
            "masks": masks.roll((shift, shift), dims=(1, 2)).bool(),
        }
        image_boxes, image_segments = instance_results(image_id, prediction, CategoryMap("category_id", (1, 2)))
        boxes += image_boxes
        segments += image_segments
    return boxes, segments


def test_perfect_predictions_score_one_and_shifted_ones_less(coco_root):
    coco = load_coco(coco_root / "annotations" / "instances_val2017.json")
    _, masks = annotation_masks(coco, 1)
    assert masks.shape == (2, 64, 80) and masks[1, 30, 60] == 1 and masks[1, 10, 10] == 0  # polygon read
    perfect = instance_scores(coco, *_ground_truth_predictions(coco), coco.getImgIds())
    assert perfect["mask_map"] == pytest.approx(1.0) and perfect["box_map"] == pytest.approx(1.0)
    shifted = instance_scores(coco, *_ground_truth_predictions(coco, shift=6), coco.getImgIds())
    assert shifted["mask_map"] < 0.7 * perfect["mask_map"] and shifted["box_map"] < perfect["box_map"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("maskrcnn") / "random.pth"
    model = qz_core.get_model(NAMES[0], **SMALL, **FEW)
    TASK.settle_random_weights(model, [torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(3))])
    torch.save(model.state_dict(), path)
    return path


def test_eval_fp32_and_int8_on_a_coco_folder(coco_root, small_checkpoint):
    result = evaluate_instance_segmenter(
        NAMES[0],
        data=coco_root,
        weights=str(small_checkpoint),
        quantize="ptq",
        backend="qnnpack",
        calib_batches=1,
        model_kwargs={**SMALL, **FEW, "box_score_thresh": 0.0},
        progress=False,
    )
    assert result.images == 2 and "1 of the 3 images" in result.calibration
    assert result.fp32.detections > 0 and result.int8.detections > 0
    for scores in (result.fp32, result.int8):
        assert 0.0 <= scores.mask_map <= 1.0 and 0.0 <= scores.box_map <= 1.0
    assert set(result.delta) == {"box_map", "box_map50", "mask_map", "mask_map50"}
    assert "mask mAP" in result.table() and "INT8 PTQ qnnpack" in result.table()


def test_eval_command_reports_bad_input_in_one_line(coco_root, tmp_path, capsys):
    from qz_core.cli import main

    code = main(["eval", "segmentation", "--model", NAMES[0], "--data", str(coco_root), "--split", "train2017"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "Invalid split 'train2017'" in err and "val2017" in err
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")
    (tmp_path / "val2017").mkdir()
    code = main(["eval", "segmentation", "--model", NAMES[0], "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not valid JSON" in err


# --- Task: training data, predict and draw -----------------------------------------------------


def test_coco_training_data_batches_with_masks(coco_root):
    spec = get_model_spec(NAMES[0])
    data = TASK.training_data(spec, coco_root, TASK.transform(spec, None))
    batch = TASK.collate([data[0], data[1]])
    assert isinstance(batch, InstanceBatch) and isinstance(batch.images, list)
    assert TASK.model_inputs(batch) is batch.images
    target = batch.targets[0]
    assert target["masks"].shape == (2, 64, 80) and target["category_ids"].tolist() == [1, 2]
    assert target["boxes"][0].tolist() == pytest.approx([8, 6, 41, 41])


def test_predict_draws_masks_and_boxes(coco_root, small_checkpoint, tmp_path):
    from qz_core.cli import main

    photo = Image.open(coco_root / "val2017" / "a.png")
    spec = get_model_spec(NAMES[0])
    model = qz_core.get_model(NAMES[0], weights=str(small_checkpoint), **SMALL, **FEW)
    model.roi_heads.score_thresh = 0.0
    [prediction] = TASK.predict(model, [photo], TASK.transform(spec, None))
    assert prediction["masks"].shape[1:] == (64, 80) and prediction["masks"].dtype == torch.bool
    mask = torch.zeros(1, 64, 80, dtype=torch.bool)
    mask[0, 10:30, 10:30] = True
    drawn = {"boxes": torch.tensor([[10.0, 10, 30, 30]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    picture = np.array(TASK.draw(photo, drawn | {"masks": mask}, ["__background__", "red"], "title"))
    plain = np.array(TASK.draw(photo, drawn | {"scores": torch.tensor([0.1]), "masks": mask}, None, "title"))
    scale = 480 / 80
    inside = (slice(28 + round(20 * scale), 28 + round(28 * scale)), slice(round(20 * scale), round(28 * scale)))
    assert picture.shape == plain.shape and not np.array_equal(picture[inside], plain[inside])
    int8 = qz_core.get_model(NAMES[0], weights=str(small_checkpoint), quantize=True, backend="qnnpack", **SMALL, **FEW)
    qz_core.calibrate(int8, [TASK.transform(spec, None)(photo)[None]], progress=False)
    qz_core.save_quantized(qz_core.convert(int8), tmp_path / "int8.pt")
    assert names_instance_model(None, tmp_path / "int8.pt")  # `qz eval segmentation --int8 FILE` picks COCO mAP
    assert not names_instance_model("lraspp_mobilenet_v3_large", None)
    out = tmp_path / "out"
    image = str(coco_root / "val2017" / "b.png")
    assert main(["predict", image, "--int8", str(tmp_path / "int8.pt"), "--out", str(out)]) == 0
    [png] = out.glob("*.png")
    assert Image.open(png).width >= 72


class _Oracle(nn.Module):
    """An ``InstanceSegmenter`` that predicts given targets, shifted by ``shift`` pixels."""

    def __init__(self, targets: list[dict], shift: int = 0) -> None:
        super().__init__()
        self.targets, self.shift = targets, shift

    def instance_loss(self, images, targets):
        return torch.zeros(())

    def segment_instances(self, images, image_sizes):
        return [
            {
                "boxes": t["boxes"] + self.shift,
                "labels": t["category_ids"],
                "scores": torch.ones(len(t["boxes"])),
                "masks": t["masks"].roll((self.shift, self.shift), dims=(1, 2)).bool(),
            }
            for t in self.targets
        ]

    def export_module(self):
        return self

    def settle_random_weights(self, inputs):
        pass


def test_task_scores_instance_batches_by_coco_mask_map():
    images = torch.rand(2, 3, 64, 64)
    targets = random_instance_targets(images)
    batches = [InstanceBatch(images, targets)]
    perfect = TASK.score(_Oracle(targets), batches, progress=False)
    assert perfect["mask_map"] == pytest.approx(1.0) and perfect["box_map"] == pytest.approx(1.0)
    assert TASK.headline_key(qz_core.get_model_spec("maskrcnn_resnet50_fpn")) == "mask_map"
    assert TASK.headline_key(qz_core.get_model_spec("fcn_resnet50")) == TASK.score_key == "miou"
    shifted = TASK.score(_Oracle(targets, shift=8), batches, progress=False)
    assert shifted["mask_map"] < perfect["mask_map"] and shifted["box_map"] < perfect["box_map"]
    assert TASK.training_loss(_Oracle(targets), batches[0]).item() == 0.0
