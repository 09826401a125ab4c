"""ImageNet evaluation: synset mapping, top-1/top-5 on a fixture with known answers, errors, `qz eval`."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from qz_classification.evaluate import evaluate_classifier, topk_accuracy
from qz_classification.imagenet import imagenet_folder, imagenet_synsets, read_class_index
from qz_core import ModelSpec, QzError, calibrate, convert, define_model, get_model, load_quantized, save_quantized
from qz_core.cli import main
from qz_core.registry import unregister_model

STUB = "qz_test_pattern_classifier"
# Three synsets whose torchvision indices are known from torchvision's category names:
# tench (0), crane bird (134), toilet tissue (999).
TENCH, CRANE, TISSUE = "n01440764", "n02012849", "n15075141"
KNOWN = {TENCH: 0, CRANE: 134, TISSUE: 999}
# Per class, offsets k: the stub predicts p = label - k and ranks p, p+1, ..., p+4 (mod 1000) as its
# top five. k=0 is a top-1 hit; 1 <= k <= 4 a top-5-only hit; anything else a miss.
OFFSETS = {TENCH: [0, 0, 4, 5], CRANE: [0, 1, -1], TISSUE: [0, 3, 500]}
TOP1, TOP5 = 100 * 4 / 10, 100 * 7 / 10  # counted by hand from OFFSETS: 2+1+1 hits, 3+2+2 in top five


class PatternClassifier(nn.Module):
    """Reads its prediction p from pixel (0, 0) (p = 256 * red + green); logit of class c is -((c - p) % n)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        predicted = x[:, 0, 0, 0].long() * 256 + x[:, 1, 0, 0].long()
        classes = torch.arange(self.num_classes)
        return -((classes.view(1, -1) - predicted.view(-1, 1)) % self.num_classes).float()


@pytest.fixture(scope="module", autouse=True)
def _pattern_stub():
    """The stub classifier, registered as a classification model (no weights enum, tensor preprocessing)."""
    spec = ModelSpec(
        name=STUB, task="classification", family="test", make_model=PatternClassifier, preprocess=lambda: pil_to_tensor
    )
    define_model(spec)
    yield
    unregister_model(STUB)


