"""ClassificationTask: the folders it reads (real mixed-size photos), its loss, predictions, drawings and commands."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos
from torch.utils.data import DataLoader
from torchvision.models import ResNet18_Weights

from qz_classification.task import TASK, Classification, ClassificationTask, drawing_size
from qz_core import QzError, get_model, get_model_spec, get_task
from qz_core.tools.testing import assert_cli_refuses, assert_task_commands_documented

CATEGORIES = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


def _save(array, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    """Three real photos of three sizes (JPEG and PNG), plus what a notebook and a Mac leave behind."""
    root = tmp_path_factory.mktemp("flat")
    _save(photos.astronaut(), root / "astronaut.jpg")  # 512x512
    _save(photos.coffee(), root / "coffee.png")  # 600x400
    _save(photos.chelsea(), root / "chelsea.jpeg")  # 451x300
    _save(photos.chelsea(), root / ".ipynb_checkpoints" / "chelsea-checkpoint.jpg")
    _save(photos.coffee(), root / "._coffee.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """The same photos in an ImageFolder layout, with hidden folders at the top and inside a class."""
    root = tmp_path_factory.mktemp("classes")
    _save(photos.chelsea(), root / "cat" / "chelsea.jpg")
    _save(photos.coffee(), root / "cup" / "coffee.png")
    _save(photos.astronaut(), root / "person" / "astronaut.jpg")
    _save(photos.astronaut(), root / "person" / ".ipynb_checkpoints" / "astronaut-checkpoint.jpg")
    _save(photos.coffee(), root / ".ipynb_checkpoints" / "coffee-checkpoint.png")
    return root


@pytest.fixture(scope="module")
def spec():
    return get_model_spec("resnet18")


def test_the_installed_task_is_this_one():
    assert get_task("classification") is TASK and isinstance(TASK, ClassificationTask)
    assert (TASK.name, TASK.metric) == ("classification", "top-1")


def test_calibration_reads_a_flat_folder_of_mixed_size_photos(flat_folder, spec):
    dataset = TASK.calibration_data(spec, flat_folder, TASK.transform(spec, None))
    assert [p.name for p in dataset.files] == ["astronaut.jpg", "chelsea.jpeg", "coffee.png"]
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=TASK.collate)))
    inputs = TASK.model_inputs(batch)
    assert inputs.shape == (3, 3, 224, 224) and inputs.dtype == torch.float32
    assert inputs.std() > 0.1  # real pixels, normalized


def test_calibration_and_training_read_class_folders_without_hidden_ones(class_folders, spec):
    transform = TASK.transform(spec, None)
    for dataset in (
        TASK.calibration_data(spec, class_folders, transform),
        TASK.training_data(spec, class_folders, transform),
    ):
        assert dataset.classes == ["cat", "cup", "person"]
        assert sorted((p.split("/")[-1], label) for p, label in dataset.samples) == [
            ("astronaut.jpg", 2),
            ("chelsea.jpg", 0),
            ("coffee.png", 1),
        ]
    images, labels = next(iter(DataLoader(dataset, batch_size=3, collate_fn=TASK.collate)))
    assert images.shape == (3, 3, 224, 224) and sorted(labels.tolist()) == [0, 1, 2]


def test_folder_errors(flat_folder, tmp_path, spec):
    transform = TASK.transform(spec, None)
    with pytest.raises(QzError, match=r"training folder .* has no class folders: labels come from DIR/CLASS/IMAGE"):
        TASK.training_data(spec, flat_folder, transform)
    with pytest.raises(QzError, match="calibration folder .*missing' does not exist"):
        TASK.calibration_data(spec, tmp_path / "missing", transform)
    (tmp_path / "empty" / ".ipynb_checkpoints").mkdir(parents=True)
    with pytest.raises(QzError, match="calibration folder .* holds no images"):
        TASK.calibration_data(spec, tmp_path / "empty", transform)
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    with pytest.raises(QzError, match="training folder .*cat"):
        TASK.training_data(spec, tmp_path / "classes", transform)


def test_training_loss_is_cross_entropy_and_takes_aux_outputs(class_folders, spec):
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=3).train()
    batch = next(iter(DataLoader(TASK.training_data(spec, class_folders, TASK.transform(spec, None)), batch_size=3)))
    loss = TASK.training_loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    googlenet_spec = get_model_spec("googlenet")
    googlenet = get_model("googlenet", num_classes=10).train()  # training output: (logits, aux2, aux1)
    inputs, targets = TASK.example_training_batch(googlenet_spec)
    assert inputs.shape == (2, 3, 224, 224) and targets.tolist() == [0, 0]
    assert torch.isfinite(TASK.training_loss(googlenet, (inputs, targets)))


def test_predict_and_draw_a_real_photo(spec):
    torch.manual_seed(0)
    model = get_model("resnet18")
    cat = Image.fromarray(photos.chelsea())  # 451x300
    predictions = TASK.predict(model, [cat, Image.fromarray(photos.coffee())], TASK.transform(spec, None))
    assert len(predictions) == 2 and all(isinstance(p, Classification) for p in predictions)
    top = predictions[0]
    assert len(top.indices) == len(top.probabilities) == 5 and all(0 <= i < 1000 for i in top.indices)
    assert list(top.probabilities) == sorted(top.probabilities, reverse=True) and sum(top.probabilities) <= 1 + 1e-6
    picture = TASK.draw(cat, top, CATEGORIES, "resnet18 (random weights)")
    assert isinstance(picture, Image.Image) and picture.mode == "RGB"
    assert picture.size == drawing_size(cat.size) == (384 + 320, 28 + 255)  # 384 px long side, panel, title
    panel = np.asarray(picture.crop((384, 28, 704, 283)))
    assert (panel < 250).any()  # bars and text are drawn
    assert picture.getpixel((200, 150)) != (255, 255, 255)  # the photo is there


def test_draw_without_class_names_and_few_classes():
    image = Image.new("RGB", (40, 100), (10, 200, 30))
    picture = TASK.draw(image, Classification((1, 0), (0.75, 0.25)), None, "two classes")
    assert picture.size == drawing_size((40, 100), rows=2) == (154 + 320, 28 + 384)


def test_eval_and_demo_commands_parse():
    parser = argparse.ArgumentParser()
    TASK.add_eval_command(parser)
    args = parser.parse_args(["--model", "resnet18", "--data", "val", "--quantize", "ptq", "--class-index", "c.txt"])
    assert (args.model, args.quantize, args.class_index, args.batch_size) == ("resnet18", "ptq", "c.txt", 64)
    assert callable(args.func)
    parser = argparse.ArgumentParser()
    assert TASK.add_demo_command(parser) is True
    args = parser.parse_args(["--epochs", "1", "--image-size", "32"])
    assert (args.model, args.epochs, args.image_size, args.data) == ("resnet18", 1, 32, None) and callable(args.func)


def test_task_module_is_import_light():
    code = (
        "import sys, qz_classification.task; "
        "heavy = {'qz_classification.models', 'qz_classification.evaluate', 'qz_classification.demo', "
        "'ultralytics', 'matplotlib', 'pycocotools', 'sklearn'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_eval_and_demo_options_all_have_help():
    assert_task_commands_documented(TASK)


def _fail(*args, **kwargs):
    pytest.fail("the evaluation or demo ran")


@pytest.mark.parametrize(
    ("argv", "option", "value"),
    [
        (["eval", "classification", "--data", "d", "--batch-size", "0"], "--batch-size", "'0'"),
        (["eval", "classification", "--data", "d", "--workers", "-1"], "--workers", "'-1'"),
        (["eval", "classification", "--data", "d", "--limit", "0"], "--limit", "'0'"),
        (["eval", "classification", "--data", "d", "--limit", "-2"], "--limit", "'-2'"),
        (["eval", "classification", "--data", "d", "--num-classes", "0"], "--num-classes", "'0'"),
        (["demo", "--task", "classification", "--qat-epochs", "0"], "--qat-epochs", "'0'"),
        (["demo", "--task", "classification", "--epochs", "-1"], "--epochs", "'-1'"),
        (["demo", "--task", "classification", "--image-size", "-64"], "--image-size", "'-64'"),
        (["demo", "--task", "classification", "--calib-batches", "0"], "--calib-batches", "'0'"),
    ],
)
def test_cli_refuses_bad_numbers_by_name(argv, option, value, capsys, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("qz_classification.evaluate"), "evaluate_classifier", _fail)
    monkeypatch.setattr(importlib.import_module("qz_classification.demo"), "run_demo", _fail)
    assert_cli_refuses(argv, option, value.strip("'"), capsys)


def test_cli_refuses_a_class_index_past_num_classes(tmp_path, capsys, monkeypatch):
    import importlib

    from qz_core.cli import main

    monkeypatch.setattr(importlib.import_module("qz_classification.evaluate"), "evaluate_classifier", _fail)
    index = tmp_path / "classes.json"
    index.write_text('{"cat": 0, "dog": 3, "fox": 1}')
    argv = ["eval", "classification", "--model", "resnet18", "--data", str(tmp_path), "--class-index", str(index)]
    assert main([*argv, "--num-classes", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--class-index" in err and "'dog' to class 3" in err and "--num-classes is 3 (valid indices 0..2)" in err
    reached = []
    monkeypatch.setattr("qz_core.cli.evaluation.report_eval", lambda result, target: reached.append(result) or 0)
    monkeypatch.setattr(importlib.import_module("qz_classification.evaluate"), "evaluate_classifier", lambda *a, **k: k)
    assert main([*argv, "--num-classes", "4"]) == 0
    assert reached[0]["num_classes"] == 4 and reached[0]["class_index"] == str(index)


class _Oracle(torch.nn.Module):
    """Logits ranking the label first for the first ``right`` images of a batch, else second."""

    def __init__(self, labels: torch.Tensor, right: int) -> None:
        super().__init__()
        self.labels, self.right = labels, right

    def forward(self, images):
        chosen = self.labels.clone()
        chosen[self.right :] = (self.labels[self.right :] + 1) % 10
        one_hot = torch.nn.functional.one_hot
        return one_hot(chosen, 10).float() * 5 + one_hot(self.labels, 10).float() * 2


def test_score_is_top1_top5_and_cross_entropy():
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 3, 7, 9])
    scores = TASK.score(_Oracle(labels, right=3), [(images, labels)], progress=False)
    assert scores["top1"] == pytest.approx(75.0) and scores["top5"] == pytest.approx(100.0)
    expected = torch.nn.functional.cross_entropy(_Oracle(labels, right=3)(images), labels)
    assert scores["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert TASK.score_key == "top1"
    with pytest.raises(QzError, match="empty"):
        TASK.score(_Oracle(labels, right=3), [], progress=False)
