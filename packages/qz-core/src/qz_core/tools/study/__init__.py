"""``qz study`` and ``qz sensitivity``: the seed PTQ study (fusion, observers, start stage, calibration) as one
command for any task's model, and per-layer quantization sensitivity.

Tooling, not library: ``axes`` turns sweeps into configurations, ``runner`` builds, scores, times and
caches rows, ``render`` writes tables, CSVs and plots, ``cli`` parses the commands.
"""

from qz_core.tools.study.axes import SWEEPS, RowConfig, StudyPlan, make_plan, read_axes_file, stage_names
from qz_core.tools.study.runner import Row, StudyInputs, StudyResult, StudySession, run_study

__all__ = [
    "SWEEPS",
    "Row",
    "RowConfig",
    "StudyInputs",
    "StudyPlan",
    "StudyResult",
    "StudySession",
    "make_plan",
    "read_axes_file",
    "run_study",
    "stage_names",
]
