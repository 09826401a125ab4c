"""The benchmark: FP32 vs INT8 latency in eager PyTorch, onnxruntime and OpenVINO (run), other quantizers timed
beside qz (anchors), its results, its tables and plots (render), and the ``qz bench`` command (cli).
"""

from qz_core.tools.bench.render import bench_markdown, bench_summary_markdown, write_bench_outputs
from qz_core.tools.bench.results import RUNNERS, BenchRow, read_bench_json, write_bench_csv, write_bench_json
from qz_core.tools.bench.run import run_benchmark, torchvision_int8, torchvision_quantizable

__all__ = [
    "RUNNERS",
    "BenchRow",
    "bench_markdown",
    "bench_summary_markdown",
    "read_bench_json",
    "run_benchmark",
    "torchvision_int8",
    "torchvision_quantizable",
    "write_bench_csv",
    "write_bench_json",
    "write_bench_outputs",
]
