"""The segmentation task on real photos: calibration and training layouts, batching, QAT, predict and draw."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos
from torch.utils.data import DataLoader
from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights

import qz_core
from qz_core import QzError
from qz_core.tools.testing import assert_cli_refuses, assert_task_commands_documented
from qz_segmentation import lraspp_mobilenet_v3_large
from qz_segmentation.task import TASK, SegmentationLogits

SIZE = 64  # the transform's shorter side here (the models' own is 520): small, fast tests
PHOTOS = {"astronaut": photos.astronaut, "coffee": photos.coffee, "chelsea": photos.chelsea}  # 512², 400x600, 300x451


@pytest.fixture(scope="module")
def spec():
    return qz_core.get_model_spec("lraspp_mobilenet_v3_large").variant(input_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def transform(spec):
    return TASK.transform(spec, None)


def _mask_of(image: np.ndarray) -> Image.Image:
    """Class 1 where the photo is bright, 0 elsewhere, a 255 (ignored) border."""
    mask = (image.mean(axis=2) > 128).astype(np.uint8)
    mask[:4], mask[-4:], mask[:, :4], mask[:, -4:] = 255, 255, 255, 255
    return Image.fromarray(mask, mode="L")


def _write_photos(folder, names=tuple(PHOTOS), masks=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(PHOTOS[name]()).save(folder / f"{name}.jpg")
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
            _mask_of(PHOTOS[name]()).save(masks / f"{name}.png")
    return folder


def _voc(root, names=("astronaut", "coffee")):
    _write_photos(root / "JPEGImages", names, masks=root / "SegmentationClass")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def test_calibration_reads_a_mixed_size_photo_folder_and_batches_it(tmp_path, spec, transform):
    folder = _write_photos(tmp_path / "calib")
    _write_photos(folder / ".thumbnails", ["astronaut"])  # hidden: skipped
    dataset = TASK.calibration_data(spec, folder, transform)
    assert len(dataset) == 3
    shapes = {tuple(dataset[i].shape) for i in range(3)}
    assert shapes == {(3, 64, 64), (3, 64, 96)}  # shorter side at SIZE, aspect ratio kept
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=TASK.collate)))
    assert batch.shape == (3, 3, 64, 96)
    astronaut = 0  # sorted names: astronaut, chelsea, coffee
    assert torch.equal(batch[astronaut, :, :, 64:], torch.zeros(3, 64, 32))  # padded with the mean colour
    model = lraspp_mobilenet_v3_large(quantize=True, backend="x86")
    loader = DataLoader(dataset, batch_size=2, collate_fn=TASK.collate)
    assert qz_core.calibrate(model, loader, inputs=TASK.model_inputs, progress=False) == 2


def test_calibration_errors_and_voc_images(tmp_path, spec, transform):
    with pytest.raises(QzError, match="does not exist"):
        TASK.calibration_data(spec, tmp_path / "nowhere", transform)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QzError, match="holds no images"):
        TASK.calibration_data(spec, tmp_path / "empty", transform)
    # A VOC layout: only JPEGImages/ calibrates, not the masks.
    assert len(TASK.calibration_data(spec, _voc(tmp_path / "voc"), transform)) == 2


def test_image_mask_pairs_are_transformed_jointly(tmp_path, spec, transform):
    _write_photos(tmp_path / "pairs" / "images", ["astronaut", "coffee"], masks=tmp_path / "pairs" / "masks")
    dataset = TASK.training_data(spec, tmp_path / "pairs", transform)
    image, mask = dataset[1]  # coffee, 400x600
    assert image.shape == (3, 64, 96) and mask.shape == (64, 96) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 255}
    images, masks = next(iter(DataLoader(dataset, batch_size=2, collate_fn=TASK.collate)))
    assert images.shape == (2, 3, 64, 96) and masks.shape == (2, 64, 96)
    assert (masks[0, :, 64:] == 255).all()  # padding is ignored by the loss


def test_training_layout_errors(tmp_path, spec, transform):
    pairs = tmp_path / "pairs"
    _write_photos(pairs / "images", ["astronaut", "coffee"], masks=pairs / "masks")
    _write_photos(pairs / "images", ["chelsea"])
    with pytest.raises(QzError, match=r"have no mask: masks/chelsea\.png"):
        TASK.training_data(spec, pairs, transform)
    (pairs / "images" / "chelsea.jpg").unlink()
    _mask_of(photos.chelsea()).save(pairs / "masks" / "coffee.png")
    dataset = TASK.training_data(spec, pairs, transform)
    with pytest.raises(QzError, match=r"coffee\.png' is 451x300 but its image .* is 600x400"):
        dataset[1]
    with pytest.raises(QzError, match="neither layout QAT reads"):
        TASK.training_data(spec, _write_photos(tmp_path / "flat", ["coffee"]), transform)


def test_voc_layout_trains(tmp_path, spec, transform):
    dataset = TASK.training_data(spec, _voc(tmp_path / "VOCdevkit" / "VOC2012"), transform)
    assert len(dataset) == 2 and dataset[0][1].shape == (64, 64)


def test_qat_with_the_task_loss_on_lraspp(tmp_path, spec, transform):
    torch.manual_seed(0)
    dataset = TASK.training_data(spec, _voc(tmp_path / "voc"), transform)
    loader = DataLoader(dataset, batch_size=2, collate_fn=TASK.collate)
    model = lraspp_mobilenet_v3_large(quantize=True, is_qat=True, num_classes=2, backend="x86")
    losses = qz_core.train_qat(model, loader, step_loss=TASK.training_loss, epochs=2, lr=1e-3, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    images, masks = TASK.example_training_batch(spec)
    assert images.shape == (2, 3, 64, 64) and masks.shape == (2, 64, 64)
    assert torch.isfinite(TASK.training_loss(model.train(), (images, masks)))


def test_predict_and_draw_at_the_photo_size(spec, transform):
    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large().eval()
    photo = Image.fromarray(photos.chelsea())
    [prediction] = TASK.predict(model, [photo], transform)
    assert prediction.shape == (300, 451) and prediction.dtype == torch.int64
    categories = LRASPP_MobileNet_V3_Large_Weights.DEFAULT.meta["categories"]
    picture = TASK.draw(photo, prediction, categories, "lraspp_mobilenet_v3_large")
    assert picture.size == (480, 319) and picture.mode == "RGB"  # small photos are enlarged to be legible
    large = photo.resize((902, 600))
    cat = torch.zeros(600, 902, dtype=torch.int64)
    cat[200:400, 300:600] = 8  # 'cat'
    drawn = np.asarray(TASK.draw(large, cat, categories, "a cat"), dtype=np.int64)
    assert drawn.shape == (600, 902, 3)  # large enough: drawn at its own size
    assert np.abs(drawn[300, 450] - np.asarray(large)[300, 450]).sum() > 30  # painted
    assert np.array_equal(drawn[300, 100], np.asarray(large)[300, 100])  # background left clear
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(SegmentationLogits(model)(x), model(x)["out"])
    assert isinstance(TASK.export_module(model), SegmentationLogits)


def test_commands():
    parser = argparse.ArgumentParser()
    TASK.add_eval_command(parser)
    args = parser.parse_args(["--data", "voc", "--split", "train", "--aux-loss"])
    assert args.split == "train" and args.aux_loss and callable(args.func)
    demo = argparse.ArgumentParser()
    assert TASK.add_demo_command(demo) is True
    assert callable(demo.parse_args(["--epochs", "2"]).func)


def test_eval_and_demo_options_all_have_help():
    assert_task_commands_documented(TASK)


@pytest.mark.parametrize(
    ("extra", "option", "value"),
    [
        (["--workers", "-1"], "--workers", "'-1'"),
        (["--limit", "-3"], "--limit", "'-3'"),
        (["--num-classes", "0"], "--num-classes", "'0'"),
        (["--calib-batches", "0"], "--calib-batches", "'0'"),
        (["--limit", "nan"], "--limit", "'nan'"),
    ],
)
def test_eval_refuses_bad_numbers_by_name(extra, option, value, capsys, monkeypatch):
    import importlib

    evaluate = importlib.import_module("qz_segmentation.evaluate")
    monkeypatch.setattr(evaluate, "evaluate_segmenter", lambda *a, **k: pytest.fail("the evaluation ran"))
    argv = ["eval", "segmentation", "--model", "lraspp_mobilenet_v3_large", "--data", "voc", *extra]
    assert assert_cli_refuses(argv, option, value.strip("'"), capsys).startswith("qz eval segmentation: error:")


def test_score_is_miou_pixel_accuracy_and_cross_entropy():
    masks = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    masks[:, :2] = 255
    perfect = torch.nn.functional.one_hot(masks.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 10

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, images):
            return {"out": self.logits}

    images = torch.rand(2, 3, 16, 16)
    best = TASK.score(Fixed(perfect), [(images, masks)], progress=False)
    assert best["miou"] == pytest.approx(100.0) and best["pixel_acc"] == pytest.approx(100.0)
    worse = TASK.score(Fixed(perfect.roll(1, dims=1)), [(images, masks)], progress=False)
    assert worse["miou"] == pytest.approx(0.0) and worse["loss"] > best["loss"]
    assert TASK.score_key in best