def _write(path, predicted: int, size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), (7, 7, 7))
    image.putpixel((0, 0), (predicted // 256, predicted % 256, 0))
    image.save(path)


def _pattern_folder(root, names=None):
    """The OFFSETS fixture; folders named by synset, or by ``names[synset]``."""
    for synset, offsets in OFFSETS.items():
        for i, k in enumerate(offsets):
            _write(root / (names or {}).get(synset, synset) / f"{i}.png", (KNOWN[synset] - k) % 1000)
    return root


def test_synset_list_is_torchvisions_class_order():
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and list(synsets) == sorted(set(synsets))
    assert all(synsets.index(s) == i for s, i in KNOWN.items())
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert [weights.meta["categories"][i] for i in KNOWN.values()] == ["tench", "crane bird", "toilet tissue"]


def test_top1_top5_known_by_construction(tmp_path):
    data = _pattern_folder(tmp_path / "imagenet")
    result = evaluate_classifier(STUB, data=data, batch_size=3, workers=2, progress=False)
    assert result.fp32.top1 == pytest.approx(TOP1) and result.fp32.top5 == pytest.approx(TOP5)
    assert (result.images, result.num_classes, result.int8) == (10, 1000, None)
    assert result.labels == "ImageNet-1k synset ids"


def test_folder_order_is_not_the_label(tmp_path):
    # ImageFolder would label the three folders 0, 1, 2: the synset mapping must not.
    dataset = imagenet_folder(_pattern_folder(tmp_path))
    assert dataset.class_to_idx == KNOWN
    assert sorted(set(dataset.targets)) == [0, 134, 999]


def test_val_subfolder_index_folders_and_limit(tmp_path):
    index_names = {s: str(i) for s, i in KNOWN.items()}
    _pattern_folder(tmp_path / "val", index_names)
    result = evaluate_classifier(STUB, data=tmp_path, batch_size=4, progress=False)
    assert (result.fp32.top1, result.fp32.top5) == pytest.approx((TOP1, TOP5))
    assert result.labels == "class indices" and result.data == str(tmp_path / "val")
    limited = evaluate_classifier(STUB, data=tmp_path, limit=5, progress=False)
    assert limited.images == 5 and limited.fp32.top5 <= 100


def test_class_index_file(tmp_path):
    _write(tmp_path / "data" / "dog" / "a.png", 0)  # dog is class 0: hit
    _write(tmp_path / "data" / "cat" / "b.png", 0)  # cat is class 1: top-1 miss, top-5 hit
    _write(tmp_path / "data" / "cat" / "c.png", 1)  # hit
    (tmp_path / "classes.txt").write_text("# folder names in class order\ndog\ncat\n")
    assert read_class_index(tmp_path / "classes.txt") == {"dog": 0, "cat": 1}
    result = evaluate_classifier(
        STUB, data=tmp_path / "data", class_index=tmp_path / "classes.txt", num_classes=2, progress=False
    )
    assert (result.fp32.top1, result.fp32.top5) == pytest.approx((200 / 3, 100.0))


def test_topk_accuracy_counts_batches():
    logits = torch.tensor([[0.0, 3.0, 2.0], [5.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 2.0]])
    labels = torch.tensor([1, 1, 0, 1])  # top-1 hit, top-2 hit, miss, miss
    batches = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    assert topk_accuracy(nn.Identity(), batches, (1, 2), progress=False) == {"top1": 25.0, "top2": 50.0}


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("flat", "holds images but no class folders"),
        ("no_images", "holds no images"),
        ("unknown", r"'n99999999'.*1000 valid ImageNet-1k synset ids"),
        ("typo", r"'n0144076x'.*Did you mean 'n01440764'"),
        ("out_of_range", r"'12'.*class 12.*10 classes"),
    ],
)
def test_folder_errors(tmp_path, layout, message):
    data = tmp_path / "val_data"
    if layout != "missing":
        data.mkdir()
    if layout == "flat":
        _write(data / "x.png", 0)
    elif layout == "no_images":
        (data / TENCH).mkdir()
        (data / TENCH / "notes.txt").write_text("no images here")
    elif layout == "unknown":
        _write(data / TENCH / "x.png", 0)
        _write(data / "n99999999" / "x.png", 0)
    elif layout == "typo":
        _write(data / "n0144076x" / "x.png", 0)
    elif layout == "out_of_range":
        _write(data / "3" / "x.png", 0)
        _write(data / "12" / "x.png", 0)
    with pytest.raises(QzError, match=message):
        evaluate_classifier(STUB, data=data, num_classes=10, progress=False)


def test_bad_arguments(tmp_path):
    data = _pattern_folder(tmp_path)
    with pytest.raises(QzError, match=r"Invalid quantize mode 'qat'.*ptq"):
        evaluate_classifier(STUB, data=data, quantize="qat")
    with pytest.raises(QzError, match="limit must be at least 1; got 0"):
        evaluate_classifier(STUB, data=data, limit=0)
    with pytest.raises(QzError, match="'n01440764' .*not in the class index file, which names 1 classes"):
        evaluate_classifier(STUB, data=data, class_index={"dog": 0})


GOLDFISH = "n01443537"
# Bright images are tench (class 0), dark ones goldfish (class 1); one bright image sits in goldfish's folder.
FOLDERS = {TENCH: ["bright", "bright"], GOLDFISH: ["dark", "bright"]}


