"""The segmentation package registers its six models with qz-core through the qz.models entry point."""

from importlib.metadata import entry_points

from torchvision.models import segmentation as tvseg
from torchvision.transforms._presets import SemanticSegmentation

import qz_core
import qz_segmentation
from qz_segmentation import SegmentationLoss

EXPECTED = {
    "fcn_resnet50": ("fcn", tvseg.FCN_ResNet50_Weights),
    "fcn_resnet101": ("fcn", tvseg.FCN_ResNet101_Weights),
    "deeplabv3_resnet50": ("deeplabv3", tvseg.DeepLabV3_ResNet50_Weights),
    "deeplabv3_resnet101": ("deeplabv3", tvseg.DeepLabV3_ResNet101_Weights),
    "deeplabv3_mobilenet_v3_large": ("deeplabv3", tvseg.DeepLabV3_MobileNet_V3_Large_Weights),
    "lraspp_mobilenet_v3_large": ("lraspp", tvseg.LRASPP_MobileNet_V3_Large_Weights),
}


def test_entry_point_registers_package_with_core():
    assert qz_segmentation.__version__ == "0.1.0"
    values = {ep.value for ep in entry_points(group="qz.models")}
    assert "qz_segmentation.models" in values
    # Loading every plugin works, and the classification backbones come along as a dependency.
    assert "resnet50" in qz_core.list_models(task="classification")
    assert all(qz_core.get_model_entry(n).task == "segmentation" for n in qz_core.list_models(task="segmentation"))


def test_every_segmenter_is_registered_with_its_metadata():
    # Test stubs (qz_test_*) may be registered beside them.
    assert set(qz_core.list_models(task="segmentation", exclude="qz_test_*")) == set(EXPECTED)
    for name, (family, weights) in EXPECTED.items():
        entry = qz_core.get_model_entry(name)
        assert entry.weights is weights
        assert entry.meta["family"] == family
        assert entry.input_size == (520, 520)
        assert entry.meta["deployed_ratio_target"] == 0.4
        assert entry.meta["qat_loss"] is SegmentationLoss
        transform = entry.meta["default_transforms"]()
        assert isinstance(transform, SemanticSegmentation) and transform.resize_size == [520]
        # Without enum weights qz falls back to the family default: torchvision's own preset.
        assert qz_core.get_model_transforms(name).resize_size == [520]
        assert getattr(qz_segmentation, name) is entry.builder
