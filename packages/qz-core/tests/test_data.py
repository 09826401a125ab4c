import numpy as np
import pytest
from PIL import Image

from qz_core import QzError, image_dataset, read_rgb


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_hidden_folders_and_files_are_skipped(tmp_path):
    rgb = np.full((8, 8, 3), 100, np.uint8)
    _save(tmp_path / "calib" / "a.png", rgb)
    _save(tmp_path / "calib" / ".ipynb_checkpoints" / "a-checkpoint.png", rgb)
    _save(tmp_path / "calib" / ".hidden.png", rgb)
    dataset = image_dataset(tmp_path / "calib")
    assert [p.name for p in dataset.files] == ["a.png"]  # flat: the checkpoint folder is not a class
    _save(tmp_path / "train" / "cat" / "1.png", rgb)
    _save(tmp_path / "train" / ".ipynb_checkpoints" / "1.png", rgb)
    _save(tmp_path / "train" / "dog" / ".1.png", rgb)
    _save(tmp_path / "train" / "dog" / "2.png", rgb)
    labelled = image_dataset(tmp_path / "train", labeled=True)
    assert labelled.classes == ["cat", "dog"] and len(labelled) == 2


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    image = np.asarray(read_rgb(path))
    assert image.shape == (8, 8, 3) and image.min() == 0 and image.max() == 255
    assert len(np.unique(image[..., 0])) > 32  # a ramp, not a wall of 255


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "calib" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    dataset = image_dataset(tmp_path / "calib")
    with pytest.raises(QzError, match=r"Cannot read image '.*broken\.jpg'"):
        dataset[0]
