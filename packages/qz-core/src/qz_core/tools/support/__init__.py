"""The support matrix: what works for each model (``probe_model``), its results and its table."""

from qz_core.tools.support.probe import DEFAULT_ENGINES, float_difference, probe_model, run_support
from qz_core.tools.support.render import support_markdown, write_support_outputs
from qz_core.tools.support.results import SupportResult, read_support_json, write_support_json

__all__ = [
    "DEFAULT_ENGINES",
    "SupportResult",
    "float_difference",
    "probe_model",
    "read_support_json",
    "run_support",
    "support_markdown",
    "write_support_json",
    "write_support_outputs",
]
