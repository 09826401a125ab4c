"""The detection package registers its models (qz.models) and its task (qz.tasks) with qz-core, import-light."""

import subprocess
import sys
from importlib.metadata import entry_points

import qz_core
import qz_detection
from qz_detection.task import TASK, DetectionTask


def test_entry_points_register_models_and_task_with_core():
    assert qz_detection.__version__ == "0.1.0"
    assert "qz_detection.models" in {ep.value for ep in entry_points(group="qz.models")}
    assert "qz_detection.task:TASK" in {ep.value for ep in entry_points(group="qz.tasks")}
    assert qz_core.get_task("detection") is TASK and isinstance(TASK, DetectionTask)
    assert TASK.metric == "box mAP"
    # Loading every plugin works, and the classification backbones come along as a dependency.
    assert "resnet50" in qz_core.list_models(task="classification")
    names = qz_core.list_models(task="detection")
    ours = [n for n in names if qz_core.get_model_builder(n).__module__.startswith("qz_detection.models")]
    assert len(ours) == 34 and all(qz_core.get_model_spec(n).task == "detection" for n in names)


def test_models_and_list_do_not_import_ultralytics_pycocotools_or_matplotlib():
    code = (
        "import sys, qz_detection.models, qz_detection.task, qz_core; qz_core.list_models(); "
        "qz_core.get_model_spec('yolov5nu'); "
        "print(sorted(m for m in ('ultralytics', 'pycocotools', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
