"""The segmentation package installs beside qz-core and registers through the qz.models entry point."""

from importlib.metadata import entry_points

import qz_core
import qz_segmentation


def test_entry_point_registers_package_with_core():
    assert qz_segmentation.__version__ == "0.1.0"
    values = {ep.value for ep in entry_points(group="qz.models")}
    assert "qz_segmentation.models" in values
    # Loading every plugin works, and the classification backbones come along as a dependency.
    assert "resnet50" in qz_core.list_models(task="classification")
    assert all(qz_core.get_model_entry(n).task == "segmentation" for n in qz_core.list_models(task="segmentation"))
