"""The segmentation package registers its task and six models with qz-core through entry points."""

from importlib.metadata import entry_points

from torchvision.models import segmentation as tvseg
from torchvision.transforms._presets import SemanticSegmentation

import qz_core
import qz_segmentation
from qz_segmentation.task import TASK

EXPECTED = {
    "fcn_resnet50": ("fcn", tvseg.FCN_ResNet50_Weights),
    "fcn_resnet101": ("fcn", tvseg.FCN_ResNet101_Weights),
    "deeplabv3_resnet50": ("deeplabv3", tvseg.DeepLabV3_ResNet50_Weights),
    "deeplabv3_resnet101": ("deeplabv3", tvseg.DeepLabV3_ResNet101_Weights),
    "deeplabv3_mobilenet_v3_large": ("deeplabv3", tvseg.DeepLabV3_MobileNet_V3_Large_Weights),
    "lraspp_mobilenet_v3_large": ("lraspp", tvseg.LRASPP_MobileNet_V3_Large_Weights),
}


def test_entry_points_register_package_with_core():
    assert qz_segmentation.__version__ == "0.1.0"
    assert "qz_segmentation.models" in {ep.value for ep in entry_points(group="qz.models")}
    assert "qz_segmentation.task:TASK" in {ep.value for ep in entry_points(group="qz.tasks")}
    assert qz_core.get_task("segmentation") is TASK and TASK.metric == "mIoU"
    # Loading every plugin works, and the classification backbones come along as a dependency.
    assert "resnet50" in qz_core.list_models(task="classification")
    assert all(qz_core.get_model_task(n) is TASK for n in qz_core.list_models(task="segmentation"))


def test_every_segmenter_is_registered_with_its_spec():
    # Test stubs and the demo's sized copies (defined outside the models package) may be registered beside them.
    names = qz_core.list_models(task="segmentation")
    ours = {n for n in names if qz_core.get_model_builder(n).__module__.startswith("qz_segmentation.models")}
    assert ours == set(EXPECTED) | {"maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"}  # Mask R-CNN: test_mask_rcnn
    for name, (family, weights) in EXPECTED.items():
        spec = qz_core.get_model_spec(name)
        assert spec.weights_enum is weights and spec.family == family
        assert spec.input_size == (520, 520) and spec.deployed_ratio_target == 0.4
        assert spec.transient_kwargs == ("weights_backbone",)
        # Without enum weights qz uses the task's default: torchvision's own preset, as the weights bring.
        transform = qz_core.get_model_transforms(name)
        assert isinstance(transform, SemanticSegmentation) and transform.resize_size == [520]
        assert repr(transform) == repr(weights.DEFAULT.transforms())
        assert getattr(qz_segmentation, name) is qz_core.get_model_builder(name)