def _photo(kind: str, generator: torch.Generator) -> Image.Image:
    low = 150 if kind == "bright" else 0
    pixels = torch.randint(low, low + 106, (40, 48, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@torch.no_grad()
def _brightness_classifier(folder: torchvision.datasets.ImageFolder) -> nn.Module:
    """A random-weight resnet18 whose fc separates bright (tench) from dark (goldfish) images."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    fc, model.fc = model.fc, nn.Identity()
    features = {kind: [] for kind in ("bright", "dark")}
    for (image, _), path in zip(folder, folder.imgs, strict=True):
        features["dark" if "dark" in path[0] else "bright"].append(model(image[None])[0])
    bright, dark = (torch.stack(f).mean(0) for f in features.values())
    direction = (bright - dark) / (bright - dark).norm() * 10
    middle = float(direction @ (bright + dark) / 2)
    fc.weight.zero_()
    fc.bias.fill_(-100.0)
    fc.weight[0], fc.weight[1] = direction, -direction
    fc.bias[0], fc.bias[1] = -middle, middle
    model.fc = fc
    return model


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory):
    """A resnet18 checkpoint that scores 75% top-1 on its 2-synset folder of 4 images (100% top-5)."""
    root = tmp_path_factory.mktemp("resnet")
    generator = torch.Generator().manual_seed(0)
    for synset, kinds in FOLDERS.items():
        (root / "data" / synset).mkdir(parents=True)
        for i, kind in enumerate(kinds):
            _photo(kind, generator).save(root / "data" / synset / f"{i}_{kind}.jpg")
    preset = torchvision.transforms._presets.ImageClassification(crop_size=224)
    model = _brightness_classifier(torchvision.datasets.ImageFolder(str(root / "data"), transform=preset))
    checkpoint = root / "resnet18.pth"
    torch.save(model.state_dict(), checkpoint)
    return checkpoint, root / "data"


def test_class_count_must_match_weights(resnet_files, tmp_path):
    _, data = resnet_files
    checkpoint = tmp_path / "resnet18_10.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), checkpoint)
    with pytest.raises(QzError, match=r"ImageNet-1k synset ids \(1000 classes\), but the model has 10 classes"):
        evaluate_classifier("resnet18", weights=checkpoint, num_classes=10, data=data, progress=False)


def test_cli_eval_ptq_fp32_and_int8(resnet_files, tmp_path, capsys):
    checkpoint, data = resnet_files
    out = tmp_path / "eval.json"
    argv = ["eval", "classification", "--model", "resnet18", "--weights", str(checkpoint), "--data", str(data)]
    argv += ["--quantize", "ptq", "--activation-observer", "minmax", "--batch-size", "2", "--workers", "0"]
    argv += ["--json", str(out), "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "FP32" in table and "INT8 PTQ" in table and "held out" in table
    result = json.loads(out.read_text())
    assert result["images"] == 3  # one of the four images calibrates and is not evaluated
    for row in ("fp32", "int8"):
        assert 0 <= result[row]["top1"] <= result[row]["top5"] <= 100
    assert result["delta"]["top1"] == pytest.approx(result["int8"]["top1"] - result["fp32"]["top1"])


def test_cli_eval_int8_file_matches_direct_evaluation(resnet_files, tmp_path, capsys):
    checkpoint, data = resnet_files
    int8 = tmp_path / "resnet18_int8.pt"
    # min/max observers: histogram ones make load_quantized's convert slow (see the qz-core note).
    prepared = get_model("resnet18", weights=str(checkpoint), quantize=True, activation_observer="minmax")
    calibrate(prepared, [torch.rand(2, 3, 224, 224) * 4 - 2], progress=False)
    save_quantized(convert(prepared), int8)
    argv = ["eval", "classification", "--int8", str(int8), "--weights", str(checkpoint), "--data", str(data)]
    assert main([*argv, "--workers", "0", "--json", "-", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{") :])
    assert result["model"] == "resnet18" and result["images"] == 4 and result["int8_source"] == str(int8)

    # FP32 by hand: torchvision's resnet18, its ImageNet preprocessing, labels 0 and 1 by synset.
    model = torchvision.models.resnet18().eval()
    model.load_state_dict(torch.load(checkpoint))
    folder = torchvision.datasets.ImageFolder(
        str(data), transform=torchvision.transforms._presets.ImageClassification(crop_size=224)
    )
    expected = topk_accuracy(model, torch.utils.data.DataLoader(folder, batch_size=4), progress=False)
    assert result["fp32"]["top1"] == pytest.approx(expected["top1"]) == pytest.approx(75.0)
    assert result["fp32"]["top5"] == pytest.approx(expected["top5"]) == pytest.approx(100.0)
    assert result["int8"] is not None and "INT8" in printed
    int8_expected = topk_accuracy(load_quantized(int8), torch.utils.data.DataLoader(folder, batch_size=4))
    assert result["int8"]["top1"] == pytest.approx(int8_expected["top1"])
