"""qz-core: the quantization workflow shared by every qz model family."""

from qz_core.backend import platform_backend, resolve_backend, set_backend, supported_backends
from qz_core.builder import (
    BuildContext,
    BuildRecipe,
    LoadedWeights,
    ModelBuilder,
    ModelSpec,
    QuantOptions,
    build_model,
    define_model,
    prepare_built,
    prepare_quantizable,
    recipe_of,
)
from qz_core.data import image_dataset, image_files, image_loader, read_rgb
from qz_core.errors import QzError
from qz_core.files import atomic_path, write_atomic
from qz_core.fusion import FUSE_LEVELS, fuse_in_blocks, fuse_modules, fuse_sequentials, sequential_fusion_groups
from qz_core.job import ModelSource, QuantizeRequest, QuantizeResult, export_model, predict_images, quantize_model
from qz_core.measure import Latency, compare_latency, measure_latency, model_size_mb, timing_setup, timing_state
from qz_core.modules import QuantizableSiLU, QuantizableSqueezeExcitation, replace_silu
from qz_core.onnx_export import OnnxReport, export_onnx, run_onnx
from qz_core.partial import FloatIsland, count_float_islands
from qz_core.qconfig import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS, make_qconfig
from qz_core.registry import (
    get_model,
    get_model_builder,
    get_model_spec,
    get_model_task,
    get_model_transforms,
    get_model_weights,
    get_task,
    list_models,
    list_tasks,
    register_task,
)
from qz_core.task import Task
from qz_core.weights import load_state_dict_strict, read_checkpoint, resolve_weights
from qz_core.workflow import (
    calibrate,
    convert,
    ensure_calibrated,
    estimate_bn_stats,
    is_quantized,
    load_quantized,
    save_quantized,
    train_qat,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATION_OBSERVERS",
    "FUSE_LEVELS",
    "WEIGHT_OBSERVERS",
    "BuildContext",
    "BuildRecipe",
    "FloatIsland",
    "Latency",
    "LoadedWeights",
    "ModelBuilder",
    "ModelSource",
    "ModelSpec",
    "OnnxReport",
    "QuantOptions",
    "QuantizableSiLU",
    "QuantizableSqueezeExcitation",
    "QuantizeRequest",
    "QuantizeResult",
    "QzError",
    "Task",
    "atomic_path",
    "build_model",
    "calibrate",
    "compare_latency",
    "convert",
    "count_float_islands",
    "define_model",
    "ensure_calibrated",
    "estimate_bn_stats",
    "export_model",
    "export_onnx",
    "fuse_in_blocks",
    "fuse_modules",
    "fuse_sequentials",
    "get_model",
    "get_model_builder",
    "get_model_spec",
    "get_model_task",
    "get_model_transforms",
    "get_model_weights",
    "get_task",
    "image_dataset",
    "image_files",
    "image_loader",
    "is_quantized",
    "list_models",
    "list_tasks",
    "load_quantized",
    "load_state_dict_strict",
    "make_qconfig",
    "measure_latency",
    "model_size_mb",
    "platform_backend",
    "predict_images",
    "prepare_built",
    "prepare_quantizable",
    "quantize_model",
    "read_checkpoint",
    "read_rgb",
    "recipe_of",
    "register_task",
    "replace_silu",
    "resolve_backend",
    "resolve_weights",
    "run_onnx",
    "save_quantized",
    "sequential_fusion_groups",
    "set_backend",
    "supported_backends",
    "timing_setup",
    "timing_state",
    "train_qat",
    "write_atomic",
]
