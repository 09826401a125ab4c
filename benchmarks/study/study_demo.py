"""``nox -s study -- --task detection|segmentation``: the PTQ study on a canvas demo's trained model.

Runs ``qz demo --task TASK`` into ``--work`` once (real digits on scikit-image photos; the demo trains its
model in FP32 and writes the checkpoint and the canvases), then ``qz study`` on that checkpoint with the
demo's model, classes and image size: box mAP (YOLOv5nu) or mIoU (LR-ASPP) per configuration.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from qz_core.cli import main as qz_main

DEMO_MODULES = {"detection": "qz_detection.demo", "segmentation": "qz_segmentation.demo"}
AXES = Path(__file__).with_name("canvas_axes.yaml")


def study_argv(task: str, work: Path, out: Path, extra: list[str]) -> list[str]:
    """The ``qz study`` arguments for ``task``'s demo model, training it first if ``work`` has no checkpoint."""
    from qz_classification.canvas_demo import run_canvas_demo

    demo = importlib.import_module(DEMO_MODULES[task]).DEMO
    checkpoint = work / f"{demo.model}_{demo.image_size}px_fp32.pth"
    data = work / "data"
    if not checkpoint.is_file():
        result = run_canvas_demo(demo, out_dir=work)
        checkpoint = result.checkpoint
    argv = [demo.model, "--weights", str(checkpoint), "--num-classes", str(demo.num_classes)]
    argv += ["--input-size", str(demo.image_size), "--data", str(data / "val"), "--calib", str(data / "train")]
    return ["study", *argv, "--out", str(out), *(extra or ["--axes", str(AXES)])]


def main() -> int:
    """Parses ``--task``, ``--work`` and ``--out``; the rest goes to ``qz study`` (default: canvas_axes.yaml)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(DEMO_MODULES), required=True)
    parser.add_argument("--work", type=Path, required=True, help="folder for the demo's data and checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="the study's folder")
    args, extra = parser.parse_known_args()
    return qz_main(study_argv(args.task, args.work, args.out, extra))


if __name__ == "__main__":
    sys.exit(main())
